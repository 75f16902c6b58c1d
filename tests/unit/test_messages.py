import msgspec
import pytest

from embedlink import RemoteProtocolError, Status
from embedlink.protocol import (
    MAX_BLOCKS,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Abort,
    FieldDesc,
    Heartbeat,
    Register,
    Resume,
    StatusUpdate,
    TransferRequest,
    TransportOffer,
    decode,
    encode,
)
from embedlink.protocol.messages import RegionDesc

EXAMPLES = [
    Register(
        session="lang-0",
        rank=1,
        host_id="boot:host",
        schema=[FieldDesc("embedding", [3584], "bfloat16"), FieldDesc("token_ids", [], "int32")],
        block_size=128,
        num_blocks=64,
        regions=[RegionDesc("embedding", 1 << 40, 4096)],
        transports=[TransportOffer("tcp", {"host": "127.0.0.1", "port": "5000"})],
    ),
    TransferRequest(session="s", room=42, epoch=7, dst_blocks=[1, 2, 3], dst_tokens=300),
    Resume(session="s", room=42, epoch=7, sent_tokens=1024, dst_blocks=[9], dst_tokens=100),
    StatusUpdate(room=42, epoch=7, status=Status.Transferring, sent_tokens=1024, total_tokens=2000),
    StatusUpdate(room=1, epoch=7, status=Status.Failed, sent_tokens=0, total_tokens=0, reason="x"),
    Abort(session="s", room=42, epoch=7, reason="user"),
    Heartbeat(session="s", seq=3),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_messages_roundtrip(msg):
    assert decode(encode(msg)) == msg


def test_messages_carry_kind_and_version():
    raw = msgspec.msgpack.decode(encode(EXAMPLES[1]))
    assert raw["kind"] == "request"
    assert raw["version"] == PROTOCOL_VERSION


def _raw(msg, **changes):
    d = msgspec.msgpack.decode(encode(msg))
    d.update(changes)
    return msgspec.msgpack.encode(d)


def _err(data):
    with pytest.raises(RemoteProtocolError) as ei:
        decode(data)
    return ei.value


def test_messages_unknown_version_names_version():
    e = _err(_raw(EXAMPLES[1], version=PROTOCOL_VERSION + 1))
    assert e.field == "version"
    assert "unsupported protocol version" in e.why


def test_messages_unknown_kind_names_kind():
    assert _err(_raw(EXAMPLES[1], kind="teleport")).field == "kind"


def test_messages_negative_count_names_field():
    e = _err(_raw(EXAMPLES[2], sent_tokens=-5))
    assert e.field == "sent_tokens"


def test_messages_absurd_count_names_field():
    assert _err(_raw(EXAMPLES[1], dst_tokens=1 << 40)).field == "dst_tokens"


def test_messages_wrong_type_names_field():
    assert _err(_raw(EXAMPLES[1], room="forty-two")).field == "room"


def test_messages_block_list_over_bound():
    e = _err(_raw(EXAMPLES[1], dst_blocks=list(range(MAX_BLOCKS + 1))))
    assert e.field == "dst_blocks"


def test_messages_oversized_message_rejected_before_parsing():
    e = _err(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    assert e.field == "$" and "limit" in e.why


def test_messages_duplicate_blocks_rejected():
    assert _err(_raw(EXAMPLES[1], dst_blocks=[1, 1])).field == "dst_blocks"


def test_messages_status_beyond_total_rejected():
    assert _err(_raw(EXAMPLES[3], sent_tokens=5000)).field == "sent_tokens"


def test_messages_failed_status_needs_reason():
    assert _err(_raw(EXAMPLES[4], reason=None)).field == "reason"


def test_messages_unknown_status_value_rejected():
    assert _err(_raw(EXAMPLES[3], status=9)).field == "status"


def test_messages_missing_field_named():
    d = msgspec.msgpack.decode(encode(EXAMPLES[1]))
    del d["epoch"]
    assert "epoch" in str(_err(msgspec.msgpack.encode(d)))


@pytest.mark.parametrize("junk", [b"", b"\xc1", b"\x93\x01\x02\x03", b"hello", b"\x80"])
def test_messages_garbage_raises_remote_protocol_error(junk):
    _err(junk)


def test_messages_non_bytes_rejected():
    _err(12345)  # type: ignore[arg-type]
