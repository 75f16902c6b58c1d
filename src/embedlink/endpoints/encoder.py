"""The sending side: :class:`EncoderEndpoint` and its per-room :class:`Sender`.

An encoder endpoint owns a block pool, a ZeroMQ ROUTER socket on which
language ranks register and request rooms (and, for those on the same host,
a Unix socket carrying the same messages: ``_lane``), a pool of data-plane
writer threads, and the :class:`~embedlink.protocol.SenderRoom` of every live
room. It registers its control address with the bootstrap server.

Threads: the endpoint's loop thread owns the sockets and the room table; the
writer threads only move bytes and report back to the loop; the user's thread
copies embeddings into the pool (``send``) and reads statuses (``poll``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zmq

from .._runtime import lane as _lane
from .._runtime.auth import Authenticator
from .._runtime.host import host_id
from .._runtime.loop import BUSY_POLL_S, CLOSE_LINGER_MS, Loop, check_endpoint_knobs
from ..bootstrap import BootstrapClient, RouteInfo
from ..embedding import Embedding, to_pool_arrays
from ..memory import BlockAllocator, Borrowed, BufferPool, checksum, pool_status
from ..observability.metrics import EndpointMetrics, MetricsExporter, rooms_by_status
from ..observability.noise import NoiseLog
from ..protocol import (
    AUX_FIELD,
    MAX_META_BYTES,
    Abort,
    Action,
    BufferSchema,
    Drop,
    FreeBlocks,
    Heartbeat,
    Message,
    Register,
    RemoteProtocolError,
    Resume,
    RoomId,
    Send,
    SenderRoom,
    SessionId,
    Status,
    StatusChanged,
    StatusUpdate,
    TransferError,
    TransferRequest,
    WriteChunk,
    decode,
    encode,
)
from ..transports import PeerWriter, TransportError, get_backend

log = logging.getLogger(__name__)

__all__ = ["EncoderEndpoint", "Sender"]


@dataclass
class _Peer:
    session: SessionId
    identity: bytes
    register: Register
    writer: PeerWriter | None = None
    transport: str | None = None
    refused: str | None = None
    regions: dict[str, int] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    #: the peer's own writer threads, when its transport limits concurrent writes
    executor: ThreadPoolExecutor | None = None
    #: heartbeat intervals of the current silence already counted as misses
    misses: int = 0

    def close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.executor is not None:
            self.executor.shutdown(wait=False)
            self.executor = None


@dataclass
class EndpointStats:
    """Counters an operator (and the tests) can read."""

    dropped_messages: int = 0
    ignored_inputs: int = 0
    bytes_written: int = 0
    chunks_written: int = 0
    write_failures: int = 0
    dead_sessions: int = 0
    collected_rooms: int = 0
    unauthenticated_messages: int = 0


def _check_meta(room: RoomId, meta: bytes | None) -> None:
    if meta is None:
        return
    if not isinstance(meta, bytes):
        raise ValueError(f"room {room}: meta must be bytes, got {type(meta).__name__}")
    if len(meta) > MAX_META_BYTES:
        raise ValueError(f"room {room}: meta of {len(meta)} bytes exceeds {MAX_META_BYTES}")


class Sender:
    """One room on the encoder side. Obtain from :meth:`EncoderEndpoint.sender`."""

    def __init__(self, endpoint: EncoderEndpoint, room: SenderRoom) -> None:
        self._ep = endpoint
        self._room = room
        self.room: RoomId = room.room
        self._sent = False
        self._buffer: tuple[int, list[int]] | None = None

    def send(
        self,
        emb: Embedding,
        *,
        timeout: float | None = None,
        borrow: bool = False,
        meta: bytes | None = None,
    ) -> None:
        """Copy ``emb`` into the encoder pool and start sending it.

        Called once per room (or :meth:`buffer` and :meth:`commit` instead).
        The caller may reuse its arrays as soon as this returns. Raises
        ValueError (naming the field) when ``emb`` does not match the schema or
        is larger than the whole pool; waits up to ``timeout`` seconds
        (default: the room timeout) for free blocks, then fails the room and
        raises :class:`TransferError`.

        ``borrow=True``: the room still reserves its blocks, but transports
        that can read any host memory (``shm``, ``tcp``) send straight from
        ``emb``'s arrays, saving the copy into the pool; others copy them into
        the blocks when they first write. The caller must then leave the
        arrays unchanged until the room ends (:meth:`poll` is terminal).
        Arrays on a GPU, or a pool on one, are copied as without it.

        ``meta``: up to 64 KiB the receiver reads as :attr:`Receiver.meta`
        (an engine's per-item metadata: image grids, timestamps, modality).
        """
        self._claim("send()")
        ep = self._ep
        try:
            _check_meta(self.room, meta)
            n, arrays = to_pool_arrays(emb, ep.schema, torch_device=ep.pool.device)
        except ValueError:
            self._sent = False
            raise
        blocks = self._alloc(n, timeout, contiguous=False)
        try:
            if borrow and Borrowed.usable(ep.pool, arrays):
                ep._borrowed[self._room] = Borrowed(ep.pool, blocks, arrays)
            else:
                ep.pool.scatter(blocks, arrays)
        except BaseException:
            ep.allocator.free(blocks)
            raise
        self._start(n, blocks, emb.mrope_position_delta, arrays, meta)

    def buffer(self, num_tokens: int, *, timeout: float | None = None) -> Embedding:
        """Reserve ``num_tokens`` tokens in the encoder pool and return them as an
        :class:`Embedding` of views: write the encoder's output straight into
        them, then call :meth:`commit`. This is the one-copy path: the only
        copy left is the transport's, into the language pool.

        The views are contiguous (``mrope_positions`` is a ``[3, n]`` view of
        the pool's ``[n, 3]`` field); they belong to the pool and must not be
        used after :meth:`commit`. Same errors as :meth:`send`.
        """
        self._claim("buffer()")
        ep = self._ep
        if num_tokens <= 0:
            self._sent = False
            raise ValueError(f"room {self.room}: an embedding needs at least one token")
        blocks = self._alloc(num_tokens, timeout, contiguous=True)
        start = blocks[0] * ep.block_size
        views = {f.name: ep.pool.view(f.name, start, num_tokens) for f in ep.schema.fields}
        self._buffer = (num_tokens, blocks)
        extra = {
            k: v for k, v in views.items() if k not in ("embedding", "token_ids", "mrope_positions")
        }
        mrope = views.get("mrope_positions")
        return Embedding(
            embedding=views.get("embedding"),
            token_ids=views.get("token_ids"),
            mrope_positions=None if mrope is None else mrope.T,
            extra=extra,
        )

    def commit(self, *, mrope_position_delta: int = 0, meta: bytes | None = None) -> None:
        """Start sending what was written into :meth:`buffer` (``meta`` as
        for :meth:`send`)."""
        if self._buffer is None:
            raise ValueError(f"room {self.room}: commit() without buffer()")
        _check_meta(self.room, meta)
        n, blocks = self._buffer
        self._buffer = None
        self._ep.pool.synchronize()
        self._start(n, blocks, mrope_position_delta, None, meta)

    def _claim(self, what: str) -> None:
        if self._sent:
            raise ValueError(f"room {self.room}: {what} after the embedding was already given")
        self._sent = True

    def _alloc(self, n: int, timeout: float | None, *, contiguous: bool) -> list[int]:
        ep = self._ep
        need = -(-n // ep.block_size)
        if need > ep.num_blocks:
            self._sent = False
            raise ValueError(
                f"room {self.room}: {n} tokens need {need} blocks but the encoder pool has {ep.num_blocks}"
            )
        wait = ep.room_timeout if timeout is None else timeout
        if contiguous:
            blocks = ep.allocator.alloc_contiguous_wait(need, wait)
        else:
            blocks = ep.allocator.alloc_wait(need, wait)
        if blocks is None:
            kind = "adjacent " if contiguous else ""
            reason = f"no {kind}free encoder blocks for {n} tokens within {wait:g}s"
            ep._abort_now(self._room, reason)
            raise TransferError(self.room, reason)
        return blocks

    def _start(
        self,
        n: int,
        blocks: list[int],
        delta: int,
        arrays: dict[str, Any] | None,
        meta: bytes | None = None,
    ) -> None:
        ep = self._ep
        checks = ep.checksums and arrays is not None and not ep.pool.is_torch
        try:
            ep.pool.write_aux(
                blocks[0],
                total_tokens=n,
                mrope_position_delta=delta,
                checksum=checksum(arrays) if checks and arrays is not None else 0,
                flags=1 if checks else 0,
            )
        except BaseException:
            ep.allocator.free(blocks)
            raise
        ep._loop.call(ep._data_ready, self._room, n, blocks, meta)

    def poll(self) -> Status:
        """The room's status now. Never blocks; safe from any thread."""
        return self._room.status

    @property
    def failure_reason(self) -> str | None:
        return self._room.failure_reason

    @property
    def history(self) -> list[tuple[Status, int]]:
        return self._room.history

    def wait(self, timeout: float | None = None) -> Status:
        """Block until the room is terminal (or ``timeout``); return its status."""
        ev = self._ep._events.get(self._room)
        if ev is not None and not self._room.done:
            ev.wait(timeout)
        return self._room.status

    def abort(self, reason: str = "aborted by sender") -> None:
        """Give up on the room. When this returns, :meth:`poll` is ``Failed``
        and :attr:`failure_reason` is ``reason`` (and :meth:`wait` returns);
        destinations are told afterwards, off this thread, and the pool's
        blocks come back once no write of the room is in flight. Blocks
        handed out by :meth:`buffer` and never committed go back at once.
        No-op once the room has ended. Never blocks."""
        if self._buffer is not None:
            self._ep.allocator.free(self._buffer[1])
            self._buffer = None
        self._ep._abort_now(self._room, reason)

    def clear(self) -> None:
        """Forget the room (call after it ended); an unfinished room is
        aborted first (as :meth:`abort`). Never blocks."""
        ep, room = self._ep, self._room
        if self._buffer is not None:
            ep.allocator.free(self._buffer[1])
            self._buffer = None
        ep._abort_now(room, "cleared before it finished")
        # The room has ended; only bookkeeping is left (blocks come back when
        # the last write ends): forget the id now, so it can be reused at
        # once, and leave the rest to the loop's next wake-up (after the
        # abort's own work, queued before it).
        with ep._lock:
            if ep._rooms.get(self.room) is room:
                del ep._rooms[self.room]
                ep._events.pop(room, None)
                ep._created.pop(room, None)
        ep._loop.call_lazy(ep._clear_room, room)


class EncoderEndpoint:
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
        self._on_request = on_request
        self.local_control = local_control
        # cleared rooms that still have a write in flight (kept for peer death)
        self._orphans: set[SenderRoom] = set()
        #: payloads sent with ``borrow=True``, until their room frees its blocks
        self._borrowed: dict[SenderRoom, Borrowed] = {}
        # terminal rooms in the order they ended, collected after room_ttl
        self.room_ttl = room_ttl
        self._auth = Authenticator(auth_secret)
        self.metrics = EndpointMetrics(
            "encoder", lambda: self.allocator.num_free, lambda: self.allocator.num_used
        )
        self.metrics_port = metrics_port
        self._exporter: MetricsExporter | None = None
        self._created: dict[SenderRoom, float] = {}
        self._ended: dict[SenderRoom, float] = {}  # oldest first; clear() removes
        self.transport_options = {k: dict(v) for k, v in (transport_options or {}).items()}
        self.pool = BufferPool(schema, num_blocks, block_size, device=device)
        self.allocator = BlockAllocator(num_blocks)
        self.stats = EndpointStats()
        self._field_names = [*schema.names, AUX_FIELD]
        self._rooms: dict[RoomId, SenderRoom] = {}
        self._events: dict[SenderRoom, threading.Event] = {}  # by identity
        self._early: dict[RoomId, list[tuple[float, bytes, Message]]] = {}
        self._peers: dict[SessionId, _Peer] = {}
        self._lock = threading.Lock()
        # Held while a room's state machine takes one event (_step): the loop
        # and a user's thread in abort() may step the same room at once.
        self._step_lock = threading.Lock()
        # dropped input: hostile or broken (WARNING), or merely late (DEBUG),
        # each counted exactly and logged at most once per peer per interval
        self._noise = NoiseLog(log, "encoder")
        self._stale = NoiseLog(log, "encoder", level=logging.DEBUG)
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._listener: _lane.Listener | None = None  # same-host control lanes
        self._lanes: dict[bytes, _lane.Lane] = {}  # by the identity they stand for
        self._lane_ids = itertools.count(1)
        self._write_workers = write_workers
        self._workers = ThreadPoolExecutor(
            max_workers=write_workers, thread_name_prefix="embedlink-write"
        )
        # Writes on worker threads not yet reported back to the loop: while
        # there are any, the loop sleeps between events rather than take a CPU
        # from the copies (it is woken when they end).
        self._writes_out = 0
        self._loop = Loop(
            f"embedlink-encoder-{tp_rank}",
            tick=self._tick,
            busy_poll=busy_poll_us / 1e6,
            may_spin=lambda: self._writes_out == 0,
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
        started closed again."""
        if self._closed:
            raise RuntimeError("the endpoint is closed; create a new one")
        if self._started:
            raise RuntimeError("the endpoint is already started")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self._loop.open()
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, 2 << 20)
        if self.port:
            sock.bind(f"tcp://{self.host}:{self.port}")
        else:
            self.port = sock.bind_to_random_port(f"tcp://{self.host}")
        self._sock = sock
        self._loop.add_socket(sock, self._on_readable)
        if self.local_control:
            self._listener = _lane.listen(self.address)
            if self._listener is not None:
                self._loop.add_fd(self._listener.fileno(), self._on_lane_accept)
        self._loop.start()
        if self.metrics_port is not None:
            self._exporter = MetricsExporter(
                self.metrics.registry, self.host, self.metrics_port, status=self.status
            ).start()
        if self.bootstrap:
            BootstrapClient(self.bootstrap, auth_secret=self._auth.key).register(
                RouteInfo(
                    role="encoder",
                    tp_size=self.tp_size,
                    dp_size=self.dp_size,
                    rank_ip=self.advertise_host,
                    rank_port=self.port,
                    engine_rank=self.tp_rank,
                    dp_group=self.dp_rank,
                    status_address=self.metrics_address or "",
                )
            )
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
                self._loop.call_wait(self._end_rooms, "encoder endpoint closed")
            except TimeoutError:
                log.warning("encoder: the loop did not end the open rooms before closing")
        self._loop.stop()
        self._workers.shutdown(wait=True, cancel_futures=True)
        for p in self._peers.values():
            if p.executor is not None:
                p.executor.shutdown(wait=True, cancel_futures=True)
        if self._exporter is not None:
            self._exporter.close()
        for p in self._peers.values():
            p.close_writer()
        if self._sock is not None:
            self._sock.close(CLOSE_LINGER_MS)  # the aborts just sent, to live peers
        for lane in self._lanes.values():
            lane.close()
        if self._listener is not None:
            self._listener.close()
        if self._ctx is not None:
            self._ctx.term()
        self._borrowed.clear()  # the callers' arrays, no longer read
        self.allocator.wake()

    def __enter__(self) -> EncoderEndpoint:
        return self if self._started and not self._closed else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        with self._lock:
            if room in self._rooms:
                raise ValueError(f"room {room} is still live on this encoder; clear() it first")
            self._rooms[room] = r
            self._events[r] = threading.Event()
            self._created[r] = time.monotonic()
            # The loop files early messages under the same lock (see _dispatch),
            # so either it saw this room or its messages are in _early now.
            early = room in self._early
        if early:
            self._loop.call(self._adopt_early, r)
        return Sender(self, r)

    def room_count(self) -> int:
        return len(self._rooms)

    def pool_usage(self) -> tuple[int, int]:
        """``(used, total)`` blocks."""
        return self.allocator.num_used, self.num_blocks

    @property
    def metrics_address(self) -> str | None:
        """``host:port`` serving ``/metrics`` and ``/status`` (None without ``metrics_port``)."""
        return None if self._exporter is None else self._exporter.address(self.advertise_host)

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot: live rooms by status, pool use, peers, counters.

        Taken on the loop thread, so it is consistent; what ``GET /status``
        and ``embedlink status`` show.
        """
        return self._loop.call_wait(self._snapshot, timeout=5.0)  # type: ignore[no-any-return]

    def _snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        rooms = rooms_by_status(r.status for r in self._rooms.values())
        return {
            "side": "encoder",
            "address": self.address,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "transports": list(self.transports),
            "rooms": rooms,
            "requests_without_sender": sum(
                1
                for reqs in self._early.values()
                if any(isinstance(m, TransferRequest) for _, _, m in reqs)
            ),
            "pool": pool_status(self.pool, self.allocator),
            "peers": [
                {
                    "session": p.session,
                    "transport": p.transport,
                    "control": "unix" if p.identity in self._lanes else "zmq",
                    "alive": p.refused is None,
                    "refused": p.refused,
                    "last_seen_s": round(now - p.last_seen, 3),
                }
                for p in self._peers.values()
            ],
            "counters": vars(self.stats).copy(),
            "loop_errors": self._loop.errors,
        }

    def sessions(self) -> dict[SessionId, str | None]:
        """Registered language sessions and the transport chosen for each."""
        return {s: p.transport for s, p in self._peers.items()}

    # -- loop thread

    def _adopt_early(self, room: SenderRoom) -> None:
        # to this room, not whatever has its id now: it may have been aborted
        # and cleared meanwhile (then its requests are answered with why)
        for _, identity, msg in self._early.pop(room.room, []):
            self._dispatch(identity, msg, room)

    def _data_ready(
        self, room: SenderRoom, n: int, blocks: list[int], meta: bytes | None = None
    ) -> None:
        self._run(room, self._step(room.data_ready, n, blocks, time.monotonic(), meta))

    def _step(self, event: Callable[..., list[Action]], *args: Any) -> list[Action]:
        """Feed one event to a room's state machine (``event`` is one of its
        methods) and return the actions, under the step lock: the loop and a
        user's thread in :meth:`Sender.abort` may step the same room at once.
        The actions are carried out afterwards, outside the lock."""
        with self._step_lock:
            return event(*args)

    def _abort_now(self, room: SenderRoom, reason: str) -> None:
        """:meth:`Sender.abort` on the caller's thread: the room is ``Failed``
        when this returns; the loop tells the destinations and frees blocks."""
        acts = self._step(room.abort, time.monotonic(), reason)
        if not acts:
            return  # it had ended already
        ev = self._events.get(room)
        if ev is not None:
            ev.set()  # Sender.wait() returns at once
        self._loop.call(self._run, room, acts)

    def _end_rooms(self, reason: str) -> None:
        now = time.monotonic()
        for room in list(self._rooms.values()):
            if not room.done:
                self._run(room, self._step(room.abort, now, reason))

    def _clear_room(self, room: SenderRoom) -> None:
        if not room.done:
            self._run(room, self._step(room.abort, time.monotonic(), "cleared before it finished"))
        self._ended.pop(room, None)
        with self._lock:
            if self._rooms.get(room.room) is room:
                del self._rooms[room.room]
                self._events.pop(room, None)
                self._created.pop(room, None)
        if not room.src_freed:
            self._orphans.add(room)  # a write is still in flight; its blocks come back later

    def _on_readable(self, sock: zmq.Socket[bytes]) -> None:
        for _ in range(256):  # bounded, so timers and calls still run under load
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.stats.dropped_messages += 1
                self.metrics.dropped.labels("encoder").inc()
                peer = frames[0].hex() if frames else "?"
                self._noise.note(f"zmq peer {peer}", "malformed", f"{len(frames)} frames, not 2")
                continue
            self._on_payload(*frames)

    def _on_payload(self, identity: bytes, payload: bytes) -> None:
        """One control message from ``identity`` (a ZeroMQ peer or a lane)."""
        opened = self._auth.open(payload)
        if opened is None:
            self.stats.unauthenticated_messages += 1
            self.metrics.unauthenticated.labels("encoder").inc()
            self._noise.note(
                self._peer_name(identity), "unauthenticated", "missing or wrong authentication tag"
            )
            return
        try:
            msg = decode(opened)
        except RemoteProtocolError as exc:
            self.stats.dropped_messages += 1
            self.metrics.dropped.labels("encoder").inc()
            self._noise.note(self._peer_name(identity), "malformed", str(exc))
            return
        self._dispatch(identity, msg)

    def _peer_name(self, identity: bytes) -> str:
        """How the logs name the peer behind ``identity``."""
        if identity in self._lanes:
            return f"same-host {identity.decode(errors='replace')}"
        return f"zmq peer {identity.hex()}"

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
        gave up on us): its session is dead now, without waiting for missed
        heartbeats. Unless it has registered again over another connection
        meanwhile: then the session lives on there."""
        lane = self._lanes.pop(identity)
        self._loop.remove_fd(lane.fileno())
        lane.close()
        for peer in list(self._peers.values()):
            if peer.identity == identity and peer.refused is None:
                self._peer_dead(peer, f"its same-host control connection ended ({why})")

    def _dispatch(self, identity: bytes, msg: Message, target: SenderRoom | None = None) -> None:
        """Handle one decoded message; ``target``: the room it is for (else
        the live room with its id)."""
        now = time.monotonic()
        if isinstance(msg, Register):
            self._on_register(identity, msg)
            return
        if isinstance(msg, Heartbeat):
            known = self._peers.get(msg.session)
            if known is not None and known.refused is None:
                known.last_seen = now
                known.identity = identity
            if msg.reply:
                registered = known is not None and known.refused is None
                self._send_raw(
                    identity,
                    Heartbeat(session=msg.session, seq=msg.seq, reply=False, registered=registered),
                )
            return
        if isinstance(msg, StatusUpdate):
            self.stats.dropped_messages += 1
            self.metrics.dropped.labels("encoder").inc()
            self._noise.note(
                self._peer_name(identity), "unexpected", "StatusUpdate is not for an encoder"
            )
            return
        peer = self._peers.get(msg.session)
        if peer is None or peer.refused is not None:
            why = "session not registered" if peer is None else peer.refused
            if not isinstance(msg, Abort) or peer is None:
                self._refuse(identity, msg.room, msg.epoch, f"refused: {why}")
            return
        peer.identity = identity
        peer.last_seen = now
        first = False
        room = target or self._rooms.get(msg.room)  # the common case: it exists, no lock
        if room is None and isinstance(msg, TransferRequest | Abort):
            with self._lock:  # against sender() adding the room meanwhile
                room = self._rooms.get(msg.room)
                if room is None:
                    # sender(room) may come later: keep it (at most a room timeout)
                    early = self._early.setdefault(msg.room, [])
                    first = not any(isinstance(m, TransferRequest) for _, _, m in early)
                    early.append((now, identity, msg))
        if room is None:
            if first and isinstance(msg, TransferRequest) and self._on_request is not None:
                self._announce(msg.room)
            if not isinstance(msg, TransferRequest):
                # Unknown room: answer so the peer can release what it holds.
                self._refuse(
                    identity, msg.room, msg.epoch, f"unknown room {msg.room} on this encoder"
                )
            return
        if isinstance(msg, TransferRequest):
            request = functools.partial(room.request, dst_num_blocks=peer.register.num_blocks)
            acts = self._step(request, msg, now)
        elif isinstance(msg, Resume):
            acts = self._step(room.resume, msg, now)
        else:
            acts = self._step(room.peer_abort, msg, now)
        self._run(room, acts)

    def _announce(self, room: RoomId) -> None:
        assert self._on_request is not None
        try:
            self._on_request(room)
        except Exception:  # the user's callback must not take the loop down
            log.exception("encoder: on_request(%d) raised", room)

    def _on_register(self, identity: bytes, msg: Register) -> None:
        old = self._peers.get(msg.session)
        if old is not None:
            old.close_writer()
        peer = _Peer(msg.session, identity, msg)
        self._peers[msg.session] = peer
        mine = self.schema.describe()
        theirs = [(f.name, list(f.shape), f.dtype) for f in msg.schema]
        if mine != theirs:
            peer.refused = f"schema mismatch: encoder has {mine}, language has {theirs}"
            log.warning("encoder: refusing session %s: %s", msg.session, peer.refused)
            return
        peer.regions = {r.field: r.nbytes for r in msg.regions}
        tried: list[str] = []
        for offer in msg.transports:
            if offer.name not in self.transports:
                continue
            try:
                backend = get_backend(offer.name)
                if backend.host_memory_only and not self.pool.on_host:
                    tried.append(
                        f"{offer.name}: needs host memory, the encoder pool is on {self.pool.device}"
                    )
                    continue
                if not backend.reachable(offer, host_id=host_id()):
                    tried.append(f"{offer.name}: not reachable from here")
                    continue
                peer.writer = backend.connect(
                    offer,
                    regions=peer.regions,
                    field_names=self._field_names,
                    timeout=self.room_timeout,
                    local_host=self.advertise_host,
                    options=self.transport_options.get(offer.name),
                )
                peer.transport = offer.name
                limit = peer.writer.max_concurrent_writes
                if limit is not None and limit < self._write_workers:
                    peer.executor = ThreadPoolExecutor(
                        max_workers=limit, thread_name_prefix=f"embedlink-write-{offer.name}"
                    )
                break
            except Exception as exc:  # a backend failing to connect must not kill the loop
                tried.append(f"{offer.name}: {exc}")
        if peer.writer is None:
            offered = [o.name for o in msg.transports]
            peer.refused = (
                f"no common transport: language offers {offered}, encoder has "
                f"{list(self.transports)}" + (f" ({'; '.join(tried)})" if tried else "")
            )
            log.warning("encoder: refusing session %s: %s", msg.session, peer.refused)
        else:
            log.info("encoder: session %s registered, transport %s", msg.session, peer.transport)

    def _refuse(self, identity: bytes, room: RoomId, epoch: int, reason: str) -> None:
        self._send_raw(
            identity,
            StatusUpdate(
                room=room,
                epoch=epoch,
                status=Status.Failed,
                sent_tokens=0,
                total_tokens=0,
                reason=reason,
            ),
        )

    def _send_raw(self, identity: bytes, msg: Message) -> None:
        assert self._sock is not None
        lane = self._lanes.get(identity)
        if lane is not None:
            if not lane.send(self._auth.seal(encode(msg))):
                self.stats.dropped_messages += 1
                log.info("encoder: could not send %s: lane closed or full", type(msg).__name__)
            self._loop.watch_writable(lane.fileno(), lane.wants_write)
            return
        try:
            self._sock.send_multipart([identity, self._auth.seal(encode(msg))], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or queue full
            self.stats.dropped_messages += 1
            log.info("encoder: could not send %s: %s", type(msg).__name__, exc)

    def _run(self, room: SenderRoom, actions: list[Action]) -> None:
        changes: list[StatusChanged] = []
        for a in actions:
            if isinstance(a, Send):
                peer = self._peers.get(a.to) if a.to is not None else None
                if peer is not None:
                    self._send_raw(peer.identity, a.msg)
            elif isinstance(a, WriteChunk):
                peer = self._peers.get(a.dst)
                limit = peer.writer.inline_max_bytes if peer and peer.writer else 0
                if a.plan.nbytes <= limit:
                    # A local copy this small costs less than two thread hand-offs.
                    self._write(room, a, peer, inline=True)
                elif peer is not None and peer.executor is not None:
                    self._writes_out += 1
                    peer.executor.submit(self._write, room, a, peer)
                else:
                    self._writes_out += 1
                    self._workers.submit(self._write, room, a, peer)
            elif isinstance(a, FreeBlocks):
                self.allocator.free(a.blocks)
                self._orphans.discard(room)
                self._borrowed.pop(room, None)  # no write of the room is in flight
            elif isinstance(a, StatusChanged):
                # bookkeeping: after the batch's messages have gone out
                changes.append(a)
            elif isinstance(a, Drop):
                self.stats.ignored_inputs += 1
                self.metrics.ignored.labels("encoder").inc()
                self._stale.note("its language ranks", "stale", a.reason)
        for a in changes:
            if a.new is Status.Transferring:
                self.metrics.resumes.labels("encoder").inc()
            if a.new.is_terminal:
                now = time.monotonic()
                self.metrics.ended(a.new.name, now - self._created.pop(room, now))
                self._ended[room] = now
                ev = self._events.get(room)
                if ev is not None:
                    ev.set()
                if a.new is Status.Failed:
                    log.info("encoder: room %d failed: %s", room.room, a.reason)

    def _write(
        self, room: SenderRoom, w: WriteChunk, peer: _Peer | None, inline: bool = False
    ) -> None:
        """Move the bytes, then report to the loop (directly when ``inline``,
        i.e. already on the loop thread). ``peer`` is the session as it was
        when the write was planned: if it has died or registered again since,
        its writer is closed and the write fails, rather than landing in a pool
        whose blocks may have been handed to other rooms."""
        ok, reason = True, None
        t0 = time.perf_counter()
        writer = None if peer is None else peer.writer  # the loop may drop it meanwhile
        if writer is None:
            ok, reason = False, f"no data-plane connection to {w.dst}"
        else:
            try:
                lent = self._borrowed.get(room)
                if lent is None:
                    writer.write(w.plan.copies, self.pool, timeout=self.room_timeout)
                elif writer.reads_any_memory:
                    counts = [seg.count for seg in w.plan.segments]
                    sources = lent.sources(w.plan.copies, w.plan.start_token, counts)
                    writer.write_from(w.plan.copies, sources, timeout=self.room_timeout)
                else:
                    lent.place()
                    writer.write(w.plan.copies, self.pool, timeout=self.room_timeout)
            except TransportError as exc:
                ok, reason = False, str(exc)
            except Exception as exc:  # a bug in a backend must still end the room
                ok, reason = False, f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        # report first (a room's status reply waits on it), count afterwards;
        # the stats are counted on the loop (one writer), the metrics are
        # thread-safe
        if inline:
            self._write_done(room, w.dst, ok, reason, w.plan.nbytes)
        else:
            self._loop.call(self._write_returned, room, w.dst, ok, reason, w.plan.nbytes)
        if ok:
            transport = peer.transport if peer is not None and peer.transport else "?"
            self.metrics.moved(transport, "sent", w.plan.nbytes, seconds)

    def _check_liveness(self, now: float) -> None:
        """Declare sessions dead that sent nothing (heartbeats included) for
        ``heartbeat_interval * heartbeat_misses`` seconds: their rooms fail and
        free their blocks; the session is refused until it registers again."""
        limit = self.heartbeat_interval * self.heartbeat_misses
        for peer in list(self._peers.values()):
            if peer.refused is not None:
                continue
            silent = int((now - peer.last_seen) // self.heartbeat_interval)
            if silent == 0:
                peer.misses = 0
            elif silent > peer.misses:
                self.metrics.heartbeat_misses.labels("encoder").inc(silent - peer.misses)
                peer.misses = silent
            if now - peer.last_seen <= limit:
                continue
            self._peer_dead(
                peer, f"no heartbeat from {peer.session} for {now - peer.last_seen:.1f}s"
            )

    def _peer_dead(self, peer: _Peer, reason: str) -> None:
        """Fail every room that writes to ``peer`` (their blocks come back) and
        refuse the session until it registers again."""
        now = time.monotonic()
        peer.refused = f"session declared dead ({reason}); register again"
        self.stats.dead_sessions += 1
        self.metrics.dead_peers.labels("encoder").inc()
        # a language endpoint that closes ends its lane: news only if rooms suffer
        busy = any(peer.session in r.dsts and not r.done for r in self._rooms.values())
        log.log(logging.WARNING if busy else logging.INFO, "encoder: %s", peer.refused)
        peer.close_writer()
        for room in list(self._rooms.values()):
            if peer.session in room.dsts:
                self._run(room, self._step(room.peer_dead, peer.session, now, reason))
        for room in list(self._orphans):
            if peer.session in room.dsts:
                self._run(room, self._step(room.peer_dead, peer.session, now, reason))

    def _write_returned(
        self, room: SenderRoom, dst: SessionId, ok: bool, reason: str | None, nbytes: int
    ) -> None:
        """A write done on a worker thread, reported on the loop."""
        self._writes_out -= 1
        self._write_done(room, dst, ok, reason, nbytes)

    def _write_done(
        self, room: SenderRoom, dst: SessionId, ok: bool, reason: str | None, nbytes: int
    ) -> None:
        self._run(room, self._step(room.write_done, dst, ok, time.monotonic(), reason))
        if ok:
            self.stats.bytes_written += nbytes
            self.stats.chunks_written += 1
        else:
            self.stats.write_failures += 1

    def _tick(self, now: float) -> None:
        for room in list(self._rooms.values()):
            if not room.done:
                self._run(room, self._step(room.tick, now))
        self._check_liveness(now)
        self._noise.flush(now)
        self._stale.flush(now)
        # Rooms that ended and were never cleared: forget them after room_ttl.
        stale = []
        for room, ended in self._ended.items():
            if now - ended <= self.room_ttl:
                break  # the rest ended later
            stale.append(room)
        for room in stale:
            del self._ended[room]
            if self._rooms.get(room.room) is room:
                self.stats.collected_rooms += 1
                self._clear_room(room)
        # A request that came before sender(room) waits at most one room timeout.
        ttl = self.room_timeout
        expired = [r for r, reqs in self._early.items() if reqs and now - reqs[0][0] > ttl]
        for r in expired:
            for _, identity, msg in self._early.pop(r):
                if not isinstance(msg, TransferRequest):
                    continue
                self._refuse(identity, r, msg.epoch, f"no sender for room {r} within {ttl:g}s")
