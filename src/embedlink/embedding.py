"""The user-facing embedding: what ``Sender.send`` takes and ``Receiver.wait`` returns."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from . import _torch
from .protocol import BufferSchema, resolve_dtype

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


def _to_numpy(name: str, value: Any, np_dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    if _torch.is_tensor(value):
        if str(value.dtype).removeprefix("torch.") != _dtype_name(np_dtype):
            raise ValueError(
                f"field {name!r}: expected dtype {_dtype_name(np_dtype)}, got {value.dtype}"
            )
        return _torch.to_host_numpy(value, np_dtype)
    if isinstance(value, np.ndarray):
        return value
    raise ValueError(
        f"field {name!r}: expected a numpy array or torch tensor, got {type(value).__name__}"
    )


def _dtype_name(dt: np.dtype[Any]) -> str:
    return "bfloat16" if dt == np.dtype(ml_dtypes.bfloat16) else str(dt)


def _to_tensor(name: str, value: Any, dtype: str, device: str) -> Any:
    t = _torch.torch()
    if _torch.is_tensor(value):
        if str(value.dtype).removeprefix("torch.") != dtype:
            raise ValueError(f"field {name!r}: expected dtype {dtype}, got {value.dtype}")
        return value
    if isinstance(value, np.ndarray):
        want = resolve_dtype(dtype)
        if value.dtype != want:
            raise ValueError(f"field {name!r}: expected dtype {dtype}, got {value.dtype}")
        arr = np.ascontiguousarray(value)
        with warnings.catch_warnings():
            # read-only input is fine: it is only read, by the copy into the pool
            warnings.simplefilter("ignore", UserWarning)
            if dtype == "bfloat16":
                return t.from_numpy(arr.view(np.int16)).view(t.bfloat16)
            return t.from_numpy(arr)
    raise ValueError(
        f"field {name!r}: expected a numpy array or torch tensor, got {type(value).__name__}"
    )


def to_pool_arrays(
    emb: Embedding, schema: BufferSchema, torch_device: str | None = None
) -> tuple[int, dict[str, Any]]:
    """Check ``emb`` against ``schema`` and return ``(n_tokens, {field: [n, *shape]})``:
    numpy arrays, or torch tensors when ``torch_device`` is given (the pool is
    a torch pool; the copy into it moves them to its device).

    Raises ValueError naming the field on a missing field, wrong shape or
    wrong dtype.
    """
    if emb.embedding is None and "embedding" in schema.names:
        raise ValueError("field 'embedding' is missing")
    known = set(schema.names)
    for name in emb.extra:
        if name not in known:
            raise ValueError(f"field {name!r} is not in the schema {list(schema.names)}")
    n: int | None = None
    out: dict[str, Any] = {}
    for f in schema.fields:
        value = emb.get(f.name)
        if value is None:
            raise ValueError(f"field {f.name!r} is missing")
        if torch_device is not None:
            arr: Any = _to_tensor(f.name, value, f.dtype, torch_device)
        else:
            arr = _to_numpy(f.name, value, f.np_dtype)
        if f.name in _TRANSPOSED:
            if arr.ndim != 2 or arr.shape[0] != f.shape[0]:
                raise ValueError(
                    f"field {f.name!r}: expected shape [{f.shape[0]}, n], got {list(arr.shape)}"
                )
            arr = arr.T
        if arr.ndim != 1 + len(f.shape) or tuple(arr.shape[1:]) != f.shape:
            want = ", ".join(["n", *map(str, f.shape)])
            raise ValueError(f"field {f.name!r}: expected shape [{want}], got {list(arr.shape)}")
        if torch_device is None and arr.dtype != f.np_dtype:
            raise ValueError(f"field {f.name!r}: expected dtype {f.dtype}, got {arr.dtype}")
        if n is None:
            n = int(arr.shape[0])
        elif arr.shape[0] != n:
            raise ValueError(f"field {f.name!r} has {arr.shape[0]} tokens, the first field has {n}")
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
        mrope_positions=None if mrope is None else _transpose(mrope),
        extra=extra,
        mrope_position_delta=delta,
    )


def _transpose(x: Any) -> Any:
    if _torch.is_tensor(x):
        return x.T.contiguous()
    return np.ascontiguousarray(x.T)
