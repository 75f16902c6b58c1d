"""The engine-independent halves of the serving-engine adapters
(embedlink.integrations._plane), with real endpoints on loopback and no
engine: what the vLLM tier relies on, tested where vLLM is not installed."""

from __future__ import annotations

import time
import uuid

import ml_dtypes
import numpy as np
import pytest

from embedlink import Embedding, EncoderEndpoint, LanguageEndpoint, Status
from embedlink.integrations._plane import (
    ConsumerScheduler,
    ConsumerWorker,
    Item,
    Mailbox,
    ParamsError,
    ProducerWorker,
    embedding_schema,
    parse_params,
)

pytestmark = pytest.mark.timeout(60)
W = 32
SCHEMA = embedding_schema(W, "bfloat16")


def wait_for(cond, what, timeout=20.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.005)


def rows(n, seed):
    return np.random.default_rng(seed).random((n, W), dtype=np.float32).astype(ml_dtypes.bfloat16)


def test_a_mailbox_keeps_what_its_peer_cannot_take_yet_in_order():
    name = f"el-test-{uuid.uuid4().hex}"
    a = Mailbox(name + "-a").open()
    try:
        for i in range(5):
            a.post(name + "-b", {"i": i})  # b is not bound yet: nothing blocks
        assert a.waiting == 5
        b = Mailbox(name + "-b").open()
        try:
            a.flush()
            got: list[int] = []
            wait_for(lambda: got.extend(m["i"] for m in b.receive(0.01)) or len(got) == 5, "all 5")
            assert got == [0, 1, 2, 3, 4] and a.waiting == 0
        finally:
            b.close()
    finally:
        a.close()


def test_a_second_instance_with_the_same_name_is_refused_clearly():
    name = f"el-test-{uuid.uuid4().hex}"
    a = Mailbox(name).open()
    try:
        with pytest.raises(RuntimeError, match="same engine_id"):
            Mailbox(name).open()
    finally:
        a.close()


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"embedlink": []}, "must be an object"),
        ({"embedlink": {"rooms": "1,2"}}, "list of room ids"),
        ({"embedlink": {"rooms": [1, -2]}}, "list of room ids"),
        ({"embedlink": {"rooms": [1]}}, "1 rooms for the request's 2"),
        ({"embedlink": {"rooms": [1, 2], "dp_group": "x"}}, "dp_group"),
    ],
)
def test_bad_params_are_refused_naming_the_field(params, match):
    with pytest.raises(ParamsError, match=match):
        parse_params(params, 2)


def test_requests_without_our_params_are_not_ours():
    assert parse_params(None, 1) is None
    assert parse_params({"other": 1}, 1) is None
    p = parse_params({"embedlink": {}}, 3, assign=True)
    assert p is not None and len(set(p.rooms)) == 3


def test_a_consumer_with_bad_params_fails_that_request_only(boot):
    eid = uuid.uuid4().hex
    sched = ConsumerScheduler(
        mailbox=f"el-{eid}-s", workers=[f"el-{eid}-w0"], bootstrap=boot.address, deadline=30
    ).start()
    try:
        items = [Item("a", 4, 10)]
        assert sched.ensure("not-ours", None, items, 0) is True
        assert sched.ensure("bad", {"embedlink": {"rooms": [1, 2]}}, items, 0) is False
        assert sched.ensure("fine", {"embedlink": {"rooms": [7]}}, items, 0) is False  # waits
        failed = sched.take_unavailable()
        assert list(failed) == ["bad"] and "2 rooms" in failed["bad"]
        assert sched.take_unavailable() == {}  # each once
    finally:
        sched.close()


def test_the_producer_never_holds_its_caller_and_bounds_its_backlog(boot):
    """The caller's hooks only queue: with the encoder pool full and nobody
    receiving, every call returns; past ``max_pending`` waiting items a room
    is refused at once with the reason, which its receiver then sees."""
    enc = EncoderEndpoint(
        SCHEMA, bootstrap=boot.address, transports=("tcp",), num_blocks=2, block_size=16
    )
    prod = ProducerWorker(enc, max_pending=2).start()
    lang = LanguageEndpoint(
        SCHEMA, transports=("tcp",), num_blocks=64, block_size=16, default_tokens=64
    )
    lang.start()
    try:
        sends = [(100 + i, f"img-{i}", 30) for i in range(8)]
        prod.plan(sends)
        cache = {f"img-{i}": rows(30, i) for i in range(8)}
        prod.offer(cache)  # returns: the copies wait on the producer's thread
        assert prod.refused >= 1
        # a receiver of a refused room is told why
        refused = [lang.receiver(bootstrap=boot.address, room=100 + i) for i in range(8)]
        wait_for(lambda: all(r.poll().is_terminal for r in refused), "every room ends")
        reasons = [r.failure_reason for r in refused if r.poll() is Status.Failed]
        assert any("backlog" in (why or "") for why in reasons), reasons
        ok = [r for r in refused if r.poll() is Status.Success]
        assert ok, "the rooms that were not refused arrive"
        for r in refused:
            r.clear()
        wait_for(lambda: lang.pool_usage()[0] == 0, "the language pool is free")
    finally:
        prod.close()
        lang.close()


def consumer_and_encoder(boot, *, to_tensor, zero_copy=False):
    """A consumer scheduler and one worker (a pool of 8 x 16 rows) over
    real mailboxes, and an encoder endpoint registered at ``boot``."""
    eid = uuid.uuid4().hex
    names = (f"el-{eid}-s", f"el-{eid}-w0")
    sched = ConsumerScheduler(
        mailbox=names[0], workers=[names[1]], bootstrap=boot.address, deadline=30
    ).start()
    lang = LanguageEndpoint(
        SCHEMA,
        transports=("tcp",),
        num_blocks=8,
        block_size=16,
        default_tokens=64,
        zero_copy=zero_copy,
    )
    worker = ConsumerWorker(
        lang, rank=0, mailbox=names[1], scheduler=names[0], to_tensor=to_tensor
    ).start()
    enc = EncoderEndpoint(
        SCHEMA, bootstrap=boot.address, transports=("tcp",), num_blocks=16, block_size=16
    ).start()
    return sched, worker, enc


def test_a_consumer_worker_reports_a_row_count_mismatch_and_frees_the_room(boot):
    sched, worker, enc = consumer_and_encoder(boot, to_tensor=np.array)
    try:
        items = [Item("a", 20, 30)]
        assert not sched.ensure("r", {"embedlink": {"rooms": [5]}}, items, 0)
        enc.sender(5).send(Embedding(embedding=rows(30, 1)))  # 30 rows, not 20
        failed: dict[str, str] = {}
        wait_for(lambda: failed.update(sched.take_unavailable()) or failed, "the request fails")
        assert "30 embedding rows" in failed["r"] and "20 placeholders" in failed["r"], failed
        assert not sched.has_item("a")
        sched.finished("r")
        wait_for(lambda: worker.ep.pool_usage()[0] == 0 and worker.held == 0, "room let go")
    finally:
        worker.close()
        sched.close()
        enc.close()


def test_a_room_its_receiver_aborted_before_the_tensor_came_holds_nothing(boot):
    """The receiver gives up before the encoder output exists; once it does,
    the producer drops it instead of opening the room again (which would
    hold the copy in its pool until the new room's deadline)."""
    enc = EncoderEndpoint(
        SCHEMA, bootstrap=boot.address, transports=("tcp",), num_blocks=16, block_size=16
    )
    prod = ProducerWorker(enc).start()
    lang = LanguageEndpoint(
        SCHEMA, transports=("tcp",), num_blocks=16, block_size=16, default_tokens=64
    ).start()
    try:
        prod.plan([(42, "img", 30)])
        rx = lang.receiver(bootstrap=boot.address, room=42)
        wait_for(lambda: enc.room_count() == 1, "the producer opened the room")
        rx.abort("the request went away")
        rx.clear()
        # the producer's sender ends, and its idle sweep clears it
        wait_for(lambda: enc.room_count() == 0, "the ended room is cleared")
        prod.saved({"img": rows(30, 3)}, "img")  # the encoder output, late
        wait_for(lambda: prod.dropped == 1, "the late tensor is dropped")
        assert enc.room_count() == 0 and enc.pool_usage()[0] == 0
        wait_for(lambda: lang.pool_usage()[0] == 0, "the language pool is free")
    finally:
        prod.close()
        lang.close()


def test_a_zero_copy_consumer_lends_half_its_pool_and_gets_it_back_with_the_tensors(boot):
    """Items that arrived in the pool go into the engine's cache as views of
    it, no copy, up to half the pool (8 blocks: 4); the next is copied and
    its blocks come back at once. Lent blocks come back only when nothing
    refers to the tensor any more (a slice of it is enough to keep them),
    not when the request finishes: vLLM keeps finished items cached."""
    # the engine's tensor: here the array itself
    sched, worker, enc = consumer_and_encoder(boot, to_tensor=lambda a: a, zero_copy=True)
    try:
        assert worker.lend_limit == 4
        items = [Item("a", 30), Item("b", 30), Item("c", 30)]  # 2 blocks each
        sent = {it.identifier: rows(30, k) for k, it in enumerate(items)}
        params = {"embedlink": {"rooms": [11, 12, 13]}}
        assert not sched.ensure("r", params, items, 0)
        for room, it in zip((11, 12, 13), items, strict=True):
            enc.sender(room).send(Embedding(embedding=sent[it.identifier]))
            # one at a time, so which ones are lent is known
            wait_for(lambda n=room - 10: worker.received == n, f"item {it.identifier}")
        wait_for(lambda: sched.ensure("r", params, items, 0), "every item arrived")
        for i in range(3):
            sched.allocated("r", i, items[i].identifier)
        cache: dict[str, np.ndarray] = {}
        assert worker.load(cache, sched.take_loads()) == []
        for ident, want in sent.items():
            assert np.array_equal(cache[ident].view(np.uint16), want.view(np.uint16)), ident
        assert worker.lent_blocks == 4
        assert worker.ep.pool_usage()[0] == 4  # "c" was copied: its blocks are back
        sched.finished("r")
        wait_for(lambda: worker.held == 0, "the rooms closed")
        assert worker.ep.pool_usage()[0] == 4  # still in the engine's cache
        keep = cache["a"][3:5]
        cache.clear()  # the cache evicts all three
        wait_for(lambda: worker.ep.pool_usage()[0] == 2, "b's blocks back")
        assert np.array_equal(keep.view(np.uint16), sent["a"][3:5].view(np.uint16))
        del keep
        wait_for(lambda: worker.ep.pool_usage()[0] == 0, "a's blocks back with its last view")
        assert worker.lent_blocks == 0
    finally:
        worker.close()
        sched.close()
        enc.close()
