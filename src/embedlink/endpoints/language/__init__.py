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

This module is the facade: construction, lifecycle, the public API and the
wiring of the parts, each a module that owns one concern:

- ``receiver``: the per-room record (:class:`LiveRoom`) and the user's handle.
- ``reservations``: the reservation queue (resumes first, headroom).
- ``assembly``: chunks into results, zero-copy views and in-pool assembly.
- ``routing``: rooms waiting for their encoder's address.
- ``links``: control links to encoders, and the fences of dead ones.
- ``fastpath``: starting and waiting from the caller's thread.
- ``events``: the loop thread's handling of room events (the interpreter).
- ``liveness``: the tick, heartbeats, repeated aborts, dead encoders.
"""

from __future__ import annotations

import logging
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
    BufferSchema,
    FieldDesc,
    ReceiverRoom,
    RegionDesc,
    Register,
    RoomId,
)
from ...transports import TransportServer, get_backend
from .._common import EndpointBase, PayloadOpener, StepLock
from .assembly import Assembler
from .fastpath import FastPath
from .links import EncoderLink, Fences, Links
from .liveness import Liveness
from .receiver import LiveRoom, Receiver
from .reservations import ReservationQueue
from .routing import RouteWaiters

log = logging.getLogger(__name__)

__all__ = ["LanguageEndpoint", "Receiver", "route_for"]


class LanguageEndpoint(EndpointBase, Liveness):
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
        #: return results as views into the pool (valid until clear()) where they
        #: lie in one contiguous run, resumed rooms included (assembly.py)
        self.zero_copy = zero_copy
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        #: reach encoders on this host over a Unix socket (``_lane``), not ZeroMQ
        self.local_control = local_control
        self.busy_poll_us = busy_poll_us
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
        self._lock = threading.Lock()
        # rooms waiting for blocks: resumes first, then first reservations
        self._reservations: ReservationQueue[LiveRoom] = ReservationQueue(
            self.allocator,
            block_size,
            self.resume_headroom,
            lock=self._lock,
            zero_copy=zero_copy,
            handed=lambda: self._fast.handed,
        )
        self._assembler = Assembler(
            schema, self.pool, self.allocator, block_size, self.metrics, zero_copy=zero_copy
        )
        # rooms waiting for their encoder's address, started once it is known
        self._routes = RouteWaiters(
            self._resolver,
            start=self._start_room,
            tell=lambda live, address: self._tell_aborted(live, self._links.connect(address)),
            unhand=lambda live: self._fast.unhand(live),
            fail=self._abort_room,
            timeout=bootstrap_timeout or room_timeout,
        )
        # Held while a room's state machine takes one event (StepLock): the
        # loop and a user's thread in abort() may step the same room at once.
        self._step = StepLock()
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
        self._fast = FastPath(
            self._loop,
            self._lock,
            self._reservations,
            block_size,
            step=self._step,
            send=self._links.send,
            run=self._run,
            tell_aborted=self._tell_aborted,
            lost=self._lost_before_start,
        )
        # dropped input: hostile or broken (WARNING), or merely late (DEBUG),
        # each counted exactly and logged at most once per peer per interval
        self._noise = NoiseLog(log, "language")
        self._stale = NoiseLog(log, "language", level=logging.DEBUG)
        self._opener: PayloadOpener[EncoderLink] = PayloadOpener(
            self._auth,
            side="language",
            counters=self,
            metrics=self.metrics,
            noise=self._noise,
            name=lambda enc: f"encoder {enc.address}",
        )
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
        return self._start_once()

    def _start(self) -> None:
        for b in self._backends:
            server = b.server(self.pool, host=self.host, options=self.transport_options.get(b.name))
            self._servers.append(server.start())
        self._links.open()
        self._loop.start()
        self._resolver.start()
        if self.metrics_port is not None:
            self._exporter = MetricsExporter(
                self.metrics.registry, self.host, self.metrics_port, status=self.status
            ).start()

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
        required_dst_info_num: int | None = None,
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

        ``required_dst_info_num``: with ``encoder=`` given directly, how many
        destination ranks (this one included) the encoder's room waits for
        before it sends, as the bootstrap route decides otherwise (SGLang's
        mapping); default 1. Every rank asking for the room must give the
        same number (the encoder refuses one that disagrees); ignored with
        ``bootstrap=``.

        ``on_done(room)``, when given, is called once when the room ends
        (``Success`` or ``Failed``), on the endpoint's loop thread or, for an
        abort, on the aborting thread: it must return at once (hand the room
        to a queue) and must not call into the endpoint. An exception it
        raises is logged.
        """
        reserve_tokens = self.default_tokens if tokens is None else tokens
        if not 0 < reserve_tokens <= self.num_blocks * self.block_size:
            raise ValueError(
                f"room {room}: a reservation of {reserve_tokens} tokens does not fit the pool's "
                f"{self.num_blocks * self.block_size} tokens"
            )
        if not self._started or self._closed:
            raise RuntimeError("the endpoint is not running (start() it first)")
        required = 1
        if required_dst_info_num is not None and encoder is not None:
            if required_dst_info_num < 1:
                raise ValueError(
                    f"required_dst_info_num must be at least 1, got {required_dst_info_num}"
                )
            required = required_dst_info_num
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
            default_tokens=reserve_tokens,
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
            self._fast.choose(live, enc)
        if encoder is None:
            self._loop.call(self._routes.add, live)
        elif not (live.starting and self._fast.start_here(live, enc)):
            if bootstrap is None:
                self._loop.call(self._start_room, live, encoder)
            else:
                self._loop.call(self._start_in_order, live, encoder, bootstrap)
        return Receiver(self, live)

    @property
    def _metrics_host(self) -> str:
        return self.host

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

    def room_count(self) -> int:
        return len(self._rooms)

    def _serve_until_done(self, live: LiveRoom, timeout: float | None) -> None:
        self._fast.serve_until_done(live, timeout)

    @property
    def _encoders(self) -> dict[str, EncoderLink]:
        """The control links by encoder address (diagnostics read it)."""
        return self._links.by_address

    # -- loop thread

    def _unsent(self, kind: str, address: str) -> None:
        self.dropped_messages += 1
        log.info("language: could not send %s to %s", kind, address)

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
