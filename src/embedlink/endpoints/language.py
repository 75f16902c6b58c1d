"""The receiving side: :class:`LanguageEndpoint` and its per-room :class:`Receiver`.

A language endpoint owns a block pool (in shared memory when ``shm`` is
offered), the transport servers that let encoders write into it, one ZeroMQ
DEALER per encoder rank it talks to (or, for an encoder on the same host, a
Unix socket carrying the same messages: ``_lane``), and the
:class:`~embedlink.protocol.ReceiverRoom` of every live room. It drives
resumes itself: after each partial chunk it copies the data out into the
request's own arrays, frees the blocks, reserves the rest (or what the pool
has) and asks the encoder to resume. When the pool is full, reservations queue
and are retried whenever blocks are freed.

Deadlock avoidance: a first reservation can wait for data the encoder cannot
produce until its own pool drains, and the encoder pool drains only when the
rooms it holds are resumed. So resumes are served before first reservations,
and first reservations never take the last ``resume_headroom`` blocks: a
resume always finds blocks eventually, every resumed room finishes, the
encoder frees its pool, and the rooms waiting on it can proceed.

That argument needs the two sides to agree on order: first reservations are
granted in the order ``receiver()`` was called (per endpoint), whether a
room's route was cached, looked up meanwhile, or started from the caller's
thread. An encoder that fills its pool in another order than its receivers
ask can still wait on a language pool held by rooms it cannot produce yet;
its ``send()`` then fails that room at its deadline, and the pools move on.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from .._runtime import lane as _lane
from .._runtime.auth import Authenticator
from .._runtime.host import host_id
from .._runtime.loop import BUSY_POLL_S, CLOSE_LINGER_MS, Loop, check_endpoint_knobs
from ..bootstrap.resolver import Resolver, check_bootstrap_address, route_for
from ..embedding import Embedding, from_pool_arrays
from ..memory import BlockAllocator, BufferPool, pool_status
from ..observability.metrics import EndpointMetrics, MetricsExporter, rooms_by_status
from ..observability.noise import NoiseLog
from ..protocol import (
    AUX_FIELD,
    Abort,
    Action,
    BufferSchema,
    Drop,
    FieldDesc,
    FreeBlocks,
    Harvest,
    Heartbeat,
    Message,
    ReceiverRoom,
    RegionDesc,
    Register,
    RemoteProtocolError,
    Reserve,
    RoomId,
    Send,
    Status,
    StatusChanged,
    StatusUpdate,
    TransferError,
    decode,
    encode,
)
from ..transports import TransportServer, get_backend

log = logging.getLogger(__name__)

__all__ = ["LanguageEndpoint", "Receiver", "route_for"]


@dataclass
class _Encoder:
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


@dataclass
class _Fence:
    """The rooms of one encoder declared dead, holding the blocks it was
    offered until its data-plane link is fenced on every transport."""

    encoder: _Encoder
    #: when a transport that cannot fence lets the blocks go (monotonic)
    release_at: float
    rooms: list[_Live] = field(default_factory=list)
    #: transports that will still call one_done
    waiting: int = 0
    #: some transport cannot fence: wait for release_at too
    graced: bool = False
    settled: bool = False


@dataclass
class _Live:
    room: ReceiverRoom
    encoder: _Encoder | None
    done: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    result: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    aux: Any = None
    queued: bool = False  # waiting in the reservation queue
    cleared: bool = False  # the user called clear(): wait() has nothing to return
    pinned: tuple[int, ...] | None = None  # blocks a zero-copy result lives in
    #: zero-copy rooms that resume: the first pool token of the contiguous run
    #: the whole embedding is assembled in (``pinned`` holds its blocks) ...
    area_start: int | None = None
    #: ... and the part of it the next chunk is to land in (its reservation)
    extension: list[int] | None = None
    #: the caller's thread is still starting the room (``receiver``'s fast
    #: path): the loop queues what it would do to it in ``deferred`` instead
    starting: bool = False
    deferred: list[Callable[[], None]] = field(default_factory=list)
    #: an eventfd the thread in wait() polls while it serves the room's lane
    #: itself (``Loop.serve_here``): written when the room ends some other
    #: way. Set and cleared holding the loop's state.
    waker: int | None = None
    waker_thread: int | None = None  # the thread polling ``waker``
    #: ``(bootstrap, dp_group)`` while the room waits for its encoder's
    #: address (the resolver looks it up off the caller's thread)
    route: tuple[str, int | None] | None = None
    on_done: Callable[[RoomId], None] | None = None
    #: counted in ``LanguageEndpoint._handed`` (until it starts or ends)
    handed: bool = False
    #: an ended room still holding blocks its encoder was offered: when its
    #: Abort goes out again if no acknowledgement came (``_ask_again``)
    ask_again_at: float | None = None


class Receiver:
    """One room on the language side. Obtain from :meth:`LanguageEndpoint.receiver`."""

    def __init__(self, endpoint: LanguageEndpoint, live: _Live) -> None:
        self._ep = endpoint
        self._live = live
        self.room: RoomId = live.room.room

    def poll(self) -> Status:
        """The room's status now. Never blocks; safe from any thread."""
        return self._live.room.status

    @property
    def failure_reason(self) -> str | None:
        return self._live.room.failure_reason

    @property
    def meta(self) -> bytes | None:
        """What the encoder attached to the embedding (``Sender.send(...,
        meta=)``), once the first chunk arrived; None when it attached nothing."""
        return self._live.room.meta

    @property
    def history(self) -> list[tuple[Status, int]]:
        """``(status, sent_tokens)`` in the order observed."""
        return self._live.room.history

    @property
    def epoch(self) -> int:
        return self._live.room.epoch

    def wait(self, timeout: float | None = None) -> Embedding:
        """Block until the room ends and return the reassembled embedding.

        Raises :class:`TransferError` (room ``Failed``) with the reason, or
        ``TimeoutError`` when ``timeout`` passes first (the room is untouched).
        With ``zero_copy=True`` on the endpoint, an embedding that arrived in
        one chunk is returned as views into the pool, valid until :meth:`clear`.
        Where the room's encoder is on this host, the calling thread reads the
        answer itself, looking for it without sleeping for the endpoint's
        ``busy_poll_us`` after it starts and after each message (yielding the
        CPU to other runnable threads meanwhile); the rest of the wait sleeps.
        """
        if self._live.cleared:
            raise RuntimeError(f"room {self.room} was cleared: its result is gone")
        if not self._live.done.is_set():
            t0 = time.monotonic()
            self._ep._serve_until_done(self._live, timeout)
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - t0))
        if not self._live.done.wait(timeout):
            raise TimeoutError(f"room {self.room} still {self.poll()} after {timeout}s")
        room = self._live.room
        if room.status is not Status.Success:
            raise TransferError(self.room, room.failure_reason or "failed")
        delta = int(self._live.aux["mrope_position_delta"]) if self._live.aux is not None else 0
        return from_pool_arrays(self._live.result, delta)

    @property
    def in_pool(self) -> bool:
        """What :meth:`wait` returns is views into the pool (a ``zero_copy``
        endpoint), valid until :meth:`clear`, which gives the blocks back;
        False for arrays of their own."""
        return self._live.pinned is not None

    @property
    def aux(self) -> Any:
        """The aux record (total_tokens, mrope_position_delta, checksum, flags) once known."""
        return self._live.aux

    def abort(self, reason: str = "aborted by receiver") -> None:
        """Give up on the room. When this returns, :meth:`poll` is ``Failed``
        and :attr:`failure_reason` is ``reason`` (and :meth:`wait` raises);
        the encoder is told afterwards, off this thread. Blocks the encoder
        may still write into stay reserved until it acknowledges (or is
        declared dead). No-op once the room has ended. Never blocks."""
        self._ep._abort_now(self._live, reason)

    def clear(self) -> None:
        """Forget the room; an unfinished room is aborted first (as
        :meth:`abort`). Blocks the encoder may still write into stay reserved
        until it acknowledges. Never blocks."""
        live, ep = self._live, self._ep
        live.cleared = True
        ep._abort_now(live, "cleared before it finished")
        if live.room.done and live.pinned is None and not live.room.holds_blocks:
            # Nothing to free or tell the encoder: forget the id now (so it can
            # be reused at once) and leave the rest, letting go of the result
            # included, to the loop's next wake-up (a room aborted by another
            # thread may still be in the middle of a harvest there).
            with ep._lock:
                if ep._rooms.get(self.room) is live:
                    del ep._rooms[self.room]
            ep._loop.call_lazy(ep._clear_room, live)
        elif not ep._loop.try_run_here(ep._clear_room, live):
            # the loop is busy: it frees the blocks (and tells the encoder)
            ep._loop.call(ep._clear_room, live)


class LanguageEndpoint:
    """The receiving side of embedlink for one language (prefill) rank.

    ``zero_copy=True`` returns results as views into the pool (valid until
    ``clear()``), resumed rooms included when the pool has a run long enough
    for the whole embedding. ``bootstrap_timeout`` bounds how long a room may
    stay ``Bootstrapping``; unset, the room timeout applies. The other settings
    are those of ``docs/configuration.md``.
    """

    def __init__(
        self,
        schema: BufferSchema,
        *,
        num_blocks: int = 1024,
        block_size: int = 128,
        default_tokens: int = 1024,
        transports: Sequence[str] = ("shm", "tcp"),
        tp_rank: int = 0,
        tp_size: int = 1,
        dp_size: int = 1,
        host: str = "127.0.0.1",
        room_timeout: float = 60.0,
        bootstrap_timeout: float | None = None,
        resume_headroom: int | None = None,
        zero_copy: bool = False,
        heartbeat_interval: float = 2.0,
        heartbeat_misses: int = 3,
        room_ttl: float = 600.0,
        auth_secret: str | bytes | None = None,
        metrics_port: int | None = None,
        transport_options: Mapping[str, Mapping[str, str]] | None = None,
        device: str | None = None,
        local_control: bool = True,
        busy_poll_us: float = BUSY_POLL_S * 1e6,
        route_refresh: float = 10.0,
        stale_write_grace: float = 30.0,
    ) -> None:
        if not transports:
            raise ValueError("offer at least one transport")
        if default_tokens <= 0:
            raise ValueError(f"default_tokens must be positive, got {default_tokens}")
        if route_refresh <= 0:
            raise ValueError(f"route_refresh must be positive, got {route_refresh}")
        if stale_write_grace <= 0:
            raise ValueError(f"stale_write_grace must be positive, got {stale_write_grace}")
        self.stale_write_grace = stale_write_grace
        check_endpoint_knobs(
            tp_rank=tp_rank,
            tp_size=tp_size,
            room_timeout=room_timeout,
            bootstrap_timeout=bootstrap_timeout,
            heartbeat_interval=heartbeat_interval,
            heartbeat_misses=heartbeat_misses,
            busy_poll_us=busy_poll_us,
        )
        if default_tokens > num_blocks * block_size:
            raise ValueError(
                f"default_tokens={default_tokens} exceeds the pool's {num_blocks * block_size} tokens"
            )
        self._backends = [get_backend(t) for t in transports]
        self.schema = schema
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.default_tokens = default_tokens
        self.transports = tuple(transports)
        self.tp_rank, self.tp_size, self.dp_size = tp_rank, tp_size, dp_size
        self.host = host
        self.room_timeout = room_timeout
        self.bootstrap_timeout = bootstrap_timeout
        self.transport_options = {k: dict(v) for k, v in (transport_options or {}).items()}
        #: return single-chunk results as views into the pool (valid until clear())
        self.zero_copy = zero_copy
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        #: reach encoders on this host over a Unix socket (``_lane``), not ZeroMQ
        self.local_control = local_control
        self.dead_encoders = 0
        #: Aborts sent again because no acknowledgement came (``_ask_again``)
        self.abort_repeats = 0
        #: terminal rooms never cleared are forgotten (and their blocks freed) after this
        self.room_ttl = room_ttl
        self.collected_rooms = 0
        self._auth = Authenticator(auth_secret)
        self.unauthenticated_messages = 0
        self.metrics = EndpointMetrics(
            "language", lambda: self.allocator.num_free, lambda: self.allocator.num_used
        )
        self.metrics_port = metrics_port
        self._exporter: MetricsExporter | None = None
        # rooms that ended and are not cleared yet, oldest first (by id(live)):
        # collected after room_ttl; clear() takes a room out at once, so a
        # busy endpoint whose users clear their rooms keeps none of them
        self._ended: dict[int, tuple[float, _Live]] = {}
        self.session = f"lang-{tp_rank}-{uuid.uuid4().hex[:16]}"
        self._token_bytes = schema.token_bytes
        self._shared: Any = None
        if "shm" in self.transports:
            from ..transports.shm import create_shared_pool

            if device not in (None, "cpu"):
                raise ValueError(
                    f"the shm transport needs host memory; a pool on {device} cannot offer it"
                )
            self._shared = create_shared_pool(schema, num_blocks, block_size, device=device)
            self.pool: BufferPool = self._shared.pool
        else:
            self.pool = BufferPool(schema, num_blocks, block_size, device=device)
        self.allocator = BlockAllocator(num_blocks)
        #: blocks first reservations leave for resumes (default: 1/8 of the pool, at least 1)
        self.resume_headroom = (
            max(1, num_blocks // 8) if resume_headroom is None else resume_headroom
        )
        if not 0 <= self.resume_headroom < num_blocks:
            raise ValueError(f"resume_headroom={self.resume_headroom} must be in [0, {num_blocks})")
        self._servers: list[TransportServer] = []
        self._encoders: dict[str, _Encoder] = {}
        self._by_sock: dict[zmq.Socket[bytes], _Encoder] = {}
        # encoder addresses are looked up off the callers' threads
        self._resolver = Resolver(
            tp_rank=tp_rank,
            tp_size=tp_size,
            dp_size=dp_size,
            on_change=self._routes_changed,
            refresh=route_refresh,
            name=f"embedlink-resolver-{tp_rank}",
        )
        self._unrouted: dict[int, _Live] = {}  # rooms waiting for a route, by id(live)
        self._rooms: dict[RoomId, _Live] = {}
        self._zombies: dict[tuple[RoomId, int], _Live] = {}
        # dead encoders whose writes may still land: their rooms keep the
        # blocks they offered until every data plane fenced the link
        self._fencing: list[_Fence] = []
        # rooms waiting for blocks: resumes first, then first reservations
        self._resumes: collections.deque[tuple[_Live, int]] = collections.deque()
        self._firsts: collections.deque[tuple[_Live, int]] = collections.deque()
        # Rooms handed to the loop to start that have not reached their first
        # reservation yet (waiting for a route, or for the loop to run): while
        # any has, a later room must not take blocks from the caller's thread
        # (``_start_here``). First reservations are granted in the order
        # ``receiver()`` was called; see _start_room. Under ``_lock``.
        self._handed = 0
        self._lock = threading.Lock()
        # Held while a room's state machine takes one event (_step): the loop
        # and a user's thread in abort() may step the same room at once.
        self._step_lock = threading.Lock()
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._loop = Loop(
            f"embedlink-language-{tp_rank}", tick=self._tick, busy_poll=busy_poll_us / 1e6
        )
        # dropped input: hostile or broken (WARNING), or merely late (DEBUG),
        # each counted exactly and logged at most once per peer per interval
        self._noise = NoiseLog(log, "language")
        self._stale = NoiseLog(log, "language", level=logging.DEBUG)
        self._started = False
        self._closed = False
        self.dropped_messages = 0
        self.ignored_inputs = 0

    # -- lifecycle

    def start(self) -> LanguageEndpoint:
        """Start the transport servers, the loop thread, the resolver and (with
        ``metrics_port``) the metrics exporter. Once: RuntimeError when called
        again or after :meth:`close`. What was started is closed again when a
        part fails to start."""
        if self._closed:
            raise RuntimeError("the endpoint is closed; create a new one")
        if self._started:
            raise RuntimeError("the endpoint is already started")
        self._started = True
        try:
            for b in self._backends:
                server = b.server(
                    self.pool, host=self.host, options=self.transport_options.get(b.name)
                )
                self._servers.append(server.start())
            self._ctx = zmq.Context()
            self._loop.start()
            self._resolver.start()
            if self.metrics_port is not None:
                self._exporter = MetricsExporter(
                    self.metrics.registry, self.host, self.metrics_port, status=self.status
                ).start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """End the open rooms (their encoders are told), stop the threads and
        close sockets, transport servers and the pool: afterwards no thread of
        this endpoint is alive. Idempotent; fine without :meth:`start`."""
        if self._closed:
            return
        self._closed = True
        if self._loop.alive:
            # Rooms still open end now, with a reason, and their encoders are
            # told: threads waiting on them return instead of at their timeouts.
            try:
                self._loop.call_wait(self._end_rooms, "language endpoint closed")
            except TimeoutError:
                log.warning("language: the loop did not end the open rooms before closing")
        self._loop.stop()
        self._resolver.close()
        for e in self._encoders.values():
            e.close(CLOSE_LINGER_MS)  # the aborts just sent, to live peers
        if self._ctx is not None:
            self._ctx.term()
        for s in self._servers:
            s.close()
        if self._exporter is not None:
            self._exporter.close()
        if self._shared is not None:
            self._shared.close()

    def __enter__(self) -> LanguageEndpoint:
        return self if self._started and not self._closed else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API

    def receiver(
        self,
        *,
        bootstrap: str | None = None,
        room: RoomId,
        encoder: str | None = None,
        dp_group: int | None = None,
        tokens: int | None = None,
        on_done: Callable[[RoomId], None] | None = None,
    ) -> Receiver:
        """Reserve ``default_tokens`` and ask the encoder for ``room``.

        The encoder rank is found through the ``bootstrap`` server (or given
        directly as ``encoder="host:port"``). ``tokens`` overrides the first
        reservation's size. Never blocks, on the network or on the pool: the
        encoder's address comes from a cache, and when it is not cached yet
        (or was dropped because that encoder was declared dead) the room
        stays ``Bootstrapping`` while it is looked up on another thread; it
        also queues there while the pool is full. A room whose encoder cannot
        be found ends ``Failed``, with a reason naming the bootstrap server
        and what it answered, when ``bootstrap_timeout`` (else
        ``room_timeout``) passes. Raises ValueError for a malformed bootstrap
        address, a room id that is still live here or a reservation larger
        than the pool; RuntimeError unless the endpoint is running.

        ``on_done(room)``, when given, is called once when the room ends
        (``Success`` or ``Failed``), on the endpoint's loop thread or, for an
        abort, on the aborting thread: it must return at once (hand the room
        to a queue) and must not call into the endpoint. An exception it
        raises is logged.
        """
        first = self.default_tokens if tokens is None else tokens
        if not 0 < first <= self.num_blocks * self.block_size:
            raise ValueError(
                f"room {room}: a reservation of {first} tokens does not fit the pool's "
                f"{self.num_blocks * self.block_size} tokens"
            )
        if not self._started or self._closed:
            raise RuntimeError("the endpoint is not running (start() it first)")
        required = 1
        route: tuple[str, int | None] | None = None
        if encoder is None:
            if bootstrap is None:
                raise ValueError("give bootstrap= (or encoder=)")
            check_bootstrap_address(bootstrap)
            found = self._resolver.get(bootstrap, room, dp_group)
            if found is None:
                route = (bootstrap, dp_group)
            else:
                encoder, required = found
        r = ReceiverRoom(
            room,
            session=self.session,
            # private randomness: a host program that seeds `random` must not
            # make epochs repeat (stale data would then pass for current)
            epoch=secrets.randbits(62) + 1,
            block_size=self.block_size,
            now=time.monotonic(),
            timeout=self.room_timeout,
            bootstrap_timeout=self.bootstrap_timeout,
            default_tokens=first,
            required_dst_info_num=required,
        )
        live = _Live(r, None, route=route, on_done=on_done)
        with self._lock:
            if room in self._rooms:
                raise ValueError(
                    f"room {room} is still live on this language rank; clear() it first"
                )
            self._rooms[room] = live
            enc = None if encoder is None else self._encoders.get(encoder)
            if (
                enc is not None
                and enc.lane is not None
                and not enc.lane.closed
                and not self._handed
            ):
                live.starting = True
            else:
                live.handed = True
                self._handed += 1
        if encoder is None:
            self._loop.call(self._await_route, live)
        elif not (live.starting and self._start_here(live, enc)):
            if bootstrap is None:
                self._loop.call(self._start_room, live, encoder)
            else:
                self._loop.call(self._start_in_order, live, encoder, bootstrap)
        return Receiver(self, live)

    def _start_here(self, live: _Live, enc: _Encoder | None) -> bool:
        """Reserve the first blocks and send the request from the caller's
        thread, over a same-host lane: the loop thread is not woken for it,
        which saves a wake-up on every room's path (docs/performance.md).
        False, with nothing done, when the loop must do it (the pool is short
        or other rooms queue for blocks). The loop defers what it would do to
        the room meanwhile (``_Live.starting``) and does it afterwards."""
        assert enc is not None
        now = time.monotonic()
        acts = self._step(live.room.start, now)
        if not acts:  # aborted meanwhile by another thread: tell the encoder instead
            self._tell_aborted(live, enc)
            self._end_start(live)
            return True
        (reserve,) = acts
        assert isinstance(reserve, Reserve)
        blocks = self._take_blocks(live, reserve.tokens, first_in_line=True)
        if blocks is None:
            with self._lock:  # the loop starts it: later rooms wait behind it
                live.handed = True
                self._handed += 1
            self._end_start(live)
            return False
        live.encoder = enc
        tokens = min(reserve.tokens, len(blocks) * self.block_size)
        later: list[Action] = []
        sent = True
        for a in self._step(live.room.reserved, blocks, tokens, now):
            if isinstance(a, Send):
                sent = self._send(enc, a.msg) and sent
            elif not (isinstance(a, StatusChanged) and not a.new.is_terminal):
                later.append(a)  # nothing else is expected; the loop handles it
        if later:
            self._loop.call(self._run, live, later)
        self._end_start(live)
        if not sent:
            # the lane closed under us: its encoder is being declared dead
            self._loop.call(self._lost_before_start, live, enc)
        return True

    def _end_start(self, live: _Live) -> None:
        """The caller's thread is done with ``live``: hand the loop what it
        deferred meanwhile, in order."""
        with self._lock:
            live.starting = False
            deferred, live.deferred = live.deferred, []
        for fn in deferred:
            self._loop.call(fn)

    def _lost_before_start(self, live: _Live, enc: _Encoder) -> None:
        reason = f"control connection to encoder {enc.address} closed"
        self._run(live, self._step(live.room.peer_dead, time.monotonic(), reason))

    def _step(self, event: Callable[..., list[Action]], *args: Any) -> list[Action]:
        """Feed one event to a room's state machine (``event`` is one of its
        methods) and return the actions. Under the step lock: the loop and a
        user's thread in :meth:`Receiver.abort` may step the same room at once.
        The actions are carried out afterwards, outside the lock."""
        with self._step_lock:
            return event(*args)

    def _abort_now(self, live: _Live, reason: str) -> None:
        """:meth:`Receiver.abort` on the caller's thread: the room is
        ``Failed`` when this returns; telling the encoder and releasing
        blocks follow on the loop (or here, if it is asleep)."""
        acts = self._step(live.room.abort, time.monotonic(), reason)
        if not acts:
            return  # it had ended already
        live.done.set()  # wait() returns at once, before the loop has run
        if not self._loop.try_run_here(self._after_abort, live, acts):
            self._loop.call(self._after_abort, live, acts)

    def _after_abort(self, live: _Live, actions: list[Action]) -> None:
        if self._defer(live, functools.partial(self._after_abort, live, actions)):
            return
        self._dequeue(live)
        self._run(live, actions)

    def _defer(self, live: _Live, fn: Callable[[], None]) -> bool:
        """Queue ``fn`` for after a room's fast start; False when it is not
        starting (run ``fn`` now). Loop thread."""
        if not live.starting:
            return False
        with self._lock:
            if live.starting:
                live.deferred.append(fn)
                return True
        return False

    @property
    def metrics_address(self) -> str | None:
        """``host:port`` serving ``/metrics`` and ``/status`` (None without ``metrics_port``)."""
        return None if self._exporter is None else self._exporter.address(self.host)

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot: live rooms by status, pool use, encoders, counters.

        Taken on the loop thread, so it is consistent; what ``GET /status``
        and ``embedlink status`` show.
        """
        return self._loop.call_wait(self._snapshot, timeout=5.0)  # type: ignore[no-any-return]

    def _snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        rooms = rooms_by_status(live.room.status for live in self._rooms.values())
        limit = self.heartbeat_interval * self.heartbeat_misses
        return {
            "side": "language",
            "session": self.session,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "dp_size": self.dp_size,
            "transports": list(self.transports),
            "default_tokens": self.default_tokens,
            "rooms": rooms,
            "queued_reservations": {"resumes": len(self._resumes), "first": len(self._firsts)},
            "pool": pool_status(self.pool, self.allocator),
            "peers": [
                {
                    "encoder": address,
                    "control": e.control,
                    "alive": now - e.last_seen <= limit,
                    "last_seen_s": round(now - e.last_seen, 3),
                }
                for address, e in self._encoders.items()
            ],
            "routes": self._resolver.cached_routes(),
            "rooms_waiting_for_route": len(self._unrouted),
            "counters": {
                "dropped_messages": self.dropped_messages,
                "ignored_inputs": self.ignored_inputs,
                "unauthenticated_messages": self.unauthenticated_messages,
                "dead_encoders": self.dead_encoders,
                "abort_repeats": self.abort_repeats,
                "collected_rooms": self.collected_rooms,
            },
            "loop_errors": self._loop.errors,
        }

    def pool_usage(self) -> tuple[int, int]:
        """``(used, total)`` blocks (blocks held for in-flight writes count as used)."""
        return self.allocator.num_used, self.num_blocks

    def room_count(self) -> int:
        return len(self._rooms)

    # -- loop thread

    def _encoder(self, address: str) -> _Encoder:
        enc = self._encoders.get(address)
        if enc is not None:
            return enc
        assert self._ctx is not None
        lane = _lane.connect(address) if self.local_control else None
        if lane is not None:
            enc = _Encoder(address, None, lane)
            self._loop.add_lane(
                lane,
                functools.partial(self._on_payload, enc),
                functools.partial(self._lane_closed, enc),
            )
        else:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, 2 << 20)
            sock.connect(f"tcp://{address}")
            enc = _Encoder(address, sock)
            self._by_sock[sock] = enc
            self._loop.add_socket(sock, self._on_readable)
        # Register first, then publish: a caller's thread that finds the
        # encoder in the table may send a request on the lane at once
        # (_start_here), and it must arrive after the registration.
        self._send(enc, self._register(enc))
        self._encoders[address] = enc
        return enc

    def _send(self, enc: _Encoder, msg: Message) -> bool:
        """Send ``msg`` to ``enc``; False when it was dropped. Any thread for a
        lane (``_start_here``); over ZeroMQ only the loop thread touches the
        socket, so others queue the send for it (loop work run on another
        thread, ``Loop.try_run_here``/``serve_here``)."""
        if enc.lane is None and not self._loop.on_loop_thread():
            self._loop.call(self._send, enc, msg)
            return True
        ok = enc.send(self._auth.seal(encode(msg)))
        if not ok:
            # counters have one writer: whoever runs the loop's work
            if self._loop.holds_state() or self._loop.on_loop_thread():
                self._unsent(type(msg).__name__, enc.address)
            else:
                self._loop.call_lazy(self._unsent, type(msg).__name__, enc.address)
        if enc.lane is not None and enc.lane.wants_write:
            if self._loop.holds_state():
                self._loop.watch_writable(enc.lane.fileno(), True)
            else:
                self._loop.call(self._watch_lane, enc)
        return ok

    def _unsent(self, kind: str, address: str) -> None:
        self.dropped_messages += 1
        log.info("language: could not send %s to %s", kind, address)

    def _serve_until_done(self, live: _Live, timeout: float | None) -> None:
        """Wait for ``live`` to end by serving its encoder's lane on this thread
        (``Loop.serve_here``): the answer then wakes this thread directly
        instead of the loop, which would then wake this thread. Returns at
        once, having done nothing, where that cannot be done (no lane, another
        thread already serves it, no eventfd): the caller then waits for the
        room's event as before."""
        enc = live.encoder
        if enc is None or enc.lane is None or enc.lane.closed or not hasattr(os, "eventfd"):
            return
        if timeout is not None and timeout <= 0:
            return  # a look, not a wait: not worth taking the lane over
        if self._loop.holds_state() or self._loop.on_loop_thread():
            return
        with self._loop.state:
            if live.waker is not None or live.done.is_set():
                return
            live.waker = waker = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            live.waker_thread = threading.get_ident()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            self._loop.serve_here(enc.lane.fileno(), live.done.is_set, deadline, waker)
        finally:
            with self._loop.state:  # nobody writes it once it is None
                live.waker = live.waker_thread = None
            os.close(waker)

    def _watch_lane(self, enc: _Encoder) -> None:
        if enc.lane is not None and not enc.lane.closed:
            self._loop.watch_writable(enc.lane.fileno(), enc.lane.wants_write)

    def _lane_closed(self, enc: _Encoder, why: str) -> None:
        # The encoder's endpoint closed or its process died: nothing more can
        # come from it, so its rooms fail now rather than after the missed
        # heartbeats.
        if self._encoders.get(enc.address) is enc:
            self._encoder_dead(
                enc, f"control connection to encoder {enc.address}: {why}", closed=True
            )

    def _register(self, enc: _Encoder) -> Register:
        names = [*self.schema.names, AUX_FIELD]
        return Register(
            session=self.session,
            rank=self.tp_rank,
            host_id=host_id(),
            schema=[FieldDesc(n, list(s), d) for n, s, d in self.schema.describe()],
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            regions=[RegionDesc(n, *self.pool.region(n)) for n in names],
            transports=[s.offer_for(enc.token) for s in self._servers],
        )

    def _unhand(self, live: _Live) -> None:
        with self._lock:
            if live.handed:
                live.handed = False
                self._handed -= 1

    def _start_in_order(self, live: _Live, address: str, bootstrap: str) -> None:
        """Start a room whose route was cached when ``receiver()`` was called,
        after the rooms created before it that still wait for a route the
        resolver now knows (the cache may fill just before ``_route_rooms``
        runs): first reservations must follow the order of ``receiver()``
        calls. An encoder copies embeddings into its own pool in the order it
        produces them and holds each until its receiver reserves; a later
        room served first can hold the language pool while the encoder's pool
        is full of earlier rooms waiting for it, and neither side moves until
        a deadline passes."""
        if self._unrouted:
            self._route_rooms(bootstrap)
        self._start_room(live, address)

    def _start_room(self, live: _Live, address: str, required: int | None = None) -> None:
        self._unhand(live)
        if live.room.done:
            # aborted before it started: the encoder may hold the embedding
            self._tell_aborted(live, self._encoder(address))
            return
        live.encoder = self._encoder(address)
        self._run(live, self._step(live.room.start, time.monotonic(), required))

    def _await_route(self, live: _Live) -> None:
        """A room whose encoder address was not cached: start it as soon as
        the resolver has it (:meth:`_routes_changed`, or a later tick). One
        aborted meanwhile still waits, until its deadline, so that the
        encoder can be told (it may hold the embedding for it)."""
        if live.route is None:
            self._unhand(live)
            return
        self._unrouted[id(live)] = live
        if len(self._unrouted) == 1:
            self._try_route(live)
        elif self._resolver.get(live.route[0], live.room.room, live.route[1]) is not None:
            # its route just became known: the rooms before it start first
            self._route_rooms(live.route[0])

    def _try_route(self, live: _Live, found: tuple[str, int] | None = None) -> bool:
        """Start ``live`` if its route is known (``found``: already looked up)."""
        assert live.route is not None
        if found is None:
            bootstrap, dp_group = live.route
            found = self._resolver.get(bootstrap, live.room.room, dp_group)
        if found is None:
            return False
        del self._unrouted[id(live)]
        live.route = None
        if live.room.done:
            # aborted before its encoder was known: tell it now
            self._unhand(live)
            self._tell_aborted(live, self._encoder(found[0]))
        else:
            self._start_room(live, *found)
        return True

    def _tell_aborted(self, live: _Live, enc: _Encoder) -> None:
        """Tell ``enc`` about a room aborted before it was started (its own
        Abort action went nowhere: the room had no encoder yet), so it does
        not keep the embedding for a receiver that is gone."""
        room = live.room
        reason = room.failure_reason or "aborted by receiver"
        self._send(
            enc, Abort(session=self.session, room=room.room, epoch=room.epoch, reason=reason)
        )

    def _routes_changed(self, bootstrap: str) -> None:
        # the resolver's thread: hand it to the loop
        self._loop.call(self._route_rooms, bootstrap)

    def _route_rooms(self, bootstrap: str | None, now: float | None = None) -> None:
        """Start the rooms waiting for a route from ``bootstrap`` (None: any)
        that the resolver now knows; with ``now``, fail those whose deadline
        has passed, naming the bootstrap server and its last answer. In the
        order the rooms were asked for, each bootstrap server's routes read
        from one view of the resolver's cache (``get_many``)."""
        order: list[tuple[_Live, str, int | None]] = []
        for live in list(self._unrouted.values()):
            if live.route is None:
                self._unrouted.pop(id(live), None)
                self._unhand(live)
            elif bootstrap is None or live.route[0] == bootstrap:
                order.append((live, *live.route))
        found: dict[int, tuple[str, int] | None] = {}
        for boot in dict.fromkeys(b for _, b, _ in order):
            mine = [(live, group) for live, b, group in order if b == boot]
            routes = self._resolver.get_many(boot, [(x.room.room, g) for x, g in mine])
            found.update(zip((id(x) for x, _ in mine), routes, strict=True))
        for live, boot, _ in order:
            if self._unrouted.get(id(live)) is not live:
                continue  # routed or ended by what the rooms before it did
            hit = found[id(live)]
            if hit is not None:
                self._try_route(live, hit)
                continue
            if now is None or now < live.room.deadline:
                continue
            del self._unrouted[id(live)]
            self._unhand(live)
            if live.room.done:
                continue  # aborted, and its encoder never found: nobody to tell
            why = self._resolver.last_error(boot) or "no answer yet"
            self._abort_room(
                live,
                f"no route to the encoder of room {live.room.room} from bootstrap server "
                f"{boot} within {self.bootstrap_timeout or self.room_timeout:g}s: {why}",
            )

    def _end_rooms(self, reason: str) -> None:
        for live in list(self._rooms.values()):
            if not live.room.done:
                fail = functools.partial(self._abort_room, live, reason)
                if not self._defer(live, fail):
                    fail()

    def _abort_room(self, live: _Live, reason: str) -> None:
        self._dequeue(live)
        self._run(live, self._step(live.room.abort, time.monotonic(), reason))

    def _clear_room(self, live: _Live) -> None:
        if not live.room.done:
            self._abort_room(live, "cleared before it finished")
        self._ended.pop(id(live), None)
        live.result = {}  # the caller may keep the arrays; we must not
        if live.pinned is not None:
            blocks, live.pinned = live.pinned, None
            live.extension = None
            if live.room.holds_blocks and live.room.blocks is not None:
                # the encoder may still write into the outstanding reservation:
                # those blocks come back with the room's FreeBlocks, later
                outstanding = set(live.room.blocks)
                blocks = tuple(b for b in blocks if b not in outstanding)
            if blocks:
                self.allocator.free(blocks)
            self._retry_reservations()
        with self._lock:
            if self._rooms.get(live.room.room) is live:
                del self._rooms[live.room.room]
        if live.room.holds_blocks:
            # The encoder may still be writing into these blocks: keep them until
            # it acknowledges (any status for this epoch) or is declared dead.
            self._zombies[(live.room.room, live.room.epoch)] = live

    def _dequeue(self, live: _Live) -> None:
        if live.queued:
            self._resumes = collections.deque(x for x in self._resumes if x[0] is not live)
            self._firsts = collections.deque(x for x in self._firsts if x[0] is not live)
            live.queued = False

    def _on_readable(self, sock: zmq.Socket[bytes]) -> None:
        enc = self._by_sock.get(sock)
        for _ in range(256):
            try:
                payload = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if enc is not None:
                self._on_payload(enc, payload)

    def _on_payload(self, enc: _Encoder, payload: bytes) -> None:
        """One control message from encoder ``enc`` (over ZeroMQ or a lane)."""
        opened = self._auth.open(payload)
        if opened is None:
            self.unauthenticated_messages += 1
            self.metrics.unauthenticated.labels("language").inc()
            self._noise.note(
                f"encoder {enc.address}", "unauthenticated", "missing or wrong authentication tag"
            )
            return
        try:
            msg = decode(opened)
        except RemoteProtocolError as exc:
            self.dropped_messages += 1
            self.metrics.dropped.labels("language").inc()
            self._noise.note(f"encoder {enc.address}", "malformed", str(exc))
            return
        now = time.monotonic()
        enc.last_seen = now
        if isinstance(msg, Heartbeat):
            if msg.reply:
                self._send(enc, Heartbeat(session=self.session, seq=msg.seq, reply=False))
            elif not msg.registered:
                # The encoder forgot us (it restarted, or declared us dead
                # while we were stalled): introduce ourselves again.
                self._send(enc, self._register(enc))
            return
        if not isinstance(msg, StatusUpdate | Abort):
            self.dropped_messages += 1
            self.metrics.dropped.labels("language").inc()
            self._noise.note(
                f"encoder {enc.address}",
                "unexpected",
                f"{type(msg).__name__} is not for a language rank",
            )
            return
        live = self._zombies.get((msg.room, msg.epoch))
        if live is None:
            live = self._rooms.get(msg.room)
        if live is None:
            self.ignored_inputs += 1
            self.metrics.ignored.labels("language").inc()
            self._stale.note(f"encoder {enc.address}", "stale", f"unknown room {msg.room}")
            return
        if self._defer(live, functools.partial(self._on_payload, enc, payload)):
            return
        if isinstance(msg, StatusUpdate):
            acts = self._step(live.room.status_update, msg, now)
        else:
            acts = self._step(live.room.peer_abort, msg, now)
        self._run(live, acts)
        if not live.room.holds_blocks:
            self._zombies.pop((live.room.room, live.room.epoch), None)

    def _run(self, live: _Live, actions: list[Action]) -> None:
        freed = False
        for a in actions:
            if isinstance(a, Send):
                if live.encoder is not None:
                    self._send(live.encoder, a.msg)
            elif isinstance(a, Reserve):
                self._reserve(live, a.tokens)
            elif isinstance(a, Harvest):
                self._harvest(live, a)
            elif isinstance(a, FreeBlocks):
                blocks = a.blocks
                if live.pinned is not None:
                    # a zero-copy result lives in the pinned blocks until clear()
                    keep = set(live.pinned)
                    blocks = tuple(b for b in blocks if b not in keep)
                if blocks:
                    self.allocator.free(blocks)
                    freed = True
            elif isinstance(a, StatusChanged):
                if a.new is Status.Transferring:
                    self.metrics.resumes.labels("language").inc()
                if a.new.is_terminal:
                    live.done.set()  # first: the waiting thread takes a while to wake
                    if live.on_done is not None:
                        try:
                            live.on_done(live.room.room)
                        except Exception:  # the user's callback must not take the loop down
                            log.exception("language: on_done(%d) raised", live.room.room)
                    # a thread serving the lane for it, unless that is this one
                    if live.waker is not None and live.waker_thread != threading.get_ident():
                        try:
                            os.eventfd_write(live.waker, 1)
                        except OSError:
                            pass
                    now = time.monotonic()
                    self.metrics.ended(a.new.name, now - live.created)
                    self._ended[id(live)] = (now, live)
                    self._dequeue(live)
                    if a.new is Status.Failed:
                        log.info("language: room %d failed: %s", live.room.room, a.reason)
            elif isinstance(a, Drop):
                self.ignored_inputs += 1
                self.metrics.ignored.labels("language").inc()
                peer = "?" if live.encoder is None else live.encoder.address
                self._stale.note(f"encoder {peer}", "stale", a.reason)
        if freed:
            self._retry_reservations()

    def _reserve(self, live: _Live, tokens: int) -> None:
        if live.extension is not None:
            # the rest goes straight after the first chunk, in the assembly run
            blocks, live.extension = live.extension, None
            now = time.monotonic()
            n = min(tokens, len(blocks) * self.block_size)
            self._run(live, self._step(live.room.reserved, blocks, n, now))
            return
        resume = live.room.sent_tokens > 0
        q = self._resumes if resume else self._firsts
        # first come, first served within each class: wait behind earlier rooms
        if q or (not resume and self._resumes) or not self._try_reserve(live, tokens):
            live.queued = True
            q.append((live, tokens))

    def _try_reserve(self, live: _Live, tokens: int) -> bool:
        blocks = self._take_blocks(live, tokens)
        if blocks is None:
            return False
        n = min(tokens, len(blocks) * self.block_size)
        self._run(live, self._step(live.room.reserved, blocks, n, time.monotonic()))
        return True

    def _take_blocks(
        self, live: _Live, tokens: int, first_in_line: bool = False
    ) -> list[int] | None:
        """Blocks for ``tokens`` of ``live`` (fewer when the pool is short), or
        None. A first reservation leaves ``resume_headroom`` blocks. Under the
        endpoint lock, so the caller's fast start and the loop cannot both take
        the headroom; ``first_in_line``: only if no room queues for blocks."""
        bs = self.block_size
        want = -(-tokens // bs)
        first = live.room.sent_tokens == 0
        # A zero-copy room's first reservation asks for as many free blocks
        # after it as it takes: should the room resume, the rest can follow it
        # in place instead of the first chunk being moved (_assemble_in_pool).
        with self._lock:
            if first_in_line and (self._firsts or self._resumes or self._handed):
                return None
            if first:
                want = min(want, self.allocator.num_free - self.resume_headroom)
                if want <= 0:
                    return None
            return self.allocator.alloc_up_to(want, want if self.zero_copy and first else 0)

    def _retry_reservations(self) -> None:
        for q in (self._resumes, self._firsts):
            while q:
                live, tokens = q[0]
                if live.room.done:
                    q.popleft()
                    live.queued = False
                    continue
                q.popleft()
                live.queued = False
                if not self._try_reserve(live, tokens):
                    q.appendleft((live, tokens))
                    live.queued = True
                    return

    def _harvest(self, live: _Live, h: Harvest) -> None:
        self.metrics.moved("all", "received", h.count * self._token_bytes)
        if live.area_start is not None:
            # a resumed zero-copy room: this chunk landed in its assembly run
            if h.start_token + h.count == h.total_tokens:
                live.result = {
                    f.name: self.pool.view(f.name, live.area_start, h.total_tokens)
                    for f in self.schema.fields
                }
            return
        if (
            self.zero_copy
            and h.first
            and h.count < h.total_tokens
            and len(h.runs) == 1
            and h.blocks
            and self._assemble_in_pool(live, h)
        ):
            return
        if (
            self.zero_copy
            and h.first
            and h.count == h.total_tokens
            and len(h.runs) == 1
            and h.blocks
        ):
            # The whole embedding arrived in one contiguous chunk: hand out views.
            start, count = h.runs[0]
            live.result = {f.name: self.pool.view(f.name, start, count) for f in self.schema.fields}
            live.pinned = h.blocks
            live.aux = self.pool.read_aux(h.aux_block)
            return
        if not live.result:
            for f in self.schema.fields:
                live.result[f.name] = self.pool.empty(f.name, h.total_tokens)
        for f in self.schema.fields:
            self.pool.gather(h.runs, f.name, live.result[f.name], h.start_token)
        self.pool.synchronize()
        if h.first:
            live.aux = self.pool.read_aux(h.aux_block)

    def _assemble_in_pool(self, live: _Live, h: Harvest) -> bool:
        """Arrange for a zero-copy room that must resume to end up contiguous in
        the pool, so its result is a view like a single-chunk room's: grow the
        first chunk's blocks in place when the blocks after them are free, else
        move the chunk to the start of a free run long enough for the whole
        embedding (one copy inside the pool, no fresh memory). The rest is then
        reserved right after it (:attr:`_Live.extension`). False when neither
        fits, or the chunk does not end on a block boundary (the rest must start
        where it ends): the result is then assembled in fresh memory."""
        bs = self.block_size
        start, count = h.runs[0]
        k = count // bs
        if count % bs or len(h.blocks) != k or start != h.blocks[0] * bs:
            return False
        need = -(-h.total_tokens // bs)
        grown = self.allocator.alloc_at(h.blocks[0] + k, need - k)
        live.aux = self.pool.read_aux(h.aux_block)
        if grown is not None:
            live.pinned = (*h.blocks, *grown)
            live.area_start = start
            live.extension = grown
            return True
        run = self.allocator.alloc_contiguous(need)
        if run is None:
            return False
        dst = run[0] * bs
        for f in self.schema.fields:
            self.pool.view(f.name, dst, count)[...] = self.pool.view(f.name, start, count)
        self.pool.synchronize()
        live.pinned = tuple(run)
        live.area_start = dst
        live.extension = run[k:]
        return True

    def _tick(self, now: float) -> None:
        if self._unrouted:
            # before the rooms' own deadlines: their reason names the bootstrap server
            self._route_rooms(None, now)
        for live in list(self._rooms.values()):
            if not live.room.done and not live.starting:  # a starting room waits a tick
                self._run(live, self._step(live.room.tick, now))
        self._noise.flush(now)
        self._stale.flush(now)
        if self._fencing:
            self._settle_fences(now)
        self._check_liveness(now)
        self._ask_again(now)
        expired = []
        for key, (ended, live) in self._ended.items():
            if now - ended <= self.room_ttl:
                break  # the rest ended later
            expired.append((key, live))
        for key, live in expired:
            del self._ended[key]
            if self._rooms.get(live.room.room) is live:
                self.collected_rooms += 1
                self._clear_room(live)

    def _ask_again(self, now: float) -> None:
        """Repeat the Abort of every ended room still holding blocks its
        (live) encoder was offered, once each ``heartbeat_interval`` until
        the encoder acknowledges. The first Abort, or its answer, may have been
        lost with a connection reset; without this the blocks would stay out
        of use for as long as the encoder lives. An encoder answers a repeat
        the same way (a status for that epoch once nothing is in flight)."""
        for live in [*self._rooms.values(), *self._zombies.values()]:
            room, enc = live.room, live.encoder
            if not (room.done and room.holds_blocks) or live.starting or enc is None:
                live.ask_again_at = None
                continue
            if self._encoders.get(enc.address) is not enc:
                continue  # declared dead: its fence gives the blocks back
            if live.ask_again_at is None:
                live.ask_again_at = now + self.heartbeat_interval
            elif now >= live.ask_again_at:
                live.ask_again_at = now + self.heartbeat_interval
                self._send(
                    enc,
                    Abort(
                        session=self.session,
                        room=room.room,
                        epoch=room.epoch,
                        reason=room.failure_reason or "aborted by receiver",
                    ),
                )
                self.abort_repeats += 1

    def _check_liveness(self, now: float) -> None:
        """Ping every encoder each ``heartbeat_interval``; one silent for
        ``heartbeat_interval * heartbeat_misses`` seconds is dead: every room
        that depends on it fails, its blocks come back (nothing more can land),
        and the next room for that address connects afresh."""
        limit = self.heartbeat_interval * self.heartbeat_misses
        for address, enc in list(self._encoders.items()):
            if now - enc.last_seen > limit:
                self._encoder_dead(
                    enc, f"no answer from encoder {address} for {now - enc.last_seen:.1f}s"
                )
                continue
            if now - enc.last_ping >= self.heartbeat_interval:
                if enc.last_ping and enc.last_seen < enc.last_ping:
                    # nothing heard since the previous ping: a miss
                    self.metrics.heartbeat_misses.labels("language").inc()
                enc.last_ping = now
                enc.seq += 1
                self._send(enc, Heartbeat(session=self.session, seq=enc.seq, reply=True))

    def _encoder_dead(self, enc: _Encoder, reason: str, *, closed: bool = False) -> None:
        """Every room that depends on ``enc`` fails, its blocks come back
        (nothing more can land), and the next room for that address connects
        afresh."""
        # an encoder on this host that closes ends its lane: news only if rooms suffer
        busy = not closed or any(
            live.encoder is enc and not live.room.done
            for live in [*self._rooms.values(), *self._zombies.values()]
        )
        log.log(logging.WARNING if busy else logging.INFO, "language: %s", reason)
        self.dead_encoders += 1
        self.metrics.dead_peers.labels("language").inc()
        del self._encoders[enc.address]
        # it may come back elsewhere (restarted on another port): look it up afresh
        self._resolver.forget(enc.address)
        if enc.sock is not None:
            self._by_sock.pop(enc.sock, None)
            self._loop.remove_socket(enc.sock)
        if enc.lane is not None:
            self._loop.remove_fd(enc.lane.fileno())
        enc.close()
        affected = [
            live
            for live in [*self._rooms.values(), *self._zombies.values()]
            if live.encoder is enc or (live.starting and live.encoder is None)
        ]
        # Out of the reservation queues first: blocks the first failures free
        # must not go to another room of the same dead encoder.
        for live in affected:
            if live.encoder is enc:
                self._dequeue(live)
        # The encoder may be alive behind a broken link, with writes held up in
        # the network: the blocks it was offered come back only once every
        # data plane has fenced its link (or, where one cannot, after a grace).
        fence = _Fence(enc, time.monotonic() + self.stale_write_grace)
        self._fencing.append(fence)
        for live in affected:
            # a room starting on the caller's thread may be about to use enc
            fail = functools.partial(self._fail_lost, live, enc, reason, fence)
            if not self._defer(live, fail):
                fail()
        self._zombies = {k: v for k, v in self._zombies.items() if v.encoder is not enc}
        for server in self._servers:
            fence.waiting += 1
            done = functools.partial(self._loop.call, self._fence_done, fence)
            if not server.fence(enc.token, done, gone=closed):
                fence.waiting -= 1
                fence.graced = True
        self._settle_fences(time.monotonic())

    def _fail_lost(self, live: _Live, enc: _Encoder, reason: str, fence: _Fence) -> None:
        if live.encoder is enc and (not live.room.done or live.room.holds_blocks):
            self._dequeue(live)
            self._run(live, self._step(live.room.peer_lost, time.monotonic(), reason))
            if live.room.holds_blocks:
                if fence.settled:
                    self._settled(live)
                else:
                    fence.rooms.append(live)

    def _settled(self, live: _Live) -> None:
        self._run(live, self._step(live.room.settled))
        key = (live.room.room, live.room.epoch)
        if self._zombies.get(key) is live:  # cleared meanwhile
            del self._zombies[key]

    def _fence_done(self, fence: _Fence) -> None:
        fence.waiting -= 1
        self._settle_fences(time.monotonic())

    def _settle_fences(self, now: float) -> None:
        """Give back the blocks of dead encoders whose links are fenced, or
        whose grace has passed. Loop thread."""
        for fence in list(self._fencing):
            if fence.waiting > 0 or (fence.graced and now < fence.release_at):
                continue
            if fence.graced and fence.rooms:
                log.info(
                    "language: the blocks encoder %s was offered come back after %.0fs "
                    "(its transport cannot fence late writes)",
                    fence.encoder.address,
                    self.stale_write_grace,
                )
            self._fencing.remove(fence)
            fence.settled = True
            for live in fence.rooms:
                self._settled(live)
            fence.rooms = []
