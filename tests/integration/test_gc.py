"""Rooms that ended and were never cleared are collected after room_ttl: room
tables and memory stay flat across rounds (10 x 1,000 rooms by default; the
issue's 10 x 10,000 with -m slow)."""

import time

import numpy as np
import pytest

from embedlink import BufferSchema, Embedding, EncoderEndpoint, LanguageEndpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
SCHEMA = BufferSchema(hidden_size=8)


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _emb(n):
    return Embedding(
        embedding=np.zeros((n, 8), SCHEMA.field("embedding").np_dtype),
        token_ids=np.arange(n, dtype=np.int32),
        mrope_positions=np.zeros((3, n), np.int32),
    )


def _rounds(boot, rounds, per_round):
    ttl = 0.3
    with (
        EncoderEndpoint(
            SCHEMA,
            bootstrap=boot.address,
            num_blocks=256,
            block_size=4,
            transports=("shm",),
            room_ttl=ttl,
        ) as enc,
        LanguageEndpoint(
            SCHEMA,
            num_blocks=256,
            block_size=4,
            default_tokens=4,
            transports=("shm",),
            room_ttl=ttl,
        ) as lang,
    ):
        rss = []
        room = 0
        for _ in range(rounds):
            rxs = []
            for i in range(per_round):
                rxs.append(lang.receiver(bootstrap=boot.address, room=room))
                enc.sender(room).send(_emb(1 + i % 7))  # some resume: 4 tokens reserved
                room += 1
            for rx in rxs:
                rx.wait(timeout=60)  # never cleared: left to the TTL
            deadline = time.monotonic() + 30
            while (enc.room_count() or lang.room_count()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert enc.room_count() == 0 and lang.room_count() == 0
            assert lang.allocator.wait_all_free(5) and enc.allocator.wait_all_free(5)
            rss.append(_rss_mb())
        assert enc.stats.collected_rooms == rounds * per_round
        assert lang.collected_rooms == rounds * per_round
        assert len(enc._ended) == 0 and len(lang._ended) == 0
        return rss


def test_unclosed_rooms_are_collected_and_memory_stays_flat(boot):
    rss = _rounds(boot, 10, 1000)
    # after warm-up, ten rounds must not keep what earlier rounds used
    assert rss[-1] - rss[2] < 40, rss


@pytest.mark.slow
def test_unclosed_rooms_collected_10_rounds_of_10000(boot):
    rss = _rounds(boot, 10, 10_000)
    assert rss[-1] - rss[2] < 60, rss


def test_cleared_rooms_let_go_of_their_data_at_once(boot):
    """With the default room_ttl (600 s), a room the user cleared must not keep
    its reassembled result (or the encoder its room) alive until the TTL: a
    busy endpoint would hold every result of the last ten minutes."""
    import gc
    import weakref

    with (
        EncoderEndpoint(SCHEMA, bootstrap=boot.address, num_blocks=64, block_size=4) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=64, block_size=4, default_tokens=4) as lang,
    ):
        results, senders = [], []
        for room in range(20):
            rx = lang.receiver(bootstrap=boot.address, room=room)
            snd = enc.sender(room)
            snd.send(_emb(3 + room % 4))  # some fit the 4 reserved tokens, some resume
            emb = rx.wait(timeout=30)
            assert emb.embedding.shape[0] == 3 + room % 4
            results.append(weakref.ref(emb.embedding))
            senders.append(weakref.ref(snd._room))
            del emb
            rx.clear()
            with pytest.raises(RuntimeError, match=f"room {room} was cleared"):
                rx.wait(timeout=1)
            assert snd.wait(timeout=30).name == "Success"
            snd.clear()
        del rx, snd  # the test's own last references
        deadline = time.monotonic() + 10  # the encoder forgets on its next wake-up
        while time.monotonic() < deadline:
            gc.collect()
            if not any(r() is not None for r in results + senders):
                break
            time.sleep(0.05)
        assert [i for i, r in enumerate(results) if r() is not None] == []
        assert [i for i, r in enumerate(senders) if r() is not None] == []
