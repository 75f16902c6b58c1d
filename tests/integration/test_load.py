"""Load: at least 5,000 rooms of 1 to 16,384 tokens, default reservation 1024,
pools small enough to force back-pressure on both sides, 5% aborted at random
moments by either side. Every room ends Success (byte-exact) or Failed with a
reason; no block leaks."""

import random
import threading
import time

import pytest

from embedlink import BufferSchema, EncoderEndpoint, LanguageEndpoint, Status, TransferError
from embedlink.tools.workers import make_embedding, same_embedding

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
SCHEMA = BufferSchema(hidden_size=8)


def _load(boot, rooms, transport):
    rng = random.Random(7)
    sizes = {r: rng.randint(1, 16384) for r in range(rooms)}
    aborted = set(rng.sample(range(rooms), rooms // 20))
    with (
        EncoderEndpoint(
            SCHEMA,
            bootstrap=boot.address,
            num_blocks=512,
            block_size=128,
            transports=(transport,),
            room_timeout=120,
        ) as enc,
        LanguageEndpoint(
            SCHEMA,
            num_blocks=96,
            block_size=128,
            default_tokens=1024,
            transports=(transport,),
            room_timeout=120,
        ) as lang,
    ):
        senders = {}
        errors = []

        def produce():
            try:
                for r in range(rooms):
                    tx = enc.sender(r)
                    senders[r] = tx
                    tx.send(make_embedding(SCHEMA, sizes[r], 0, r), timeout=120)
                    if r in aborted and r % 2 == 0:
                        time.sleep(rng.random() * 0.002)
                        tx.abort("load test: encoder gives up")
            except Exception as exc:  # surfaced below
                errors.append(exc)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        results = {}
        pending = []
        window = 64

        def finish(r, rx):
            try:
                emb = rx.wait(timeout=120)
                results[r] = ("ok", same_embedding(emb, make_embedding(SCHEMA, sizes[r], 0, r)))
            except TransferError as exc:
                results[r] = ("failed", exc.reason)
            except TimeoutError as exc:
                # a room that never ends: say where it is stuck (a rare hang
                # under heavy load, not yet understood)
                snap = lang.status()
                raise AssertionError(
                    f"{exc}; room: status={rx.poll()} history={rx.history}; language: "
                    f"waiting for a route={snap['rooms_waiting_for_route']} "
                    f"queued={snap['queued_reservations']} pool={lang.pool_usage()} "
                    f"encoders={[p['encoder'] for p in snap['peers']]}; "
                    f"encoder: rooms={enc.room_count()} pool={enc.pool_usage()}"
                ) from None
            rx.clear()

        for r in range(rooms):
            if len(pending) >= window:
                finish(*pending.pop(0))
            rx = lang.receiver(bootstrap=boot.address, room=r)
            if r in aborted and r % 2 == 1:
                rx.abort("load test: receiver gives up")
            pending.append((r, rx))
        for p in pending:
            finish(*p)
        producer.join(120)
        assert not errors, errors
        assert len(results) == rooms
        bad = [r for r, (k, v) in results.items() if k == "ok" and not v]
        assert not bad, f"rooms delivered wrong bytes: {bad[:10]}"
        failed = {r: v for r, (k, v) in results.items() if k == "failed"}
        assert all(failed.values()), "a Failed room without a reason"
        assert set(failed) <= aborted, {r: failed[r] for r in list(set(failed) - aborted)[:5]}
        ok = rooms - len(failed)
        assert ok >= rooms - len(aborted)
        for tx in senders.values():
            assert tx.wait(60) in (Status.Success, Status.Failed)
            tx.clear()
        assert lang.allocator.wait_all_free(30), lang.pool_usage()
        assert enc.allocator.wait_all_free(30), enc.pool_usage()
        assert enc.loop_errors == 0 and lang.loop_errors == 0
        return ok, len(failed)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_load_5000_rooms_with_random_aborts(boot, transport):
    ok, failed = _load(boot, 5000, transport)
    assert ok + failed == 5000
