"""What both endpoints do alike, in one place: their lifecycle and status
(:class:`EndpointBase`: start once, close for good, the context manager, the
status snapshot and the loop's health), stepping a room's state machine under
the endpoint's step lock, and turning a control payload into a message
(authentication, decoding, and the counting and rate-limited logging of
whatever is dropped on the way).

Nothing here knows which side it serves: the side's label, its counters, its
metrics, its noise log and how it names a peer are passed in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from .._runtime.auth import Authenticator
from .._runtime.loop import Loop
from ..memory import BlockAllocator
from ..observability.metrics import EndpointMetrics, MetricsExporter
from ..observability.noise import NoiseLog
from ..protocol import Action, Message, RemoteProtocolError, decode

__all__ = ["DropCounters", "EndpointBase", "PayloadOpener", "StepLock"]

#: how an endpoint names the peer a payload came from (a ZeroMQ identity, a record)
PeerKey = TypeVar("PeerKey")
Endpoint = TypeVar("Endpoint", bound="EndpointBase")


class EndpointBase:
    """The lifecycle and status both endpoints share.

    An endpoint starts once (:meth:`_start_once`, which its ``start()``
    calls: RuntimeError when started again or after ``close()``; whatever a
    failed start opened is closed again before the error propagates) and
    closes for good; as a context manager it starts on entry unless running
    and closes on exit. A subclass provides ``_start()`` (open everything),
    ``close()`` (idempotent, fine without a start), ``_snapshot()`` (on the
    loop thread) and ``_metrics_host`` (how its metrics address is named),
    and sets the attributes declared here in its constructor.
    """

    _loop: Loop
    _exporter: MetricsExporter | None
    _started: bool
    _closed: bool
    allocator: BlockAllocator
    num_blocks: int
    #: how long the loop polls for the next control message before sleeping
    busy_poll_us: float

    def _start(self) -> None:
        raise NotImplementedError

    def _snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def _metrics_host(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _start_once(self: Endpoint) -> Endpoint:
        if self._closed:
            raise RuntimeError("the endpoint is closed; create a new one")
        if self._started:
            raise RuntimeError("the endpoint is already started")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self: Endpoint) -> Endpoint:
        return self if self._started and not self._closed else self._start_once()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """Started, not closed, and its loop thread alive (False after a
        crash of that thread, which a health check should report)."""
        return self._started and not self._closed and self._loop.alive

    @property
    def loop_errors(self) -> int:
        """Exceptions the endpoint's loop caught in its own handlers (each
        logged): 0 in a healthy endpoint; also ``status()["loop_errors"]``."""
        return self._loop.errors

    @property
    def metrics_address(self) -> str | None:
        """``host:port`` serving ``/metrics`` and ``/status`` (None without ``metrics_port``)."""
        return None if self._exporter is None else self._exporter.address(self._metrics_host)

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot: live rooms by status, pool use, peers, counters.

        Taken on the loop thread, so it is consistent; what ``GET /status``
        and ``embedlink status`` show. TimeoutError when the loop does not
        answer within 5 s.
        """
        return self._loop.call_wait(self._snapshot, timeout=5.0)  # type: ignore[no-any-return]

    def pool_usage(self) -> tuple[int, int]:
        """``(used, total)`` blocks (blocks held for in-flight writes count as used)."""
        return self.allocator.num_used, self.num_blocks


class StepLock:
    """Feeds one event to a room's state machine and returns its actions, under
    one lock per endpoint: the loop and a user's thread (an ``abort()``) may
    step the same room at once. The actions are carried out afterwards,
    outside the lock.

    ``step(room.tick, now)`` is ``room.tick(now)`` with the lock held.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, event: Callable[..., list[Action]], *args: Any) -> list[Action]:
        with self._lock:
            return event(*args)


class DropCounters(Protocol):
    """The plain counters a :class:`PayloadOpener` adds to (an endpoint's
    stats object, or the endpoint itself)."""

    dropped_messages: int
    unauthenticated_messages: int


class PayloadOpener(Generic[PeerKey]):
    """Opens and decodes the control payloads of one endpoint.

    A payload whose authentication tag is missing or wrong, or that does not
    decode, is dropped: counted exactly (``counters`` and the ``side``'s
    metrics, in that order) and then noted in ``noise``, which logs at most
    one line per peer per interval. ``name(peer)`` says how the log names
    the peer; it is called only for a payload that is dropped.

    Used on the endpoint's loop thread (one caller at a time), like the
    counters and the noise log it writes to.
    """

    def __init__(
        self,
        auth: Authenticator,
        *,
        side: str,
        counters: DropCounters,
        metrics: EndpointMetrics,
        noise: NoiseLog,
        name: Callable[[PeerKey], str],
    ) -> None:
        self._auth = auth
        self._side = side
        self._counters = counters
        self._metrics = metrics
        self._noise = noise
        self._name = name

    def open(self, payload: bytes, peer: PeerKey) -> Message | None:
        """The message in ``payload`` from ``peer``, or None when it was
        dropped (unauthenticated or malformed; counted and noted)."""
        opened = self._auth.open(payload)
        if opened is None:
            self._counters.unauthenticated_messages += 1
            self._metrics.unauthenticated.labels(self._side).inc()
            self._noise.note(
                self._name(peer), "unauthenticated", "missing or wrong authentication tag"
            )
            return None
        try:
            return decode(opened)
        except RemoteProtocolError as exc:
            self.drop(self._name(peer), "malformed", str(exc))
            return None

    def reject(self, peer: PeerKey, kind: str, detail: str) -> None:
        """Drop a message from ``peer`` that decoded but is not for this side
        (``kind``: e.g. ``"unexpected"``): counted as dropped, and noted."""
        self.drop(self._name(peer), kind, detail)

    def drop(self, name: str, kind: str, detail: str) -> None:
        """Count one dropped message (``dropped_messages`` and the ``side``'s
        ``dropped`` metric, in that order) and note it in the noise log
        against the peer called ``name``."""
        self._counters.dropped_messages += 1
        self._metrics.dropped.labels(self._side).inc()
        self._noise.note(name, kind, detail)
