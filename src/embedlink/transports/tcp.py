"""``tcp``: the built-in data plane, pure Python over sockets. Works everywhere.

Wire format of one batch (sender -> receiver), little-endian::

    header   "ELT1" | n_copies u32 | payload_bytes u64
    entries  n_copies x (field_id u16 | dst_offset u64 | length u64)
    payload  the bytes of every copy, in entry order

and the receiver's answer::

    reply    status u8 (0 ok, 1 refused) | message_len u32 | message (utf-8)

The receiver checks every entry against its registered regions *before*
reading the payload, then ``recv_into``\\ s each copy straight into a
memoryview of its pool (no intermediate bytes objects). A refused batch is
still drained, so the connection stays usable, and nothing of it is written.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Mapping, Sequence

from ..memory import BufferPool
from ..protocol import AUX_FIELD, Copy, TransportOffer
from . import Backend
from .base import (
    PeerWriter,
    TransportError,
    TransportServer,
    TransportUnavailable,
    WriteOutOfBounds,
    check_bounds,
)

log = logging.getLogger(__name__)

__all__ = ["BACKEND", "TcpBackend", "TcpServer", "TcpWriter"]

_MAGIC = b"ELT1"
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
        self._conns: set[socket.socket] = set()
        self._conn_threads: set[threading.Thread] = set()
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
            threads = list(self._conn_threads)
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
                self._conns.add(conn)
                self._conn_threads.add(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
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
        except OSError as exc:
            if not self._closed.is_set():
                log.info("tcp: connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._conn_threads.discard(threading.current_thread())
            conn.close()

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
    ) -> None:
        self.addr = (host, port)
        self.regions = regions
        self.ids = {name: i for i, name in enumerate(field_names)}
        self.connect_timeout = timeout
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def _get(self) -> socket.socket:
        with self._lock:
            if self._closed:
                raise TransportError("writer closed")
            if self._idle:
                return self._idle.pop()
        try:
            s = socket.create_connection(self.addr, timeout=self.connect_timeout)
        except OSError as exc:
            raise TransportError(
                f"tcp: cannot connect to {self.addr[0]}:{self.addr[1]}: {exc}"
            ) from exc
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def write(self, copies: Sequence[Copy], src: BufferPool, timeout: float) -> None:
        check_bounds(copies, self.regions, src)
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
            for c in copies:
                mv = src.field_bytes(c.field)
                sock.sendall(mv[c.src_offset : c.src_offset + c.length])
            status, mlen = _REPLY.unpack(_recv_exact(sock, _REPLY.size))
            msg = _recv_exact(sock, mlen).decode(errors="replace") if mlen else ""
        except (OSError, ConnectionError) as exc:
            sock.close()
            raise TransportError(
                f"tcp: write to {self.addr[0]}:{self.addr[1]} failed: {exc}"
            ) from exc
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
        )


BACKEND: Backend = TcpBackend()
