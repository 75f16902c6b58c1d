"""Against a hand-driven encoder: input for an old epoch (a reused room id) is
refused and counted, and blocks an encoder may still be writing into are not
freed on abort until it acknowledges."""

import time

import pytest
import zmq

from embedlink import BufferSchema, LanguageEndpoint, Status
from embedlink.protocol import Abort, StatusUpdate, TransferRequest, decode, encode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
SCHEMA = BufferSchema(hidden_size=16)


@pytest.fixture
def fake_encoder():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVTIMEO, 10_000)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    yield router, f"127.0.0.1:{port}"
    router.close()
    ctx.term()


def _next(router, kind):
    while True:
        identity, payload = router.recv_multipart()
        msg = decode(payload)
        if isinstance(msg, kind):
            return identity, msg


def _ack_failed(router, identity, room, epoch, reason):
    """What an encoder answers an abort with: a Failed status for that epoch."""
    router.send_multipart(
        [
            identity,
            encode(
                StatusUpdate(
                    room=room,
                    epoch=epoch,
                    status=Status.Failed,
                    sent_tokens=0,
                    total_tokens=0,
                    reason=reason,
                )
            ),
        ]
    )


def _wait(cond, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_status_for_an_old_epoch_is_refused_and_counted(fake_encoder):
    router, address = fake_encoder
    with LanguageEndpoint(SCHEMA, num_blocks=16, transports=("tcp",)) as lang:
        old = lang.receiver(encoder=address, room=5)
        identity, req_old = _next(router, TransferRequest)
        old.abort()
        _next(router, Abort)
        _ack_failed(router, identity, 5, req_old.epoch, "ack")
        _wait(lambda: lang.allocator.num_used == 0)
        old.clear()
        _wait(lambda: lang.room_count() == 0)
        new = lang.receiver(encoder=address, room=5)  # the id is reused
        _, req_new = _next(router, TransferRequest)
        assert req_new.epoch != req_old.epoch
        before = lang.ignored_inputs
        # a late chunk report for the old reservation must not touch the new one
        router.send_multipart(
            [
                identity,
                encode(
                    StatusUpdate(
                        room=5,
                        epoch=req_old.epoch,
                        status=Status.Success,
                        sent_tokens=10,
                        total_tokens=10,
                    )
                ),
            ]
        )
        _wait(lambda: lang.ignored_inputs > before)
        assert new.poll() is Status.WaitingForInput
        assert new.history[-1] == (Status.WaitingForInput, 0)


def test_abort_keeps_blocks_a_write_may_still_land_in_until_acknowledged(fake_encoder):
    router, address = fake_encoder
    with LanguageEndpoint(
        SCHEMA, num_blocks=16, block_size=128, default_tokens=512, transports=("tcp",)
    ) as lang:
        rx = lang.receiver(encoder=address, room=9)
        identity, req = _next(router, TransferRequest)
        assert lang.allocator.num_used == 4
        rx.abort()
        _next(router, Abort)
        assert rx.poll() is Status.Failed
        time.sleep(0.3)  # the encoder has not answered: its write may still be landing
        assert lang.allocator.num_used == 4
        _ack_failed(router, identity, 9, req.epoch, "aborted by peer")
        _wait(lambda: lang.allocator.num_used == 0)
        assert rx.failure_reason == "aborted by receiver"


def test_a_lost_abort_is_repeated_until_acknowledged(fake_encoder):
    """A reset connection may lose an Abort (or its answer): the blocks the
    encoder was offered must not stay out of use for as long as it lives."""
    router, address = fake_encoder
    with LanguageEndpoint(
        SCHEMA,
        num_blocks=16,
        block_size=128,
        default_tokens=512,
        transports=("tcp",),
        heartbeat_interval=0.2,
        heartbeat_misses=100,  # the fake never answers heartbeats
    ) as lang:
        rx = lang.receiver(encoder=address, room=4)
        identity, req = _next(router, TransferRequest)
        rx.abort()
        first = _next(router, Abort)[1]  # "lost": never answered
        rx.clear()  # the caller is done with it; the blocks are still offered
        assert lang.allocator.num_used == 4
        _, again = _next(router, Abort)
        assert (again.room, again.epoch) == (first.room, first.epoch) == (4, req.epoch)
        assert lang.abort_repeats >= 1
        assert lang.allocator.num_used == 4
        _ack_failed(router, identity, 4, req.epoch, "unknown room 4 on this encoder")
        _wait(lambda: lang.allocator.num_used == 0)
        assert lang.status()["counters"]["abort_repeats"] >= 1
