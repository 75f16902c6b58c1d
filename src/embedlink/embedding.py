"""The user-facing embedding: what ``Sender.send`` takes and ``Receiver.wait`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .protocol import BufferSchema

__all__ = ["Embedding", "to_pool_arrays"]

#: Fields stored per token as ``[n, 3]`` in the pool but given as ``[3, n]`` by users.
_TRANSPOSED = ("mrope_positions",)


@dataclass
class Embedding:
    """One request's embedding.

    ``embedding``: ``[n, hidden]``; ``token_ids``: ``[n]`` int32;
    ``mrope_positions``: ``[3, n]`` int32; ``extra``: further schema fields
    (``[n, *shape]``), e.g. ``deepstack``. Arrays are numpy (bfloat16 via
    ml_dtypes) or torch tensors. ``mrope_position_delta`` travels in the aux
    record.
    """

    embedding: Any
    token_ids: Any = None
    mrope_positions: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    mrope_position_delta: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.embedding.shape[0])

    def get(self, name: str) -> Any:
        if name == "embedding":
            return self.embedding
        if name == "token_ids":
            return self.token_ids
        if name == "mrope_positions":
            return self.mrope_positions
        return self.extra.get(name)


def _to_numpy(name: str, value: Any) -> np.ndarray[Any, Any]:
    mod = type(value).__module__
    if mod.startswith("torch"):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if str(t.dtype) == "torch.bfloat16":
            import ml_dtypes

            return np.asarray(t.contiguous().view(dtype=_torch_int16(t)).numpy()).view(
                ml_dtypes.bfloat16
            )
        return np.asarray(t.contiguous().numpy())
    if isinstance(value, np.ndarray):
        return value
    raise ValueError(
        f"field {name!r}: expected a numpy array or torch tensor, got {type(value).__name__}"
    )


def _torch_int16(t: Any) -> Any:
    import torch  # only reached when a torch tensor was passed in

    return torch.int16


def to_pool_arrays(
    emb: Embedding, schema: BufferSchema
) -> tuple[int, dict[str, np.ndarray[Any, Any]]]:
    """Check ``emb`` against ``schema`` and return ``(n_tokens, {field: [n, *shape]})``.

    Raises ValueError naming the field on a missing field, wrong shape or
    wrong dtype.
    """
    if emb.embedding is None:
        raise ValueError("field 'embedding' is missing")
    known = set(schema.names)
    for name in emb.extra:
        if name not in known:
            raise ValueError(f"field {name!r} is not in the schema {list(schema.names)}")
    n: int | None = None
    out: dict[str, np.ndarray[Any, Any]] = {}
    for f in schema.fields:
        value = emb.get(f.name)
        if value is None:
            raise ValueError(f"field {f.name!r} is missing")
        arr = _to_numpy(f.name, value)
        if f.name in _TRANSPOSED:
            if arr.ndim != 2 or arr.shape[0] != f.shape[0]:
                raise ValueError(
                    f"field {f.name!r}: expected shape [{f.shape[0]}, n], got {list(arr.shape)}"
                )
            arr = arr.T
        if arr.ndim != 1 + len(f.shape) or tuple(arr.shape[1:]) != f.shape:
            raise ValueError(
                f"field {f.name!r}: expected shape [n, {', '.join(map(str, f.shape))}]".replace(
                    ", ]", "]"
                )
                + f", got {list(arr.shape)}"
            )
        if arr.dtype != f.np_dtype:
            raise ValueError(f"field {f.name!r}: expected dtype {f.dtype}, got {arr.dtype}")
        if n is None:
            n = int(arr.shape[0])
        elif arr.shape[0] != n:
            raise ValueError(f"field {f.name!r} has {arr.shape[0]} tokens, 'embedding' has {n}")
        out[f.name] = arr
    assert n is not None
    if n <= 0:
        raise ValueError("the embedding has no tokens")
    return n, out


def from_pool_arrays(arrays: dict[str, np.ndarray[Any, Any]], delta: int) -> Embedding:
    """Inverse of :func:`to_pool_arrays` for a reassembled result."""
    extra = {k: v for k, v in arrays.items() if k not in ("embedding", "token_ids", *_TRANSPOSED)}
    mrope = arrays.get("mrope_positions")
    return Embedding(
        embedding=arrays.get("embedding"),
        token_ids=arrays.get("token_ids"),
        mrope_positions=None if mrope is None else np.ascontiguousarray(mrope.T),
        extra=extra,
        mrope_position_delta=delta,
    )
