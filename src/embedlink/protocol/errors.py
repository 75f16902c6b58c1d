"""The error types of embedlink.

Two families, after h11: a :class:`LocalProtocolError` means *we* tried
something the protocol forbids (a bug in the caller or in embedlink); a
:class:`RemoteProtocolError` means the *peer* sent something malformed or
illegal. The receive path converts everything it cannot parse into a
``RemoteProtocolError``, so a peer's garbage can only ever surface as that one
type, and it only ever affects the room it names.
"""

from __future__ import annotations

from .types import RoomId

__all__ = [
    "EmbedlinkError",
    "IllegalInput",
    "IllegalTransition",
    "InvalidArgument",
    "LocalProtocolError",
    "PlanError",
    "RemoteProtocolError",
    "TransferError",
]


class EmbedlinkError(Exception):
    """Base class of every error embedlink raises on purpose."""


class LocalProtocolError(EmbedlinkError):
    """We tried something the protocol forbids (a programming error).

    The one type for local misuse of the core: every subclass below means
    the caller (an endpoint, a test, embedlink itself) broke a contract, never
    that the peer did. The object it was raised on is left unchanged.
    """


class IllegalTransition(LocalProtocolError):
    """A status move the transition table rejects.

    Attributes ``current`` and ``proposed`` are the two statuses; the room is
    left unchanged.
    """

    def __init__(self, current: object, proposed: object, why: str) -> None:
        super().__init__(f"illegal status move {current!s} -> {proposed!s}: {why}")
        self.current = current
        self.proposed = proposed
        self.why = why


class IllegalInput(LocalProtocolError):
    """A room was fed an input its input table refuses for a local caller
    (``rooms.py``'s ``SENDER_INPUTS`` / ``RECEIVER_INPUTS``: effect
    ``raise-local`` or ``unreachable``).

    Attributes ``state`` (the room's status), ``input`` (the input kind) and
    ``why``; the room is left unchanged, and any blocks passed in stay the
    caller's.
    """

    def __init__(self, state: object, input: object, why: str) -> None:
        super().__init__(f"illegal input {input!s} in {state!s}: {why}")
        self.state = state
        self.input = input
        self.why = why


class InvalidArgument(LocalProtocolError, ValueError):
    """A constructor or call of the core got an argument outside its contract
    (a schema with no fields, a non-positive default reservation, ...).

    Also a :class:`ValueError`, which is what these raised before the core had
    one error type for local misuse; callers that catch ``ValueError`` still
    do.
    """


class PlanError(LocalProtocolError):
    """The planner was asked for a copy that would break a bound."""


class RemoteProtocolError(EmbedlinkError):
    """The peer sent something malformed or illegal.

    ``field`` names the offending field (``"$"`` for the whole message) and
    ``why`` says what was wrong with it.
    """

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"bad message field {field!r}: {why}")
        self.field = field
        self.why = why


class TransferError(EmbedlinkError):
    """A room ended ``Failed``; ``reason`` says why.

    Raised by the blocking calls of the public API (``Receiver.wait``,
    ``Sender.send`` on timeout). The room is ``Failed`` when this is raised.
    """

    def __init__(self, room: RoomId, reason: str) -> None:
        super().__init__(f"room {room}: {reason}")
        self.room = room
        self.reason = reason
