import threading

import ml_dtypes
import numpy as np
import pytest

from embedlink import BlockAllocator, BufferPool, BufferSchema
from embedlink.protocol import AUX_FIELD

SCHEMA = BufferSchema(hidden_size=16)


def test_pool_fields_are_contiguous_arrays_in_one_buffer():
    pool = BufferPool(SCHEMA, num_blocks=8, block_size=4)
    emb = pool.array("embedding")
    assert emb.shape == (32, 16) and emb.dtype == np.dtype(ml_dtypes.bfloat16)
    assert emb.flags.c_contiguous
    addr, nbytes = pool.region("embedding")
    assert nbytes == 32 * 16 * 2 and addr == emb.ctypes.data
    assert pool.array("mrope_positions").shape == (32, 3)
    for name, (off, n) in pool.layout.items():
        assert off % 4096 == 0 and off + n <= pool.nbytes, name
    pool.write_aux(3, total_tokens=77, mrope_position_delta=-2, checksum=9, flags=1)
    rec = pool.read_aux(3)
    assert (int(rec["total_tokens"]), int(rec["mrope_position_delta"])) == (77, -2)
    assert len(pool.field_bytes(AUX_FIELD)) == 8 * 32


def test_pool_scatter_gather_roundtrip_across_non_adjacent_blocks():
    pool = BufferPool(SCHEMA, num_blocks=8, block_size=4)
    data = np.arange(10 * 16, dtype=np.float32).reshape(10, 16).astype(ml_dtypes.bfloat16)
    blocks = [5, 6, 1]
    pool.scatter(blocks, {"embedding": data})
    out = np.zeros_like(data)
    runs = [(20, 8), (4, 2)]
    pool.gather(runs, "embedding", out, 0)
    assert np.array_equal(out.view(np.uint16), data.view(np.uint16))


def test_pool_on_external_buffer_and_size_checks():
    pool0 = BufferPool(SCHEMA, num_blocks=4, block_size=4)
    buf = bytearray(pool0.nbytes)
    pool = BufferPool(SCHEMA, num_blocks=4, block_size=4, buffer=buf)
    pool.array("token_ids")[:] = 7
    assert any(buf)
    with pytest.raises(ValueError, match="smaller"):
        BufferPool(SCHEMA, num_blocks=4, block_size=4, buffer=bytearray(10))
    with pytest.raises(ValueError, match="writable"):
        BufferPool(SCHEMA, num_blocks=4, block_size=4, buffer=bytes(pool0.nbytes))


def test_pool_scatter_rejects_too_many_tokens():
    pool = BufferPool(SCHEMA, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="do not fit"):
        pool.scatter([0], {"token_ids": np.zeros(5, np.int32)})


def test_allocator_prefers_contiguous_runs():
    a = BlockAllocator(16)
    x = a.alloc(4)
    y = a.alloc(4)
    assert x == [0, 1, 2, 3] and y == [4, 5, 6, 7]
    a.free(x)
    assert a.alloc(6) == [8, 9, 10, 11, 12, 13]
    assert a.alloc(4) == [0, 1, 2, 3]


def test_allocator_exhaustion_is_none_not_an_exception():
    a = BlockAllocator(4)
    assert a.alloc(4) is not None
    assert a.alloc(1) is None
    assert a.alloc_up_to(3) is None


def test_allocator_alloc_up_to_takes_what_is_free():
    a = BlockAllocator(4)
    a.alloc(3)
    assert a.alloc_up_to(10) == [3]


def test_allocator_fragmented_allocation_gathers_runs():
    a = BlockAllocator(8)
    blocks = a.alloc(8)
    a.free([blocks[i] for i in (0, 2, 3, 6)])
    got = a.alloc(4)
    assert sorted(got) == [0, 2, 3, 6]
    assert a.num_free == 0


def test_allocator_double_free_and_foreign_blocks_are_errors():
    a = BlockAllocator(4)
    b = a.alloc(2)
    a.free(b)
    with pytest.raises(ValueError, match="not allocated"):
        a.free(b)
    with pytest.raises(ValueError, match="not allocated"):
        a.free([99])
    c = a.alloc(1)
    with pytest.raises(ValueError):
        a.free([c[0], 3])  # all or nothing: 3 is free
    assert a.num_used == 1


def test_allocator_alloc_wait_wakes_on_free():
    a = BlockAllocator(2)
    held = a.alloc(2)
    got = []
    t = threading.Thread(target=lambda: got.append(a.alloc_wait(2, timeout=10)))
    t.start()
    a.free(held)
    t.join(10)
    assert got and got[0] is not None and len(got[0]) == 2


def test_allocator_alloc_wait_times_out_and_rejects_impossible():
    a = BlockAllocator(2)
    a.alloc(2)
    assert a.alloc_wait(1, timeout=0.01) is None
    with pytest.raises(ValueError, match="pool of 2"):
        a.alloc_wait(3, timeout=0.01)


def test_allocator_contiguous_wait_skips_fragments():
    a = BlockAllocator(8)
    blocks = a.alloc(8)
    a.free([blocks[i] for i in (0, 2, 3, 6)])
    assert a.alloc_contiguous_wait(2, timeout=0.01) == [2, 3]
    assert a.alloc_contiguous_wait(2, timeout=0.01) is None  # 0 and 6 are free but apart
    assert a.num_free == 2


def test_allocator_spare_leaves_room_to_grow_in_place():
    a = BlockAllocator(64)
    first = a.alloc_up_to(8, spare=8)
    assert first == list(range(0, 8))  # first fit, blocks 8-15 kept for it
    second = a.alloc_up_to(8, spare=8)
    assert second == list(range(16, 24))  # skips the first one's spare
    assert a.alloc(4) == list(range(8, 12))  # a plain allocation may still take it
    third = a.alloc_up_to(8, spare=8)
    assert third == list(range(32, 40))  # after the second one's spare
    assert a.alloc_at(24, 8) == list(range(24, 32))  # the second grows in place
    a.free(third)  # the third ended: its spare lapses
    assert a.alloc_up_to(8, spare=8) == list(range(32, 40))
    # no run long enough for blocks plus spare: as without it (first fit)
    assert a.alloc_up_to(20, spare=20) == list(range(40, 60))
    with pytest.raises(ValueError):
        a.alloc_up_to(4, spare=-1)
