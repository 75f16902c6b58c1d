"""The encoder's control links: the ZeroMQ ROUTER socket on which language
ranks register and request rooms, and, for those on the same host, a Unix
socket listener whose accepted connections ("lanes", :mod:`embedlink._runtime.lane`)
carry the same messages. A lane stands for a made-up identity
(``b"lane/<n>"``), so the rest of the endpoint answers either kind alike.

Incoming payloads are opened and decoded here (a malformed or
unauthenticated one is dropped, counted and logged sparingly) and handed on
as ``on_message(identity, msg)``; a lane that ends is reported as
``on_lane_closed(identity, why)``. :meth:`ControlLinks.send` sends a message
back to an identity, over whichever link it came on.

The loop thread owns the sockets: everything here runs on it, except
:meth:`ControlLinks.close` (after the loop has stopped).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable

import zmq

from ..._runtime import lane as _lane
from ..._runtime.auth import Authenticator
from ..._runtime.loop import CLOSE_LINGER_MS, Loop
from ...observability.metrics import EndpointMetrics
from ...observability.noise import NoiseLog
from ...protocol import Message, encode
from .._common import PayloadOpener
from .stats import EndpointStats

# the package's logger: the one name operators configure, as before the split
log = logging.getLogger(__package__)

__all__ = ["ControlLinks"]


class ControlLinks:
    """The ROUTER socket and the same-host lanes of one encoder endpoint."""

    def __init__(
        self,
        loop: Loop,
        auth: Authenticator,
        *,
        stats: EndpointStats,
        metrics: EndpointMetrics,
        noise: NoiseLog,
        on_message: Callable[[bytes, Message], None],
        on_lane_closed: Callable[[bytes, str], None],
    ) -> None:
        self._loop = loop
        self._auth = auth
        self._stats = stats
        self._on_message = on_message
        self._on_lane_closed = on_lane_closed
        self._opener = PayloadOpener(
            auth, side="encoder", counters=stats, metrics=metrics, noise=noise, name=self.peer_name
        )
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._listener: _lane.Listener | None = None  # same-host control lanes
        self._lanes: dict[bytes, _lane.Lane] = {}  # by the identity they stand for
        self._lane_ids = itertools.count(1)

    # -- opening and closing

    def bind(self, host: str, port: int) -> int:
        """Bind the ROUTER socket to ``host:port`` (0: a free port) and watch
        it on the loop; returns the port."""
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, 2 << 20)
        try:
            if port:
                sock.bind(f"tcp://{host}:{port}")
            else:
                port = sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as exc:
            # An open socket would block the context's term() in close() for
            # ever: a port in use must fail start(), not hang it.
            sock.close(0)
            raise OSError(
                exc.errno, f"cannot bind the control socket to {host}:{port}: {exc}"
            ) from exc
        self._sock = sock
        self._loop.add_socket(sock, self._on_readable)
        return port

    def listen_local(self, address: str) -> None:
        """Accept same-host lanes for the control ``address`` (where the host allows)."""
        self._listener = _lane.listen(address)
        if self._listener is not None:
            self._loop.add_fd(self._listener.fileno(), self._on_lane_accept)

    def close(self) -> None:
        """Close the socket (letting the messages just sent reach live peers),
        the lanes, the listener and the ZeroMQ context. Fine when never bound."""
        if self._sock is not None:
            self._sock.close(CLOSE_LINGER_MS)  # the aborts just sent, to live peers
        for lane in self._lanes.values():
            lane.close()
        if self._listener is not None:
            self._listener.close()
        if self._ctx is not None:
            self._ctx.term()

    # -- naming peers

    def is_lane(self, identity: bytes) -> bool:
        """Whether ``identity`` stands for a same-host lane."""
        return identity in self._lanes

    def peer_name(self, identity: bytes) -> str:
        """How the logs name the peer behind ``identity``."""
        if identity in self._lanes:
            return f"same-host {identity.decode(errors='replace')}"
        return f"zmq peer {identity.hex()}"

    # -- out

    def send(self, identity: bytes, msg: Message) -> None:
        """Send ``msg`` to ``identity`` without blocking; counted as dropped
        (and logged) when its link is gone or full."""
        assert self._sock is not None
        lane = self._lanes.get(identity)
        if lane is not None:
            if not lane.send(self._auth.seal(encode(msg))):
                self._stats.dropped_messages += 1
                log.info("encoder: could not send %s: lane closed or full", type(msg).__name__)
            self._loop.watch_writable(lane.fileno(), lane.wants_write)
            return
        try:
            self._sock.send_multipart([identity, self._auth.seal(encode(msg))], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or queue full
            self._stats.dropped_messages += 1
            log.info("encoder: could not send %s: %s", type(msg).__name__, exc)

    def reject(self, identity: bytes, kind: str, detail: str) -> None:
        """Drop a decoded message from ``identity`` that is not for an
        encoder: counted as dropped, and logged sparingly."""
        self._opener.reject(identity, kind, detail)

    # -- in

    def _on_readable(self, sock: zmq.Socket[bytes]) -> None:
        for _ in range(256):  # bounded, so timers and calls still run under load
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                peer = frames[0].hex() if frames else "?"
                self._opener.drop(f"zmq peer {peer}", "malformed", f"{len(frames)} frames, not 2")
                continue
            self._on_payload(*frames)

    def _on_payload(self, identity: bytes, payload: bytes) -> None:
        """One control message from ``identity`` (a ZeroMQ peer or a lane)."""
        msg = self._opener.open(payload, identity)
        if msg is None:
            return
        self._on_message(identity, msg)

    def _on_lane_accept(self) -> None:
        assert self._listener is not None
        for lane in _lane.accept(self._listener):
            identity = b"lane/%d" % next(self._lane_ids)
            self._lanes[identity] = lane
            self._loop.add_lane(
                lane,
                functools.partial(self._on_payload, identity),
                functools.partial(self._lane_closed, identity),
            )

    def _lane_closed(self, identity: bytes, why: str) -> None:
        """A language endpoint on this host closed its lane (it closed, died or
        gave up on us): forget the lane, then tell the sessions
        (``on_lane_closed``), which declare its session dead."""
        lane = self._lanes.pop(identity)
        self._loop.remove_fd(lane.fileno())
        lane.close()
        self._on_lane_closed(identity, why)
