"""The little embedlink needs from torch, imported only when a torch pool or
tensor is involved (torch is optional)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["is_tensor", "to_host_numpy", "torch", "torch_dtype"]


def torch() -> Any:
    try:
        import torch as _torch
    except ImportError as exc:
        raise RuntimeError("this needs torch (pip install torch)") from exc
    return _torch


def is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


_NAMES = {
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
    "float64": "float64",
    "int8": "int8",
    "uint8": "uint8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
}


def torch_dtype(name: str) -> Any:
    """The torch dtype for a schema dtype name."""
    return getattr(torch(), _NAMES[name])


def to_host_numpy(x: Any, np_dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """A numpy array with ``x``'s bytes (a copy off the GPU; a view on the CPU)."""
    if isinstance(x, np.ndarray):
        return x
    t = x.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    raw = t.view(torch().uint8).numpy() if t.element_size() else t.numpy()
    out: np.ndarray[Any, Any] = np.asarray(raw).view(np_dtype).reshape(tuple(t.shape))
    return out
