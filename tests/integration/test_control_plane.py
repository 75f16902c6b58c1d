"""The encoder's control plane against a hand-driven peer: wrong resumes, junk
and unknown rooms fail only what they name."""

import time

import pytest
import zmq

from embedlink import BufferPool, BufferSchema, EncoderEndpoint, LanguageEndpoint, Status
from embedlink._runtime.host import host_id
from embedlink.protocol import (
    AUX_FIELD,
    FieldDesc,
    RegionDesc,
    Register,
    Resume,
    StatusUpdate,
    TransferRequest,
    decode,
    encode,
)
from embedlink.tools.workers import make_embedding, same_embedding
from embedlink.transports import get_backend

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
SCHEMA = BufferSchema(hidden_size=32)


@pytest.fixture
def setup(boot):
    enc = EncoderEndpoint(
        SCHEMA,
        bootstrap=boot.address,
        num_blocks=32,
        block_size=128,
        transports=("tcp",),
        room_timeout=20,
    ).start()
    pool = BufferPool(SCHEMA, 16, 128)
    server = get_backend("tcp").server(pool, host="127.0.0.1").start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(f"tcp://{enc.address}")
    names = [*SCHEMA.names, AUX_FIELD]
    sock.send(
        encode(
            Register(
                session="raw",
                rank=0,
                host_id=host_id(),
                schema=[FieldDesc(n, list(s), d) for n, s, d in SCHEMA.describe()],
                block_size=128,
                num_blocks=16,
                regions=[RegionDesc(n, *pool.region(n)) for n in names],
                transports=[server.offer()],
            )
        )
    )
    yield enc, sock, pool
    sock.close()
    ctx.term()
    server.close()
    enc.close()


def recv(sock):
    msg = decode(sock.recv())
    assert isinstance(msg, StatusUpdate)
    return msg


def test_resume_with_wrong_sent_tokens_fails_only_that_room(setup, boot):
    enc, sock, _ = setup
    sock.send(
        encode(
            TransferRequest(
                session="raw", room=1, epoch=5, dst_blocks=list(range(8)), dst_tokens=1024
            )
        )
    )
    tx = enc.sender(1)
    tx.send(make_embedding(SCHEMA, 2000, 0, 1))
    first = recv(sock)
    assert (first.status, first.sent_tokens, first.total_tokens) == (
        Status.Transferring,
        1024,
        2000,
    )
    # junk and an unknown room in between change nothing
    sock.send(b"\xff\x00junk")
    sock.send(
        encode(
            Resume(session="raw", room=999, epoch=1, sent_tokens=5, dst_blocks=[0], dst_tokens=1)
        )
    )
    unknown = recv(sock)
    assert (
        unknown.room == 999 and unknown.status is Status.Failed and "unknown room" in unknown.reason
    )
    assert tx.poll() is Status.Transferring
    # the wrong resume fails room 1 with a reason
    sock.send(
        encode(
            Resume(
                session="raw",
                room=1,
                epoch=5,
                sent_tokens=1000,
                dst_blocks=list(range(8)),
                dst_tokens=1024,
            )
        )
    )
    failed = recv(sock)
    assert failed.status is Status.Failed and "sent_tokens=1000" in failed.reason
    assert tx.wait(5) is Status.Failed and "1024 tokens were delivered" in tx.failure_reason
    assert enc.stats.dropped_messages >= 1
    # the endpoint keeps serving others
    with LanguageEndpoint(SCHEMA, num_blocks=16, transports=("tcp",)) as lang:
        rx = lang.receiver(bootstrap=boot.address, room=2)
        enc.sender(2).send(make_embedding(SCHEMA, 3000, 0, 2))
        assert same_embedding(rx.wait(timeout=20), make_embedding(SCHEMA, 3000, 0, 2))
    assert enc.allocator.wait_all_free(5)
    assert enc.loop_errors == 0


def test_duplicate_resume_is_ignored_over_the_wire(setup):
    enc, sock, pool = setup
    sock.send(
        encode(
            TransferRequest(
                session="raw", room=3, epoch=9, dst_blocks=list(range(4)), dst_tokens=512
            )
        )
    )
    tx = enc.sender(3)
    tx.send(make_embedding(SCHEMA, 900, 0, 3))
    assert recv(sock).sent_tokens == 512
    resume = Resume(
        session="raw",
        room=3,
        epoch=9,
        sent_tokens=512,
        dst_blocks=list(range(4, 8)),
        dst_tokens=512,
    )
    sock.send(encode(resume))
    sock.send(encode(resume))
    last = recv(sock)
    assert (last.status, last.sent_tokens) == (Status.Success, 900)
    assert tx.wait(5) is Status.Success
    want = make_embedding(SCHEMA, 900, 0, 3).token_ids
    assert (pool.array("token_ids")[512:900] == want[512:900]).all()  # blocks 4.. hold the rest
    sock.setsockopt(zmq.RCVTIMEO, 300)
    with pytest.raises(zmq.Again):
        sock.recv()  # the duplicate produced no second write or status
    assert enc.stats.ignored_inputs >= 1


def test_on_request_announces_each_unknown_room_once_and_survives_a_raising_callback(boot):
    """``on_request`` is told about a room a language rank asked for before any
    sender existed, once; a callback that raises is logged, the loop goes on
    and the room is still served when its sender comes."""
    seen = []

    def on_request(room):
        seen.append(room)
        if room == 2:
            raise RuntimeError("callback bug")

    with (
        EncoderEndpoint(
            SCHEMA,
            bootstrap=boot.address,
            num_blocks=32,
            transports=("tcp",),
            on_request=on_request,
        ) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=32, transports=("tcp",)) as lang,
    ):
        rxs = [lang.receiver(bootstrap=boot.address, room=r) for r in (1, 2)]
        deadline = time.monotonic() + 10
        while len(seen) < 2:
            assert time.monotonic() < deadline, seen
            time.sleep(0.01)
        for r in (1, 2):
            enc.sender(r).send(make_embedding(SCHEMA, 300, 0, r))
        for r, rx in zip((1, 2), rxs, strict=True):
            assert same_embedding(rx.wait(timeout=20), make_embedding(SCHEMA, 300, 0, r))
        assert sorted(seen) == [1, 2]
        assert enc.loop_errors == 0
