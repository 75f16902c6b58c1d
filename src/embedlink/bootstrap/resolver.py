"""Finding encoder ranks through bootstrap servers, off the caller's thread.

A language rank needs, for each room, the control address of the encoder rank
that serves it. The bootstrap server knows it, but asking over HTTP on the
thread that calls :meth:`LanguageEndpoint.receiver` would block a serving
engine's scheduler on the network (SGLang #36965: a scheduler rank blocked
for 1800 s by one dead encoder). So :class:`Resolver` keeps a cache, and
lookups run on its own thread (an asyncio loop with an aiohttp client, so
:meth:`Resolver.close` cancels a hung request at once instead of waiting
out its timeout):

* :meth:`Resolver.get` answers from the cache only (any thread, never
  blocks). A miss, or an entry older than ``refresh`` seconds, queues a
  lookup; at most one is in flight per bootstrap server and key.
* A lookup that fails is tried again when asked again, no sooner than a
  back-off (0.05 s doubling to 2 s); :meth:`Resolver.last_error` says why it
  failed, for the reason of a room that gives up.
* :meth:`Resolver.forget` drops every route to an address (an encoder
  declared dead): the next room for that rank looks it up afresh, so an
  encoder restarted on another port is found.
* ``on_change(bootstrap)`` is called (on the resolver's thread; it must not
  block) whenever a lookup brought something new, so rooms waiting for a
  route can go on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..protocol import RoomId

log = logging.getLogger(__name__)

__all__ = ["Resolver", "check_bootstrap_address", "route_for"]

#: back-off after a failed lookup: first, and the most it doubles to
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0

# The key of what a lookup finds: ("sizes",) or ("rank", engine_rank, dp_group)
_Key = tuple[Any, ...]


def route_for(
    lang_tp_rank: int, lang_tp_size: int, lang_dp_size: int, enc_tp_size: int
) -> tuple[int, int]:
    """``(encoder_rank, required_dst_info_num)`` for a language rank (SGLang's mapping).

    With ``L = lang_tp_size // lang_dp_size`` language ranks per dp group and
    ``E`` encoder ranks: when ``L > E`` each encoder rank serves ``L // E``
    language ranks, all of which must receive every room; otherwise language
    rank ``r`` receives from encoder rank ``r`` alone.
    """
    per_group = max(1, lang_tp_size // lang_dp_size)
    r = lang_tp_rank % per_group
    if per_group > enc_tp_size:
        ratio = per_group // enc_tp_size
        return r // ratio, ratio
    return r % enc_tp_size, 1


def check_bootstrap_address(address: str) -> None:
    """ValueError unless ``address`` looks like ``host:port``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bootstrap address {address!r} must be host:port")


@dataclass
class _Entry:
    value: Any
    fetched: float


@dataclass
class _Failure:
    error: str
    retry_at: float
    backoff: float


class Resolver:
    """Cached, asynchronous lookups of encoder ranks (see the module docstring).

    ``tp_rank``, ``tp_size``, ``dp_size``: the language rank's own, for
    :func:`route_for`. ``timeout``: of one HTTP request. ``refresh``: how old
    a cached answer may be before a lookup refreshes it (it is still used
    meanwhile). :meth:`start` starts the thread; :meth:`close` cancels what
    is in flight and joins it.
    """

    def __init__(
        self,
        *,
        tp_rank: int,
        tp_size: int,
        dp_size: int,
        on_change: Callable[[str], None],
        timeout: float = 5.0,
        refresh: float = 10.0,
        name: str = "embedlink-resolver",
    ) -> None:
        self.tp_rank, self.tp_size, self.dp_size = tp_rank, tp_size, dp_size
        self.timeout = timeout
        self.refresh = refresh
        self._on_change = on_change
        self._name = name
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, _Key], _Entry] = {}
        self._inflight: set[tuple[str, _Key]] = set()
        self._failures: dict[tuple[str, _Key], _Failure] = {}
        self._errors: dict[str, str] = {}  # bootstrap -> the last lookup error
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closed = False
        #: lookups made (each HTTP request), for tests and ``status()``
        self.lookups = 0

    # -- lifecycle

    def start(self) -> Resolver:
        if self._thread is not None:
            raise RuntimeError("the resolver is already started")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def close(self) -> None:
        """Cancel lookups in flight and join the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass  # already closed
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._session = None
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(self._shutdown())
            loop.close()

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        await asyncio.get_running_loop().shutdown_default_executor()

    # -- any thread

    def get(self, bootstrap: str, room: RoomId, dp_group: int | None) -> tuple[str, int] | None:
        """``(encoder "host:port", required_dst_info_num)`` for ``room`` from the
        cache, or None (a lookup is then queued, or backing off after a failure).
        Never blocks. A stale answer is returned and refreshed meanwhile."""
        now = time.monotonic()
        with self._lock:
            return self._get(bootstrap, room, dp_group, now)

    def get_many(
        self, bootstrap: str, rooms: Sequence[tuple[RoomId, int | None]]
    ) -> list[tuple[str, int] | None]:
        """:meth:`get` for each ``(room, dp_group)``, from one view of the
        cache: a lookup that lands meanwhile is seen by all of them or by
        none. (Asked one by one while the answer arrives, the later rooms of
        a batch would find a route the earlier ones had not, and start
        first.)"""
        now = time.monotonic()
        with self._lock:
            return [self._get(bootstrap, room, group, now) for room, group in rooms]

    def _get(
        self, bootstrap: str, room: RoomId, dp_group: int | None, now: float
    ) -> tuple[str, int] | None:
        sizes = self._fresh(bootstrap, ("sizes",), now)
        if sizes is None:
            return None
        enc_tp, enc_dp = sizes
        enc_rank, required = route_for(self.tp_rank, self.tp_size, self.dp_size, enc_tp)
        group = room % enc_dp if dp_group is None else dp_group
        address = self._fresh(bootstrap, ("rank", enc_rank, group), now)
        if address is None:
            return None
        return str(address), required

    def forget(self, address: str) -> int:
        """Drop every cached route to ``address``, and mark the sizes of the
        bootstrap servers that gave it stale; the number of routes dropped."""
        with self._lock:
            gone = [k for k, e in self._cache.items() if k[1][0] == "rank" and e.value == address]
            for k in gone:
                del self._cache[k]
                sizes = self._cache.get((k[0], ("sizes",)))
                if sizes is not None:
                    sizes.fetched = float("-inf")  # refresh, keep using meanwhile
        return len(gone)

    def last_error(self, bootstrap: str) -> str | None:
        """Why the last lookup at ``bootstrap`` failed (None after a success)."""
        with self._lock:
            return self._errors.get(bootstrap)

    def cached_routes(self) -> dict[str, dict[str, str]]:
        """``{bootstrap: {"rank/group": address}}``, for ``status()``."""
        out: dict[str, dict[str, str]] = {}
        with self._lock:
            for (boot, key), e in self._cache.items():
                if key[0] == "rank":
                    out.setdefault(boot, {})[f"{key[1]}/{key[2]}"] = str(e.value)
        return out

    # -- internals

    def _fresh(self, bootstrap: str, key: _Key, now: float) -> Any:
        """The cached value (or None), queueing a lookup when it is missing or
        stale. Holding the lock."""
        entry = self._cache.get((bootstrap, key))
        if entry is None or now - entry.fetched > self.refresh:
            self._want(bootstrap, key, now)
        return None if entry is None else entry.value

    def _want(self, bootstrap: str, key: _Key, now: float) -> None:
        k = (bootstrap, key)
        if k in self._inflight or self._closed or self._loop is None:
            return
        failed = self._failures.get(k)
        if failed is not None and now < failed.retry_at:
            return
        self._inflight.add(k)
        try:
            self._loop.call_soon_threadsafe(self._launch, bootstrap, key)
        except RuntimeError:  # the loop closed meanwhile
            self._inflight.discard(k)

    def _launch(self, bootstrap: str, key: _Key) -> None:
        asyncio.get_running_loop().create_task(self._lookup(bootstrap, key))

    async def _lookup(self, bootstrap: str, key: _Key) -> None:
        k = (bootstrap, key)
        if key[0] == "sizes":
            query = "engine_rank=-1&target_dp_group=-1"
        else:
            query = f"engine_rank={key[1]}&target_dp_group={key[2]}"
        value: Any = None
        error: str | None = None
        try:
            body = await self._get_json(f"http://{bootstrap}/route?{query}")
            if key[0] == "sizes":
                value = (int(body["tp_size"]), int(body["dp_size"]))
            else:
                value = f"{body['rank_ip']}:{int(body['rank_port'])}"
        except asyncio.CancelledError:
            with self._lock:
                self._inflight.discard(k)
            raise
        except _HTTPStatus as exc:
            error = str(exc)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            error = f"bootstrap {bootstrap} unreachable: {type(exc).__name__}: {exc}".rstrip(": ")
        except (KeyError, TypeError, ValueError) as exc:
            error = f"bootstrap {bootstrap} answered something unexpected: {exc!r}"
        self.lookups += 1
        changed = False
        with self._lock:
            self._inflight.discard(k)
            now = time.monotonic()
            if error is None:
                old = self._cache.get(k)
                changed = old is None or old.value != value
                self._cache[k] = _Entry(value, now)
                self._failures.pop(k, None)
                self._errors.pop(bootstrap, None)
            else:
                prev = self._failures.get(k)
                backoff = RETRY_FIRST_S if prev is None else min(RETRY_MAX_S, prev.backoff * 2)
                self._failures[k] = _Failure(error, now + backoff, backoff)
                self._errors[bootstrap] = error
        if error is not None:
            log.debug("resolver: %s", error)
        if changed:
            if key[0] == "rank":
                log.info(
                    "resolver: encoder rank %d/%d at %s via %s", key[1], key[2], value, bootstrap
                )
            try:
                self._on_change(bootstrap)
            except Exception:  # the endpoint's callback must not end the lookups
                log.exception("resolver: on_change raised")

    async def _get_json(self, url: str) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._session.get(url) as resp:
            try:
                body = await resp.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                body = None
            if resp.status != 200:
                msg = body.get("error") if isinstance(body, dict) else resp.reason
                raise _HTTPStatus(f"bootstrap {url.split('/')[2]}: {resp.status} {msg}")
            return body


class _HTTPStatus(Exception):
    """A bootstrap server answered with an error status."""
