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

import functools
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..._runtime.auth import Authenticator
from ..._runtime.host import host_id
from ..._runtime.loop import BUSY_POLL_S, CLOSE_LINGER_MS, Loop, check_endpoint_knobs
from ...bootstrap.resolver import Resolver, check_bootstrap_address, route_for
from ...memory import BlockAllocator, BufferPool, pool_status
from ...observability.metrics import EndpointMetrics, MetricsExporter, rooms_by_status
from ...observability.noise import NoiseLog
from ...protocol import (
    AUX_FIELD,
    Abort,
    Action,
    BufferSchema,
    Drop,
    FieldDesc,
    FreeBlocks,
    Harvest,
    Heartbeat,
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
    decode,
)
from ...transports import TransportServer, get_backend
from .assembly import Assembler
from .links import EncoderLink, Fence, Fences, Links
from .receiver import LiveRoom, Receiver
from .reservations import ReservationQueue
from .routing import RouteWaiters

log = logging.getLogger(__name__)

__all__ = ["LanguageEndpoint", "Receiver", "route_for"]


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
        self._ended: dict[int, tuple[float, LiveRoom]] = {}
        self.session = f"lang-{tp_rank}-{uuid.uuid4().hex[:16]}"
        self._shared: Any = None
        if "shm" in self.transports:
            from ...transports.shm import create_shared_pool

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
        # encoder addresses are looked up off the callers' threads
        self._resolver = Resolver(
            tp_rank=tp_rank,
            tp_size=tp_size,
            dp_size=dp_size,
            on_change=self._routes_changed,
            refresh=route_refresh,
            name=f"embedlink-resolver-{tp_rank}",
        )
        self._rooms: dict[RoomId, LiveRoom] = {}
        self._zombies: dict[tuple[RoomId, int], LiveRoom] = {}
        # dead encoders whose writes may still land: their rooms keep the
        # blocks they offered until every data plane fenced the link
        self._fences = Fences(stale_write_grace, self._settled, log.info)
        # Rooms handed to the loop to start that have not reached their first
        # reservation yet (waiting for a route, or for the loop to run): while
        # any has, a later room must not take blocks from the caller's thread
        # (``_start_here``). First reservations are granted in the order
        # ``receiver()`` was called; see _start_room. Under ``_lock``.
        self._handed = 0
        self._lock = threading.Lock()
        # rooms waiting for blocks: resumes first, then first reservations
        self._reservations: ReservationQueue[LiveRoom] = ReservationQueue(
            self.allocator,
            block_size,
            self.resume_headroom,
            lock=self._lock,
            zero_copy=zero_copy,
            handed=lambda: self._handed,
        )
        self._assembler = Assembler(
            schema, self.pool, self.allocator, block_size, self.metrics, zero_copy=zero_copy
        )
        # rooms waiting for their encoder's address, started once it is known
        self._routes = RouteWaiters(
            self._resolver,
            start=self._start_room,
            tell=lambda live, address: self._tell_aborted(live, self._links.connect(address)),
            unhand=self._unhand,
            fail=self._abort_room,
            timeout=bootstrap_timeout or room_timeout,
        )
        # Held while a room's state machine takes one event (_step): the loop
        # and a user's thread in abort() may step the same room at once.
        self._step_lock = threading.Lock()
        self._loop = Loop(
            f"embedlink-language-{tp_rank}", tick=self._tick, busy_poll=busy_poll_us / 1e6
        )
        # late-bound callbacks: a test may wrap _on_payload on the instance
        self._links = Links(
            self._loop,
            self._auth,
            local_control=local_control,
            hello=self._register,
            on_payload=lambda enc, payload: self._on_payload(enc, payload),
            on_lane_closed=lambda enc, why: self._lane_closed(enc, why),
            on_unsent=self._unsent,
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
            self._links.open()
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
        self._links.close(CLOSE_LINGER_MS)  # the aborts just sent, to live peers
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
        live = LiveRoom(r, None, route=route, on_done=on_done)
        with self._lock:
            if room in self._rooms:
                raise ValueError(
                    f"room {room} is still live on this language rank; clear() it first"
                )
            self._rooms[room] = live
            enc = None if encoder is None else self._links.get(encoder)
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
            self._loop.call(self._routes.add, live)
        elif not (live.starting and self._start_here(live, enc)):
            if bootstrap is None:
                self._loop.call(self._start_room, live, encoder)
            else:
                self._loop.call(self._start_in_order, live, encoder, bootstrap)
        return Receiver(self, live)

    def _start_here(self, live: LiveRoom, enc: EncoderLink | None) -> bool:
        """Reserve the first blocks and send the request from the caller's
        thread, over a same-host lane: the loop thread is not woken for it,
        which saves a wake-up on every room's path (docs/performance.md).
        False, with nothing done, when the loop must do it (the pool is short
        or other rooms queue for blocks). The loop defers what it would do to
        the room meanwhile (``LiveRoom.starting``) and does it afterwards."""
        assert enc is not None
        now = time.monotonic()
        acts = self._step(live.room.start, now)
        if not acts:  # aborted meanwhile by another thread: tell the encoder instead
            self._tell_aborted(live, enc)
            self._end_start(live)
            return True
        (reserve,) = acts
        assert isinstance(reserve, Reserve)
        blocks = self._reservations.take(reserve.tokens, first=True, first_in_line=True)
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
                sent = self._links.send(enc, a.msg) and sent
            elif not (isinstance(a, StatusChanged) and not a.new.is_terminal):
                later.append(a)  # nothing else is expected; the loop handles it
        if later:
            self._loop.call(self._run, live, later)
        self._end_start(live)
        if not sent:
            # the lane closed under us: its encoder is being declared dead
            self._loop.call(self._lost_before_start, live, enc)
        return True

    def _clear_now(self, live: LiveRoom) -> None:
        """:meth:`Receiver.clear` on the caller's thread."""
        live.cleared = True
        self._abort_now(live, "cleared before it finished")
        if live.room.done and live.pinned is None and not live.room.holds_blocks:
            # Nothing to free or tell the encoder: forget the id now (so it can
            # be reused at once) and leave the rest, letting go of the result
            # included, to the loop's next wake-up (a room aborted by another
            # thread may still be in the middle of a harvest there).
            with self._lock:
                if self._rooms.get(live.room.room) is live:
                    del self._rooms[live.room.room]
            self._loop.call_lazy(self._clear_room, live)
        elif not self._loop.try_run_here(self._clear_room, live):
            # the loop is busy: it frees the blocks (and tells the encoder)
            self._loop.call(self._clear_room, live)

    def _end_start(self, live: LiveRoom) -> None:
        """The caller's thread is done with ``live``: hand the loop what it
        deferred meanwhile, in order."""
        with self._lock:
            live.starting = False
            deferred, live.deferred = live.deferred, []
        for fn in deferred:
            self._loop.call(fn)

    def _lost_before_start(self, live: LiveRoom, enc: EncoderLink) -> None:
        reason = f"control connection to encoder {enc.address} closed"
        self._run(live, self._step(live.room.peer_dead, time.monotonic(), reason))

    def _step(self, event: Callable[..., list[Action]], *args: Any) -> list[Action]:
        """Feed one event to a room's state machine (``event`` is one of its
        methods) and return the actions. Under the step lock: the loop and a
        user's thread in :meth:`Receiver.abort` may step the same room at once.
        The actions are carried out afterwards, outside the lock."""
        with self._step_lock:
            return event(*args)

    def _abort_now(self, live: LiveRoom, reason: str) -> None:
        """:meth:`Receiver.abort` on the caller's thread: the room is
        ``Failed`` when this returns; telling the encoder and releasing
        blocks follow on the loop (or here, if it is asleep)."""
        acts = self._step(live.room.abort, time.monotonic(), reason)
        if not acts:
            return  # it had ended already
        live.done.set()  # wait() returns at once, before the loop has run
        if not self._loop.try_run_here(self._after_abort, live, acts):
            self._loop.call(self._after_abort, live, acts)

    def _after_abort(self, live: LiveRoom, actions: list[Action]) -> None:
        if self._defer(live, functools.partial(self._after_abort, live, actions)):
            return
        self._reservations.remove(live)
        self._run(live, actions)

    def _defer(self, live: LiveRoom, fn: Callable[[], None]) -> bool:
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
            "queued_reservations": {
                "resumes": len(self._reservations.resumes),
                "first": len(self._reservations.firsts),
            },
            "pool": pool_status(self.pool, self.allocator),
            "peers": [
                {
                    "encoder": address,
                    "control": e.control,
                    "alive": now - e.last_seen <= limit,
                    "last_seen_s": round(now - e.last_seen, 3),
                }
                for address, e in self._links.by_address.items()
            ],
            "routes": self._resolver.cached_routes(),
            "rooms_waiting_for_route": len(self._routes),
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

    @property
    def _encoders(self) -> dict[str, EncoderLink]:
        """The control links by encoder address (diagnostics read it)."""
        return self._links.by_address

    # -- loop thread

    def _unsent(self, kind: str, address: str) -> None:
        self.dropped_messages += 1
        log.info("language: could not send %s to %s", kind, address)

    def _serve_until_done(self, live: LiveRoom, timeout: float | None) -> None:
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

    def _lane_closed(self, enc: EncoderLink, why: str) -> None:
        # The encoder's endpoint closed or its process died: nothing more can
        # come from it, so its rooms fail now rather than after the missed
        # heartbeats.
        if self._links.get(enc.address) is enc:
            self._encoder_dead(
                enc, f"control connection to encoder {enc.address}: {why}", closed=True
            )

    def _register(self, enc: EncoderLink) -> Register:
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

    def _unhand(self, live: LiveRoom) -> None:
        with self._lock:
            if live.handed:
                live.handed = False
                self._handed -= 1

    def _start_in_order(self, live: LiveRoom, address: str, bootstrap: str) -> None:
        """Start a room whose route was cached when ``receiver()`` was called,
        after the rooms created before it that still wait for a route the
        resolver now knows (the cache may fill just before ``_route_rooms``
        runs): first reservations must follow the order of ``receiver()``
        calls. An encoder copies embeddings into its own pool in the order it
        produces them and holds each until its receiver reserves; a later
        room served first can hold the language pool while the encoder's pool
        is full of earlier rooms waiting for it, and neither side moves until
        a deadline passes."""
        if self._routes:
            self._routes.route(bootstrap)
        self._start_room(live, address)

    def _start_room(self, live: LiveRoom, address: str, required: int | None = None) -> None:
        self._unhand(live)
        if live.room.done:
            # aborted before it started: the encoder may hold the embedding
            self._tell_aborted(live, self._links.connect(address))
            return
        live.encoder = self._links.connect(address)
        self._run(live, self._step(live.room.start, time.monotonic(), required))

    def _tell_aborted(self, live: LiveRoom, enc: EncoderLink) -> None:
        """Tell ``enc`` about a room aborted before it was started (its own
        Abort action went nowhere: the room had no encoder yet), so it does
        not keep the embedding for a receiver that is gone."""
        room = live.room
        reason = room.failure_reason or "aborted by receiver"
        self._links.send(
            enc, Abort(session=self.session, room=room.room, epoch=room.epoch, reason=reason)
        )

    def _routes_changed(self, bootstrap: str) -> None:
        # the resolver's thread: hand it to the loop
        self._loop.call(self._routes.route, bootstrap)

    def _end_rooms(self, reason: str) -> None:
        for live in list(self._rooms.values()):
            if not live.room.done:
                fail = functools.partial(self._abort_room, live, reason)
                if not self._defer(live, fail):
                    fail()

    def _abort_room(self, live: LiveRoom, reason: str) -> None:
        self._reservations.remove(live)
        self._run(live, self._step(live.room.abort, time.monotonic(), reason))

    def _clear_room(self, live: LiveRoom) -> None:
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

    def _on_payload(self, enc: EncoderLink, payload: bytes) -> None:
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
                self._links.send(enc, Heartbeat(session=self.session, seq=msg.seq, reply=False))
            elif not msg.registered:
                # The encoder forgot us (it restarted, or declared us dead
                # while we were stalled): introduce ourselves again.
                self._links.send(enc, self._register(enc))
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

    def _run(self, live: LiveRoom, actions: list[Action]) -> None:
        freed = False
        for a in actions:
            if isinstance(a, Send):
                if live.encoder is not None:
                    self._links.send(live.encoder, a.msg)
            elif isinstance(a, Reserve):
                self._reserve(live, a.tokens)
            elif isinstance(a, Harvest):
                self._assembler.harvest(live, a)
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
                    self._reservations.remove(live)
                    if a.new is Status.Failed:
                        log.info("language: room %d failed: %s", live.room.room, a.reason)
            elif isinstance(a, Drop):
                self.ignored_inputs += 1
                self.metrics.ignored.labels("language").inc()
                peer = "?" if live.encoder is None else live.encoder.address
                self._stale.note(f"encoder {peer}", "stale", a.reason)
        if freed:
            self._retry_reservations()

    def _reserve(self, live: LiveRoom, tokens: int) -> None:
        if live.extension is not None:
            # the rest goes straight after the first chunk, in the assembly run
            blocks, live.extension = live.extension, None
            now = time.monotonic()
            n = min(tokens, len(blocks) * self.block_size)
            self._run(live, self._step(live.room.reserved, blocks, n, now))
            return
        # first come, first served within each class: wait behind earlier rooms
        resume = live.room.sent_tokens > 0
        self._reservations.request(live, tokens, resume=resume, grant=self._grant)

    def _grant(self, live: LiveRoom, blocks: list[int], tokens: int) -> None:
        """``blocks`` from the reservation queue for a room that asked for ``tokens``."""
        n = min(tokens, len(blocks) * self.block_size)
        self._run(live, self._step(live.room.reserved, blocks, n, time.monotonic()))

    def _retry_reservations(self) -> None:
        self._reservations.retry(self._grant, lambda live: live.room.done)

    def _tick(self, now: float) -> None:
        if self._routes:
            # before the rooms' own deadlines: their reason names the bootstrap server
            self._routes.route(None, now)
        for live in list(self._rooms.values()):
            if not live.room.done and not live.starting:  # a starting room waits a tick
                self._run(live, self._step(live.room.tick, now))
        self._noise.flush(now)
        self._stale.flush(now)
        if self._fences:
            self._fences.settle(now)
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
            if self._links.get(enc.address) is not enc:
                continue  # declared dead: its fence gives the blocks back
            if live.ask_again_at is None:
                live.ask_again_at = now + self.heartbeat_interval
            elif now >= live.ask_again_at:
                live.ask_again_at = now + self.heartbeat_interval
                self._links.send(
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
        for address, enc in list(self._links.by_address.items()):
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
                self._links.send(enc, Heartbeat(session=self.session, seq=enc.seq, reply=True))

    def _encoder_dead(self, enc: EncoderLink, reason: str, *, closed: bool = False) -> None:
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
        self._links.drop(enc)
        # it may come back elsewhere (restarted on another port): look it up afresh
        self._resolver.forget(enc.address)
        affected = [
            live
            for live in [*self._rooms.values(), *self._zombies.values()]
            if live.encoder is enc or (live.starting and live.encoder is None)
        ]
        # Out of the reservation queues first: blocks the first failures free
        # must not go to another room of the same dead encoder.
        for live in affected:
            if live.encoder is enc:
                self._reservations.remove(live)
        # The encoder may be alive behind a broken link, with writes held up in
        # the network: the blocks it was offered come back only once every
        # data plane has fenced its link (or, where one cannot, after a grace).
        fence = self._fences.raise_for(enc)
        for live in affected:
            # a room starting on the caller's thread may be about to use enc
            fail = functools.partial(self._fail_lost, live, enc, reason, fence)
            if not self._defer(live, fail):
                fail()
        self._zombies = {k: v for k, v in self._zombies.items() if v.encoder is not enc}
        done = functools.partial(self._loop.call, self._fences.one_done)
        self._fences.ask(fence, self._servers, done, gone=closed)
        self._fences.settle(time.monotonic())

    def _fail_lost(self, live: LiveRoom, enc: EncoderLink, reason: str, fence: Fence) -> None:
        if live.encoder is enc and (not live.room.done or live.room.holds_blocks):
            self._reservations.remove(live)
            self._run(live, self._step(live.room.peer_lost, time.monotonic(), reason))
            if live.room.holds_blocks:
                self._fences.hold(fence, live)

    def _settled(self, live: LiveRoom) -> None:
        self._run(live, self._step(live.room.settled))
        key = (live.room.room, live.room.epoch)
        if self._zombies.get(key) is live:  # cleared meanwhile
            del self._zombies[key]
