"""The transfer planner: which bytes go where for one chunk.

Pure arithmetic. A sender holds an embedding of ``total_tokens`` tokens in its
pool, token ``t`` at slot ``t % block_size`` of block ``src_blocks[t //
block_size]``. A destination has reserved ``dst_blocks`` (and at most
``dst_tokens`` tokens of them). Having already delivered ``sent_tokens``, the
next chunk covers tokens ``[sent_tokens, sent_tokens + n)`` where ``n`` is
whatever fits; chunk token ``i`` lands at slot ``i % block_size`` of block
``dst_blocks[i // block_size]``.

Copies of tokens that are consecutive on *both* sides are merged into one
operation per field, so a contiguous reservation costs one copy per field. The
first chunk (``sent_tokens == 0``) also carries the room's aux record, from the
aux slot of the first source block to the aux slot of the first destination
block.

Guarantees (property-tested): across any sequence of chunks every token of
every field is copied exactly once; no copy writes outside the destination
reservation or reads past the embedding's own tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import PlanError
from .layout import AUX_FIELD, AUX_SIZE, BufferSchema
from .types import BlockId

__all__ = ["Copy", "Plan", "Segment", "plan_chunk", "token_segments"]


@dataclass(frozen=True, slots=True)
class Copy:
    """Copy ``length`` bytes of ``field`` from ``src_offset`` to ``dst_offset``.

    Offsets are bytes from the start of that field's array in the source and
    the destination pool respectively.
    """

    field: str
    src_offset: int
    dst_offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of ``count`` tokens, consecutive in both pools (token indices)."""

    src_token: int
    dst_token: int
    count: int


@dataclass(frozen=True, slots=True)
class Plan:
    """One chunk: its copies, the token range it covers and whether it ends the room."""

    copies: tuple[Copy, ...]
    segments: tuple[Segment, ...]
    start_token: int
    tokens: int
    is_last: bool

    @property
    def end_token(self) -> int:
        """``sent_tokens`` after this chunk is delivered."""
        return self.start_token + self.tokens

    @property
    def nbytes(self) -> int:
        return sum(c.length for c in self.copies)


def _check_blocks(name: str, blocks: Sequence[BlockId], num_blocks: int | None) -> None:
    seen: set[int] = set()
    for b in blocks:
        if not isinstance(b, int) or b < 0 or (num_blocks is not None and b >= num_blocks):
            raise PlanError(f"{name}: block {b!r} outside the pool of {num_blocks} blocks")
        if b in seen:
            raise PlanError(f"{name}: block {b} listed twice")
        seen.add(b)


def token_segments(
    *,
    block_size: int,
    start_token: int,
    count: int,
    src_blocks: Sequence[BlockId],
    dst_blocks: Sequence[BlockId],
) -> tuple[Segment, ...]:
    """Map tokens ``[start_token, start_token + count)`` of the source onto
    chunk positions ``[0, count)`` of the destination, as maximal runs that are
    consecutive in both pools. Callers check bounds first."""
    bs = block_size
    out: list[Segment] = []
    i = 0
    while i < count:
        s = start_token + i
        s_off = s % bs
        d_off = i % bs
        run = min(bs - s_off, bs - d_off, count - i)
        src_tok = src_blocks[s // bs] * bs + s_off
        dst_tok = dst_blocks[i // bs] * bs + d_off
        if out:
            prev = out[-1]
            if prev.src_token + prev.count == src_tok and prev.dst_token + prev.count == dst_tok:
                out[-1] = Segment(prev.src_token, prev.dst_token, prev.count + run)
                i += run
                continue
        out.append(Segment(src_tok, dst_tok, run))
        i += run
    return tuple(out)


def plan_chunk(
    *,
    schema: BufferSchema,
    block_size: int,
    total_tokens: int,
    sent_tokens: int,
    src_blocks: Sequence[BlockId],
    dst_blocks: Sequence[BlockId],
    dst_tokens: int | None = None,
    src_num_blocks: int | None = None,
    dst_num_blocks: int | None = None,
) -> Plan:
    """Plan the next chunk of a room.

    ``dst_tokens`` caps the reservation below the capacity of ``dst_blocks``
    (default: the full capacity). ``*_num_blocks`` bound block ids when given.
    Raises :class:`PlanError` when the arguments are inconsistent (nothing left
    to send, no room at the destination, blocks out of range or repeated, too
    few source blocks for ``total_tokens``); a plan is never partial.
    """
    if block_size <= 0:
        raise PlanError(f"block_size must be positive, got {block_size}")
    if total_tokens <= 0:
        raise PlanError(f"total_tokens must be positive, got {total_tokens}")
    if not 0 <= sent_tokens < total_tokens:
        raise PlanError(f"sent_tokens={sent_tokens} outside [0, total_tokens={total_tokens})")
    _check_blocks("src_blocks", src_blocks, src_num_blocks)
    _check_blocks("dst_blocks", dst_blocks, dst_num_blocks)
    if len(src_blocks) * block_size < total_tokens:
        raise PlanError(
            f"{len(src_blocks)} source blocks of {block_size} cannot hold {total_tokens} tokens"
        )
    capacity = len(dst_blocks) * block_size
    if dst_tokens is None:
        dst_tokens = capacity
    if not 0 < dst_tokens <= capacity:
        raise PlanError(f"dst_tokens={dst_tokens} outside (0, {capacity}] of the reservation")

    count = min(total_tokens - sent_tokens, dst_tokens)
    segments = token_segments(
        block_size=block_size,
        start_token=sent_tokens,
        count=count,
        src_blocks=src_blocks,
        dst_blocks=dst_blocks,
    )
    copies: list[Copy] = []
    for f in schema.fields:
        tb = f.token_bytes
        copies.extend(
            Copy(f.name, seg.src_token * tb, seg.dst_token * tb, seg.count * tb) for seg in segments
        )
    if sent_tokens == 0:
        copies.append(Copy(AUX_FIELD, src_blocks[0] * AUX_SIZE, dst_blocks[0] * AUX_SIZE, AUX_SIZE))
    return Plan(
        copies=tuple(copies),
        segments=segments,
        start_token=sent_tokens,
        tokens=count,
        is_last=sent_tokens + count == total_tokens,
    )
