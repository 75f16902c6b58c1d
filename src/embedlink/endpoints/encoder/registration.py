"""Keeping an encoder rank registered with its bootstrap server.

The first registration happens in ``start()``, on the caller's thread, so
that a bootstrap server that cannot be reached is an error at start-up. A
bootstrap server keeps its registry in memory: restarted (an upgrade, a
crash), it knows no encoder, and language ranks that have not cached the
route yet (new ones, or ones whose encoder was declared dead and looked up
again) would fail their rooms with "no route" while the encoder is alive.
So the encoder registers again every ``interval`` seconds, on a thread of
its own; a registration is idempotent (the same route is put again).

A failure is logged once at WARNING (then at DEBUG until it succeeds
again, when one INFO line says so) and counted; it never ends the thread
or touches the endpoint's rooms: the encoder keeps serving the language
ranks that know it.
"""

from __future__ import annotations

import logging
import threading

from ...bootstrap import BootstrapClient, BootstrapError, RouteInfo

log = logging.getLogger(__name__)

__all__ = ["Registration"]


class Registration:
    """Registers ``info`` with ``client`` every ``interval`` seconds from
    :meth:`start` until :meth:`close` (which joins the thread). The counters
    are written by that thread alone and read by ``status()``."""

    def __init__(
        self, client: BootstrapClient, info: RouteInfo, interval: float, name: str
    ) -> None:
        # interval > 0: the endpoint checked register_interval at construction
        self._client = client
        self._info = info
        self.interval = interval
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: registrations made since start (the first, in start(), included)
        self.registered = 1
        #: registrations that failed since start
        self.failures = 0
        #: why the last registration failed, while it has not succeeded since
        self.last_error: str | None = None

    def start(self) -> Registration:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def describe(self) -> dict[str, object]:
        """What ``status()`` shows."""
        return {
            "bootstrap": self._client.address,
            "interval_s": self.interval,
            "registered": self.registered,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    def _run(self) -> None:
        # Event.wait, not sleep: close() ends the wait at once
        while not self._stop.wait(self.interval):
            try:
                self._client.register(self._info)
            except BootstrapError as exc:
                self.failures += 1
                if self.last_error is None:
                    log.warning(
                        "encoder rank %d: cannot register again with %s (retrying every %gs): %s",
                        self._info.engine_rank,
                        self._client.address,
                        self.interval,
                        exc,
                    )
                else:
                    log.debug(
                        "encoder rank %d: registration failed: %s", self._info.engine_rank, exc
                    )
                self.last_error = str(exc)
                continue
            except Exception:  # a bug must not end the thread: the next try may work
                self.failures += 1
                log.exception("encoder rank %d: registration raised", self._info.engine_rank)
                continue
            self.registered += 1
            if self.last_error is not None:
                log.info(
                    "encoder rank %d: registered with %s again",
                    self._info.engine_rank,
                    self._client.address,
                )
                self.last_error = None
