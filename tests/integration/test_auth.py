"""Shared-secret authentication: HMAC over every control message and every
bootstrap registration; anything unauthenticated is rejected and counted."""

import pytest
import zmq

from embedlink import (
    BootstrapError,
    BootstrapServer,
    BufferSchema,
    EncoderEndpoint,
    LanguageEndpoint,
    TransferError,
)
from embedlink.protocol import Heartbeat, encode
from embedlink.tools.workers import make_embedding, same_embedding

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
SCHEMA = BufferSchema(hidden_size=16)
SECRET = "s3cret"


def test_authenticated_pipeline_works_and_strangers_are_counted():
    with (
        BootstrapServer(port=0, auth_secret=SECRET) as boot,
        EncoderEndpoint(
            SCHEMA, bootstrap=boot.address, num_blocks=32, transports=("tcp",), auth_secret=SECRET
        ) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=32, transports=("tcp",), auth_secret=SECRET) as lang,
    ):
        rx = lang.receiver(bootstrap=boot.address, room=1)
        enc.sender(1).send(make_embedding(SCHEMA, 2000, 0, 1))
        assert same_embedding(rx.wait(timeout=30), make_embedding(SCHEMA, 2000, 0, 1))
        # a stranger without the secret: valid messages, no tag
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://{enc.address}")
        for i in range(10):
            s.send(encode(Heartbeat(session="mallory", seq=i)))
        s.setsockopt(zmq.RCVTIMEO, 500)
        with pytest.raises(zmq.Again):
            s.recv()  # no answer to an unauthenticated heartbeat
        s.close()
        ctx.term()
        assert enc.stats.unauthenticated_messages >= 10
        # a language endpoint with the wrong secret gets nowhere
        with LanguageEndpoint(
            SCHEMA, num_blocks=32, transports=("tcp",), auth_secret="wrong", room_timeout=1.0
        ) as bad:
            rx = bad.receiver(encoder=enc.address, room=2)
            with pytest.raises(TransferError, match="timed out"):
                rx.wait(timeout=30)
        assert enc.loop_errors == 0


def test_unauthenticated_registration_is_refused():
    with BootstrapServer(port=0, auth_secret=SECRET) as boot:
        enc = EncoderEndpoint(SCHEMA, bootstrap=boot.address, num_blocks=8, transports=("tcp",))
        try:
            with pytest.raises(BootstrapError) as ei:
                enc.start()
            assert ei.value.status == 401
        finally:
            enc.close()
        assert boot.unauthenticated == 1
