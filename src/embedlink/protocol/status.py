"""The room status and its transition rule.

Theory of operation
-------------------
Every room (one request's embedding, on one side of the link) has a status
that only moves forward::

    Bootstrapping(0) --> WaitingForInput(1) --+--> Transferring(2) --> Success(3)
          |                    |              |          |
          |                    |              +----------+-----------> Success(3)
          v                    v                         v
       Failed(4)  <--------- Failed(4)  <------------ Failed(4)

* ``Bootstrapping``: the room exists; its peers are not all connected yet.
* ``WaitingForInput``: every destination has sent its buffer information.
* ``Transferring``: a chunk arrived, more remains (``is_last=False``); waiting
  for a resume. The status *stays* ``Transferring`` across any number of
  resumes: the ``sent_tokens`` carried next to it tells chunks apart.
* ``Success`` / ``Failed``: terminal.

Two rules, after h11's ``_state.py``:

1. Everything that decides whether a status move is legal lives in this file,
   as data (:data:`TRANSITIONS`), so a test can walk every pair and a document
   can be generated from it. Which *inputs* a room takes in each status, and
   where they may lead, is the other table, in ``inputs.py``.
2. This file does not know which side (encoder or language) it serves, nor why
   a status is proposed. ``rooms.py`` decides *what* to propose (as its input
   table allows); this file decides whether the move is legal.

The rules are the seed document's (``status-fix-summary.zh.md``), made exact:
a status never goes backwards (the old bug reset a resumed room to
``WaitingForInput``); ``Success`` and ``Failed`` are terminal; ``Failed`` is
reachable from every non-terminal status and always carries a reason; the same
status proposed again is an explicit no-op.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from .errors import IllegalTransition

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "Move",
    "Status",
    "check_transition",
    "transition",
]


class Status(enum.IntEnum):
    """The status of one room. Values are the seed's and are part of the API."""

    #: Room created; peers not yet connected.
    Bootstrapping = 0
    #: All destination ranks have sent their buffer information.
    WaitingForInput = 1
    #: A chunk arrived but more remains (``is_last=False``); waiting for a resume.
    Transferring = 2
    #: Every token delivered to every destination rank.
    Success = 3
    #: Error, timeout, abort or peer death; a reason is recorded.
    Failed = 4

    def __str__(self) -> str:
        return self.name

    @property
    def is_terminal(self) -> bool:
        """True for ``Success`` and ``Failed``, which nothing leaves."""
        return self in TERMINAL


#: The statuses nothing leaves.
TERMINAL: frozenset[Status] = frozenset({Status.Success, Status.Failed})


class Move(enum.Enum):
    """What proposing ``to`` while in ``from`` does."""

    #: A legal forward move; the status becomes the proposed one.
    ADVANCE = "advance"
    #: The same status again; nothing changes (not an error).
    SAME = "same"
    #: A lower status; rejected (rule 1: never backwards, never reset on resume).
    BACKWARD = "backward"
    #: Leaving ``Success`` or ``Failed``; rejected (rule 2: terminal).
    FROM_TERMINAL = "from-terminal"
    #: A forward jump over a required step (e.g. ``Bootstrapping -> Success``:
    #: nothing can be delivered before the destinations are known); rejected.
    SKIP = "skip"


_S = Status

#: The legal forward moves, besides ``-> Failed`` from any non-terminal status.
_FORWARD: frozenset[tuple[Status, Status]] = frozenset(
    {
        (_S.Bootstrapping, _S.WaitingForInput),  # all destinations known
        (_S.WaitingForInput, _S.Transferring),  # chunk written, is_last=False
        (_S.WaitingForInput, _S.Success),  # chunk written, is_last=True
        (_S.Transferring, _S.Success),  # resumed chunk written, is_last=True
    }
)


def _classify(current: Status, proposed: Status) -> Move:
    if current is proposed:
        return Move.SAME
    if current in TERMINAL:
        return Move.FROM_TERMINAL
    if proposed < current:
        return Move.BACKWARD
    if proposed is Status.Failed or (current, proposed) in _FORWARD:
        return Move.ADVANCE
    return Move.SKIP


#: Every ``(current, proposed)`` pair and what proposing it does. Built once from
#: the rules above; tests walk it and ``docs/`` draws it.
TRANSITIONS: Mapping[tuple[Status, Status], Move] = MappingProxyType(
    {(a, b): _classify(a, b) for a in Status for b in Status}
)


def check_transition(current: Status, proposed: Status) -> Move:
    """Return what proposing ``proposed`` while in ``current`` would do.

    Pure and side-effect free; never raises.
    """
    return TRANSITIONS[(current, proposed)]


def transition(current: Status, proposed: Status, reason: str | None = None) -> Status:
    """Return the status after proposing ``proposed`` while in ``current``.

    ``Move.SAME`` returns ``current`` unchanged. A move to ``Failed`` needs a
    non-empty ``reason``. Every rejected move raises :class:`IllegalTransition`
    and changes nothing.
    """
    move = TRANSITIONS[(current, proposed)]
    if move is Move.SAME:
        return current
    if move is Move.ADVANCE:
        if proposed is Status.Failed and not reason:
            raise IllegalTransition(current, proposed, "Failed needs a reason")
        return proposed
    raise IllegalTransition(current, proposed, move.value)
