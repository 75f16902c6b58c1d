"""``tcp``: the built-in data plane, pure Python over sockets. Works everywhere.

Every connection opens with the sender's link token (the ``token`` of the
offer it was given; empty for a plain :meth:`TcpServer.offer`)::

    hello    "ELTH" | token_len u16 | token (utf-8)

then carries batches (sender -> receiver), little-endian::

    header   "ELT1" | n_copies u32 | payload_bytes u64
    entries  n_copies x (field_id u16 | dst_offset u64 | length u64)
    payload  the bytes of every copy, in entry order

and the receiver's answer::

    reply    status u8 (0 ok, 1 out of bounds, 2 link fenced) | message_len u32 | message

The receiver checks every entry against its registered regions *before*
reading the payload, then ``recv_into``\\ s each copy straight into a
memoryview of its pool (no intermediate bytes objects). A refused batch is
still drained, so the connection stays usable, and nothing of it is written.

Fencing: the receiver hands each encoder link its own token
(:meth:`TcpServer.offer_for`). :meth:`TcpServer.fence` shuts that link's
connections and refuses its token from then on; its ``done`` callback runs
once the threads that wrote for the link have ended, so a write held up in
the network (a stalled link, a proxy) can never land in blocks given to
another room afterwards.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..memory import BufferPool
from ..protocol import AUX_FIELD, Copy, TransportOffer
from . import Backend
from .base import (
    DataPlaneError,
    PeerWriter,
    TransportServer,
    TransportUnavailable,
    WriteOutOfBounds,
    check_bounds,
)

log = logging.getLogger(__name__)

__all__ = ["BACKEND", "TcpBackend", "TcpServer", "TcpWriter"]

_MAGIC = b"ELT1"
_HELLO = struct.Struct("<4sH")
_HELLO_MAGIC = b"ELTH"
_HEADER = struct.Struct("<4sIQ")
_ENTRY = struct.Struct("<HQQ")
_REPLY = struct.Struct("<BI")
_MAX_COPIES = 1 << 20
_DRAIN = 1 << 20


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


def _field_names(pool: BufferPool) -> list[str]:
    return [*pool.schema.names, AUX_FIELD]


class TcpServer(TransportServer):
    """Listens on ``host:0``; one thread per connection writes into the pool."""

    name = "tcp"

    def __init__(self, pool: BufferPool, *, host: str) -> None:
        super().__init__(pool, host=host)
        if not pool.on_host:
            raise TransportUnavailable(f"tcp: needs a host-memory pool, not one on {pool.device}")
        self._sock: socket.socket | None = None
        #: open connection -> its link token (None until its hello was read)
        self._conns: dict[socket.socket, str | None] = {}
        #: open connection -> the thread serving it
        self._serving: dict[socket.socket, threading.Thread] = {}
        #: tokens whose writes are admitted: offered and not fenced ("" always)
        self._admitted: set[str] = {""}
        #: fenced token -> (threads still serving it, its done callback)
        self._fences: dict[str, tuple[set[threading.Thread], Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._names = _field_names(pool)
        self._views = {name: pool.field_bytes(name) for name in self._names}
        #: batches refused for being out of bounds (for metrics and tests)
        self.refused = 0

    def start(self) -> TcpServer:
        sock = socket.create_server((self.host, 0), backlog=128)
        self._sock = sock
        self._thread = threading.Thread(
            target=self._accept_loop, name="embedlink-tcp-accept", daemon=True
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._sock is not None, "start() first"
        return int(self._sock.getsockname()[1])

    def offer(self) -> TransportOffer:
        return TransportOffer("tcp", {"host": self.host, "port": str(self.port)})

    def offer_for(self, peer: str) -> TransportOffer:
        with self._lock:
            self._admitted.add(peer)
        return TransportOffer("tcp", {"host": self.host, "port": str(self.port), "token": peer})

    def fence(self, peer: str, done: Callable[[], None], *, gone: bool = False) -> bool:
        if not peer:
            return False  # the shared default link cannot be told apart
        with self._lock:
            self._admitted.discard(peer)
            victims = [c for c, tok in self._conns.items() if tok == peer]
            threads = {self._serving[c] for c in victims if c in self._serving}
            if threads:
                self._fences[peer] = (threads, done)
        for c in victims:
            try:
                # wakes a thread blocked in recv (a stalled link) with EOF
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if not threads:
            done()
        return True

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)  # no connection is added after this
        with self._lock:
            conns = list(self._conns)
            threads = list(self._serving.values())
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(timeout=5)
        if not any(t.is_alive() for t in threads):
            # the views would keep a shared pool's mapping open until this
            # server is garbage collected
            self._views = {}

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(
                target=self._serve, args=(conn,), name="embedlink-tcp-conn", daemon=True
            )
            with self._lock:
                self._conns[conn] = None
                self._serving[conn] = t
            t.start()

    def _admit(self, conn: socket.socket) -> str | None:
        """Read the connection's hello; its token if admitted, else None."""
        magic, n = _HELLO.unpack(_recv_exact(conn, _HELLO.size))
        if magic != _HELLO_MAGIC:
            raise ConnectionError("the connection did not open with a hello")
        token = _recv_exact(conn, n).decode(errors="replace")
        with self._lock:
            # under the lock: a fence either sees this connection or refused it
            if token not in self._admitted:
                return None
            self._conns[conn] = token
        return token

    def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                token = self._admit(conn)
            except ConnectionError as exc:
                log.warning("tcp: closing a connection: %s", exc)
                return
            if token is None:
                # a fenced (or never offered) link: tell it why, and hang up
                msg = b"this link was fenced: the receiver declared its sender dead"
                conn.sendall(_REPLY.pack(2, len(msg)) + msg)
                return
            while not self._closed.is_set():
                try:
                    head = _recv_exact(conn, _HEADER.size)
                except ConnectionError:
                    return
                magic, n, payload = _HEADER.unpack(head)
                if magic != _MAGIC or n > _MAX_COPIES:
                    log.warning("tcp: closing a connection that sent a bad batch header")
                    return
                table = _recv_exact(conn, _ENTRY.size * n)
                entries = [_ENTRY.unpack_from(table, i * _ENTRY.size) for i in range(n)]
                problem = self._check(entries, payload)
                if problem is None:
                    for fid, off, length in entries:
                        _recv_into(conn, self._views[self._names[fid]][off : off + length])
                    conn.sendall(_REPLY.pack(0, 0))
                else:
                    self.refused += 1
                    self._drain(conn, payload)
                    msg = problem.encode()
                    conn.sendall(_REPLY.pack(1, len(msg)) + msg)
        except (OSError, ConnectionError) as exc:
            if not self._closed.is_set():
                log.info("tcp: connection ended: %s", exc)
        finally:
            self._ended(conn)

    def _ended(self, conn: socket.socket) -> None:
        """A serving thread is done: nothing more lands through ``conn``."""
        me = threading.current_thread()
        settled: Callable[[], None] | None = None
        with self._lock:
            token = self._conns.pop(conn, None)
            self._serving.pop(conn, None)
            fence = self._fences.get(token) if token else None
            if fence is not None:
                fence[0].discard(me)
                if not fence[0]:
                    del self._fences[token]  # type: ignore[arg-type]
                    settled = fence[1]
        conn.close()
        if settled is not None:
            settled()

    def _check(self, entries: list[tuple[int, int, int]], payload: int) -> str | None:
        total = 0
        for fid, off, length in entries:
            if fid >= len(self._names):
                return f"unknown field id {fid}"
            name = self._names[fid]
            size = len(self._views[name])
            if off + length > size:
                return f"write of {length} bytes at offset {off} of {name!r} exceeds the {size}-byte region"
            total += length
        if total != payload:
            return f"payload of {payload} bytes does not match the entries' {total}"
        return None

    @staticmethod
    def _drain(conn: socket.socket, n: int) -> None:
        scratch = memoryview(bytearray(min(n, _DRAIN) or 1))
        while n > 0:
            k = min(n, len(scratch))
            _recv_into(conn, scratch[:k])
            n -= k


class TcpWriter(PeerWriter):
    """Writes batches to one peer's :class:`TcpServer`; keeps idle connections for reuse."""

    name = "tcp"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        regions: dict[str, int],
        field_names: list[str],
        timeout: float,
        token: str = "",
    ) -> None:
        self.addr = (host, port)
        raw = token.encode()
        self._hello = _HELLO.pack(_HELLO_MAGIC, len(raw)) + raw
        self.regions = regions
        self.ids = {name: i for i, name in enumerate(field_names)}
        self.connect_timeout = timeout
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def _get(self) -> socket.socket:
        with self._lock:
            if self._closed:
                raise DataPlaneError("writer closed")
            if self._idle:
                return self._idle.pop()
        try:
            s = socket.create_connection(self.addr, timeout=self.connect_timeout)
        except OSError as exc:
            raise DataPlaneError(
                f"tcp: cannot connect to {self.addr[0]}:{self.addr[1]}: {exc}"
            ) from exc
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            s.sendall(self._hello)  # goes out with the first batch (no round trip)
        except OSError as exc:
            s.close()
            raise DataPlaneError(
                f"tcp: cannot open a link to {self.addr[0]}:{self.addr[1]}: {exc}"
            ) from exc
        return s

    reads_any_memory = True

    def write(self, copies: Sequence[Copy], src: BufferPool, timeout: float) -> None:
        check_bounds(copies, self.regions, src)
        sources = [src.field_bytes(c.field)[c.src_offset : c.src_offset + c.length] for c in copies]
        self._send(copies, sources, timeout)

    def write_from(self, copies: Sequence[Copy], sources: Sequence[Any], timeout: float) -> None:
        check_bounds(copies, self.regions)
        for c, data in zip(copies, sources, strict=True):
            if memoryview(data).nbytes != c.length:
                raise WriteOutOfBounds(f"source of {c.field!r} is not {c.length} bytes")
        self._send(copies, sources, timeout)

    def _send(self, copies: Sequence[Copy], sources: Sequence[Any], timeout: float) -> None:
        for c in copies:
            if c.field not in self.ids:
                raise WriteOutOfBounds(f"field {c.field!r} unknown to the peer")
        sock = self._get()
        try:
            sock.settimeout(timeout)
            total = sum(c.length for c in copies)
            head = _HEADER.pack(_MAGIC, len(copies), total) + b"".join(
                _ENTRY.pack(self.ids[c.field], c.dst_offset, c.length) for c in copies
            )
            sock.sendall(head)
            for data in sources:
                sock.sendall(data)
            status, mlen = _REPLY.unpack(_recv_exact(sock, _REPLY.size))
            msg = _recv_exact(sock, mlen).decode(errors="replace") if mlen else ""
        except (OSError, ConnectionError) as exc:
            sock.close()
            raise DataPlaneError(
                f"tcp: write to {self.addr[0]}:{self.addr[1]} failed: {exc}"
            ) from exc
        if status == 2:  # the server hung up after saying so
            sock.close()
            raise DataPlaneError(f"tcp: {self.addr[0]}:{self.addr[1]} refused the write: {msg}")
        with self._lock:
            if self._closed:
                sock.close()
            else:
                self._idle.append(sock)
        if status != 0:
            raise WriteOutOfBounds(f"tcp: peer refused the write: {msg}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()


class TcpBackend:
    name = "tcp"
    host_memory_only = True

    def server(
        self, pool: BufferPool, *, host: str, options: Mapping[str, str] | None = None
    ) -> TransportServer:
        return TcpServer(pool, host=host)

    def reachable(self, offer: TransportOffer, *, host_id: str) -> bool:
        return "host" in offer.params and offer.params.get("port", "").isdigit()

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
        return TcpWriter(
            offer.params["host"],
            int(offer.params["port"]),
            regions=regions,
            field_names=field_names,
            timeout=timeout,
            token=offer.params.get("token", ""),
        )


BACKEND: Backend = TcpBackend()
