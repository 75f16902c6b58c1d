import msgspec
from hypothesis import given
from hypothesis import strategies as st

from embedlink import RemoteProtocolError, Status
from embedlink.protocol import (
    Abort,
    Heartbeat,
    Resume,
    StatusUpdate,
    TransferRequest,
    decode,
    encode,
)

ids = st.integers(0, (1 << 63) - 1)
tokens = st.integers(1, 1 << 20)
blocks = st.lists(st.integers(0, (1 << 31) - 1), max_size=50, unique=True)
session = st.text(min_size=1, max_size=20)


@st.composite
def status_updates(draw):
    total = draw(st.integers(0, 1 << 20))
    sent = draw(st.integers(0, total))
    status = draw(st.sampled_from(list(Status)))
    reason = (
        draw(st.text(min_size=1, max_size=30))
        if status is Status.Failed
        else draw(st.one_of(st.none(), st.text(max_size=30)))
    )
    return StatusUpdate(
        room=draw(ids),
        epoch=draw(ids),
        status=status,
        sent_tokens=sent,
        total_tokens=total,
        reason=reason,
    )


messages = st.one_of(
    st.builds(
        TransferRequest,
        session=session,
        room=ids,
        epoch=ids,
        dst_blocks=blocks,
        dst_tokens=tokens,
        required_dst_info_num=st.integers(1, 64),
    ),
    st.builds(
        Resume,
        session=session,
        room=ids,
        epoch=ids,
        sent_tokens=tokens,
        dst_blocks=blocks,
        dst_tokens=tokens,
    ),
    status_updates(),
    st.builds(Abort, session=session, room=ids, epoch=ids, reason=st.text(max_size=50)),
    st.builds(Heartbeat, session=session, seq=ids, reply=st.booleans()),
)


@given(messages)
def test_decode_encode_roundtrip(msg):
    assert decode(encode(msg)) == msg


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_remote_protocol_error(data):
    try:
        msg = decode(data)
    except RemoteProtocolError:
        return
    # whatever decodes is a well-formed message of this protocol
    assert decode(encode(msg)) == msg


@given(messages, st.data())
def test_mutated_messages_raise_only_remote_protocol_error(msg, data):
    raw = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[i:]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    try:
        out = decode(bytes(raw))
    except RemoteProtocolError:
        return
    # Whatever survives mutation is a well-formed message of this protocol.
    assert decode(encode(out)) == out


any_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)


@given(
    st.sampled_from(["request", "resume", "status", "abort", "heartbeat", "register"]),
    st.dictionaries(
        st.sampled_from(
            [
                "room",
                "epoch",
                "session",
                "status",
                "sent_tokens",
                "total_tokens",
                "dst_blocks",
                "dst_tokens",
                "reason",
                "schema",
                "seq",
            ]
        ),
        any_value,
        max_size=8,
    ),
)
def test_wrong_typed_fields_raise_only_remote_protocol_error(kind, fields):
    data = msgspec.msgpack.encode({"kind": kind, "version": 1, **fields})
    try:
        msg = decode(data)
    except RemoteProtocolError as e:
        assert e.field
        return
    assert decode(encode(msg)) == msg
