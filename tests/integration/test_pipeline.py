"""The pipeline across real processes over ``tcp`` and ``shm`` (issue: the
working pipeline). The encoder runs in a spawned process; the language side
runs in the test process where its statuses can be read, or in a process of
its own for the load test."""

import gc
import random
import time
import weakref

import ml_dtypes
import numpy as np
import pytest

from embedlink import (
    BufferSchema,
    Embedding,
    EncoderEndpoint,
    LanguageEndpoint,
    Status,
    TransferError,
)
from embedlink.tools.workers import make_embedding, same_embedding

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

S = Status
HIDDEN = 256
SCHEMA = BufferSchema(hidden_size=HIDDEN)
TRANSPORTS = ["tcp", "shm", "mooncake", "nixl"]
# Control messages go over a same-host lane by default ("unix"); peers on
# other hosts use ZeroMQ ("zmq"). The seed's rules must hold on both.
CONTROLS = ["unix", "zmq"]


def enc_cfg(boot, transport, control="unix", **kw):
    cfg = dict(
        local_control=control == "unix",
        bootstrap=boot.address,
        hidden_size=HIDDEN,
        num_blocks=128,
        block_size=128,
        transports=(transport,),
        room_timeout=30.0,
    )
    cfg.update(kw)
    return cfg


def language(transport, control="unix", **kw):
    args = dict(
        local_control=control == "unix",
        num_blocks=64,
        block_size=128,
        default_tokens=1024,
        transports=(transport,),
        room_timeout=30.0,
    )
    args.update(kw)
    return LanguageEndpoint(SCHEMA, **args).start()


@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_seed_500_tokens_waiting_for_input_then_success(boot, spawn_encoder, transport, control):
    enc = spawn_encoder(**enc_cfg(boot, transport, control))
    with language(transport, control) as lang:
        rx = lang.receiver(bootstrap=boot.address, room=500)
        enc.call("send", 500, 500)
        emb = rx.wait(timeout=30)
        assert same_embedding(emb, make_embedding(SCHEMA, 500, 0, 500))
        assert rx.history == [(S.Bootstrapping, 0), (S.WaitingForInput, 0), (S.Success, 500)]
        assert [p["control"] for p in lang.status()["peers"]] == [control]
        _, statuses, usage = enc.call("wait_idle", 10)
        assert statuses == {500: (int(S.Success), None)}
        assert usage[0] == 0
        sessions = enc.call("stats")[3]
        assert list(sessions.values()) == [transport]


@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_seed_2000_tokens_one_resume_at_1024(boot, spawn_encoder, transport, control):
    enc = spawn_encoder(**enc_cfg(boot, transport, control))
    with language(transport, control) as lang:
        rx = lang.receiver(bootstrap=boot.address, room=2000)
        enc.call("send", 2000, 2000)
        emb = rx.wait(timeout=30)
        assert same_embedding(emb, make_embedding(SCHEMA, 2000, 0, 2000))
        assert rx.history == [
            (S.Bootstrapping, 0),
            (S.WaitingForInput, 0),
            (S.Transferring, 1024),
            (S.Success, 2000),
        ]
        assert int(rx.aux["total_tokens"]) == 2000
        assert [p["control"] for p in lang.status()["peers"]] == [control]
        assert enc.call("wait_idle", 10)[1] == {2000: (int(S.Success), None)}
        assert lang.allocator.wait_all_free(5)


@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_seed_failure_ends_failed_with_reason(boot, spawn_encoder, transport, control):
    enc = spawn_encoder(**enc_cfg(boot, transport, control))
    with language(transport, control) as lang:
        # the encoder gives up on a room
        rx = lang.receiver(bootstrap=boot.address, room=1)
        enc.call("open", 1)
        enc.call("abort", 1)
        # the request may reach the encoder before or after the abort
        with pytest.raises(TransferError, match=r"aborted by (peer|sender)"):
            rx.wait(timeout=30)
        assert rx.poll() is S.Failed
        assert rx.history[-1][0] is S.Failed
        # nobody ever sends a room: the deadline fails it
    with language(transport, control, room_timeout=1.0) as lang:
        rx = lang.receiver(bootstrap=boot.address, room=2)
        with pytest.raises(TransferError, match="timed out"):
            rx.wait(timeout=30)
        assert lang.allocator.wait_all_free(10)


@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_5000_tokens_small_pool_resumes_at_least_three_times(
    boot, spawn_encoder, transport, control
):
    enc = spawn_encoder(**enc_cfg(boot, transport, control))
    with language(transport, control, num_blocks=6, default_tokens=768) as lang:
        rx = lang.receiver(bootstrap=boot.address, room=5000)
        enc.call("send", 5000, 5000)
        emb = rx.wait(timeout=60)
        assert same_embedding(emb, make_embedding(SCHEMA, 5000, 0, 5000))
        partial = [t for s, t in rx.history if s is S.Transferring]
        assert len(partial) >= 3 and partial == sorted(partial)
        assert [s for s, _ in rx.history] == sorted(s for s, _ in rx.history)
        assert rx.history[-1] == (S.Success, 5000)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_receiver_may_come_after_send(boot, spawn_encoder, transport):
    enc = spawn_encoder(**enc_cfg(boot, transport))
    enc.call("send", 77, 1500)
    with language(transport) as lang:
        rx = lang.receiver(bootstrap=boot.address, room=77)
        assert same_embedding(rx.wait(timeout=30), make_embedding(SCHEMA, 1500, 0, 77))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_language_tp2_encoder_tp1_both_ranks_receive(boot, spawn_encoder, transport):
    enc = spawn_encoder(**enc_cfg(boot, transport))
    with (
        language(transport, tp_rank=0, tp_size=2) as l0,
        language(transport, tp_rank=1, tp_size=2) as l1,
    ):
        r0 = l0.receiver(bootstrap=boot.address, room=9)
        r1 = l1.receiver(bootstrap=boot.address, room=9)
        enc.call("send", 9, 3000)
        want = make_embedding(SCHEMA, 3000, 0, 9)
        assert same_embedding(r0.wait(timeout=30), want)
        assert same_embedding(r1.wait(timeout=30), want)
        _, statuses, usage = enc.call("wait_idle", 10)
        assert statuses == {9: (int(S.Success), None)}
        assert usage[0] == 0
        assert len(enc.call("stats")[3]) == 2


@pytest.mark.parametrize(
    ("transport", "control"), [*((t, "unix") for t in TRANSPORTS), ("shm", "zmq")]
)
def test_500_concurrent_rooms_byte_exact_and_pools_free(
    boot, spawn_encoder, spawn_language, transport, control
):
    rng = random.Random(5)
    jobs = [(1000 + i, rng.randint(1, 4096)) for i in range(500)]
    enc = spawn_encoder(**enc_cfg(boot, transport, control, num_blocks=256))
    lang = spawn_language(
        dict(
            local_control=control == "unix",
            bootstrap=boot.address,
            hidden_size=HIDDEN,
            num_blocks=64,
            default_tokens=1024,
            transports=(transport,),
            window=500,
            room_timeout=60.0,
        ),
        jobs,
    )
    for room, n in jobs:
        enc.call("send", room, n)
    results, (tag, usage, errors) = lang.results(len(jobs), timeout=120)
    assert tag == "done"
    bad = [(r.room, r.reason) for r in results if not r.ok]
    assert not bad, bad[:5]
    assert len(results) == 500
    assert any(any(s == int(S.Transferring) for s, _ in r.history) for r in results)
    assert usage[0] == 0 and errors == 0
    _, statuses, enc_usage = enc.call("wait_idle", 30)
    assert enc_usage[0] == 0
    assert all(st == int(S.Success) for st, _ in statuses.values())


# -- bad input: a clear error for that room only ---------------------------------------


@pytest.fixture
def pair(boot):
    enc = EncoderEndpoint(
        SCHEMA,
        bootstrap=boot.address,
        num_blocks=16,
        block_size=128,
        transports=("tcp",),
        room_timeout=2.0,
    ).start()
    lang = LanguageEndpoint(
        SCHEMA,
        num_blocks=16,
        block_size=128,
        default_tokens=1024,
        transports=("tcp",),
        room_timeout=30.0,
    ).start()
    yield enc, lang
    enc.close()
    lang.close()


def _emb(n, **over):
    e = dict(
        embedding=np.zeros((n, HIDDEN), ml_dtypes.bfloat16),
        token_ids=np.zeros(n, np.int32),
        mrope_positions=np.zeros((3, n), np.int32),
    )
    e.update(over)
    return Embedding(**e)


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"embedding": np.zeros((10, HIDDEN), np.float32)}, "embedding"),
        ({"embedding": np.zeros((10, HIDDEN + 1), ml_dtypes.bfloat16)}, "embedding"),
        ({"token_ids": np.zeros(10, np.int64)}, "token_ids"),
        ({"mrope_positions": np.zeros((10, 3), np.int32)}, "mrope_positions"),
        ({"token_ids": np.zeros(9, np.int32)}, "token_ids"),
        ({"token_ids": None}, "token_ids"),
    ],
)
def test_send_rejects_mismatched_field_naming_it(pair, over, field):
    enc, _ = pair
    tx = enc.sender(room=3)
    with pytest.raises(ValueError, match=field):
        tx.send(_emb(10, **over))


def test_bad_rooms_do_not_disturb_good_ones(pair, boot):
    enc, lang = pair
    # an embedding larger than the whole encoder pool
    with pytest.raises(ValueError, match="pool"):
        enc.sender(room=4).send(_emb(16 * 128 + 1))
    # a reservation larger than the language pool
    with pytest.raises(ValueError, match="does not fit"):
        lang.receiver(bootstrap=boot.address, room=5, tokens=16 * 128 + 1)
    # a request for a room the encoder never opens: refused after its room timeout
    ghost = lang.receiver(bootstrap=boot.address, room=6)
    # a live room id cannot be reused until cleared
    good_rx = lang.receiver(bootstrap=boot.address, room=7)
    with pytest.raises(ValueError, match="still live"):
        lang.receiver(bootstrap=boot.address, room=7)
    tx = enc.sender(room=7)
    with pytest.raises(ValueError, match="still live"):
        enc.sender(room=7)
    data = make_embedding(SCHEMA, 1500, 0, 7)
    tx.send(data)
    assert same_embedding(good_rx.wait(timeout=30), data)
    with pytest.raises(TransferError, match="no sender for room 6"):
        ghost.wait(timeout=30)
    assert lang.allocator.wait_all_free(5)
    assert enc.allocator.wait_all_free(5)
    assert enc.loop_errors == 0 and lang.loop_errors == 0


def test_schema_mismatch_refuses_the_session(boot):
    with (
        EncoderEndpoint(SCHEMA, bootstrap=boot.address, num_blocks=16, transports=("tcp",)) as enc,
        LanguageEndpoint(
            BufferSchema(hidden_size=HIDDEN * 2), num_blocks=16, transports=("tcp",)
        ) as lang,
    ):
        rx = lang.receiver(bootstrap=boot.address, room=1)
        enc.sender(room=1)
        with pytest.raises(TransferError, match="schema mismatch"):
            rx.wait(timeout=30)


def test_no_common_transport_is_a_clear_failure(boot):
    with (
        EncoderEndpoint(SCHEMA, bootstrap=boot.address, num_blocks=16, transports=("shm",)) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=16, transports=("tcp",)) as lang,
    ):
        rx = lang.receiver(bootstrap=boot.address, room=1)
        enc.sender(room=1)
        with pytest.raises(TransferError, match="no common transport"):
            rx.wait(timeout=30)


@pytest.mark.parametrize(
    ("enc_has", "lang_offers", "chosen"),
    [
        (("mooncake", "tcp"), ("mooncake", "tcp"), "mooncake"),
        (("tcp",), ("mooncake", "tcp"), "tcp"),
        (("mooncake", "tcp"), ("tcp",), "tcp"),
        (("tcp", "shm"), ("shm", "tcp"), "shm"),
        # the receiver's order decides, whatever the encoder's
        (("tcp", "nixl"), ("nixl", "tcp"), "nixl"),
        (("nixl", "tcp"), ("tcp", "nixl"), "tcp"),
        (("tcp",), ("nixl", "tcp"), "tcp"),
        (("nixl", "tcp"), ("tcp",), "tcp"),
        (("nixl", "mooncake"), ("mooncake", "nixl"), "mooncake"),
    ],
)
def test_negotiation_picks_the_first_common_transport(boot, enc_has, lang_offers, chosen):
    with (
        EncoderEndpoint(SCHEMA, bootstrap=boot.address, num_blocks=16, transports=enc_has) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=16, transports=lang_offers) as lang,
    ):
        rx = lang.receiver(bootstrap=boot.address, room=1)
        enc.sender(room=1).send(make_embedding(SCHEMA, 300, 0, 1))
        assert same_embedding(rx.wait(timeout=30), make_embedding(SCHEMA, 300, 0, 1))
        assert list(enc.sessions().values()) == [chosen]


def test_send_accepts_torch_tensors(pair, boot):
    torch = pytest.importorskip("torch", reason="torch not installed (EMBEDLINK_TEST_TORCH=0)")
    enc, lang = pair
    want = make_embedding(SCHEMA, 700, 0, 11)
    emb = Embedding(
        embedding=torch.from_numpy(want.embedding.view(np.int16).copy()).view(torch.bfloat16),
        token_ids=torch.from_numpy(want.token_ids.copy()),
        mrope_positions=torch.from_numpy(want.mrope_positions.copy()),
        mrope_position_delta=want.mrope_position_delta,
    )
    rx = lang.receiver(bootstrap=boot.address, room=11)
    enc.sender(11).send(emb)
    assert same_embedding(rx.wait(timeout=30), want)


def test_send_waits_for_blocks_then_times_out(boot):
    with EncoderEndpoint(
        SCHEMA, bootstrap=boot.address, num_blocks=4, block_size=128, transports=("tcp",)
    ) as enc:
        enc.sender(1).send(make_embedding(SCHEMA, 512, 0, 1))  # fills the pool; nobody receives
        tx = enc.sender(2)
        with pytest.raises(TransferError, match="no free encoder blocks"):
            tx.send(make_embedding(SCHEMA, 100, 0, 2), timeout=0.3)
        assert tx.wait(5) is S.Failed
        assert "no free encoder blocks" in tx.failure_reason


@pytest.mark.parametrize("zero_copy", [False, True])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_torch_cpu_pools_end_to_end(boot, transport, zero_copy):
    torch = pytest.importorskip("torch", reason="torch not installed (EMBEDLINK_TEST_TORCH=0)")
    with (
        EncoderEndpoint(
            SCHEMA, bootstrap=boot.address, num_blocks=64, transports=(transport,), device="cpu"
        ) as enc,
        LanguageEndpoint(
            SCHEMA,
            num_blocks=40 if zero_copy else 16,  # 16: the 3000-token room resumes twice
            transports=(transport,),
            device="cpu",
            zero_copy=zero_copy,
        ) as lang,
    ):
        for room, n in ((1, 500), (2, 3000)):
            want = make_embedding(SCHEMA, n, 0, room)
            rx = lang.receiver(bootstrap=boot.address, room=room)
            enc.sender(room).send(want)
            got = rx.wait(timeout=30)
            assert isinstance(got.embedding, torch.Tensor)
            assert same_embedding(got, want)
            assert rx.history[-1] == (S.Success, n)
            base = lang.pool.tensor.data_ptr()
            inside = base <= got.embedding.data_ptr() < base + lang.pool.nbytes
            assert inside == zero_copy  # resumed zero-copy rooms are views too
            rx.clear()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_copy_path_buffer_commit_and_zero_copy_receive(boot, transport):
    with (
        EncoderEndpoint(
            SCHEMA, bootstrap=boot.address, num_blocks=64, transports=(transport,)
        ) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=32, transports=(transport,), zero_copy=True) as lang,
    ):
        want = make_embedding(SCHEMA, 1500, 0, 5)
        rx = lang.receiver(bootstrap=boot.address, room=5, tokens=1500)
        tx = enc.sender(5)
        buf = tx.buffer(1500)
        assert enc.allocator.num_used == 12
        buf.embedding[:] = want.embedding
        buf.token_ids[:] = want.token_ids
        buf.mrope_positions[:] = want.mrope_positions  # a [3, n] view of the pool's [n, 3]
        tx.commit(mrope_position_delta=want.mrope_position_delta)
        got = rx.wait(timeout=30)
        assert same_embedding(got, want)
        # the result lives in the language pool until clear()
        assert np.shares_memory(got.embedding, lang.pool.array("embedding"))
        assert lang.allocator.num_used == 12
        rx.clear()
        assert lang.allocator.wait_all_free(5)
        # a resumed room grows its reservation in place: still a view
        rx2 = lang.receiver(bootstrap=boot.address, room=6)
        enc.sender(6).send(make_embedding(SCHEMA, 3000, 0, 6))
        got2 = rx2.wait(timeout=30)
        assert np.shares_memory(got2.embedding, lang.pool.array("embedding"))
        assert token_offset(got2.embedding, lang.pool.array("embedding")) == 0
        assert same_embedding(got2, make_embedding(SCHEMA, 3000, 0, 6))
        assert rx2.history[-2:] == [(S.Transferring, 1024), (S.Success, 3000)]
        assert lang.allocator.num_used == 24  # 3000 tokens, pinned until clear()
        rx2.clear()
        assert lang.allocator.wait_all_free(5)
        assert enc.allocator.wait_all_free(5)
        # every write done on a worker thread was reported back: the encoder's
        # loop may busy-poll again (it does not while copies are in flight)
        assert enc.status()["writes_in_flight"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_borrowed_send_reads_the_callers_arrays_across_resumes(boot, transport):
    """send(borrow=True): shm and tcp write every chunk straight from the
    caller's arrays (the encoder pool's payload blocks are never written);
    mooncake and nixl, which write only from registered memory, copy the
    payload into the blocks first. Either way every byte arrives, through resumes."""
    with (
        EncoderEndpoint(
            SCHEMA, bootstrap=boot.address, num_blocks=64, transports=(transport,)
        ) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=40, transports=(transport,)) as lang,
    ):
        pool = enc.pool.array("embedding")
        pool[:] = 0
        rooms = {7: 2500, 8: 300}  # 2,500 tokens resume twice past the 1,024 default
        rxs = {r: lang.receiver(bootstrap=boot.address, room=r) for r in rooms}
        lent = []
        for r, n in rooms.items():
            emb = make_embedding(SCHEMA, n, 0, r)
            lent.append(weakref.ref(emb.embedding))
            enc.sender(r).send(emb, borrow=True)
        del emb
        for r, n in rooms.items():
            assert same_embedding(rxs[r].wait(timeout=30), make_embedding(SCHEMA, n, 0, r))
        assert (S.Transferring, 1024) in rxs[7].history
        written = bool(np.any(pool.view(np.uint16)))
        assert written == (transport in ("mooncake", "nixl"))
        assert enc.allocator.wait_all_free(5)
        # the encoder lets go of the arrays with the blocks
        deadline = time.monotonic() + 10
        while any(ref() is not None for ref in lent) and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert all(ref() is None for ref in lent)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_meta_travels_with_the_embedding_through_resumes(boot, transport):
    """Bytes attached with send(meta=) or commit(meta=) are the receiver's
    ``meta`` once the room succeeds, also when it resumed; none attached is
    None; more than 64 KiB is refused naming the limit, the room untouched."""
    from embedlink.protocol import MAX_META_BYTES

    with (
        EncoderEndpoint(
            SCHEMA, bootstrap=boot.address, num_blocks=64, transports=(transport,)
        ) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=40, transports=(transport,)) as lang,
    ):
        meta = bytes(range(256)) * 8
        rx1 = lang.receiver(bootstrap=boot.address, room=1)
        rx2 = lang.receiver(bootstrap=boot.address, room=2)
        rx3 = lang.receiver(bootstrap=boot.address, room=3)
        tx1 = enc.sender(1)
        with pytest.raises(ValueError, match=str(MAX_META_BYTES)):
            tx1.send(make_embedding(SCHEMA, 10, 0, 1), meta=b"x" * (MAX_META_BYTES + 1))
        tx1.send(make_embedding(SCHEMA, 2500, 0, 1), meta=meta)  # the room is still usable
        enc.sender(2).send(make_embedding(SCHEMA, 100, 0, 2))
        tx3 = enc.sender(3)
        buf = tx3.buffer(50)
        want3 = make_embedding(SCHEMA, 50, 0, 3)
        buf.embedding[:] = want3.embedding
        buf.token_ids[:] = want3.token_ids
        buf.mrope_positions[:] = want3.mrope_positions
        tx3.commit(mrope_position_delta=want3.mrope_position_delta, meta=b"three")
        assert same_embedding(rx1.wait(timeout=30), make_embedding(SCHEMA, 2500, 0, 1))
        assert (S.Transferring, 1024) in rx1.history
        assert rx1.meta == meta
        assert same_embedding(rx2.wait(timeout=30), make_embedding(SCHEMA, 100, 0, 2))
        assert rx2.meta is None
        assert same_embedding(rx3.wait(timeout=30), want3)
        assert rx3.meta == b"three"


def token_offset(view, pool):
    """Which pool token a view of the embedding field starts at."""
    return (view.__array_interface__["data"][0] - pool.__array_interface__["data"][0]) // (
        pool.strides[0]
    )


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_zero_copy_resumes_end_contiguous_or_fall_back(boot, transport):
    """A zero-copy room that resumes is a view of one contiguous pool run:
    grown in place (its first reservation keeps free blocks after it, and a
    second room's skips them), or moved once inside the pool when its
    neighbour is taken; with no run long enough it is reassembled in fresh
    memory. Every byte arrives and every block comes back."""
    with (
        EncoderEndpoint(
            SCHEMA, bootstrap=boot.address, num_blocks=96, transports=(transport,)
        ) as enc,
        LanguageEndpoint(
            SCHEMA, num_blocks=40, transports=(transport,), zero_copy=True, resume_headroom=4
        ) as lang,
    ):
        pool = lang.pool.array("embedding")
        # in place: room 1 takes blocks 0-7 and room 2 skips 8-15, kept for room 1
        rx1 = lang.receiver(bootstrap=boot.address, room=1)
        rx2 = lang.receiver(bootstrap=boot.address, room=2)
        enc.sender(1).send(make_embedding(SCHEMA, 1900, 0, 1))
        enc.sender(2).send(make_embedding(SCHEMA, 1100, 0, 2))
        got1, got2 = rx1.wait(timeout=30), rx2.wait(timeout=30)
        assert same_embedding(got1, make_embedding(SCHEMA, 1900, 0, 1))
        assert same_embedding(got2, make_embedding(SCHEMA, 1100, 0, 2))
        assert token_offset(got1.embedding, pool) == 0
        assert token_offset(got2.embedding, pool) == 16 * 128
        rx1.clear()
        rx2.clear()
        assert lang.allocator.wait_all_free(5)
        # moved: room 3 takes blocks 0-7, then something else takes 8-15
        rx3 = lang.receiver(bootstrap=boot.address, room=3)
        deadline = time.monotonic() + 10
        while lang.allocator.num_used < 8 and time.monotonic() < deadline:
            time.sleep(0.01)  # the reservation is made on the loop thread
        neighbour = lang.allocator.alloc_at(8, 8)
        assert neighbour == list(range(8, 16))
        enc.sender(3).send(make_embedding(SCHEMA, 2500, 0, 3))
        got3 = rx3.wait(timeout=30)
        assert same_embedding(got3, make_embedding(SCHEMA, 2500, 0, 3))
        assert np.shares_memory(got3.embedding, pool)
        assert token_offset(got3.embedding, pool) == 16 * 128  # the first run of 20
        lang.allocator.free(neighbour)
        # room 3 pins blocks 16-35: no run of 32 for a 4000-token room, so it
        # falls back to fresh memory
        rx4 = lang.receiver(bootstrap=boot.address, room=4)
        enc.sender(4).send(make_embedding(SCHEMA, 4000, 0, 4))
        got4 = rx4.wait(timeout=30)
        assert same_embedding(got4, make_embedding(SCHEMA, 4000, 0, 4))
        assert not np.shares_memory(got4.embedding, pool)
        for rx in (rx3, rx4):
            rx.clear()
        assert lang.allocator.wait_all_free(5)
        assert enc.allocator.wait_all_free(5)


def test_buffer_errors_and_abort_returns_blocks(boot):
    with EncoderEndpoint(SCHEMA, bootstrap=boot.address, num_blocks=8, transports=("tcp",)) as enc:
        tx = enc.sender(1)
        with pytest.raises(ValueError, match="pool has 8"):
            tx.buffer(8 * 128 + 1)
        with pytest.raises(ValueError, match="without buffer"):
            tx.commit()
        tx.buffer(300)
        with pytest.raises(ValueError, match="already"):
            tx.buffer(10)
        assert enc.allocator.num_used == 3
        tx.abort()
        assert enc.allocator.num_used == 0
        assert tx.wait(5) is S.Failed


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"room_timeout": 0}, "room_timeout"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"heartbeat_misses": 0}, "heartbeat_misses"),
        ({"tp_rank": 2, "tp_size": 2}, "tp_rank"),
        ({"transports": ("pigeon",)}, "pigeon"),
        ({"busy_poll_us": -1}, "busy_poll_us"),
    ],
)
def test_bad_endpoint_settings_fail_at_construction_naming_them(kwargs, name):
    for cls in (EncoderEndpoint, LanguageEndpoint):
        with pytest.raises(ValueError, match=name):
            cls(SCHEMA, num_blocks=16, **kwargs)
