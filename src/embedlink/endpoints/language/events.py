"""How a language endpoint's rooms take their events: messages from their
encoders, aborts and clears from the user, reservations granted, and the
actions each room's state machine returns (:meth:`RoomEvents._run`, the
interpreter). The loop thread runs all of it, except where a method says it
runs on the caller's thread.

A mixin of :class:`~embedlink.endpoints.language.LanguageEndpoint`: it
keeps the endpoint's state (declared below) and the parts it drives
(reservations, assembly, routing, links, fences, the fast path), each a
module of its own.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time

from ..._runtime.auth import Authenticator
from ..._runtime.loop import Loop
from ...memory import BlockAllocator
from ...observability.metrics import EndpointMetrics
from ...observability.noise import NoiseLog
from ...protocol import (
    Abort,
    Action,
    Drop,
    FreeBlocks,
    Harvest,
    Heartbeat,
    Register,
    Reserve,
    RoomId,
    Send,
    Status,
    StatusChanged,
    StatusUpdate,
)
from .._common import PayloadOpener, StepLock
from .assembly import Assembler
from .fastpath import FastPath
from .links import EncoderLink, Fences, Links
from .receiver import LiveRoom
from .reservations import ReservationQueue
from .routing import RouteWaiters

log = logging.getLogger("embedlink.endpoints.language")

__all__ = ["RoomEvents"]


class RoomEvents:
    """The loop-thread side of a language endpoint's rooms (a mixin)."""

    # the endpoint's state this works on (set by LanguageEndpoint.__init__)
    session: str
    block_size: int
    heartbeat_interval: float
    heartbeat_misses: int
    room_ttl: float
    allocator: BlockAllocator
    metrics: EndpointMetrics
    dropped_messages: int
    ignored_inputs: int
    unauthenticated_messages: int
    dead_encoders: int
    abort_repeats: int
    collected_rooms: int
    _auth: Authenticator
    _loop: Loop
    _lock: threading.Lock
    _step: StepLock
    _opener: PayloadOpener[EncoderLink]
    _rooms: dict[RoomId, LiveRoom]
    _zombies: dict[tuple[RoomId, int], LiveRoom]
    _ended: dict[int, tuple[float, LiveRoom]]
    _reservations: ReservationQueue[LiveRoom]
    _assembler: Assembler
    _routes: RouteWaiters
    _links: Links
    _fences: Fences
    _fast: FastPath
    _noise: NoiseLog
    _stale: NoiseLog

    def _register(self, enc: EncoderLink) -> Register:
        raise NotImplementedError  # the endpoint's

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
        if self._fast.defer(live, functools.partial(self._after_abort, live, actions)):
            return
        self._reservations.remove(live)
        self._run(live, actions)

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

    def _lost_before_start(self, live: LiveRoom, enc: EncoderLink) -> None:
        reason = f"control connection to encoder {enc.address} closed"
        self._run(live, self._step(live.room.peer_dead, time.monotonic(), reason))

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
        self._fast.unhand(live)
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
                if not self._fast.defer(live, fail):
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
        msg = self._opener.open(payload, enc)
        if msg is None:
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
            self._opener.reject(
                enc, "unexpected", f"{type(msg).__name__} is not for a language rank"
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
        if self._fast.defer(live, functools.partial(self._on_payload, enc, payload)):
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
