import pytest

from embedlink import Status
from embedlink.protocol import (
    Abort,
    Drop,
    FreeBlocks,
    IllegalInput,
    LocalProtocolError,
    PlanError,
    ReceiverRoom,
    Resume,
    Send,
    SenderRoom,
    StatusUpdate,
    TransferRequest,
    WriteChunk,
)
from tests.helpers import SCHEMA, embedding, make_link, same_bytes

S = Status
W, T, OK, F = S.WaitingForInput, S.Transferring, S.Success, S.Failed


def statuses(history):
    return [s for s, _ in history]


# -- the seed's three scenarios ------------------------------------------------------


def test_seed_scenario_500_tokens_waiting_for_input_then_success():
    link = make_link()
    link.start()
    data = embedding(500)
    link.send(data)
    link.run()
    r = link.dests["lang-0"].room
    assert statuses(r.history) == [S.Bootstrapping, W, OK]
    assert statuses(link.sender.history) == [S.Bootstrapping, W, OK]
    assert same_bytes(link.result("lang-0"), data)


def test_seed_scenario_2000_tokens_resumes_once_at_1024():
    link = make_link()
    link.start()
    data = embedding(2000, seed=1)
    link.send(data)
    link.run()
    r = link.dests["lang-0"].room
    assert r.history == [(S.Bootstrapping, 0), (W, 0), (T, 1024), (OK, 2000)]
    assert link.sender.history == [(S.Bootstrapping, 0), (W, 0), (T, 1024), (OK, 2000)]
    assert same_bytes(link.result("lang-0"), data)
    assert link.sender_ep.alloc.num_used == 0 and link.dests["lang-0"].ep.alloc.num_used == 0


@pytest.mark.parametrize("stage", ["bootstrapping", "waiting", "transferring"])
def test_seed_scenario_failure_at_each_stage(stage):
    link = make_link()
    link.start()
    rx = link.dests["lang-0"].room
    if stage == "bootstrapping":
        # before the request reaches the sender: a failed first write kills nothing yet,
        # so fail the sender directly through a local abort.
        link.sender.abort(link.now)
        assert link.sender.status is F
        link.send(embedding(10))
        link.run()
        assert rx.status is F and "room 7 already ended" in rx.failure_reason
    elif stage == "waiting":
        link.send(embedding(500))
        link.deliver(0)  # request reaches the sender: WaitingForInput, write pending
        assert link.sender.status is W
        link.complete_write(0, ok=False)
        link.run()
        assert link.sender.status is F and "injected failure" in link.sender.failure_reason
        assert rx.status is F
    else:
        link.send(embedding(2000))
        link.deliver(0)
        link.complete_write(0)
        link.deliver(0)  # Transferring status reaches the receiver; it resumes
        assert rx.status is T
        link.deliver(0)  # resume reaches the sender
        link.complete_write(0, ok=False)
        link.run()
        assert link.sender.status is F and rx.status is F
    assert rx.failure_reason and link.sender.failure_reason
    assert link.sender_ep.alloc.num_used == 0
    assert link.dests["lang-0"].ep.alloc.num_used == 0


# -- resume rules --------------------------------------------------------------------


def test_resume_never_resets_status_across_many_resumes():
    link = make_link(receiver_blocks=4)  # 512 tokens at most per chunk
    link.start()
    data = embedding(5000, seed=2)
    link.send(data)
    link.run()
    r = link.dests["lang-0"].room
    sts = statuses(r.history)
    assert sts == sorted(sts)
    assert sts.count(T) >= 3
    assert [t for s, t in r.history if s is T] == sorted({t for s, t in r.history if s is T})
    assert same_bytes(link.result("lang-0"), data)


def _sender_after_first_chunk(total=2000):
    tx = SenderRoom(1, schema=SCHEMA, block_size=128, now=0, timeout=10)
    tx.request(
        TransferRequest(session="a", room=1, epoch=5, dst_blocks=list(range(8)), dst_tokens=1024), 0
    )
    acts = tx.data_ready(total, list(range(16)), 0)
    assert isinstance(acts[0], WriteChunk)
    acts = tx.write_done("a", True, 0)
    assert tx.status is T
    upd = next(a.msg for a in acts if isinstance(a, Send))
    assert (upd.status, upd.sent_tokens, upd.total_tokens) == (T, 1024, 2000)
    return tx


def test_resume_with_wrong_sent_tokens_fails_the_room():
    tx = _sender_after_first_chunk()
    acts = tx.resume(
        Resume(session="a", room=1, epoch=5, sent_tokens=1000, dst_blocks=[1], dst_tokens=128), 1
    )
    assert tx.status is F and "sent_tokens=1000" in tx.failure_reason
    assert any(isinstance(a, Send) and a.msg.status is F for a in acts)
    assert any(isinstance(a, FreeBlocks) for a in acts)


def test_duplicate_resume_is_ignored():
    tx = _sender_after_first_chunk()
    r = Resume(
        session="a", room=1, epoch=5, sent_tokens=1024, dst_blocks=list(range(8)), dst_tokens=976
    )
    acts = tx.resume(r, 1)
    assert any(isinstance(a, WriteChunk) for a in acts)
    acts2 = tx.resume(r, 1)
    assert acts2 and all(isinstance(a, Drop) for a in acts2)
    tx.write_done("a", True, 2)
    assert tx.status is OK
    assert all(isinstance(a, Drop) for a in tx.resume(r, 3))


def test_resume_for_old_epoch_is_dropped():
    tx = _sender_after_first_chunk()
    acts = tx.resume(
        Resume(session="a", room=1, epoch=4, sent_tokens=1024, dst_blocks=[1], dst_tokens=1), 1
    )
    assert [type(a) for a in acts] == [Drop]
    assert tx.status is T


def test_receiver_drops_status_for_old_epoch_and_duplicates():
    rx = ReceiverRoom(
        1, session="a", epoch=9, block_size=128, now=0, timeout=10, default_tokens=1024
    )
    rx.start(0)
    rx.reserved(list(range(8)), 1024, 0)
    old = StatusUpdate(room=1, epoch=8, status=OK, sent_tokens=10, total_tokens=10)
    assert [type(a) for a in rx.status_update(old, 0)] == [Drop]
    upd = StatusUpdate(room=1, epoch=9, status=T, sent_tokens=1024, total_tokens=2000)
    rx.status_update(upd, 0)
    assert rx.status is T
    assert [type(a) for a in rx.status_update(upd, 0)] == [Drop]


def test_receiver_fails_on_chunk_overrunning_its_reservation():
    rx = ReceiverRoom(
        1, session="a", epoch=9, block_size=128, now=0, timeout=10, default_tokens=1024
    )
    rx.start(0)
    rx.reserved(list(range(8)), 1024, 0)
    bad = StatusUpdate(room=1, epoch=9, status=T, sent_tokens=1500, total_tokens=2000)
    acts = rx.status_update(bad, 0)
    assert rx.status is F and "overruns" in rx.failure_reason
    assert any(isinstance(a, FreeBlocks) for a in acts)
    assert any(isinstance(a, Send) and isinstance(a.msg, Abort) for a in acts)


# -- multiple destinations -----------------------------------------------------------


def test_two_destinations_success_only_when_both_have_everything():
    link = make_link(n_dst=2, receiver_blocks=4)
    link.start()
    data = embedding(1000, seed=3)
    link.send(data)
    # deliver both requests; the sender waits for both before writing anything
    link.deliver(0)
    assert link.sender.status is S.Bootstrapping and not link.writes
    link.deliver(0)
    assert link.sender.status is W and len(link.writes) == 2
    link.run()
    assert link.sender.status is OK
    for s in link.dests:
        assert link.status(s) is OK
        assert same_bytes(link.result(s), data)
    assert all(d.ep.alloc.num_used == 0 for d in link.dests.values())


def test_extra_destination_is_refused_without_touching_the_room():
    tx = SenderRoom(1, schema=SCHEMA, block_size=128, now=0, timeout=10)
    tx.request(TransferRequest(session="a", room=1, epoch=1, dst_blocks=[0], dst_tokens=1), 0)
    acts = tx.request(
        TransferRequest(session="b", room=1, epoch=1, dst_blocks=[0], dst_tokens=1), 0
    )
    assert tx.status is W
    assert acts[0].to == "b" and acts[0].msg.status is F


# -- abort, deadlines, blocks in flight ----------------------------------------------


def test_sender_abort_during_write_defers_free_and_notice():
    tx = SenderRoom(1, schema=SCHEMA, block_size=128, now=0, timeout=10)
    tx.request(TransferRequest(session="a", room=1, epoch=1, dst_blocks=[0, 1], dst_tokens=256), 0)
    tx.data_ready(100, [3], 0)
    acts = tx.abort(1)
    assert tx.status is F
    assert not any(isinstance(a, FreeBlocks | Send) for a in acts), "write still in flight"
    acts = tx.write_done("a", True, 2)
    assert any(isinstance(a, FreeBlocks) and a.blocks == (3,) for a in acts)
    notes = [a.msg for a in acts if isinstance(a, Send)]
    assert len(notes) == 1 and isinstance(notes[0], Abort)


def test_receiver_abort_keeps_offered_blocks_until_acknowledged():
    rx = ReceiverRoom(
        1, session="a", epoch=3, block_size=128, now=0, timeout=10, default_tokens=256
    )
    rx.start(0)
    rx.reserved([4, 5], 256, 0)
    acts = rx.abort(1)
    assert rx.status is F and rx.failure_reason == "aborted by receiver"
    assert not any(isinstance(a, FreeBlocks) for a in acts)
    assert any(isinstance(a, Send) and isinstance(a.msg, Abort) for a in acts)
    ack = StatusUpdate(
        room=1, epoch=3, status=F, sent_tokens=0, total_tokens=0, reason="aborted by peer"
    )
    acts = rx.status_update(ack, 2)
    assert any(isinstance(a, FreeBlocks) and a.blocks == (4, 5) for a in acts)
    assert rx.failure_reason == "aborted by receiver"


def test_peer_abort_reaches_the_other_side_as_aborted_by_peer():
    link = make_link()
    link.start()
    link.send(embedding(2000))
    link.deliver(0)
    link.complete_write(0)
    link.deliver(0)  # receiver now Transferring, resume queued on the wire
    link.dests["lang-0"].room.abort(link.now)
    link.wire.clear()  # the resume is lost; only the abort below travels
    link._run_receiver(
        link.dests["lang-0"], [Send(Abort(session="lang-0", room=7, epoch=1000, reason="bye"))]
    )
    link.run()
    assert link.sender.status is F and link.sender.failure_reason == "aborted by peer: bye"
    assert link.sender_ep.alloc.num_used == 0 and link.dests["lang-0"].ep.alloc.num_used == 0


@pytest.mark.parametrize("stage", [S.Bootstrapping, W, T])
def test_deadline_fails_every_non_terminal_status(stage):
    link = make_link(timeout=5.0)
    link.start()
    rx = link.dests["lang-0"].room
    if stage is not S.Bootstrapping:
        link.send(embedding(2000 if stage is T else 500))
        link.deliver(0)
        if stage is T:
            link.complete_write(0)
            link.deliver(0)
            link.wire.clear()  # the resume never arrives
    link.tick(4.0)
    assert not rx.done
    link.tick(2.0)
    assert rx.status is F and "timed out" in rx.failure_reason
    link.run()
    if stage is not S.Bootstrapping:
        assert link.sender.status is F
    assert link.dests["lang-0"].ep.alloc.num_used == 0


def test_data_ready_twice_is_a_local_error():
    tx = SenderRoom(1, schema=SCHEMA, block_size=128, now=0, timeout=10)
    tx.data_ready(10, [0], 0)
    with pytest.raises(IllegalInput, match="data-ready-again") as err:
        tx.data_ready(10, [1], 0)
    assert isinstance(err.value, LocalProtocolError)
    assert tx.src_blocks == (0,)


def test_peer_dead_frees_receiver_blocks_even_mid_write():
    rx = ReceiverRoom(
        1, session="a", epoch=3, block_size=128, now=0, timeout=10, default_tokens=256
    )
    rx.start(0)
    rx.reserved([4, 5], 256, 0)
    acts = rx.peer_dead(1, "heartbeat missed 3 times")
    assert rx.status is F and "encoder lost" in rx.failure_reason
    assert any(isinstance(a, FreeBlocks) for a in acts)


def test_peer_lost_fails_at_once_but_keeps_offered_blocks_until_settled():
    rx = ReceiverRoom(
        1, session="a", epoch=3, block_size=128, now=0, timeout=10, default_tokens=256
    )
    rx.start(0)
    rx.reserved([4, 5], 256, 0)  # offered to the encoder: a write may be on its way
    acts = rx.peer_lost(1, "no answer for 6s")
    assert rx.status is F and "encoder lost" in rx.failure_reason
    assert not any(isinstance(a, FreeBlocks) for a in acts) and rx.holds_blocks
    assert rx.peer_lost(2, "again") == []  # ended: nothing more
    assert [a.blocks for a in rx.settled() if isinstance(a, FreeBlocks)] == [(4, 5)]
    assert not rx.holds_blocks and rx.settled() == []
    # a room that offered nothing gives back nothing and just fails
    q = ReceiverRoom(2, session="a", epoch=4, block_size=128, now=0, timeout=10, default_tokens=256)
    q.start(0)
    assert not any(isinstance(a, FreeBlocks) for a in q.peer_lost(1, "gone"))
    assert q.status is F and q.waiting_for_blocks is None


def test_receiver_abort_before_its_request_still_tells_the_encoder():
    rx = ReceiverRoom(
        1, session="a", epoch=3, block_size=128, now=0, timeout=10, default_tokens=256
    )
    rx.start(0)  # queued: no blocks, no request yet
    acts = rx.abort(1)
    assert rx.status is S.Failed
    assert any(isinstance(a, Send) and isinstance(a.msg, Abort) for a in acts)


def test_sender_fails_on_abort_from_a_destination_that_never_requested():
    tx = SenderRoom(1, schema=SCHEMA, block_size=128, now=0, timeout=10)
    tx.data_ready(100, [0], 0)
    acts = tx.peer_abort(Abort(session="late", room=1, epoch=9, reason="gone"), 1)
    assert tx.status is S.Failed and tx.failure_reason == "aborted by peer: gone"
    assert any(isinstance(a, FreeBlocks) for a in acts)
    # it never got a write from us: it is acknowledged at once (its blocks come back)
    ack = [a for a in acts if isinstance(a, Send) and isinstance(a.msg, StatusUpdate)]
    assert [(a.to, a.msg.epoch, a.msg.status) for a in ack] == [("late", 9, S.Failed)]
    # ... and so is a repeat of it (the first answer may have been lost)
    again = tx.peer_abort(Abort(session="late", room=1, epoch=9, reason="gone"), 2)
    assert [(type(a.msg), a.to, a.msg.epoch) for a in again] == [(StatusUpdate, "late", 9)]
    # once every destination is known, a stranger's abort changes nothing but
    # is acknowledged all the same
    tx2 = SenderRoom(2, schema=SCHEMA, block_size=128, now=0, timeout=10)
    tx2.request(TransferRequest(session="a", room=2, epoch=1, dst_blocks=[0], dst_tokens=1), 0)
    acts = tx2.peer_abort(Abort(session="b", room=2, epoch=1, reason="x"), 1)
    assert [(type(a.msg), a.to, a.msg.status) for a in acts] == [(StatusUpdate, "b", S.Failed)]
    assert tx2.status is S.WaitingForInput


# -- what the sender attaches to the embedding ----------------------------------------


def test_meta_reaches_every_destination_with_the_first_chunk_and_survives_resumes():
    link = make_link(n_dst=2, default_tokens=256)
    link.start()
    data = embedding(1000, seed=3)
    link.send(data, meta=b"\x00grid=[[1,28,36]]")
    first_updates = []
    for _ in range(100_000):  # link.run(), noting each status update on the wire
        if link.writes:
            link.complete_write(0)
        elif link.wire:
            m = link.wire[0]
            if isinstance(m.msg, StatusUpdate):
                first_updates.append((m.to, m.msg.sent_tokens, m.msg.meta))
            link.deliver(0)
        elif any(d.pending_reserve is not None for d in link.dests.values()):
            link.retry_reservations()
        else:
            break
    for name, d in link.dests.items():
        assert d.room.status is OK
        assert (T, 256) in d.room.history  # it resumed
        assert d.room.meta == b"\x00grid=[[1,28,36]]"
        assert same_bytes(link.result(name), data)
    # carried once per destination: only the first chunk's update has it
    with_meta = [u for u in first_updates if u[2] is not None]
    assert sorted(u[1] for u in with_meta) == [256, 256]


def test_meta_over_the_limit_is_refused_before_anything_moves():
    from embedlink.protocol import MAX_META_BYTES

    room = SenderRoom(1, schema=SCHEMA, block_size=128, now=0.0, timeout=30.0)
    with pytest.raises(PlanError, match="meta"):
        room.data_ready(10, [0], 0.0, b"x" * (MAX_META_BYTES + 1))
    assert room.total_tokens is None
