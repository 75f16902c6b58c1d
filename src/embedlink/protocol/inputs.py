"""What each input does to a room, as data.

Theory of operation
-------------------
``status.py`` says which status *moves* are legal. This file says which
*inputs* a room accepts in each status, and what becomes of them, after h2's
``_transitions[(state, input)] -> (side_effect, new_state)``. Every room method
in ``rooms.py`` first names its input (an :class:`SenderInput` /
:class:`ReceiverInput`: the method, refined by how the input relates to the
room, e.g. "a resume that repeats one already served"), then looks up
``(room.status, input)`` here and dispatches on the :class:`Rule`'s
:class:`Effect`. So this table is the truth, not a description of it: a test
walks every pair (``tests/unit/test_input_table.py``) and ``docs/protocol.md``
is generated from it.

Rules:

1. The table is total: every ``(status, input)`` pair has a rule.
2. The state is the :class:`~.status.Status` alone. What else an input depends
   on (is a write in flight, was this resume served, is the chunk the last)
   is folded into the input kind, which a room computes from its own fields
   and the input, never from its status.
3. The peer's mistakes never raise: they are dropped, refused or fail the room
   with a reason (``refuse-remote``), exactly as on the wire. Our own caller's
   mistakes raise :class:`~.errors.IllegalInput` (``raise-local``) and leave the
   room unchanged.
4. Races are not mistakes. An input that arrives after the room ended (the
   pool grants blocks to a room just aborted on another thread, a transport
   reports a write that ``peer_dead`` already wrote off) is ``ignore``: the
   status stays, what the input brought (blocks) is given back.
5. A pair that no sequence of calls can produce is ``unreachable``; feeding it
   anyway means the room's own bookkeeping broke, and raises
   :class:`~.errors.IllegalInput` like a local mistake.

Sender (encoder) and receiver (language) rooms have one table each,
:data:`SENDER_INPUTS` and :data:`RECEIVER_INPUTS`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from .status import TERMINAL, Status

__all__ = [
    "RECEIVER_INPUTS",
    "SENDER_INPUTS",
    "Effect",
    "ReceiverInput",
    "Rule",
    "SenderInput",
]


class Effect(enum.Enum):
    """What a room does with an input in a given status."""

    #: The input is applied; the status afterwards is one of :attr:`Rule.next`.
    HANDLE = "handle"
    #: The status stays (a duplicate, a stale or late input); the room may still
    #: give back blocks the input brought or acknowledge it, and says why it
    #: ignored it with a ``Drop`` where it has nothing else to say.
    IGNORE = "ignore"
    #: The peer sent something illegal here: dropped, refused with a ``Failed``
    #: status to that peer, or the room fails with a reason (``next`` says which).
    REFUSE_REMOTE = "refuse-remote"
    #: Our own caller's misuse: :class:`~.errors.IllegalInput`, room unchanged.
    RAISE_LOCAL = "raise-local"
    #: No sequence of calls reaches this pair; treated as :attr:`RAISE_LOCAL`.
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class Rule:
    """The rule for one ``(status, input)`` pair."""

    effect: Effect
    #: The statuses the room may be in afterwards (empty for ``unreachable``).
    next: frozenset[Status]
    #: One line for the generated document: what happens, or why not.
    why: str


class SenderInput(enum.Enum):
    """The inputs of a :class:`~.rooms.SenderRoom`, one or more per method."""

    def __str__(self) -> str:
        return self.value

    #: ``request``: a destination not seen before, fitting the room.
    REQUEST = "request"
    #: ``request``: the same destination and epoch again.
    REQUEST_DUPLICATE = "request-duplicate"
    #: ``request``: a known destination with another epoch (the id is still in use).
    REQUEST_REUSED = "request-reused"
    #: ``request``: its ``required_dst_info_num`` disagrees with the others'.
    REQUEST_MISMATCH = "request-mismatch"
    #: ``request``: a new destination when all of them are known already.
    REQUEST_SURPLUS = "request-surplus"
    #: ``data_ready``: the embedding, the first time.
    DATA_READY = "data-ready"
    #: ``data_ready`` once the data was given already.
    DATA_READY_AGAIN = "data-ready-again"
    #: ``resume``: at exactly what that destination holds, nothing in flight.
    RESUME = "resume"
    #: ``resume`` from an unknown destination or for another epoch.
    RESUME_STALE = "resume-stale"
    #: ``resume`` repeating one already served.
    RESUME_DUPLICATE = "resume-duplicate"
    #: ``resume`` at a ``sent_tokens`` other than what was delivered, or while a
    #: write to that destination is in flight.
    RESUME_MISMATCH = "resume-mismatch"
    #: ``resume`` from a destination that has every token already.
    RESUME_EXHAUSTED = "resume-exhausted"
    #: ``write_done(ok=True)`` for the write in flight.
    WRITE_OK = "write-ok"
    #: ``write_done(ok=False)`` for the write in flight.
    WRITE_FAILED = "write-failed"
    #: ``write_done`` with no write in flight to that destination.
    WRITE_NONE = "write-none"
    #: ``abort``: the local user gives up.
    ABORT = "abort"
    #: ``peer_abort`` from a known destination, for its epoch.
    PEER_ABORT = "peer-abort"
    #: ``peer_abort`` from a destination not known yet, while some are missing.
    PEER_ABORT_EARLY = "peer-abort-early"
    #: ``peer_abort`` from a destination not known, when all are known.
    PEER_ABORT_STRANGER = "peer-abort-stranger"
    #: ``peer_abort`` from a known destination for another epoch.
    PEER_ABORT_STALE = "peer-abort-stale"
    #: ``peer_dead`` for one of the room's destinations.
    PEER_DEAD = "peer-dead"
    #: ``peer_dead`` for a session that is not a destination of the room.
    PEER_DEAD_OTHER = "peer-dead-other"
    #: ``tick`` before the deadline.
    TICK = "tick"
    #: ``tick`` at or after the deadline.
    TICK_EXPIRED = "tick-expired"


class ReceiverInput(enum.Enum):
    """The inputs of a :class:`~.rooms.ReceiverRoom`, one or more per method."""

    def __str__(self) -> str:
        return self.value

    #: ``start``: ask for the first reservation.
    START = "start"
    #: ``reserved``: blocks for the outstanding ``Reserve``.
    RESERVED = "reserved"
    #: ``reserved`` with no ``Reserve`` outstanding.
    RESERVED_UNASKED = "reserved-unasked"
    #: ``status_update`` for another epoch.
    STATUS_STALE = "status-stale"
    #: ``status_update`` saying ``Failed``.
    STATUS_FAILED = "status-failed"
    #: ``status_update`` with a status an encoder never reports
    #: (``Bootstrapping``, ``WaitingForInput``).
    STATUS_BOGUS = "status-bogus"
    #: ``status_update`` at a ``sent_tokens`` this room already holds.
    STATUS_OLD = "status-old"
    #: ``status_update`` reporting a chunk that cannot be right (no reservation
    #: outstanding, a changed total, an overrun, a status that disagrees).
    CHUNK_BAD = "chunk-bad"
    #: ``status_update``: a good chunk, more to come (``is_last=False``).
    CHUNK_PARTIAL = "chunk-partial"
    #: ``status_update``: a good chunk, the last (``is_last=True``).
    CHUNK_LAST = "chunk-last"
    #: ``peer_abort`` for this room's epoch.
    PEER_ABORT = "peer-abort"
    #: ``peer_abort`` for another epoch.
    PEER_ABORT_STALE = "peer-abort-stale"
    #: ``abort``: the local user gives up.
    ABORT = "abort"
    #: ``peer_dead``: the encoder is gone and nothing of it can land any more.
    PEER_DEAD = "peer-dead"
    #: ``peer_lost``: the encoder is gone; a write of its may still land.
    PEER_LOST = "peer-lost"
    #: ``settled``: nothing the encoder wrote can land any more.
    SETTLED = "settled"
    #: ``tick`` before the deadline.
    TICK = "tick"
    #: ``tick`` at or after the deadline.
    TICK_EXPIRED = "tick-expired"


_B, _W, _T, _S, _F = (
    Status.Bootstrapping,
    Status.WaitingForInput,
    Status.Transferring,
    Status.Success,
    Status.Failed,
)
_LIVE = (_B, _W, _T)


def _handle(*next: Status, why: str) -> Rule:
    return Rule(Effect.HANDLE, frozenset(next), why)


def _refuse(*next: Status, why: str) -> Rule:
    return Rule(Effect.REFUSE_REMOTE, frozenset(next), why)


@dataclass(frozen=True, slots=True)
class _Stay:
    """A rule whose next status is the one it sits in (filled in by _build)."""

    effect: Effect
    why: str


def _ignore(why: str) -> _Stay:
    return _Stay(Effect.IGNORE, why)


def _local(why: str) -> _Stay:
    return _Stay(Effect.RAISE_LOCAL, why)


def _unreachable(why: str) -> _Stay:
    return _Stay(Effect.UNREACHABLE, why)


def _refuse_same(why: str) -> _Stay:
    return _Stay(Effect.REFUSE_REMOTE, why)


_Spec = Rule | _Stay
_K = TypeVar("_K", SenderInput, ReceiverInput)
_ENDED = "the room ended"


def _build(rows: Mapping[_K, Mapping[Status, _Spec]]) -> Mapping[tuple[Status, _K], Rule]:
    table: dict[tuple[Status, _K], Rule] = {}
    for kind, by_status in rows.items():
        for status in Status:
            spec = by_status[status]  # a KeyError here is a hole in the table
            if isinstance(spec, _Stay):
                next_ = frozenset() if spec.effect is Effect.UNREACHABLE else frozenset({status})
                spec = Rule(spec.effect, next_, spec.why)
            table[(status, kind)] = spec
    return MappingProxyType(table)


def _live(live: _Spec, ended: _Spec) -> dict[Status, _Spec]:
    """``live`` in the non-terminal statuses, ``ended`` in the terminal ones."""
    return {s: (ended if s in TERMINAL else live) for s in Status}


def _all(spec: _Spec) -> dict[Status, _Spec]:
    return dict.fromkeys(Status, spec)


_NO_WRITE = _unreachable("no write happens before every destination is known")
_NO_DATA_YET = _unreachable("nothing was delivered yet")

_S_ = SenderInput
#: Every ``(status, SenderInput)`` pair and its rule.
SENDER_INPUTS: Mapping[tuple[Status, SenderInput], Rule] = _build(
    {
        _S_.REQUEST: {
            _B: _handle(_B, _W, _F, why="a destination joins; the last one -> WaitingForInput"),
            _W: _unreachable("every destination is known: a new one is surplus"),
            _T: _unreachable("every destination is known: a new one is surplus"),
            _S: _unreachable("every destination is known: a new one is surplus"),
            _F: _refuse_same("refused with Failed: the room ended"),
        },
        _S_.REQUEST_DUPLICATE: _all(_ignore("a repeated request")),
        _S_.REQUEST_REUSED: _all(_refuse_same("refused with Failed: the room id is in use")),
        _S_.REQUEST_MISMATCH: _all(
            _refuse_same("refused with Failed: required_dst_info_num disagrees")
        ),
        _S_.REQUEST_SURPLUS: {
            _B: _unreachable("destinations are still missing"),
            **dict.fromkeys(
                (_W, _T, _S, _F), _refuse_same("refused with Failed: one destination too many")
            ),
        },
        _S_.DATA_READY: {
            _B: _handle(_B, why="kept until every destination is known"),
            _W: _handle(_W, _F, why="the first chunks are written (a bad reservation fails)"),
            _T: _unreachable("a chunk was delivered, so the data was given"),
            _S: _unreachable("every token was delivered, so the data was given"),
            _F: _ignore("nothing will use it: the source blocks go back at once"),
        },
        _S_.DATA_READY_AGAIN: _all(_local("the data was given already")),
        _S_.RESUME: {
            _B: _NO_DATA_YET,
            _W: _handle(_W, _F, why="the next chunk is written (a bad reservation fails)"),
            _T: _handle(_T, _F, why="the next chunk is written (a bad reservation fails)"),
            _S: _unreachable("every destination has every token"),
            _F: _ignore(_ENDED),
        },
        _S_.RESUME_STALE: _all(_ignore("not for this room's destinations or epochs")),
        _S_.RESUME_DUPLICATE: {
            _B: _NO_DATA_YET,
            **dict.fromkeys((_W, _T, _S, _F), _ignore("a resume already served")),
        },
        _S_.RESUME_MISMATCH: _live(
            _refuse(_F, why="a protocol error: the room fails with a reason"),
            _ignore(_ENDED),
        ),
        _S_.RESUME_EXHAUSTED: {
            _B: _NO_DATA_YET,
            **dict.fromkeys((_W, _T, _S, _F), _ignore("nothing left to send to it")),
        },
        _S_.WRITE_OK: {
            _B: _NO_WRITE,
            _W: _handle(
                _W,
                _T,
                _S,
                why="landed: Transferring once all have a chunk, Success once all have all",
            ),
            _T: _handle(_T, _S, why="the chunk landed: every token everywhere -> Success"),
            _S: _unreachable("nothing is written once every destination is complete"),
            _F: _ignore("the blocks are quiet now: the held-back notice goes out"),
        },
        _S_.WRITE_FAILED: {
            _B: _NO_WRITE,
            _W: _handle(_F, why="the room fails with the transport's reason"),
            _T: _handle(_F, why="the room fails with the transport's reason"),
            _S: _unreachable("nothing is written once every destination is complete"),
            _F: _ignore("the blocks are quiet now: the held-back notice goes out"),
        },
        _S_.WRITE_NONE: _all(_ignore("no write in flight (its peer was written off)")),
        _S_.ABORT: _live(_handle(_F, why="fails; destinations are told"), _ignore(_ENDED)),
        _S_.PEER_ABORT: _live(
            _handle(_F, why="fails; the other destinations are told"),
            _ignore("ended: acknowledged once nothing is in flight to it"),
        ),
        _S_.PEER_ABORT_EARLY: {
            _B: _handle(_F, why="fails (nobody else can complete it); acknowledged"),
            _W: _unreachable("every destination is known"),
            _T: _unreachable("every destination is known"),
            _S: _unreachable("every destination is known"),
            _F: _ignore("ended: acknowledged"),
        },
        _S_.PEER_ABORT_STRANGER: {
            _B: _unreachable("destinations are still missing"),
            **dict.fromkeys((_W, _T, _S, _F), _ignore("not a destination: acknowledged")),
        },
        _S_.PEER_ABORT_STALE: _all(_ignore("for another epoch")),
        _S_.PEER_DEAD: _live(
            _handle(_F, why="fails; the other destinations are told"),
            _ignore("ended: its write is written off"),
        ),
        _S_.PEER_DEAD_OTHER: _all(_ignore("not a destination of this room")),
        _S_.TICK: _all(_ignore("the deadline has not passed")),
        _S_.TICK_EXPIRED: _live(_handle(_F, why="timed out: fails with a reason"), _ignore(_ENDED)),
    }
)

_R_ = ReceiverInput
_NO_RESERVATION = _unreachable("no reservation was offered yet")
_GONE = _unreachable("the reservation went back when the last chunk came")
#: Every ``(status, ReceiverInput)`` pair and its rule.
RECEIVER_INPUTS: Mapping[tuple[Status, ReceiverInput], Rule] = _build(
    {
        _R_.START: {
            # Again while the first Reserve is outstanding asks again: the loop
            # starts a room the caller's thread could not get blocks for.
            _B: _handle(_B, why="asks for the first reservation"),
            _W: _local("started already: the first reservation was granted"),
            _T: _local("started already: the first chunk came"),
            # The endpoint reads the empty answer as "aborted meanwhile".
            _S: _ignore(_ENDED),
            _F: _ignore(_ENDED),
        },
        _R_.RESERVED: {
            _B: _handle(_W, why="the request goes out -> WaitingForInput"),
            _W: _unreachable("no Reserve is outstanding while the request is out"),
            _T: _handle(_T, why="the resume goes out"),
            _S: _unreachable("no Reserve is outstanding after the last chunk"),
            _F: _ignore("ended while the blocks were granted: they go back"),
        },
        _R_.RESERVED_UNASKED: _live(
            _local("no Reserve is outstanding"),
            _ignore("ended while the blocks were granted: they go back"),
        ),
        _R_.STATUS_STALE: _all(_ignore("for another epoch")),
        _R_.STATUS_FAILED: _live(
            _handle(_F, why="fails with the encoder's reason"),
            _ignore("ended: the encoder's acknowledgement; offered blocks go back"),
        ),
        _R_.STATUS_BOGUS: _live(
            _refuse_same("dropped: an encoder never reports this status"),
            _ignore("ended: offered blocks go back"),
        ),
        _R_.STATUS_OLD: _live(
            _ignore("a chunk already taken"), _ignore("ended: offered blocks go back")
        ),
        _R_.CHUNK_BAD: _live(
            _refuse(_F, why="a protocol error: fails, and the encoder is told"),
            _ignore("ended: offered blocks go back"),
        ),
        _R_.CHUNK_PARTIAL: {
            _B: _NO_RESERVATION,
            _W: _handle(_T, why="taken; the rest is reserved -> Transferring"),
            _T: _handle(_T, why="taken; the rest is reserved"),
            _S: _GONE,
            _F: _ignore("ended: offered blocks go back"),
        },
        _R_.CHUNK_LAST: {
            _B: _NO_RESERVATION,
            _W: _handle(_S, why="taken -> Success"),
            _T: _handle(_S, why="taken -> Success"),
            _S: _GONE,
            _F: _ignore("ended: offered blocks go back"),
        },
        _R_.PEER_ABORT: _live(
            _handle(_F, why="fails with the encoder's reason"),
            _ignore("ended: offered blocks go back"),
        ),
        _R_.PEER_ABORT_STALE: _all(_ignore("for another epoch")),
        _R_.ABORT: _live(
            _handle(_F, why="fails; the encoder is told; offered blocks wait for its answer"),
            _ignore(_ENDED),
        ),
        _R_.PEER_DEAD: _live(
            _handle(_F, why="fails; every block goes back"), _ignore("ended: every block goes back")
        ),
        _R_.PEER_LOST: _live(
            _handle(_F, why="fails; offered blocks wait until settled"), _ignore(_ENDED)
        ),
        _R_.SETTLED: _live(
            _local("the encoder was not lost: it may still write into offered blocks"),
            _ignore("offered blocks go back"),
        ),
        _R_.TICK: _all(_ignore("the deadline has not passed")),
        _R_.TICK_EXPIRED: _live(
            _handle(_F, why="timed out: fails, and the encoder is told"), _ignore(_ENDED)
        ),
    }
)
