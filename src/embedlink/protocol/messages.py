"""Typed, versioned control messages and their wire encoding.

Every control message is a msgspec ``Struct`` encoded as a MessagePack map with
a ``kind`` tag and a ``version``. :func:`decode` is the only way bytes from a
peer become a message, and it raises exactly one exception type,
:class:`~embedlink.protocol.errors.RemoteProtocolError`, naming the field and
why, for anything malformed: random bytes, wrong types, an unknown kind or
version, negative or absurd counts, block lists over :data:`MAX_BLOCKS`, a
message over :data:`MAX_MESSAGE_BYTES`.

Who sends what::

    language (receiver)                       encoder (sender)
      Register        ------------------->    (once per session: pool layout, transports)
      TransferRequest ------------------->    (per room and destination rank)
                      <-------------------    StatusUpdate (after each chunk is written)
      Resume          ------------------->    (sent_tokens > 0, fresh blocks)
      Abort           <------------------>    (either way)
      Heartbeat       <------------------>    (liveness; the peer answers in kind)
"""

from __future__ import annotations

import re
from typing import Annotated, Final, TypeAlias, cast

import msgspec
from msgspec import Meta

from .errors import RemoteProtocolError
from .status import Status

__all__ = [
    "MAX_BLOCKS",
    "MAX_MESSAGE_BYTES",
    "MAX_META_BYTES",
    "MAX_TOKENS",
    "PROTOCOL_VERSION",
    "Abort",
    "FieldDesc",
    "Heartbeat",
    "Message",
    "RegionDesc",
    "Register",
    "Resume",
    "StatusUpdate",
    "TransferRequest",
    "TransportOffer",
    "decode",
    "encode",
]

#: Wire protocol version. Bump on any incompatible change and record it here.
#:
#: Version history:
#:   1 - initial: Register, TransferRequest, Resume, StatusUpdate, Abort, Heartbeat
#:       (Heartbeat.registered, defaulting to true, and StatusUpdate.meta,
#:       defaulting to none, were added before any release).
PROTOCOL_VERSION: Final = 1

#: Largest control message accepted, in bytes.
MAX_MESSAGE_BYTES: Final = 1 << 20
#: Most block ids one message may carry.
MAX_BLOCKS: Final = 1 << 16
#: Most tokens one room may have.
MAX_TOKENS: Final = 1 << 26
#: Most destination ranks one room may have.
MAX_RANKS: Final = 4096
#: Most bytes a sender may attach to one embedding (:attr:`StatusUpdate.meta`).
MAX_META_BYTES: Final = 1 << 16
_MAX_STR: Final = 256
_MAX_REASON: Final = 4096

RoomT: TypeAlias = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
EpochT: TypeAlias = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
TokensT: TypeAlias = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
BlockT: TypeAlias = Annotated[int, Meta(ge=0, lt=1 << 31)]
BlocksT: TypeAlias = Annotated[list[BlockT], Meta(max_length=MAX_BLOCKS)]
RankT: TypeAlias = Annotated[int, Meta(ge=0, lt=MAX_RANKS)]
StrT: TypeAlias = Annotated[str, Meta(max_length=_MAX_STR)]
SessionT: TypeAlias = Annotated[str, Meta(min_length=1, max_length=_MAX_STR)]
ReasonT: TypeAlias = Annotated[str, Meta(max_length=_MAX_REASON)]


class _Msg(msgspec.Struct, frozen=True, tag_field="kind", kw_only=True):
    version: int = PROTOCOL_VERSION


class FieldDesc(msgspec.Struct, frozen=True):
    """One schema field: name, per-token shape, dtype name."""

    name: StrT
    shape: Annotated[list[Annotated[int, Meta(ge=1, le=1 << 24)]], Meta(max_length=8)]
    dtype: StrT


class RegionDesc(msgspec.Struct, frozen=True):
    """Where one field's array lives in the receiver's address space."""

    field: StrT
    addr: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
    nbytes: Annotated[int, Meta(ge=0, lt=1 << 48)]


class TransportOffer(msgspec.Struct, frozen=True):
    """A data plane the receiver offers, with what a sender needs to reach it."""

    name: StrT
    params: Annotated[dict[StrT, Annotated[str, Meta(max_length=4096)]], Meta(max_length=32)] = {}


class Register(_Msg, frozen=True, tag="register"):
    """Receiver -> sender, once per session: the receiver's pool and transports."""

    session: SessionT
    rank: RankT
    host_id: StrT
    schema: Annotated[list[FieldDesc], Meta(min_length=1, max_length=64)]
    block_size: Annotated[int, Meta(ge=1, le=1 << 20)]
    num_blocks: Annotated[int, Meta(ge=1, le=1 << 31)]
    regions: Annotated[list[RegionDesc], Meta(max_length=65)]
    transports: Annotated[list[TransportOffer], Meta(min_length=1, max_length=16)]


class TransferRequest(_Msg, frozen=True, tag="request"):
    """Receiver -> sender: "room ``room`` may write into these blocks of mine"."""

    session: SessionT
    room: RoomT
    epoch: EpochT
    dst_blocks: BlocksT
    dst_tokens: TokensT
    required_dst_info_num: Annotated[int, Meta(ge=1, le=MAX_RANKS)] = 1


class Resume(_Msg, frozen=True, tag="resume"):
    """Receiver -> sender: "I hold ``sent_tokens``; continue into these blocks"."""

    session: SessionT
    room: RoomT
    epoch: EpochT
    sent_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
    dst_blocks: BlocksT
    dst_tokens: TokensT


class StatusUpdate(_Msg, frozen=True, tag="status"):
    """Sender -> receiver: the room's status as seen from this destination.

    ``sent_tokens`` is how many tokens this destination now holds in total, so
    a new partial chunk is told from an old one while the status stays
    ``Transferring`` across resumes.
    """

    room: RoomT
    epoch: EpochT
    status: Status
    sent_tokens: TokensT
    total_tokens: TokensT
    reason: ReasonT | None = None
    #: what the sender attached to the embedding (an engine's per-item
    #: metadata), on the first chunk's update only
    meta: Annotated[bytes, Meta(max_length=MAX_META_BYTES)] | None = None


class Abort(_Msg, frozen=True, tag="abort"):
    """Either way: the room is abandoned; the peer fails it with ``reason``."""

    session: SessionT
    room: RoomT
    epoch: EpochT
    reason: ReasonT


class Heartbeat(_Msg, frozen=True, tag="heartbeat"):
    """Either way: liveness. ``reply`` asks the peer to answer with a heartbeat.
    In an answer, ``registered=False`` tells the language side the encoder does
    not (or no longer) know its session, so it must send ``Register`` again."""

    session: SessionT
    seq: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
    reply: bool = True
    registered: bool = True


Message: TypeAlias = Register | TransferRequest | Resume | StatusUpdate | Abort | Heartbeat

_TYPES: Final[dict[str, type[_Msg]]] = {
    "register": Register,
    "request": TransferRequest,
    "resume": Resume,
    "status": StatusUpdate,
    "abort": Abort,
    "heartbeat": Heartbeat,
}


class _Header(msgspec.Struct):
    kind: str
    version: int


_ENCODER = msgspec.msgpack.Encoder()
_HEADER = msgspec.msgpack.Decoder(_Header)
_DECODERS: Final = {k: msgspec.msgpack.Decoder(t) for k, t in _TYPES.items()}
_PATH = re.compile(r"at `\$\.?([^`]*)`")


def encode(msg: Message) -> bytes:
    """Serialise a message. Inverse of :func:`decode`."""
    return _ENCODER.encode(msg)


def _field_of(err: Exception) -> str:
    m = _PATH.search(str(err))
    return (m.group(1) or "$") if m else "$"


def _semantic_checks(msg: Message) -> None:
    if isinstance(msg, TransferRequest | Resume):
        if len(set(msg.dst_blocks)) != len(msg.dst_blocks):
            raise RemoteProtocolError("dst_blocks", "a block id is listed twice")
        if msg.dst_tokens <= 0:
            raise RemoteProtocolError("dst_tokens", "a reservation must hold at least one token")
    elif isinstance(msg, StatusUpdate):
        if msg.sent_tokens > msg.total_tokens:
            raise RemoteProtocolError(
                "sent_tokens", f"{msg.sent_tokens} exceeds total_tokens={msg.total_tokens}"
            )
        if msg.status is Status.Failed and not msg.reason:
            raise RemoteProtocolError("reason", "a Failed status must carry a reason")
    elif isinstance(msg, Register):
        names = [f.name for f in msg.schema]
        if len(set(names)) != len(names):
            raise RemoteProtocolError("schema", "duplicate field names")


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse one control message from a peer.

    Raises :class:`RemoteProtocolError` and nothing else for any input that is
    not a well-formed message of this protocol version.
    """
    try:
        size = len(data)
    except Exception:
        raise RemoteProtocolError("$", f"not bytes but {type(data).__name__}") from None
    if size > MAX_MESSAGE_BYTES:
        raise RemoteProtocolError("$", f"{size} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        header = _HEADER.decode(data)
    except msgspec.ValidationError as exc:
        field = _field_of(exc)
        raise RemoteProtocolError(field, f"bad header: {exc}") from None
    except Exception as exc:
        raise RemoteProtocolError("$", f"undecodable: {exc}") from None
    if header.version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            "version",
            f"unsupported protocol version {header.version}; this side speaks {PROTOCOL_VERSION}",
        )
    decoder = _DECODERS.get(header.kind)
    if decoder is None:
        raise RemoteProtocolError("kind", f"unknown message kind {header.kind[:64]!r}")
    try:
        msg = cast(Message, decoder.decode(data))
    except msgspec.ValidationError as exc:
        raise RemoteProtocolError(_field_of(exc), str(exc)) from None
    except Exception as exc:
        raise RemoteProtocolError("$", f"undecodable: {exc}") from None
    _semantic_checks(msg)
    return msg
