"""The language side's control links (one per encoder rank it talks to) and
the fences that hold a dead encoder's blocks until its writes cannot land.

A link is a ZeroMQ DEALER, or a lane (a Unix socket carrying the same
messages, :mod:`embedlink._runtime.lane`) when the encoder runs on this host.
Each has a token naming its data-plane link, which the transport servers can
fence (``TransportServer.fence``) when the encoder is declared dead: the
encoder may be alive behind a broken link, with writes held up in the
network, so the blocks it was offered come back only once every data plane
has fenced the link (or, where one cannot, after a grace).
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from ..._runtime import lane as _lane
from ..._runtime.auth import Authenticator
from ..._runtime.loop import Loop
from ...protocol import Message, encode
from ...transports import TransportServer

if TYPE_CHECKING:
    from .receiver import LiveRoom

__all__ = ["EncoderLink", "Fence", "Fences", "Links"]


@dataclass(eq=False)
class EncoderLink:
    """The control connection to one encoder rank: a ZeroMQ DEALER, or a lane
    when the encoder runs on this host."""

    address: str
    sock: zmq.Socket[bytes] | None
    lane: _lane.Lane | None = None
    last_seen: float = field(default_factory=time.monotonic)
    last_ping: float = 0.0
    seq: int = 0
    #: names this control connection's data-plane link (see TransportServer.fence)
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def control(self) -> str:
        return "zmq" if self.lane is None else "unix"

    def send(self, payload: bytes) -> bool:
        """Send one sealed message; False when it was dropped."""
        if self.lane is not None:
            return self.lane.send(payload)
        assert self.sock is not None
        if self.sock.closed:  # declared dead meanwhile: nothing goes out any more
            return False
        self.sock.send(payload)
        return True

    def close(self, linger_ms: int = 0) -> None:
        """``linger_ms``: how long ZeroMQ may still try to deliver what was sent."""
        if self.lane is not None:
            self.lane.close()
        if self.sock is not None:
            self.sock.close(linger_ms)


@dataclass(eq=False)
class Fence:
    """The rooms of one encoder declared dead, holding the blocks it was
    offered until its data-plane link is fenced on every transport."""

    encoder: EncoderLink
    #: when a transport that cannot fence lets the blocks go (monotonic)
    release_at: float
    rooms: list[LiveRoom] = field(default_factory=list)
    #: transports that will still call one_done
    waiting: int = 0
    #: some transport cannot fence: wait for release_at too
    graced: bool = False
    settled: bool = False


class Fences:
    """The fences still up. ``settled(room)`` gives a room's blocks back once
    its fence settles. Loop thread only."""

    def __init__(
        self, grace: float, settled: Callable[[LiveRoom], None], log: Callable[..., None]
    ) -> None:
        self.grace = grace
        self._settled = settled
        self._log = log
        self.up: list[Fence] = []

    def __bool__(self) -> bool:
        return bool(self.up)

    def raise_for(self, enc: EncoderLink) -> Fence:
        """A fence for dead ``enc``. Its rooms join with :meth:`hold`, then
        :meth:`ask` asks the transport servers to fence the link."""
        fence = Fence(enc, time.monotonic() + self.grace)
        self.up.append(fence)
        return fence

    def ask(
        self,
        fence: Fence,
        servers: Sequence[TransportServer],
        done: Callable[[Fence], None],
        *,
        gone: bool,
    ) -> None:
        """Ask each of ``servers`` to fence ``fence``'s link; each calls back
        (through ``done``, which must bring the call to the loop thread, where
        it calls :meth:`one_done`) once it has. One that cannot fence leaves
        the blocks to the grace. ``gone``: the peer is known to have closed."""
        for server in servers:
            fence.waiting += 1
            if not server.fence(fence.encoder.token, functools.partial(done, fence), gone=gone):
                fence.waiting -= 1
                fence.graced = True

    def hold(self, fence: Fence, live: LiveRoom) -> None:
        """Keep ``live``'s blocks until ``fence`` settles (now, if it has)."""
        if fence.settled:
            self._settled(live)
        else:
            fence.rooms.append(live)

    def one_done(self, fence: Fence) -> None:
        """A transport fenced ``fence``'s link (loop thread)."""
        fence.waiting -= 1
        self.settle(time.monotonic())

    def settle(self, now: float) -> None:
        """Give back the blocks of dead encoders whose links are fenced, or
        whose grace has passed."""
        for fence in list(self.up):
            if fence.waiting > 0 or (fence.graced and now < fence.release_at):
                continue
            if fence.graced and fence.rooms:
                self._log(
                    "language: the blocks encoder %s was offered come back after %.0fs "
                    "(its transport cannot fence late writes)",
                    fence.encoder.address,
                    self.grace,
                )
            self.up.remove(fence)
            fence.settled = True
            for live in fence.rooms:
                self._settled(live)
            fence.rooms = []


class Links:
    """The control links of one language endpoint, by encoder address.

    ``hello(link)`` builds the Register message a new link opens with;
    ``on_payload(link, payload)`` takes each sealed message that arrives;
    ``on_lane_closed(link, why)`` hears of a lane its encoder closed;
    ``on_unsent(kind, address)`` counts a message that could not go out
    (called by whoever runs the loop's work). The loop thread owns the links;
    :meth:`send` may be called from any thread (see there).
    """

    def __init__(
        self,
        loop: Loop,
        auth: Authenticator,
        *,
        local_control: bool,
        hello: Callable[[EncoderLink], Message],
        on_payload: Callable[[EncoderLink, bytes], None],
        on_lane_closed: Callable[[EncoderLink, str], None],
        on_unsent: Callable[[str, str], None],
    ) -> None:
        self._loop = loop
        self._auth = auth
        self.local_control = local_control
        self._hello = hello
        self._on_payload = on_payload
        self._on_lane_closed = on_lane_closed
        self._on_unsent = on_unsent
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.by_address: dict[str, EncoderLink] = {}
        self._by_sock: dict[zmq.Socket[bytes], EncoderLink] = {}

    def open(self) -> None:
        self._ctx = zmq.Context()

    def close(self, linger_ms: int) -> None:
        """Close every link (``linger_ms``: for what was just sent) and the context."""
        for e in self.by_address.values():
            e.close(linger_ms)
        if self._ctx is not None:
            self._ctx.term()

    def get(self, address: str) -> EncoderLink | None:
        return self.by_address.get(address)

    def connect(self, address: str) -> EncoderLink:
        """The link to ``address``, opened (and registered) if there is none. Loop thread."""
        enc = self.by_address.get(address)
        if enc is not None:
            return enc
        assert self._ctx is not None
        lane = _lane.connect(address) if self.local_control else None
        if lane is not None:
            enc = EncoderLink(address, None, lane)
            self._loop.add_lane(
                lane,
                functools.partial(self._on_payload, enc),
                functools.partial(self._on_lane_closed, enc),
            )
        else:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, 2 << 20)
            sock.connect(f"tcp://{address}")
            enc = EncoderLink(address, sock)
            self._by_sock[sock] = enc
            self._loop.add_socket(sock, self._on_readable)
        # Register first, then publish: a caller's thread that finds the
        # encoder in the table may send a request on the lane at once
        # (_start_here), and it must arrive after the registration.
        self.send(enc, self._hello(enc))
        self.by_address[address] = enc
        return enc

    def drop(self, enc: EncoderLink) -> None:
        """Forget and close ``enc`` (its encoder was declared dead): the next
        room for that address connects afresh. Loop thread."""
        del self.by_address[enc.address]
        if enc.sock is not None:
            self._by_sock.pop(enc.sock, None)
            self._loop.remove_socket(enc.sock)
        if enc.lane is not None:
            self._loop.remove_fd(enc.lane.fileno())
        enc.close()

    def send(self, enc: EncoderLink, msg: Message) -> bool:
        """Send ``msg`` to ``enc``; False when it was dropped. Any thread for a
        lane (``_start_here``); over ZeroMQ only the loop thread touches the
        socket, so others queue the send for it (loop work run on another
        thread, ``Loop.try_run_here``/``serve_here``)."""
        if enc.lane is None and not self._loop.on_loop_thread():
            self._loop.call(self.send, enc, msg)
            return True
        ok = enc.send(self._auth.seal(encode(msg)))
        if not ok:
            # counters have one writer: whoever runs the loop's work
            if self._loop.holds_state() or self._loop.on_loop_thread():
                self._on_unsent(type(msg).__name__, enc.address)
            else:
                self._loop.call_lazy(self._on_unsent, type(msg).__name__, enc.address)
        if enc.lane is not None and enc.lane.wants_write:
            if self._loop.holds_state():
                self._loop.watch_writable(enc.lane.fileno(), True)
            else:
                self._loop.call(self._watch_lane, enc)
        return ok

    def _watch_lane(self, enc: EncoderLink) -> None:
        if enc.lane is not None and not enc.lane.closed:
            self._loop.watch_writable(enc.lane.fileno(), enc.lane.wants_write)

    def _on_readable(self, sock: zmq.Socket[bytes]) -> None:
        enc = self._by_sock.get(sock)
        for _ in range(256):
            try:
                payload = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if enc is not None:
                self._on_payload(enc, payload)
