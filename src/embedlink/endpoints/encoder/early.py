"""Requests that came before their room: a language rank may ask for a room
(``TransferRequest``, or ``Abort`` it) before the encoder called
``sender(room)``. They are filed here and handed to the room when it is
made (:meth:`EarlyRequests.adopt`), or refused once they waited a room
timeout (:meth:`EarlyRequests.expire`).

Not locked itself: the endpoint files requests and checks for them under the
lock of its room table, so that either the loop saw a new room or that
room's requests are filed here when ``sender()`` looks (see
:meth:`EncoderEndpoint.sender`). Adoption and expiry run on the loop.
"""

from __future__ import annotations

from collections.abc import Callable

from ...protocol import Message, RoomId, TransferRequest

__all__ = ["EarlyRequests"]


class EarlyRequests:
    """Messages for rooms that have no sender yet, by room id, oldest first."""

    def __init__(self) -> None:
        self._by_room: dict[RoomId, list[tuple[float, bytes, Message]]] = {}

    def __contains__(self, room: RoomId) -> bool:
        return room in self._by_room

    def file(self, room: RoomId, now: float, identity: bytes, msg: Message) -> bool:
        """Keep ``msg`` (from ``identity``, received at ``now``) for ``room``;
        True when it is the first request for that room (no
        ``TransferRequest`` was filed for it before): then the endpoint
        announces the room (``on_request``)."""
        early = self._by_room.setdefault(room, [])
        first = not any(isinstance(m, TransferRequest) for _, _, m in early)
        early.append((now, identity, msg))
        return first

    def adopt(self, room: RoomId) -> list[tuple[bytes, Message]]:
        """Take what was filed for ``room``, oldest first: ``(identity, msg)``."""
        return [(identity, msg) for _, identity, msg in self._by_room.pop(room, [])]

    def expire(
        self, now: float, ttl: float, refuse: Callable[[bytes, RoomId, int, str], None]
    ) -> None:
        """Forget the rooms whose oldest message waited more than ``ttl``
        seconds at ``now``; each of their requests is refused
        (``refuse(identity, room, epoch, reason)``, room by room, each
        right after its room is forgotten)."""
        expired = [r for r, reqs in self._by_room.items() if reqs and now - reqs[0][0] > ttl]
        for r in expired:
            for _, identity, msg in self._by_room.pop(r):
                if not isinstance(msg, TransferRequest):
                    continue
                refuse(identity, r, msg.epoch, f"no sender for room {r} within {ttl:g}s")

    def count(self) -> int:
        """Rooms asked for (a ``TransferRequest`` filed) that have no sender:
        what ``status()`` shows as ``requests_without_sender``."""
        return sum(
            1
            for reqs in self._by_room.values()
            if any(isinstance(m, TransferRequest) for _, _, m in reqs)
        )
