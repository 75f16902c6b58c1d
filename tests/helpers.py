import ml_dtypes
import numpy as np

from embedlink import BufferSchema
from embedlink.testing.sim import Link

SCHEMA = BufferSchema(hidden_size=8)


def embedding(n, seed=0, schema=SCHEMA):
    rng = np.random.default_rng(seed)
    out = {}
    for f in schema.fields:
        raw = rng.integers(0, 256, size=n * f.token_bytes, dtype=np.uint8)
        out[f.name] = raw.view(f.np_dtype).reshape((n, *f.shape))
    return out


def same_bytes(a, b):
    return all(np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)) for k in b)


def make_link(n_dst=1, receiver_blocks=64, default_tokens=1024, block_size=128, timeout=30.0):
    link = Link(
        SCHEMA,
        block_size=block_size,
        sender_blocks=128,
        receiver_blocks=receiver_blocks,
        default_tokens=default_tokens,
        n_dst=n_dst,
        timeout=timeout,
    )
    return link


__all__ = ["SCHEMA", "embedding", "make_link", "ml_dtypes", "same_bytes"]
