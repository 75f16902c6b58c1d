"""The room table and the action interpreter.

:class:`Rooms` keeps the live :class:`~embedlink.protocol.SenderRoom` of every
room (by id, under :attr:`Rooms.lock`), the event each ``Sender.wait()``
waits on, when each room was made and when it ended, and the cleared rooms
that still have a write in flight. :meth:`Rooms.run` carries out what a
room's state machine asked for (the order of a batch is the order of its
side effects: messages go out, writes start and blocks come back as listed;
the bookkeeping of status changes follows). Ticks and the collection of
ended rooms that nobody cleared live here too.

Runs on the loop thread, except :meth:`Rooms.abort_now` (a user's thread:
it steps the room itself, under the step lock, and leaves the rest to the
loop) and :meth:`Rooms.forget` (``Sender.clear()``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from ..._runtime.loop import Loop
from ...memory import BlockAllocator
from ...observability.metrics import EndpointMetrics
from ...observability.noise import NoiseLog
from ...protocol import (
    Action,
    Drop,
    FreeBlocks,
    Message,
    RoomId,
    Send,
    SenderRoom,
    SessionId,
    Status,
    StatusChanged,
    WriteChunk,
)
from .._common import StepLock
from .sessions import Peer
from .stats import EndpointStats
from .writes import WriteDispatch

# the package's logger: the one name operators configure, as before the split
log = logging.getLogger(__package__)

__all__ = ["Rooms"]


class Rooms:
    """The rooms of one encoder endpoint.

    ``peers``: the registered sessions by id (read only: a room's
    destinations); ``send(identity, msg)``: a control message out.
    """

    def __init__(
        self,
        loop: Loop,
        step: StepLock,
        allocator: BlockAllocator,
        *,
        peers: Mapping[SessionId, Peer],
        send: Callable[[bytes, Message], None],
        writes: WriteDispatch,
        stats: EndpointStats,
        metrics: EndpointMetrics,
        stale: NoiseLog,
        room_ttl: float,
    ) -> None:
        self._loop = loop
        self._step = step
        self._allocator = allocator
        self._peers = peers
        self._send = send
        self._writes = writes
        self._stats = stats
        self._metrics = metrics
        self._stale = stale
        self.room_ttl = room_ttl
        #: against sender() adding a room while the loop files a request for it
        self.lock = threading.Lock()
        self.live: dict[RoomId, SenderRoom] = {}
        self.events: dict[SenderRoom, threading.Event] = {}  # by identity
        self.created: dict[SenderRoom, float] = {}
        # terminal rooms in the order they ended, collected after room_ttl
        self.ended: dict[SenderRoom, float] = {}  # oldest first; clear() removes
        # cleared rooms that still have a write in flight (kept for peer death)
        self.orphans: set[SenderRoom] = set()

    def add(self, r: SenderRoom) -> None:
        """A new room (``sender()``), with :attr:`lock` held. ValueError when
        a room with its id is still live."""
        if r.room in self.live:
            raise ValueError(f"room {r.room} is still live on this encoder; clear() it first")
        self.live[r.room] = r
        self.events[r] = threading.Event()
        self.created[r] = time.monotonic()

    def forget(self, room: SenderRoom) -> None:
        """Drop ``room`` from the table (if it is still the live room with its id)."""
        with self.lock:
            if self.live.get(room.room) is room:
                del self.live[room.room]
                self.events.pop(room, None)
                self.created.pop(room, None)

    def busy(self, session: SessionId) -> bool:
        """Whether an unfinished room writes to ``session``."""
        return any(session in r.dsts and not r.done for r in self.live.values())

    # -- events

    def data_ready(
        self, room: SenderRoom, n: int, blocks: list[int], meta: bytes | None = None
    ) -> None:
        self.run(room, self._step(room.data_ready, n, blocks, time.monotonic(), meta))

    def write_done(self, room: SenderRoom, dst: SessionId, ok: bool, reason: str | None) -> None:
        self.run(room, self._step(room.write_done, dst, ok, time.monotonic(), reason))

    def abort_now(self, room: SenderRoom, reason: str) -> None:
        """:meth:`Sender.abort` on the caller's thread: the room is ``Failed``
        when this returns; the loop tells the destinations and frees blocks."""
        acts = self._step(room.abort, time.monotonic(), reason)
        if not acts:
            return  # it had ended already
        ev = self.events.get(room)
        if ev is not None:
            ev.set()  # Sender.wait() returns at once
        self._loop.call(self.run, room, acts)

    def end_all(self, reason: str) -> None:
        now = time.monotonic()
        for room in list(self.live.values()):
            if not room.done:
                self.run(room, self._step(room.abort, now, reason))

    def clear_room(self, room: SenderRoom) -> None:
        if not room.done:
            self.run(room, self._step(room.abort, time.monotonic(), "cleared before it finished"))
        self.ended.pop(room, None)
        self.forget(room)
        if not room.src_freed:
            self.orphans.add(room)  # a write is still in flight; its blocks come back later

    def peer_dead(self, session: SessionId, now: float, reason: str) -> None:
        """Fail every room (cleared ones with a write in flight included) that
        writes to the dead ``session``."""
        for room in list(self.live.values()):
            if session in room.dsts:
                self.run(room, self._step(room.peer_dead, session, now, reason))
        for room in list(self.orphans):
            if session in room.dsts:
                self.run(room, self._step(room.peer_dead, session, now, reason))

    def tick(self, now: float) -> None:
        for room in list(self.live.values()):
            if not room.done:
                self.run(room, self._step(room.tick, now))

    def collect(self, now: float) -> None:
        # Rooms that ended and were never cleared: forget them after room_ttl.
        stale = []
        for room, ended in self.ended.items():
            if now - ended <= self.room_ttl:
                break  # the rest ended later
            stale.append(room)
        for room in stale:
            del self.ended[room]
            if self.live.get(room.room) is room:
                self._stats.collected_rooms += 1
                self.clear_room(room)

    # -- actions

    def run(self, room: SenderRoom, actions: list[Action]) -> None:
        changes: list[StatusChanged] = []
        for a in actions:
            if isinstance(a, Send):
                peer = self._peers.get(a.to) if a.to is not None else None
                if peer is not None:
                    self._send(peer.identity, a.msg)
            elif isinstance(a, WriteChunk):
                self._writes.dispatch(room, a, self._peers.get(a.dst))
            elif isinstance(a, FreeBlocks):
                self._allocator.free(a.blocks)
                self.orphans.discard(room)
                self._writes.release(room)  # no write of the room is in flight
            elif isinstance(a, StatusChanged):
                # bookkeeping: after the batch's messages have gone out
                changes.append(a)
            elif isinstance(a, Drop):
                self._stats.ignored_inputs += 1
                self._metrics.ignored.labels("encoder").inc()
                self._stale.note("its language ranks", "stale", a.reason)
        for a in changes:
            if a.new is Status.Transferring:
                self._metrics.resumes.labels("encoder").inc()
            if a.new.is_terminal:
                now = time.monotonic()
                self._metrics.ended(a.new.name, now - self.created.pop(room, now))
                self.ended[room] = now
                ev = self.events.get(room)
                if ev is not None:
                    ev.set()
                if a.new is Status.Failed:
                    log.info("encoder: room %d failed: %s", room.room, a.reason)
