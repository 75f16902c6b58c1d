"""Message dispatch: what each decoded control message does.

``Register`` and ``Heartbeat`` go to the sessions; a ``TransferRequest``,
``Resume`` or ``Abort`` from a registered session becomes an event of its
room's state machine (whose actions the rooms part carries out). A request
for a room that has no sender yet is filed with the early requests (and
announced through ``on_request`` the first time); anything else for an
unknown room, or from a session that is not registered, is refused with a
``Failed`` status update saying why, so the peer can release what it holds.

Runs on the endpoint's loop thread.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from ...protocol import (
    Abort,
    Heartbeat,
    Message,
    Register,
    Resume,
    RoomId,
    SenderRoom,
    Status,
    StatusUpdate,
    TransferRequest,
)
from .._common import StepLock
from .early import EarlyRequests
from .rooms import Rooms
from .sessions import Sessions

# the package's logger: the one name operators configure, as before the split
log = logging.getLogger(__package__)

__all__ = ["Dispatcher"]


class Dispatcher:
    """Turns the control messages of one encoder endpoint into events.

    ``send(identity, msg)``: a control message out; ``reject(identity, kind,
    detail)``: drop a message that is not for an encoder (counted, logged
    sparingly); ``on_request(room)``: the user's callback for a room asked
    for before its sender exists (None: no callback).
    """

    def __init__(
        self,
        rooms: Rooms,
        sessions: Sessions,
        early: EarlyRequests,
        step: StepLock,
        *,
        send: Callable[[bytes, Message], None],
        reject: Callable[[bytes, str, str], None],
        on_request: Callable[[RoomId], None] | None,
        room_timeout: float,
    ) -> None:
        self._rooms = rooms
        self._sessions = sessions
        self._early = early
        self._step = step
        self._send = send
        self._reject = reject
        self._on_request = on_request
        self.room_timeout = room_timeout

    def dispatch(self, identity: bytes, msg: Message, target: SenderRoom | None = None) -> None:
        """Handle one decoded message; ``target``: the room it is for (else
        the live room with its id)."""
        now = time.monotonic()
        if isinstance(msg, Register):
            self._sessions.register(identity, msg)
            return
        if isinstance(msg, Heartbeat):
            reply = self._sessions.heartbeat(identity, msg, now)
            if reply is not None:
                self._send(identity, reply)
            return
        if isinstance(msg, StatusUpdate):
            self._reject(identity, "unexpected", "StatusUpdate is not for an encoder")
            return
        peer = self._sessions.get(msg.session)
        if peer is None or peer.refused is not None:
            why = "session not registered" if peer is None else peer.refused
            if not isinstance(msg, Abort) or peer is None:
                self.refuse(identity, msg.room, msg.epoch, f"refused: {why}")
            return
        peer.identity = identity
        peer.last_seen = now
        first = False
        rooms = self._rooms
        room = target or rooms.live.get(msg.room)  # the common case: it exists, no lock
        if room is None and isinstance(msg, TransferRequest | Abort):
            with rooms.lock:  # against sender() adding the room meanwhile
                room = rooms.live.get(msg.room)
                if room is None:
                    # sender(room) may come later: keep it (at most a room timeout)
                    first = self._early.file(msg.room, now, identity, msg)
        if room is None:
            if first and isinstance(msg, TransferRequest) and self._on_request is not None:
                self._announce(msg.room)
            if not isinstance(msg, TransferRequest):
                # Unknown room: answer so the peer can release what it holds.
                self.refuse(
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
        rooms.run(room, acts)

    def adopt_early(self, room: SenderRoom) -> None:
        # to this room, not whatever has its id now: it may have been aborted
        # and cleared meanwhile (then its requests are answered with why)
        for identity, msg in self._early.adopt(room.room):
            self.dispatch(identity, msg, room)

    def expire_early(self, now: float) -> None:
        # A request that came before sender(room) waits at most one room timeout.
        self._early.expire(now, self.room_timeout, self.refuse)

    def _announce(self, room: RoomId) -> None:
        assert self._on_request is not None
        try:
            self._on_request(room)
        except Exception:  # the user's callback must not take the loop down
            log.exception("encoder: on_request(%d) raised", room)

    def refuse(self, identity: bytes, room: RoomId, epoch: int, reason: str) -> None:
        """Tell ``identity`` that ``room`` (``epoch``) failed, and why."""
        self._send(
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
