"""The language sessions an encoder serves: one :class:`Peer` record per
session, the ``Register`` handshake with its transport negotiation, the
session side of heartbeats, liveness (a session that sends nothing for
``heartbeat_interval * heartbeat_misses`` seconds is declared dead) and
closing the sessions' writers.

Rooms are not kept here: when a session dies, the rooms that write to it are
failed through the ``fail_rooms`` callable (and ``rooms_busy`` says whether
any would suffer, which decides how loudly that is logged).

Runs on the endpoint's loop thread, except the ``shutdown_executors`` and
``close_writers`` of closing, after the loop has stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..._runtime.host import host_id
from ...memory import BufferPool
from ...observability.metrics import EndpointMetrics
from ...protocol import BufferSchema, Heartbeat, Register, SessionId
from ...transports import PeerWriter, get_backend
from .stats import EndpointStats

# the package's logger: the one name operators configure, as before the split
log = logging.getLogger(__package__)

__all__ = ["Peer", "Sessions"]


@dataclass
class Peer:
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


class Sessions:
    """The registered language sessions of one encoder, by session id.

    ``executor_for(writer, transport)``: the session's own writer threads
    when its writer limits concurrent writes (else None; see
    :meth:`WriteDispatch.executor_for`). ``rooms_busy(session)``: whether an
    unfinished room writes to ``session``. ``fail_rooms(session, now,
    reason)``: fail every room that writes to ``session``.
    """

    def __init__(
        self,
        *,
        schema: BufferSchema,
        transports: Sequence[str],
        pool: BufferPool,
        field_names: list[str],
        room_timeout: float,
        advertise_host: str,
        transport_options: Mapping[str, Mapping[str, str]],
        heartbeat_interval: float,
        heartbeat_misses: int,
        stats: EndpointStats,
        metrics: EndpointMetrics,
        executor_for: Callable[[PeerWriter, str], ThreadPoolExecutor | None],
        rooms_busy: Callable[[SessionId], bool],
        fail_rooms: Callable[[SessionId, float, str], None],
    ) -> None:
        self.schema = schema
        self.transports = tuple(transports)
        self.pool = pool
        self._field_names = field_names
        self.room_timeout = room_timeout
        self.advertise_host = advertise_host
        self.transport_options = transport_options
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        self._stats = stats
        self._metrics = metrics
        self._executor_for = executor_for
        self._rooms_busy = rooms_busy
        self._fail_rooms = fail_rooms
        #: by session id; the rooms part reads it to find a room's destinations
        self.peers: dict[SessionId, Peer] = {}

    def get(self, session: SessionId) -> Peer | None:
        return self.peers.get(session)

    def register(self, identity: bytes, msg: Register) -> None:
        """A ``Register`` from ``identity``: (re)open the session and pick the
        first transport the language rank offers that this encoder has and can
        reach; else the session is refused, with the reason."""
        old = self.peers.get(msg.session)
        if old is not None:
            old.close_writer()
        peer = Peer(msg.session, identity, msg)
        self.peers[msg.session] = peer
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
                peer.executor = self._executor_for(peer.writer, offer.name)
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

    def heartbeat(self, identity: bytes, msg: Heartbeat, now: float) -> Heartbeat | None:
        """A ``Heartbeat`` from ``identity`` at ``now``: a live session is seen
        (and now answers at ``identity``). Returns the reply to send when the
        peer asked for one (saying whether the session is registered)."""
        known = self.peers.get(msg.session)
        if known is not None and known.refused is None:
            known.last_seen = now
            known.identity = identity
        if not msg.reply:
            return None
        registered = known is not None and known.refused is None
        return Heartbeat(session=msg.session, seq=msg.seq, reply=False, registered=registered)

    def check_liveness(self, now: float) -> None:
        """Declare sessions dead that sent nothing (heartbeats included) for
        ``heartbeat_interval * heartbeat_misses`` seconds: their rooms fail and
        free their blocks; the session is refused until it registers again."""
        limit = self.heartbeat_interval * self.heartbeat_misses
        for peer in list(self.peers.values()):
            if peer.refused is not None:
                continue
            silent = int((now - peer.last_seen) // self.heartbeat_interval)
            if silent == 0:
                peer.misses = 0
            elif silent > peer.misses:
                self._metrics.heartbeat_misses.labels("encoder").inc(silent - peer.misses)
                peer.misses = silent
            if now - peer.last_seen <= limit:
                continue
            self.dead(peer, f"no heartbeat from {peer.session} for {now - peer.last_seen:.1f}s")

    def dead(self, peer: Peer, reason: str) -> None:
        """Fail every room that writes to ``peer`` (their blocks come back) and
        refuse the session until it registers again."""
        now = time.monotonic()
        peer.refused = f"session declared dead ({reason}); register again"
        self._stats.dead_sessions += 1
        self._metrics.dead_peers.labels("encoder").inc()
        # a language endpoint that closes ends its lane: news only if rooms suffer
        busy = self._rooms_busy(peer.session)
        log.log(logging.WARNING if busy else logging.INFO, "encoder: %s", peer.refused)
        peer.close_writer()
        self._fail_rooms(peer.session, now, reason)

    def lane_closed(self, identity: bytes, why: str) -> None:
        """The same-host control connection standing for ``identity`` ended
        (its language endpoint closed, died or gave up on us): its session is
        dead now, without waiting for missed heartbeats. Unless it has
        registered again over another connection meanwhile: then the session
        lives on there."""
        for peer in list(self.peers.values()):
            if peer.identity == identity and peer.refused is None:
                self.dead(peer, f"its same-host control connection ended ({why})")

    def transports_by_session(self) -> dict[SessionId, str | None]:
        """Registered sessions and the transport chosen for each."""
        return {s: p.transport for s, p in self.peers.items()}

    def describe(self, now: float, is_lane: Callable[[bytes], bool]) -> list[dict[str, Any]]:
        """The sessions as ``status()`` shows them (``is_lane(identity)``: the
        session's control messages come over a same-host lane)."""
        return [
            {
                "session": p.session,
                "transport": p.transport,
                "control": "unix" if is_lane(p.identity) else "zmq",
                "alive": p.refused is None,
                "refused": p.refused,
                "last_seen_s": round(now - p.last_seen, 3),
            }
            for p in self.peers.values()
        ]

    def shutdown_executors(self) -> None:
        """Closing: wait for the sessions' own writer threads (queued writes cancelled)."""
        for p in self.peers.values():
            if p.executor is not None:
                p.executor.shutdown(wait=True, cancel_futures=True)

    def close_writers(self) -> None:
        for p in self.peers.values():
            p.close_writer()
