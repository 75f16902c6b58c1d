"""Across any sequence of resumes with random reservation sizes the planner
copies every token of every field exactly once, byte for byte, on real pools,
and never writes outside the destination reservation."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from embedlink import BufferPool, BufferSchema
from embedlink.memory import Borrowed
from embedlink.protocol import AUX_FIELD, AUX_SIZE, plan_chunk

SCHEMA = BufferSchema(hidden_size=3, dtype="bfloat16", extra_fields={"deep": ((2,), "int8")})


@st.composite
def scenarios(draw):
    bs = draw(st.integers(1, 8))
    total = draw(st.integers(1, 60))
    src_n = -(-total // bs)
    pool_blocks = src_n + draw(st.integers(0, 6))
    src_blocks = draw(st.permutations(list(range(pool_blocks))))[:src_n]
    dst_pool_blocks = draw(st.integers(1, 12))
    return bs, total, pool_blocks, src_blocks, dst_pool_blocks


@given(scenarios(), st.data())
def test_every_token_of_every_field_copied_exactly_once(sc, data):
    bs, total, pool_blocks, src_blocks, dst_pool_blocks = sc
    src = BufferPool(SCHEMA, pool_blocks, bs)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    src.backing[:] = rng.integers(0, 256, size=src.nbytes, dtype=np.uint8)
    dst = BufferPool(SCHEMA, dst_pool_blocks, bs)
    result = {f.name: bytearray(total * f.token_bytes) for f in SCHEMA.fields}
    covered = {f.name: np.zeros(total * f.token_bytes, dtype=np.int32) for f in SCHEMA.fields}
    sent = 0
    while sent < total:
        n_blocks = data.draw(st.integers(1, dst_pool_blocks))
        dst_blocks = data.draw(st.permutations(list(range(dst_pool_blocks))))[:n_blocks]
        dst_tokens = data.draw(st.integers(1, n_blocks * bs))
        plan = plan_chunk(
            schema=SCHEMA,
            block_size=bs,
            total_tokens=total,
            sent_tokens=sent,
            src_blocks=src_blocks,
            dst_blocks=dst_blocks,
            dst_tokens=dst_tokens,
            src_num_blocks=pool_blocks,
            dst_num_blocks=dst_pool_blocks,
        )
        dst.backing[:] = 0xEE
        for c in plan.copies:
            s_mv, d_mv = src.field_bytes(c.field), dst.field_bytes(c.field)
            d_mv[c.dst_offset : c.dst_offset + c.length] = s_mv[
                c.src_offset : c.src_offset + c.length
            ]
            if c.field == AUX_FIELD:
                assert sent == 0 and c.length == AUX_SIZE
                assert c.src_offset == src_blocks[0] * AUX_SIZE
                assert c.dst_offset == dst_blocks[0] * AUX_SIZE
                continue
            tb = SCHEMA.field(c.field).token_bytes
            # inside the reservation: every byte lies in one of the first dst_tokens slots
            for off in range(c.dst_offset, c.dst_offset + c.length, tb):
                tok = off // tb
                blk, slot = divmod(tok, bs)
                assert blk in dst_blocks
                assert dst_blocks.index(blk) * bs + slot < dst_tokens
            # never reads past the embedding's own tokens
            for off in range(c.src_offset, c.src_offset + c.length, tb):
                blk, slot = divmod(off // tb, bs)
                assert src_blocks.index(blk) * bs + slot < total
        assert plan.tokens == min(total - sent, dst_tokens)
        # Harvest: chunk token i sits at dst_blocks[i // bs] slot i % bs.
        for f in SCHEMA.fields:
            tb = f.token_bytes
            arr = dst.field_bytes(f.name)
            for i in range(plan.tokens):
                p = dst_blocks[i // bs] * bs + i % bs
                t = sent + i
                result[f.name][t * tb : (t + 1) * tb] = arr[p * tb : (p + 1) * tb]
                covered[f.name][t * tb : (t + 1) * tb] += 1
        sent = plan.end_token
        assert plan.is_last == (sent == total)
    for f in SCHEMA.fields:
        tb = f.token_bytes
        expect = bytearray()
        s_mv = src.field_bytes(f.name)
        for t in range(total):
            p = src_blocks[t // bs] * bs + t % bs
            expect += s_mv[p * tb : (p + 1) * tb]
        assert bytes(result[f.name]) == bytes(expect), f.name
        assert (covered[f.name] == 1).all(), f.name


@given(scenarios(), st.data())
def test_a_borrowed_payload_gives_each_copy_the_bytes_the_pool_would(sc, data):
    """``Borrowed.sources`` (a room read from the caller's arrays) yields, for
    every copy of every chunk, exactly the bytes the same copy reads from a
    pool the payload was scattered into."""
    bs, total, pool_blocks, src_blocks, dst_pool_blocks = sc
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    arrays = {}
    for f in SCHEMA.fields:
        raw = rng.integers(0, 256, size=total * f.token_bytes, dtype=np.uint8)
        arrays[f.name] = raw.view(f.np_dtype).reshape((total, *f.shape))
    placed = BufferPool(SCHEMA, pool_blocks, bs)
    placed.scatter(src_blocks, arrays)
    lent_pool = BufferPool(SCHEMA, pool_blocks, bs)
    lent_pool.field_bytes(AUX_FIELD)[:] = placed.field_bytes(AUX_FIELD)  # the aux stays pooled
    lent = Borrowed(lent_pool, src_blocks, arrays)
    sent = 0
    while sent < total:
        n_blocks = data.draw(st.integers(1, dst_pool_blocks))
        dst_blocks = data.draw(st.permutations(list(range(dst_pool_blocks))))[:n_blocks]
        plan = plan_chunk(
            schema=SCHEMA,
            block_size=bs,
            total_tokens=total,
            sent_tokens=sent,
            src_blocks=src_blocks,
            dst_blocks=dst_blocks,
            dst_tokens=data.draw(st.integers(1, n_blocks * bs)),
        )
        got = lent.sources(plan.copies, plan.start_token, [s.count for s in plan.segments])
        assert len(got) == len(plan.copies)
        for c, g in zip(plan.copies, got, strict=True):
            want = placed.field_bytes(c.field)[c.src_offset : c.src_offset + c.length]
            assert bytes(g) == bytes(want)
        sent = plan.end_token
    assert not np.any(lent_pool.array("embedding").view(np.uint16))  # never written
    lent.place()
    for f in SCHEMA.fields:
        assert bytes(lent_pool.field_bytes(f.name)) == bytes(placed.field_bytes(f.name))
