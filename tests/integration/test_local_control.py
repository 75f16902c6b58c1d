"""The same-host control lane (``local_control``) against ZeroMQ, across real
processes: which one peers use, that rooms succeed over either, and that a
closed lane ends the other side's rooms at once instead of after missed
heartbeats."""

import os
import signal

import pytest

from embedlink import BufferSchema, EncoderEndpoint, LanguageEndpoint, Status, TransferError
from embedlink._lane import SUPPORTED
from embedlink.workers import make_embedding, same_embedding

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not SUPPORTED, reason="lanes need Linux abstract sockets"),
]

SCHEMA = BufferSchema(hidden_size=64)
# heartbeats far slower than the tests' waits: whatever fails a room here,
# it is not a missed heartbeat
SLOW_HB = dict(heartbeat_interval=30.0, heartbeat_misses=3)


@pytest.mark.parametrize(
    "enc_local, lang_local, used",
    [(True, True, "unix"), (True, False, "zmq"), (False, True, "zmq"), (False, False, "zmq")],
)
def test_same_host_peers_use_the_lane_when_both_allow_it(enc_local, lang_local, used):
    with (
        EncoderEndpoint(SCHEMA, num_blocks=32, local_control=enc_local) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=32, local_control=lang_local) as lang,
    ):
        for room, n in ((1, 100), (2, 3000)):  # 3000 tokens resume twice
            tx = enc.sender(room)
            tx.send(make_embedding(SCHEMA, n, 0, room))
            rx = lang.receiver(encoder=enc.address, room=room)
            assert same_embedding(rx.wait(timeout=30), make_embedding(SCHEMA, n, 0, room))
            assert tx.wait(10) is Status.Success
            rx.clear()
            tx.clear()
        (peer,) = lang.status()["peers"]
        assert peer["control"] == used and peer["alive"]
        (session,) = enc.status()["peers"]
        assert session["control"] == used and session["alive"]
        assert lang.dropped_messages == 0 and enc.stats.dropped_messages == 0


def test_encoder_killed_fails_rooms_through_the_closed_lane(boot, spawn_encoder):
    enc = spawn_encoder(
        bootstrap=boot.address,
        hidden_size=64,
        num_blocks=32,
        transports=("shm",),
        room_timeout=60.0,
        **SLOW_HB,
    )
    with LanguageEndpoint(
        SCHEMA, num_blocks=32, transports=("shm",), room_timeout=60.0, **SLOW_HB
    ) as lang:
        ok = lang.receiver(bootstrap=boot.address, room=1)
        enc.call("send", 1, 300)
        assert same_embedding(ok.wait(timeout=30), make_embedding(SCHEMA, 300, 0, 1))
        waiting = lang.receiver(bootstrap=boot.address, room=2)
        enc.call("open", 2)
        os.kill(enc.proc.pid, signal.SIGKILL)
        with pytest.raises(TransferError, match="encoder lost.*control connection"):
            waiting.wait(timeout=30)
        assert waiting.poll() is Status.Failed
        assert lang.dead_encoders == 1
        ok.clear()
        waiting.clear()
        assert lang.allocator.wait_all_free(10)


def test_language_closing_ends_its_rooms_on_the_encoder_at_once():
    with EncoderEndpoint(SCHEMA, num_blocks=32, **SLOW_HB) as enc:
        tx = enc.sender(5)  # requested below, never sent: the room waits
        with LanguageEndpoint(SCHEMA, num_blocks=32, **SLOW_HB) as lang:
            rx = lang.receiver(encoder=enc.address, room=5)
            # the request has arrived once the encoder's room waits for input
            for _ in range(100):
                if tx.poll() is Status.WaitingForInput:
                    break
                tx.wait(0.05)
            assert tx.poll() is Status.WaitingForInput
            assert rx.poll() is Status.WaitingForInput
        assert tx.wait(10) is Status.Failed
        assert "control connection ended" in (tx.failure_reason or "")
        assert enc.stats.dead_sessions == 1
        tx.clear()
        assert enc.allocator.wait_all_free(10)
