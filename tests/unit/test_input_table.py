"""The rooms' input tables (protocol/inputs.py) are total and are what the
rooms do.

The walk: from fresh rooms, try every input in every state reached through
public calls (breadth first, states told apart by the room's fields), and check
each step against the rule for ``(status, input kind)``: a handled input leaves
a status the rule lists, an ignored one leaves the status alone and starts
nothing, a refused remote one is dropped, refused or fails the room, a refused
local one raises ``IllegalInput`` and changes nothing. Every pair the table
does not mark ``unreachable`` must be met, and none it marks so.
"""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from embedlink.protocol import (
    RECEIVER_INPUTS,
    SENDER_INPUTS,
    Abort,
    Drop,
    Effect,
    FreeBlocks,
    Harvest,
    IllegalInput,
    LocalProtocolError,
    ReceiverInput,
    ReceiverRoom,
    Reserve,
    Resume,
    Rule,
    Send,
    SenderInput,
    SenderRoom,
    Status,
    StatusChanged,
    StatusUpdate,
    TransferRequest,
    WriteChunk,
)
from tests.helpers import SCHEMA

BS = 2  # block size: a 5-token embedding needs three blocks
TOTAL = 5
NOW = 1.0
ROOM = 1
EPOCH = 7

Move = Callable[[Any], list[Any]]

# -- the walk -----------------------------------------------------------------------


def _fields(room: SenderRoom | ReceiverRoom) -> dict[str, Any]:
    """What a room is, less what cannot change what it does next: the clock
    (ticks are placed relative to the deadline), the history, the last input."""
    skip = {"deadline", "_history", "last_input", "schema"}
    return {k: v for k, v in vars(room).items() if k not in skip}


def _check_step(
    table: Any, before: Any, after: Any, acts: list[Any] | None, err: Exception | None
) -> tuple[Status, Any]:
    """Check one step against its rule; return the pair it exercised."""
    status = before.status
    if err is not None:
        assert isinstance(err, IllegalInput), f"{type(err).__name__}: {err}"
        assert isinstance(err, LocalProtocolError)
        pair = (err.state, err.input)
        assert err.state is status
        rule: Rule = table[pair]
        assert rule.effect is Effect.RAISE_LOCAL, (pair, rule, err)
        assert _fields(after) == _fields(before), f"{pair}: changed the room before raising"
        assert after.last_input == before.last_input
        return pair
    assert acts is not None
    assert after.last_input is not None and after.last_input[0] is status
    pair = after.last_input
    rule = table[pair]
    assert rule.effect not in (Effect.RAISE_LOCAL, Effect.UNREACHABLE), (pair, rule)
    assert after.status in rule.next, (pair, rule, after.status)
    started = [a for a in acts if isinstance(a, (WriteChunk, Harvest, Reserve))]
    if rule.effect is Effect.IGNORE:
        assert after.status is status
        assert started == [], (pair, acts)
        assert not any(isinstance(a, StatusChanged) for a in acts), (pair, acts)
    elif rule.effect is Effect.REFUSE_REMOTE:
        assert started == [], (pair, acts)
        if after.status is status:
            refused = [
                a
                for a in acts
                if isinstance(a, Drop)
                or (isinstance(a, Send) and isinstance(a.msg, Abort))
                or (
                    isinstance(a, Send)
                    and isinstance(a.msg, StatusUpdate)
                    and a.msg.status is Status.Failed
                    and a.msg.reason
                )
            ]
            assert refused, (pair, acts)
        else:
            assert after.status is Status.Failed and after.failure_reason, (pair, acts)
    return pair


def _walk(
    fresh: list[Any], moves: Callable[[Any], Iterator[tuple[str, Move]]], table: Any
) -> set[tuple[Status, Any]]:
    """Every pair met from the rooms ``fresh``, each step checked."""
    met: set[tuple[Status, Any]] = set()
    seen: set[str] = set()
    queue = deque(fresh)
    while queue:
        room = queue.popleft()
        key = repr(sorted(_fields(room).items()))
        if key in seen:
            continue
        seen.add(key)
        assert len(seen) < 50_000, "the walk does not end"
        # each input goes to a deep copy (pickle: several times faster than deepcopy)
        frozen = pickle.dumps(room)
        for _name, move in moves(room):
            after = pickle.loads(frozen)
            acts: list[Any] | None = None
            err: Exception | None = None
            try:
                acts = move(after)
            except Exception as exc:  # checked: only IllegalInput may come out
                err = exc
            met.add(_check_step(table, room, after, acts, err))
            if err is None:
                queue.append(after)
    return met


def _reachable(table: Any) -> set[tuple[Status, Any]]:
    return {pair for pair, rule in table.items() if rule.effect is not Effect.UNREACHABLE}


# -- the sending side ---------------------------------------------------------------


def _sender() -> SenderRoom:
    return SenderRoom(ROOM, schema=SCHEMA, block_size=BS, now=0.0, timeout=10.0)


def _sender_moves(
    required: int, sessions: tuple[str, ...], lean: tuple[str, ...] = ()
) -> Callable[..., Iterator[Any]]:
    """Every input to try on a room with destinations ``sessions``; the
    ``lean`` ones only request and complete their writes (a second
    destination with every input multiplies the states for nothing new)."""

    def moves(room: SenderRoom) -> Iterator[tuple[str, Move]]:
        def request(s: str, tokens: int, epoch: int = EPOCH, req: int = required) -> Move:
            msg = TransferRequest(
                session=s,
                room=ROOM,
                epoch=epoch,
                dst_blocks=list(range(-(-tokens // BS))),
                dst_tokens=tokens,
                required_dst_info_num=req,
            )
            return lambda r: r.request(msg, NOW)

        def resume(s: str, sent: int, tokens: int, epoch: int = EPOCH) -> Move:
            msg = Resume(
                session=s,
                room=ROOM,
                epoch=epoch,
                sent_tokens=sent,
                dst_blocks=list(range(-(-tokens // BS))),
                dst_tokens=tokens,
            )
            return lambda r: r.resume(msg, NOW)

        def abort_from(s: str, epoch: int = EPOCH) -> Move:
            msg = Abort(session=s, room=ROOM, epoch=epoch, reason="gone")
            return lambda r: r.peer_abort(msg, NOW)

        for s in sessions:
            yield f"request {s} 2", request(s, 2)
            yield f"request {s} 6", request(s, 6)
            d = room.dsts.get(s)
            held = d.delivered if d is not None else 0
            yield f"resume {s} at {held} 2", resume(s, max(held, 1), 2)
            yield f"resume {s} at {held} 6", resume(s, max(held, 1), 6)
            for served in sorted(d.served) if d is not None else ():
                yield f"resume {s} at served {served}", resume(s, served, 2)
            yield f"resume {s} past", resume(s, held + 1, 2)
            yield f"resume {s} stale", resume(s, max(held, 1), 2, epoch=EPOCH + 1)
            yield f"write_done {s} ok", lambda r, s=s: r.write_done(s, True, NOW)
            yield f"write_done {s} failed", lambda r, s=s: r.write_done(s, False, NOW, "boom")
            yield f"peer_abort {s}", abort_from(s)
            yield f"peer_abort {s} stale", abort_from(s, EPOCH + 1)
            yield f"peer_dead {s}", lambda r, s=s: r.peer_dead(s, NOW, "gone")
        for s in lean:
            yield f"request {s} 2", request(s, 2)
            yield f"write_done {s} ok", lambda r, s=s: r.write_done(s, True, NOW)
        yield "request a again, another epoch", request(sessions[0], 2, epoch=EPOCH + 1)
        yield "request z", request("z", 2)
        yield "request z, other required", request("z", 2, req=required + 1)
        yield "data_ready", lambda r: r.data_ready(TOTAL, [0, 1, 2], NOW)
        yield "write_done z", lambda r: r.write_done("z", True, NOW)
        yield "peer_abort z", abort_from("z")
        yield "peer_dead z", lambda r: r.peer_dead("z", NOW, "gone")
        yield "abort", lambda r: r.abort(NOW)
        yield "tick early", lambda r: r.tick(r.deadline - 0.5)
        yield "tick late", lambda r: r.tick(r.deadline + 1.0)

    return moves


def _sender_walk() -> set[tuple[Status, Any]]:
    met = _walk([_sender()], _sender_moves(1, ("a",)), SENDER_INPUTS)
    met |= _walk([_sender()], _sender_moves(2, ("a",), lean=("b",)), SENDER_INPUTS)
    return met


# -- the receiving side -------------------------------------------------------------


def _receiver(default_tokens: int) -> ReceiverRoom:
    return ReceiverRoom(
        ROOM,
        session="a",
        epoch=EPOCH,
        block_size=BS,
        now=0.0,
        timeout=10.0,
        default_tokens=default_tokens,
    )


def _receiver_moves(room: ReceiverRoom) -> Iterator[tuple[str, Move]]:
    def update(status: Status, sent: int, total: int = TOTAL, epoch: int = EPOCH) -> Move:
        msg = StatusUpdate(
            room=ROOM,
            epoch=epoch,
            status=status,
            sent_tokens=sent,
            total_tokens=total,
            reason="boom" if status is Status.Failed else None,
        )
        return lambda r: r.status_update(msg, NOW)

    def grant(nblocks: int) -> Move:
        want = room.waiting_for_blocks or 2
        blocks = list(range(10, 10 + nblocks))
        return lambda r: r.reserved(blocks, min(want, nblocks * BS), NOW)

    held = room.delivered
    step = max(room.tokens, 1) if room.holds_blocks else 2
    sent = min(held + step, TOTAL)
    yield "start", lambda r: r.start(NOW)
    yield "reserved 1 block", grant(1)
    yield "reserved 3 blocks", grant(3)
    yield "chunk", update(Status.Success if sent == TOTAL else Status.Transferring, sent)
    yield "failed", update(Status.Failed, 0, 0)
    yield "bogus", update(Status.WaitingForInput, min(held + 1, TOTAL))
    yield "old", update(Status.Transferring, held)
    yield "bad", update(Status.Transferring, TOTAL)
    yield "stale", update(Status.Transferring, sent, epoch=EPOCH + 1)
    if room.total_tokens is not None or not room.holds_blocks:
        # past the end of what the room knows (else it would be a good chunk)
        yield "grown", update(Status.Success, TOTAL + 1, total=TOTAL + 1)
    yield (
        "peer_abort",
        lambda r: r.peer_abort(Abort(session="e", room=ROOM, epoch=EPOCH, reason="x"), NOW),
    )
    yield (
        "peer_abort stale",
        lambda r: r.peer_abort(Abort(session="e", room=ROOM, epoch=EPOCH + 1, reason="x"), NOW),
    )
    yield "abort", lambda r: r.abort(NOW)
    yield "peer_dead", lambda r: r.peer_dead(NOW, "gone")
    yield "peer_lost", lambda r: r.peer_lost(NOW, "gone")
    yield "settled", lambda r: r.settled()
    yield "tick early", lambda r: r.tick(r.deadline - 0.5)
    yield "tick late", lambda r: r.tick(r.deadline + 1.0)


def _receiver_walk() -> set[tuple[Status, Any]]:
    # 2 tokens first: resumes; 6: the whole embedding in the first chunk
    return _walk([_receiver(2), _receiver(6)], _receiver_moves, RECEIVER_INPUTS)


# -- the tests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "kinds"), [(SENDER_INPUTS, SenderInput), (RECEIVER_INPUTS, ReceiverInput)]
)
def test_input_table_is_total(table, kinds):
    assert set(table) == {(s, k) for s in Status for k in kinds}
    for (status, _kind), rule in table.items():
        if rule.effect in (Effect.IGNORE, Effect.RAISE_LOCAL):
            assert rule.next == {status}, "the status stays"
        if rule.effect is Effect.UNREACHABLE:
            assert rule.next == frozenset()
        else:
            assert rule.next, "where it can go"
        assert rule.why


@pytest.mark.parametrize(("table"), [SENDER_INPUTS, RECEIVER_INPUTS])
def test_input_table_never_leaves_a_terminal_status_and_never_raises_for_the_peer(table):
    remote_only = {
        SenderInput.REQUEST,
        SenderInput.REQUEST_DUPLICATE,
        SenderInput.REQUEST_REUSED,
        SenderInput.REQUEST_MISMATCH,
        SenderInput.REQUEST_SURPLUS,
        SenderInput.RESUME,
        SenderInput.RESUME_STALE,
        SenderInput.RESUME_DUPLICATE,
        SenderInput.RESUME_MISMATCH,
        SenderInput.RESUME_EXHAUSTED,
        SenderInput.PEER_ABORT,
        SenderInput.PEER_ABORT_EARLY,
        SenderInput.PEER_ABORT_STRANGER,
        SenderInput.PEER_ABORT_STALE,
        ReceiverInput.STATUS_STALE,
        ReceiverInput.STATUS_FAILED,
        ReceiverInput.STATUS_BOGUS,
        ReceiverInput.STATUS_OLD,
        ReceiverInput.CHUNK_BAD,
        ReceiverInput.CHUNK_PARTIAL,
        ReceiverInput.CHUNK_LAST,
        ReceiverInput.PEER_ABORT,
        ReceiverInput.PEER_ABORT_STALE,
    }
    for (status, kind), rule in table.items():
        if status.is_terminal and rule.effect is not Effect.UNREACHABLE:
            assert rule.next == {status}, (status, kind)
        if kind in remote_only:
            assert rule.effect is not Effect.RAISE_LOCAL, (status, kind)


def test_sender_room_does_what_its_input_table_says_for_every_pair():
    assert _sender_walk() == _reachable(SENDER_INPUTS)


def test_receiver_room_does_what_its_input_table_says_for_every_pair():
    assert _receiver_walk() == _reachable(RECEIVER_INPUTS)


# -- our own misuse, one by one -----------------------------------------------------


def test_local_misuse_raises_illegal_input_and_changes_nothing():
    rx = _receiver(2)
    with pytest.raises(IllegalInput, match="reserved-unasked"):
        rx.reserved([0], 2, NOW)  # before start(): nobody asked for blocks
    rx.start(NOW)
    rx.reserved([0], 2, NOW)
    assert rx.status is Status.WaitingForInput
    for misuse in (
        lambda: rx.reserved([1], 2, NOW),  # a second grant for one Reserve
        lambda: rx.start(NOW),  # started twice, after the grant
        lambda: rx.settled(),  # the encoder may still write into block 0
    ):
        before = _fields(rx)
        with pytest.raises(IllegalInput) as err:
            misuse()
        assert isinstance(err.value, LocalProtocolError)
        assert err.value.state is Status.WaitingForInput
        assert _fields(rx) == before and rx.blocks == (0,)


def test_late_inputs_after_an_end_are_races_not_misuse():
    rx = _receiver(2)
    rx.start(NOW)
    rx.abort(NOW)  # on another thread, while the pool was granting
    assert rx.reserved([3], 2, NOW) == [FreeBlocks((3,))]
    assert rx.start(NOW) == []
    tx = _sender()
    tx.abort(NOW)
    assert tx.abort(NOW) == []
    assert tx.data_ready(TOTAL, [0, 1, 2], NOW) == [FreeBlocks((0, 1, 2))]


def test_bad_arguments_raise_invalid_argument_which_is_a_value_error():
    from embedlink.protocol import BufferSchema, InvalidArgument

    for bad in (
        lambda: _receiver(0),
        lambda: _receiver(2).start(NOW, required_dst_info_num=0),
        lambda: BufferSchema(hidden_size=0),
        lambda: BufferSchema(fields=[]),
    ):
        with pytest.raises(InvalidArgument) as err:
            bad()
        assert isinstance(err.value, ValueError) and isinstance(err.value, LocalProtocolError)
