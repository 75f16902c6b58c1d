"""Torch-backed pools on the CPU: the code path CUDA pools take, tested here."""

import ml_dtypes
import numpy as np
import pytest

from embedlink import BufferPool, BufferSchema

torch = pytest.importorskip("torch", reason="torch not installed (EMBEDLINK_TEST_TORCH=0)")
SCHEMA = BufferSchema(hidden_size=16)


def test_torch_pool_views_share_one_tensor_and_host_memory():
    pool = BufferPool(SCHEMA, 8, 4, device="cpu")
    assert pool.is_torch and pool.on_host
    emb = pool.array("embedding")
    assert isinstance(emb, torch.Tensor) and emb.dtype == torch.bfloat16 and emb.shape == (32, 16)
    assert pool.base_addr == pool.tensor.data_ptr() == pool.backing.ctypes.data
    emb[0, 0] = 1.5
    off = pool.layout["embedding"][0]
    assert pool.backing[off : off + 2].view(ml_dtypes.bfloat16)[0] == 1.5


def test_torch_pool_scatter_gather_roundtrip_numpy_and_tensors():
    pool = BufferPool(SCHEMA, 8, 4, device="cpu")
    data = torch.randn(10, 16).to(torch.bfloat16)
    ids = np.arange(10, dtype=np.int32)
    pool.scatter([5, 6, 1], {"embedding": data, "token_ids": ids})
    out = pool.empty("embedding", 10)
    pool.gather([(20, 8), (4, 2)], "embedding", out, 0)
    assert torch.equal(out, data)
    out_ids = pool.empty("token_ids", 10)
    pool.gather([(20, 8), (4, 2)], "token_ids", out_ids, 0)
    assert torch.equal(out_ids, torch.from_numpy(ids))


def test_torch_pool_aux_and_external_buffer():
    ref = BufferPool(SCHEMA, 4, 4)
    buf = bytearray(ref.nbytes)
    pool = BufferPool(SCHEMA, 4, 4, buffer=buf, device="cpu")
    pool.write_aux(2, total_tokens=5, mrope_position_delta=3, checksum=0, flags=0)
    assert int(pool.read_aux(2)["total_tokens"]) == 5
    assert any(buf)
    with pytest.raises(ValueError, match="host memory"):
        BufferPool(SCHEMA, 4, 4, buffer=buf, device="cuda:0")
