"""In-memory control lanes and an in-memory data plane, for tests (after
httpx's ``MockTransport``): an encoder and a language endpoint in one process
exchange every control message and every byte through memory.

- :class:`MemoryTransport` is a real data-plane backend (the interface of
  :mod:`embedlink.transports`), named ``"memory"``: the writer copies from the
  encoder's pool into the language pool in this process, checks bounds like
  every backend, and fences a link exactly (a fence waits for the link's
  writes in flight, then refuses the rest), so fencing can be tested on it.
  Writes can be made to fail on demand (:meth:`MemoryTransport.fail_writes`).
- :class:`MemoryLanes` provides the same-host control lanes
  (:func:`embedlink._runtime.lane.use_provider`) as in-process queues, each
  end woken through an eventfd the endpoint's loop polls. A language endpoint
  with ``local_control=True`` reaches an encoder in the same process over
  them; no Unix socket is made. (An encoder still binds its ZeroMQ socket on
  the loopback address it is given, unused while every peer comes by lane.)

Use both through :func:`in_memory`::

    with in_memory() as mem:
        enc = EncoderEndpoint(schema, transports=["memory"]).start()
        lang = LanguageEndpoint(schema, transports=["memory"]).start()

Linux only (eventfd).
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .._runtime import lane as _lane
from ..memory import BufferPool
from ..protocol import AUX_FIELD, Copy, TransportOffer
from ..transports import (
    DataPlaneError,
    PeerWriter,
    TransportServer,
    TransportUnavailable,
    register_backend,
    unregister_backend,
)
from ..transports.base import check_bounds

__all__ = ["MemoryLane", "MemoryLanes", "MemoryTransport", "in_memory"]


# -- control lanes


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class MemoryLane(_lane.Lane):
    """One end of an in-process lane: the contract of
    :class:`~embedlink._runtime.lane.Lane` (never blocks, any thread sends,
    the owner receives and closes) over a queue. The end's eventfd is
    readable while messages (or the peer's end of stream) wait."""

    def __init__(self, lock: threading.Lock) -> None:  # not Lane's: no socket
        self._pair_lock = lock  # shared by both ends
        self._fd = _eventfd()
        self._queue: collections.deque[bytes] = collections.deque()
        self._peer: MemoryLane | None = None
        self._peer_gone = False
        self.closed = False
        self._released = False
        self.dropped = 0

    @classmethod
    def pair(cls) -> tuple[MemoryLane, MemoryLane]:
        lock = threading.Lock()
        a, b = cls(lock), cls(lock)
        a._peer, b._peer = b, a
        return a, b

    def fileno(self) -> int:
        return self._fd

    @property
    def wants_write(self) -> bool:
        return False  # a send never waits for the peer to read

    def send(self, payload: bytes) -> bool:
        with self._pair_lock:
            peer = self._peer
            if self.closed or peer is None or peer.closed or len(payload) > _lane.MAX_FRAME:
                self.dropped += 1
                return False
            peer._queue.append(bytes(payload))
            os.eventfd_write(peer._fd, 1)
            return True

    def flush(self) -> None:
        """Nothing waits to go out."""

    def receive(self) -> tuple[list[bytes], str | None]:
        with self._pair_lock:
            if self._released:
                return [], "closed"
            _drain(self._fd)
            frames = list(self._queue)
            self._queue.clear()
            if self._peer_gone:
                self.closed = True
                return frames, "connection closed by the peer"
            return frames, None

    def close(self) -> None:
        with self._pair_lock:
            self.closed = True
            self._queue.clear()
            peer, self._peer = self._peer, None
            if peer is not None and not peer._released:
                peer._peer_gone = True
                os.eventfd_write(peer._fd, 1)  # it reads its end of stream
            if not self._released:
                self._released = True
                os.close(self._fd)


class _MemoryListener:
    """An encoder's listener: lanes connected to its address, waiting to be accepted."""

    def __init__(self, lanes: MemoryLanes, address: str) -> None:
        self._lanes = lanes
        self.address = address
        self._fd = _eventfd()
        self._lock = threading.Lock()
        self._waiting: list[MemoryLane] = []
        self._closed = False

    def fileno(self) -> int:
        return self._fd

    def offer(self, lane: MemoryLane) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._waiting.append(lane)
            os.eventfd_write(self._fd, 1)
            return True

    def accept_lanes(self) -> list[_lane.Lane]:
        with self._lock:
            if self._closed:
                return []
            _drain(self._fd)
            out: list[_lane.Lane] = list(self._waiting)
            self._waiting.clear()
            return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting, self._waiting = self._waiting, []
            os.close(self._fd)
        for lane in waiting:  # their language sides see the end at once
            lane.close()
        self._lanes._forget(self)


class MemoryLanes:
    """A lane provider whose lanes are in-process queues (see the module
    docstring). ``connections`` counts the lanes connected so far."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[str, _MemoryListener] = {}
        self.connections = 0

    def listen(self, address: str) -> _MemoryListener | None:
        with self._lock:
            if address in self._listeners:
                return None  # the name is taken, as for an abstract socket
            listener = _MemoryListener(self, address)
            self._listeners[address] = listener
            return listener

    def connect(self, address: str) -> _lane.Lane | None:
        with self._lock:
            listener = self._listeners.get(address)
        if listener is None:
            return None  # nobody listens: the endpoint uses ZeroMQ
        mine, theirs = MemoryLane.pair()
        if not listener.offer(theirs):
            mine.close()
            theirs.close()
            return None
        with self._lock:
            self.connections += 1
        return mine

    def _forget(self, listener: _MemoryListener) -> None:
        with self._lock:
            if self._listeners.get(listener.address) is listener:
                del self._listeners[listener.address]


# -- the data plane


class _MemoryServer(TransportServer):
    """A language pool others in this process may write into, per link until fenced."""

    name = "memory"

    def __init__(self, transport: MemoryTransport, pool: BufferPool, *, host: str) -> None:
        super().__init__(pool, host=host)
        if not pool.on_host:
            raise TransportUnavailable("memory: the pool must be in host memory")
        self._transport = transport
        self.key = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._fenced: set[str] = set()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._waiters: dict[str, list[Callable[[], None]]] = {}

    def start(self) -> TransportServer:
        self._transport._servers[self.key] = self
        return self

    def offer(self) -> TransportOffer:
        return TransportOffer("memory", {"key": self.key, "process": str(os.getpid())})

    def offer_for(self, peer: str) -> TransportOffer:
        return TransportOffer(
            "memory", {"key": self.key, "process": str(os.getpid()), "link": peer}
        )

    def fence(self, peer: str, done: Callable[[], None], *, gone: bool = False) -> bool:
        with self._lock:
            self._fenced.add(peer)
            if self._in_flight[peer]:
                self._waiters.setdefault(peer, []).append(done)
                return True
        done()
        return True

    def admit(self, link: str) -> None:
        with self._lock:
            if link in self._fenced:
                raise DataPlaneError(f"memory: link {link} is fenced")
            self._in_flight[link] += 1

    def release(self, link: str) -> None:
        with self._lock:
            self._in_flight[link] -= 1
            done = self._waiters.pop(link, []) if self._in_flight[link] == 0 else []
        for fn in done:
            fn()

    def close(self) -> None:
        self._transport._servers.pop(self.key, None)


class _MemoryWriter(PeerWriter):
    name = "memory"
    reads_any_memory = True

    def __init__(
        self,
        transport: MemoryTransport,
        server: _MemoryServer,
        link: str,
        regions: dict[str, int],
        field_names: list[str],
    ) -> None:
        self._transport = transport
        self._server: _MemoryServer | None = server
        self._link = link
        self.regions = regions
        self._fields = field_names

    def _target(self) -> _MemoryServer:
        server = self._server
        if server is None:
            raise DataPlaneError("memory: writer closed")
        failure = self._transport._failure
        if failure is not None:
            raise DataPlaneError(f"memory: {failure}")
        return server

    def write(self, copies: Sequence[Copy], src: BufferPool, timeout: float) -> None:
        server = self._target()
        check_bounds(copies, self.regions, src)
        server.admit(self._link)
        try:
            dst, back = server.pool.backing, src.backing
            for c in copies:
                d = server.pool.layout[c.field][0] + c.dst_offset
                s = src.layout[c.field][0] + c.src_offset
                dst[d : d + c.length] = back[s : s + c.length]
            self._transport.bytes_written += sum(c.length for c in copies)
        finally:
            server.release(self._link)

    def write_from(self, copies: Sequence[Copy], sources: Sequence[Any], timeout: float) -> None:
        server = self._target()
        check_bounds(copies, self.regions)
        server.admit(self._link)
        try:
            dst = server.pool.backing
            for c, data in zip(copies, sources, strict=True):
                d = server.pool.layout[c.field][0] + c.dst_offset
                dst[d : d + c.length] = np.frombuffer(data, dtype=np.uint8, count=c.length)
            self._transport.bytes_written += sum(c.length for c in copies)
        finally:
            server.release(self._link)

    def close(self) -> None:
        self._server = None


class MemoryTransport:
    """The ``"memory"`` backend (register it with :func:`in_memory`, or
    ``embedlink.transports.register_backend``). ``bytes_written`` counts what
    its writers moved."""

    name = "memory"
    host_memory_only = True

    def __init__(self) -> None:
        self._servers: dict[str, _MemoryServer] = {}
        self._failure: str | None = None
        self.bytes_written = 0

    def fail_writes(self, reason: str | None) -> None:
        """Make every write fail with ``reason`` from now on (None: succeed again)."""
        self._failure = reason

    def server(
        self, pool: BufferPool, *, host: str, options: Mapping[str, str] | None = None
    ) -> TransportServer:
        return _MemoryServer(self, pool, host=host)

    def reachable(self, offer: TransportOffer, *, host_id: str) -> bool:
        return offer.params.get("process") == str(os.getpid()) and (
            offer.params.get("key") in self._servers
        )

    def connect(
        self,
        offer: TransportOffer,
        *,
        regions: dict[str, int],
        field_names: list[str],
        timeout: float,
        local_host: str = "127.0.0.1",
        options: Mapping[str, str] | None = None,
    ) -> PeerWriter:
        server = self._servers.get(offer.params.get("key", ""))
        if server is None:
            raise TransportUnavailable("memory: no such pool in this process")
        names = [*server.pool.schema.names, AUX_FIELD]
        if list(field_names) != names:
            raise TransportUnavailable("memory: the schemas differ")
        return _MemoryWriter(self, server, offer.params.get("link", ""), regions, field_names)


@contextlib.contextmanager
def in_memory() -> Iterator[tuple[MemoryTransport, MemoryLanes]]:
    """Register the ``"memory"`` transport and make lanes in-memory for the
    duration; yields both (for their counters and failure switches). Endpoints
    must be closed inside the block."""
    transport, lanes = MemoryTransport(), MemoryLanes()
    register_backend(transport, replace=True)
    previous = _lane.use_provider(lanes)
    try:
        yield transport, lanes
    finally:
        _lane.use_provider(previous)
        unregister_backend("memory")
