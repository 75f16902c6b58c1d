"""What one token of an embedding looks like in memory.

A :class:`BufferSchema` declares the per-token fields of a request: each has a
per-token shape and a dtype. Pools store each field as one contiguous array of
``num_blocks * block_size`` tokens, so the schema fixes every byte offset the
planner computes. Both sides must agree on the schema exactly; the
fingerprint (:meth:`BufferSchema.describe`) travels in ``Register`` and a
mismatch refuses the session.

Each room also has one fixed-size aux record (:data:`AUX_DTYPE`), delivered with
the first chunk: the real ``total_tokens`` (the language side cannot know it in
advance), ``mrope_position_delta`` and a checksum of the embedding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import InvalidArgument

__all__ = [
    "AUX_DTYPE",
    "AUX_FIELD",
    "AUX_SIZE",
    "DEFAULT_HIDDEN_SIZE",
    "BufferSchema",
    "FieldSpec",
    "resolve_dtype",
]

#: Hidden size of Qwen2.5-VL-7B's language model, a realistic default.
DEFAULT_HIDDEN_SIZE = 3584

#: Name under which the per-room aux record appears in copy plans.
AUX_FIELD = "__aux__"

#: The per-room aux record. ``flags`` bit 0: the checksum is meaningful.
AUX_DTYPE = np.dtype(
    [
        ("total_tokens", "<i8"),
        ("mrope_position_delta", "<i8"),
        ("checksum", "<u8"),
        ("flags", "<u8"),
    ]
)
AUX_SIZE: int = AUX_DTYPE.itemsize

_DTYPES: Mapping[str, np.dtype[np.generic]] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


def resolve_dtype(name: str) -> np.dtype[np.generic]:
    """Return the numpy dtype for a schema dtype name, or raise :class:`InvalidArgument`
    (a ``ValueError``)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown dtype {name!r}; expected one of {', '.join(sorted(_DTYPES))}"
        ) from None


@dataclass(frozen=True)
class FieldSpec:
    """One per-token field: ``shape`` is the shape of a single token's entry."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier() or self.name.startswith("__"):
            raise InvalidArgument(f"field name {self.name!r} must be a plain identifier")
        if any((not isinstance(d, int)) or d <= 0 for d in self.shape):
            raise InvalidArgument(f"field {self.name!r}: shape {self.shape} must be positive ints")
        resolve_dtype(self.dtype)

    # cached: the planner asks for them on every chunk of every room
    @functools.cached_property
    def np_dtype(self) -> np.dtype[np.generic]:
        return resolve_dtype(self.dtype)

    @functools.cached_property
    def token_bytes(self) -> int:
        """Bytes of one token of this field."""
        return math.prod(self.shape) * self.np_dtype.itemsize


class BufferSchema:
    """The per-token fields of every request an endpoint moves.

    By default: ``embedding`` ``[hidden_size]`` of ``dtype``, ``token_ids``
    ``[]`` int32 and ``mrope_positions`` ``[3]`` int32. ``extra_fields`` adds
    fields such as ``{"deepstack": ((3, hidden_size), "bfloat16")}``.
    ``fields`` replaces the defaults entirely.
    """

    __slots__ = ("_by_name", "_token_bytes", "fields")

    def __init__(
        self,
        hidden_size: int = DEFAULT_HIDDEN_SIZE,
        dtype: str = "bfloat16",
        *,
        extra_fields: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
        fields: Iterable[FieldSpec] | None = None,
    ) -> None:
        if fields is None:
            if not isinstance(hidden_size, int) or hidden_size <= 0:
                raise InvalidArgument(f"hidden_size must be a positive int, got {hidden_size!r}")
            specs = [
                FieldSpec("embedding", (hidden_size,), dtype),
                FieldSpec("token_ids", (), "int32"),
                FieldSpec("mrope_positions", (3,), "int32"),
            ]
            for name, (shape, fdtype) in (extra_fields or {}).items():
                specs.append(FieldSpec(name, tuple(shape), fdtype))
        else:
            specs = list(fields)
            if extra_fields:
                raise InvalidArgument("give either fields or extra_fields, not both")
        if not specs:
            raise InvalidArgument("a schema needs at least one field")
        names = [f.name for f in specs]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"duplicate field names in {names}")
        self.fields: tuple[FieldSpec, ...] = tuple(specs)
        self._by_name = {f.name: f for f in specs}
        self._token_bytes = sum(f.token_bytes for f in specs)

    def field(self, name: str) -> FieldSpec:
        """The field called ``name``; KeyError naming the known fields otherwise."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no field {name!r}; schema has {list(self._by_name)}") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def token_bytes(self) -> int:
        """Bytes of one token across all fields."""
        return self._token_bytes

    def describe(self) -> list[tuple[str, list[int], str]]:
        """A plain-data fingerprint, carried in ``Register`` and compared exactly."""
        return [(f.name, list(f.shape), f.dtype) for f in self.fields]

    @classmethod
    def from_description(cls, desc: Iterable[tuple[str, list[int], str]]) -> BufferSchema:
        """Inverse of :meth:`describe`; :class:`InvalidArgument` (a ``ValueError``)
        on anything malformed."""
        return cls(fields=[FieldSpec(n, tuple(s), d) for n, s, d in desc])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BufferSchema) and self.fields == other.fields

    def __hash__(self) -> int:
        return hash(self.fields)

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}{list(f.shape)}:{f.dtype}" for f in self.fields)
        return f"BufferSchema({inner})"
