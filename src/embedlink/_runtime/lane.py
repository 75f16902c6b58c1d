"""A same-host control channel: the control messages over a Unix-domain socket.

Why it exists: through ZeroMQ, one control message passes three threads (the
sending thread, ZeroMQ's I/O thread in each process) before it reaches the
thread that acts on it. On a virtual machine every wake-up of a thread on
another CPU costs tens of microseconds, and a room takes two messages
(docs/performance.md, "Small rooms"). A Unix socket that each endpoint's loop
polls itself delivers a message with one wake-up, straight into that loop.

What it carries: exactly the payloads the ZeroMQ sockets carry (sealed,
encoded messages), each framed by a 4-byte big-endian length on a stream
socket. A stream, not ``SOCK_SEQPACKET``: a packet socket limits a message to
the socket's send buffer (about 200 KB unless an administrator raises
``net.core.wmem_max``), and ZeroMQ's limit is 2 MiB.

How peers find it: an encoder listens on an abstract-namespace name made from
the address it advertises (``host:port`` of its ZeroMQ socket); a language
endpoint told to reach that address tries the name first. Abstract names live
in the network namespace, so the name is found exactly when both run in one
namespace on one host, and is gone as soon as the encoder's socket closes.
Anywhere else (another host, another namespace, an OS without abstract
sockets) the connect fails and the endpoint uses ZeroMQ as before.

Contract of :class:`Lane`: never blocks; one owner thread (the endpoint's
loop) receives, flushes and closes, and :meth:`Lane.send` may be called from
any thread (a language endpoint sends a room's request from the caller's
thread, see ``LanguageEndpoint.receiver``). A lane that fails stops carrying
messages (``closed``) but keeps its socket until its owner, having stopped
polling it, calls :meth:`Lane.close`: a descriptor closed under a poller could
be reused by the next socket opened. :meth:`Lane.send` queues what the kernel does not take at once and
drops a message, reporting it, only once ``MAX_BACKLOG`` bytes wait for a
peer that does not read (ZeroMQ drops at its high-water mark the same way).
A frame longer than ``MAX_FRAME`` ends the connection, as ZeroMQ's
``MAXMSGSIZE`` does.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
import threading
from typing import Protocol

__all__ = [
    "MAX_BACKLOG",
    "MAX_FRAME",
    "Lane",
    "LaneProvider",
    "Listener",
    "ProvidedListener",
    "accept",
    "connect",
    "lane_name",
    "listen",
    "use_provider",
]

log = logging.getLogger(__name__)

#: the largest message, as ZeroMQ's MAXMSGSIZE on the endpoints' sockets
MAX_FRAME = 2 << 20
#: bytes a lane queues for a peer that does not read before it drops messages
MAX_BACKLOG = 16 << 20
_HEADER = struct.Struct(">I")
_CHUNK = 1 << 16
#: reads per call to :meth:`Lane.receive`, so one busy peer cannot hold the loop
_READS = 16

SUPPORTED = sys.platform.startswith("linux")


class Listener(Protocol):
    """What :func:`listen` returns: a listening socket, or a provider's
    listener, which the loop polls for new lanes."""

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class ProvidedListener(Listener, Protocol):
    """A provider's listener: it hands out its waiting lanes itself."""

    def accept_lanes(self) -> list[Lane]: ...


class LaneProvider(Protocol):
    """Where lanes come from instead of Unix sockets (:func:`use_provider`):
    the same three calls, the same contracts. ``embedlink.testing.memory``
    has one whose lanes are in-process queues."""

    def listen(self, address: str) -> ProvidedListener | None: ...

    def connect(self, address: str) -> Lane | None: ...


_provider: LaneProvider | None = None


def use_provider(provider: LaneProvider | None) -> LaneProvider | None:
    """Make ``provider`` the source of every lane listened for or connected
    from now on (None: Unix sockets again); returns the one it replaces.
    Process-wide: for tests that run endpoints without sockets."""
    global _provider
    previous, _provider = _provider, provider
    return previous


def lane_name(address: str) -> bytes:
    """The abstract socket name of the encoder advertising ``address``."""
    return b"\0embedlink-control/" + address.encode()


def listen(address: str) -> Listener | None:
    """A non-blocking listening socket for ``address``'s lane, or None (with
    the reason logged) where lanes are not supported or the name is taken."""
    if _provider is not None:
        return _provider.listen(address)
    if not SUPPORTED:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(lane_name(address))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        log.warning("no same-host control socket for %s (%s): ZeroMQ only", address, exc)
        return None
    sock.setblocking(False)
    return sock


def accept(listener: Listener) -> list[Lane]:
    """Every connection waiting on ``listener`` (from :func:`listen`), each as
    a :class:`Lane`."""
    if not isinstance(listener, socket.socket):
        provided: ProvidedListener = listener  # type: ignore[assignment]
        return provided.accept_lanes()
    out: list[Lane] = []
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return out
        except OSError as exc:  # e.g. out of file descriptors: the peer falls back to waiting
            log.warning("same-host control socket: accept failed: %s", exc)
            return out
        out.append(Lane(conn))


def connect(address: str) -> Lane | None:
    """A lane to the encoder advertising ``address`` when one listens in this
    network namespace, else None (the caller uses ZeroMQ). Never blocks: a
    Unix connect completes at once, or fails (EAGAIN when the encoder's
    accept queue is full: ZeroMQ then)."""
    if _provider is not None:
        return _provider.connect(address)
    if not SUPPORTED:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(lane_name(address))
    except OSError:
        sock.close()
        return None
    return Lane(sock)


class Lane:
    """One end of a framed, non-blocking Unix stream connection."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._inbox = bytearray()
        self._outbox = bytearray()  # frames, or their tails, the kernel has not taken
        # senders on two threads must not interleave frames or the outbox
        self._send_lock = threading.Lock()
        #: no more messages either way (failed, or closed by the owner)
        self.closed = False
        self._released = False  # the socket itself is closed
        #: messages given to :meth:`send` that will never be sent
        self.dropped = 0

    def fileno(self) -> int:
        """The socket's descriptor (still valid for unregistering after close)."""
        return self._fd

    @property
    def wants_write(self) -> bool:
        """Bytes wait for the socket to become writable: poll it for output."""
        return bool(self._outbox) and not self.closed

    def send(self, payload: bytes) -> bool:
        """Send one message or queue it behind earlier ones; False when it is
        dropped (the lane is closed, or ``MAX_BACKLOG`` bytes already wait)."""
        with self._send_lock:
            return self._send_locked(payload)

    def _send_locked(self, payload: bytes) -> bool:
        if self.closed or len(payload) > MAX_FRAME:
            self.dropped += 1
            return False
        header = _HEADER.pack(len(payload))
        if self._outbox:
            if len(self._outbox) + len(payload) + 4 > MAX_BACKLOG:
                self.dropped += 1
                return False
            self._outbox += header
            self._outbox += payload
            return True
        try:
            n = self._sock.sendmsg((header, payload))
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:  # the peer is gone: its end of stream tells the owner
            self._fail_locked()
            self.dropped += 1
            return False
        if n < len(payload) + 4:
            self._outbox += (header + payload)[n:]
        return True

    def flush(self) -> None:
        """Hand queued bytes to the kernel, as many as it takes now."""
        with self._send_lock:
            while self._outbox and not self.closed:
                try:
                    n = self._sock.send(self._outbox)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    self._fail_locked()
                    return
                del self._outbox[:n]

    def receive(self) -> tuple[list[bytes], str | None]:
        """The whole messages that arrived, and why the lane closed (None while
        it is open). Messages that arrived before the end are returned too.
        Owner thread; the owner then stops polling the lane and closes it."""
        if self._released:
            return [], "closed"
        why = None
        for _ in range(_READS):
            try:
                chunk = self._sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                why = f"connection error: {exc}"
                break
            if not chunk:
                why = "connection closed by the peer"
                break
            self._inbox += chunk
            if len(chunk) < _CHUNK:
                break  # drained: spare the read that would only say so
        frames: list[bytes] = []
        buf, pos = self._inbox, 0
        while len(buf) - pos >= 4:
            (n,) = _HEADER.unpack_from(buf, pos)
            if n > MAX_FRAME:
                why = f"a message of {n} bytes, over the {MAX_FRAME}-byte limit"
                break
            if len(buf) - pos - 4 < n:
                break
            frames.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        if why is not None:
            with self._send_lock:
                self._fail_locked()
        elif self.closed:
            why = "closed after a failed send"
        return frames, why

    def close(self) -> None:
        """Close the socket; queued bytes are lost. Owner thread, after it
        stopped polling the lane. Idempotent."""
        with self._send_lock:
            self._fail_locked()
            if not self._released:
                self._released = True
                self._sock.close()

    def _fail_locked(self) -> None:
        self.closed = True
        self._outbox.clear()
