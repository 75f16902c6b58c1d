"""The sending side: :class:`EncoderEndpoint` and its per-room :class:`Sender`.

An encoder endpoint owns a block pool, a ZeroMQ ROUTER socket on which
language ranks register and request rooms (and, for those on the same host,
a Unix socket carrying the same messages: ``_lane``), a pool of data-plane
writer threads, and the :class:`~embedlink.protocol.SenderRoom` of every live
room. It registers its control address with the bootstrap server.

Threads: the endpoint's loop thread owns the sockets and the room table; the
writer threads only move bytes and report back to the loop; the user's thread
copies embeddings into the pool (``send``) and reads statuses (``poll``).

The endpoint is a facade over parts, each a module of this package that owns
one concern (after vLLM's NIXL connector package and httpcore's
connection / pool split):

- :mod:`.sender`: :class:`Sender`, the user's handle on one room;
- :mod:`.control`: the control links (ROUTER socket, same-host lanes):
  opening and decoding payloads, sending, naming peers;
- :mod:`.dispatch`: what each decoded message does;
- :mod:`.sessions`: the language sessions: the ``Register`` handshake and
  transport negotiation, heartbeats, liveness;
- :mod:`.rooms`: the room table, the action interpreter, ticks and the
  collection of ended rooms;
- :mod:`.writes`: write dispatch: writer threads, inline writes, borrowed
  payloads;
- :mod:`.early`: requests that came before their room's sender;
- :mod:`.stats`: the counters.

This module builds and wires the parts, starts and closes them, and keeps
the public API.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..._runtime.auth import Authenticator
from ..._runtime.loop import BUSY_POLL_S, Loop, check_endpoint_knobs
from ...bootstrap import BootstrapClient, RouteInfo
from ...memory import BlockAllocator, BufferPool, pool_status
from ...observability.metrics import EndpointMetrics, MetricsExporter, rooms_by_status
from ...observability.noise import NoiseLog
from ...protocol import AUX_FIELD, BufferSchema, RoomId, SenderRoom, SessionId
from ...transports import get_backend
from .._common import EndpointBase, StepLock
from .control import ControlLinks
from .dispatch import Dispatcher
from .early import EarlyRequests
from .registration import Registration
from .rooms import Rooms
from .sender import SendContext, Sender
from .sessions import Sessions
from .stats import EndpointStats
from .writes import WriteDispatch

log = logging.getLogger(__name__)

__all__ = ["EncoderEndpoint", "Sender"]


class EncoderEndpoint(EndpointBase):
    """The sending side of embedlink for one encoder rank.

    ``on_request(room)`` is called on the endpoint's loop thread (it must not
    block) the first time a language rank asks for a room that has no
    :class:`Sender` yet: an encoder that produces embeddings on demand learns
    there what to produce. ``bootstrap_timeout`` bounds how long a room may
    stay ``Bootstrapping`` (no request from a language rank yet); unset, the
    room timeout applies. The other settings are those of
    ``docs/configuration.md``.
    """

    def __init__(
        self,
        schema: BufferSchema,
        *,
        bootstrap: str | None = None,
        num_blocks: int = 1024,
        block_size: int = 128,
        transports: Sequence[str] = ("shm", "tcp"),
        tp_rank: int = 0,
        tp_size: int = 1,
        dp_size: int = 1,
        dp_rank: int = 0,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        port: int = 0,
        room_timeout: float = 60.0,
        bootstrap_timeout: float | None = None,
        write_workers: int = 4,
        checksums: bool = False,
        transport_options: Mapping[str, Mapping[str, str]] | None = None,
        device: str | None = None,
        heartbeat_interval: float = 2.0,
        heartbeat_misses: int = 3,
        room_ttl: float = 600.0,
        register_interval: float = 10.0,
        auth_secret: str | bytes | None = None,
        metrics_port: int | None = None,
        on_request: Callable[[RoomId], None] | None = None,
        local_control: bool = True,
        busy_poll_us: float = BUSY_POLL_S * 1e6,
    ) -> None:
        check_endpoint_knobs(
            tp_rank=tp_rank,
            tp_size=tp_size,
            room_timeout=room_timeout,
            bootstrap_timeout=bootstrap_timeout,
            heartbeat_interval=heartbeat_interval,
            heartbeat_misses=heartbeat_misses,
            busy_poll_us=busy_poll_us,
        )
        if register_interval <= 0:
            raise ValueError(f"register_interval must be positive, got {register_interval}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        for t in transports:
            get_backend(t)  # unknown names fail here, at construction
        self.schema = schema
        self.bootstrap = bootstrap
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.transports = tuple(transports)
        self.tp_rank, self.tp_size, self.dp_size, self.dp_rank = tp_rank, tp_size, dp_size, dp_rank
        self.host = host
        self.advertise_host = advertise_host or host
        self.port = port
        self.room_timeout = room_timeout
        self.bootstrap_timeout = bootstrap_timeout
        self.checksums = checksums
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        self.local_control = local_control
        self.busy_poll_us = busy_poll_us
        self.room_ttl = room_ttl
        #: seconds between registrations with the bootstrap server after the first
        self.register_interval = register_interval
        self._registration: Registration | None = None
        self._auth = Authenticator(auth_secret)
        self.metrics = EndpointMetrics(
            "encoder", lambda: self.allocator.num_free, lambda: self.allocator.num_used
        )
        self.metrics_port = metrics_port
        self._exporter: MetricsExporter | None = None
        self.transport_options = {k: dict(v) for k, v in (transport_options or {}).items()}
        self.pool = BufferPool(schema, num_blocks, block_size, device=device)
        self.allocator = BlockAllocator(num_blocks)
        self.stats = EndpointStats()
        # Held while a room's state machine takes one event (StepLock): the
        # loop and a user's thread in abort() may step the same room at once.
        self._step = StepLock()
        # dropped input: hostile or broken (WARNING), or merely late (DEBUG),
        # each counted exactly and logged at most once per peer per interval
        self._noise = NoiseLog(log, "encoder")
        self._stale = NoiseLog(log, "encoder", level=logging.DEBUG)
        self._loop = Loop(
            f"embedlink-encoder-{tp_rank}",
            tick=self._tick,
            busy_poll=busy_poll_us / 1e6,
            may_spin=lambda: self._writes.outstanding == 0,
        )
        # The parts. Where two call each other, the one made first reaches
        # the other through a lambda, looked up when called.
        self._links = ControlLinks(
            self._loop,
            self._auth,
            stats=self.stats,
            metrics=self.metrics,
            noise=self._noise,
            on_message=lambda identity, msg: self._dispatcher.dispatch(identity, msg),
            on_lane_closed=lambda identity, why: self._sessions.lane_closed(identity, why),
        )
        self._writes = WriteDispatch(
            self._loop,
            self.pool,
            workers=write_workers,
            room_timeout=room_timeout,
            stats=self.stats,
            metrics=self.metrics,
            report=lambda room, dst, ok, why: self._rooms.write_done(room, dst, ok, why),
        )
        self._sessions = Sessions(
            schema=schema,
            transports=self.transports,
            pool=self.pool,
            field_names=[*schema.names, AUX_FIELD],
            room_timeout=room_timeout,
            advertise_host=self.advertise_host,
            transport_options=self.transport_options,
            heartbeat_interval=heartbeat_interval,
            heartbeat_misses=heartbeat_misses,
            stats=self.stats,
            metrics=self.metrics,
            executor_for=self._writes.executor_for,
            rooms_busy=lambda session: self._rooms.busy(session),
            fail_rooms=lambda session, now, why: self._rooms.peer_dead(session, now, why),
        )
        self._rooms = Rooms(
            self._loop,
            self._step,
            self.allocator,
            peers=self._sessions.peers,
            send=self._links.send,
            writes=self._writes,
            stats=self.stats,
            metrics=self.metrics,
            stale=self._stale,
            room_ttl=room_ttl,
        )
        self._early = EarlyRequests()
        self._dispatcher = Dispatcher(
            self._rooms,
            self._sessions,
            self._early,
            self._step,
            send=self._links.send,
            reject=self._links.reject,
            on_request=on_request,
            room_timeout=room_timeout,
        )
        self._senders = SendContext(
            schema=schema,
            pool=self.pool,
            allocator=self.allocator,
            block_size=block_size,
            num_blocks=num_blocks,
            room_timeout=room_timeout,
            checksums=checksums,
            loop=self._loop,
            rooms=self._rooms,
            writes=self._writes,
        )
        self._started = False
        self._closed = False

    # -- lifecycle

    @property
    def address(self) -> str:
        """``host:port`` of the control plane, as advertised to peers."""
        return f"{self.advertise_host}:{self.port}"

    def start(self) -> EncoderEndpoint:
        """Bind the control plane, start the loop thread (and, with
        ``metrics_port``, the metrics exporter) and register with the
        bootstrap server. Once: RuntimeError when called again or after
        :meth:`close`. The registration is the one network call made on the
        caller's thread (bounded by the client's timeout): a bootstrap server
        that cannot be reached is an error at start-up, with everything
        started closed again. A control port in use is an OSError naming it."""
        return self._start_once()

    def _start(self) -> None:
        self._loop.open()
        self.port = self._links.bind(self.host, self.port)
        if self.local_control:
            self._links.listen_local(self.address)
        self._loop.start()
        if self.metrics_port is not None:
            self._exporter = MetricsExporter(
                self.metrics.registry, self.host, self.metrics_port, status=self.status
            ).start()
        if self.bootstrap:
            info = RouteInfo(
                role="encoder",
                tp_size=self.tp_size,
                dp_size=self.dp_size,
                rank_ip=self.advertise_host,
                rank_port=self.port,
                engine_rank=self.tp_rank,
                dp_group=self.dp_rank,
                status_address=self.metrics_address or "",
            )
            BootstrapClient(self.bootstrap, auth_secret=self._auth.key).register(info)
            # again every register_interval, for a bootstrap server that restarts
            again = BootstrapClient(
                self.bootstrap,
                timeout=min(5.0, self.register_interval),
                auth_secret=self._auth.key,
            )
            self._registration = Registration(
                again, info, self.register_interval, f"embedlink-register-{self.tp_rank}"
            ).start()
        log.info("encoder rank %d listening on %s", self.tp_rank, self.address)

    def close(self) -> None:
        """End the open rooms (destinations are told), stop the threads and
        close sockets and peer writers: afterwards no thread of this endpoint
        is alive. Idempotent; fine without :meth:`start`."""
        if self._closed:
            return
        self._closed = True
        if self._loop.alive:
            # Rooms still open end now, with a reason, and their destinations
            # are told: threads in Sender.wait() return, language ranks fail
            # those rooms at once instead of noticing a dead peer later.
            try:
                self._loop.call_wait(self._rooms.end_all, "encoder endpoint closed")
            except TimeoutError:
                log.warning("encoder: the loop did not end the open rooms before closing")
        if self._registration is not None:
            self._registration.close()
        self._loop.stop()
        self._writes.shutdown()
        self._sessions.shutdown_executors()
        if self._exporter is not None:
            self._exporter.close()
        self._sessions.close_writers()
        self._links.close()
        self._writes.clear_borrowed()  # the callers' arrays, no longer read
        self.allocator.wake()

    # -- public API

    def sender(self, room: RoomId) -> Sender:
        """A :class:`Sender` for ``room``. Either side may come first. ValueError
        when a room with this id is still live (clear it first)."""
        if not self._started or self._closed:
            raise RuntimeError("the endpoint is not running (start() it first)")
        r = SenderRoom(
            room,
            schema=self.schema,
            block_size=self.block_size,
            now=time.monotonic(),
            timeout=self.room_timeout,
            bootstrap_timeout=self.bootstrap_timeout,
            src_num_blocks=self.num_blocks,
        )
        with self._rooms.lock:
            self._rooms.add(r)
            # The loop files early messages under the same lock (see
            # Dispatcher.dispatch), so either it saw this room or its messages
            # are filed with the early requests now.
            early = room in self._early
        if early:
            self._loop.call(self._dispatcher.adopt_early, r)
        return Sender(self._senders, r)

    def room_count(self) -> int:
        return len(self._rooms.live)

    @property
    def _metrics_host(self) -> str:
        return self.advertise_host

    def _snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        rooms = rooms_by_status(r.status for r in self._rooms.live.values())
        return {
            "side": "encoder",
            "address": self.address,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "transports": list(self.transports),
            "rooms": rooms,
            "requests_without_sender": self._early.count(),
            "writes_in_flight": self._writes.outstanding,
            "registration": None if self._registration is None else self._registration.describe(),
            "pool": pool_status(self.pool, self.allocator),
            "peers": self._sessions.describe(now, self._links.is_lane),
            "counters": vars(self.stats).copy(),
            "loop_errors": self._loop.errors,
        }

    def sessions(self) -> dict[SessionId, str | None]:
        """Registered language sessions and the transport chosen for each."""
        return self._sessions.transports_by_session()

    # -- what tests and tools read, kept where the parts moved it

    @property
    def _ended(self) -> dict[SenderRoom, float]:
        """Ended rooms not yet cleared or collected, oldest first."""
        return self._rooms.ended

    # -- loop thread

    def _tick(self, now: float) -> None:
        self._rooms.tick(now)
        self._sessions.check_liveness(now)
        self._noise.flush(now)
        self._stale.flush(now)
        self._rooms.collect(now)
        self._dispatcher.expire_early(now)
