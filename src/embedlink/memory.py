"""Block storage: :class:`BufferPool` and :class:`BlockAllocator`.

A pool holds ``num_blocks`` blocks of ``block_size`` tokens. Each schema field
is one contiguous array of ``num_blocks * block_size`` tokens, so a run of
adjacent blocks is one contiguous byte range and the planner's merged copies
are single ``memcpy`` calls. All arrays (and the per-block aux records) live in
one backing buffer, page-aligned per field, so a transport registers a pool as
one region (shared memory, Mooncake) and a peer can map it from its layout.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .protocol.layout import AUX_DTYPE, AUX_FIELD, AUX_SIZE, BufferSchema
from .protocol.types import BlockId

__all__ = ["BlockAllocator", "BufferPool", "PoolLayout", "pool_layout"]

_ALIGN = 4096

#: ``{field: (offset, nbytes)}`` within a pool's backing buffer, aux included.
PoolLayout = Mapping[str, tuple[int, int]]


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def pool_layout(
    schema: BufferSchema, num_blocks: int, block_size: int
) -> tuple[dict[str, tuple[int, int]], int]:
    """Offsets of every field (and the aux records) in a pool's backing buffer,
    and the buffer's total size. Both sides compute the same layout."""
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
    tokens = num_blocks * block_size
    layout: dict[str, tuple[int, int]] = {}
    off = 0
    for f in schema.fields:
        nbytes = tokens * f.token_bytes
        layout[f.name] = (off, nbytes)
        off = _align(off + nbytes)
    layout[AUX_FIELD] = (off, num_blocks * AUX_SIZE)
    off = _align(off + num_blocks * AUX_SIZE)
    return layout, off


class BufferPool:
    """``num_blocks`` blocks of ``block_size`` tokens for every field of ``schema``.

    ``buffer``, when given, is a writable buffer of at least :attr:`nbytes`
    bytes to lay the pool out in (shared memory, pinned memory); otherwise the
    pool allocates its own. ``segment`` names the shared-memory segment that
    ``buffer`` belongs to, so the ``shm`` transport can offer it to peers. The pool never frees a buffer it did not allocate.
    """

    def __init__(
        self,
        schema: BufferSchema,
        num_blocks: int,
        block_size: int,
        *,
        buffer: Any | None = None,
        segment: str | None = None,
    ) -> None:
        self.schema = schema
        #: Name of the shared-memory segment holding ``buffer``, if any.
        self.segment = segment
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layout, self.nbytes = pool_layout(schema, num_blocks, block_size)
        if buffer is None:
            self._backing = np.zeros(self.nbytes, dtype=np.uint8)
        else:
            backing = np.frombuffer(buffer, dtype=np.uint8)
            if backing.size < self.nbytes:
                raise ValueError(
                    f"buffer of {backing.size} bytes is smaller than the pool's {self.nbytes}"
                )
            if backing.flags.writeable is False:
                raise ValueError("the pool's buffer must be writable")
            self._backing = backing[: self.nbytes]
        tokens = self.capacity_tokens
        self._arrays: dict[str, np.ndarray[Any, Any]] = {}
        for f in schema.fields:
            off, nbytes = self.layout[f.name]
            raw = self._backing[off : off + nbytes]
            self._arrays[f.name] = raw.view(f.np_dtype).reshape((tokens, *f.shape))
        off, nbytes = self.layout[AUX_FIELD]
        self.aux: np.ndarray[Any, Any] = self._backing[off : off + nbytes].view(AUX_DTYPE)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def base_addr(self) -> int:
        """Address of the backing buffer (for registering it with a transport)."""
        return int(self._backing.ctypes.data)

    @property
    def backing(self) -> np.ndarray[Any, Any]:
        """The whole backing buffer as flat uint8."""
        return self._backing

    def array(self, name: str) -> np.ndarray[Any, Any]:
        """Field ``name`` as a ``[capacity_tokens, *shape]`` array (a view)."""
        try:
            return self._arrays[name]
        except KeyError:
            raise KeyError(f"no field {name!r}; pool has {list(self._arrays)}") from None

    def field_bytes(self, name: str) -> memoryview:
        """Field ``name`` (or :data:`AUX_FIELD`) as a flat writable byte view."""
        off, nbytes = self._region(name)
        return memoryview(self._backing[off : off + nbytes])  # type: ignore[arg-type]

    def region(self, name: str) -> tuple[int, int]:
        """``(address, nbytes)`` of field ``name`` (or the aux records)."""
        off, nbytes = self._region(name)
        return self.base_addr + off, nbytes

    def _region(self, name: str) -> tuple[int, int]:
        try:
            return self.layout[name]
        except KeyError:
            raise KeyError(f"no field {name!r}; pool has {list(self.layout)}") from None

    def token_index(self, blocks: Sequence[BlockId], count: int) -> np.ndarray[Any, Any]:
        """Pool token indices of the first ``count`` tokens of a reservation."""
        bs = self.block_size
        if count > len(blocks) * bs:
            raise ValueError(f"{count} tokens do not fit in {len(blocks)} blocks of {bs}")
        idx = (np.asarray(blocks, dtype=np.int64)[:, None] * bs + np.arange(bs)).reshape(-1)
        return idx[:count]

    def scatter(
        self, blocks: Sequence[BlockId], arrays: Mapping[str, np.ndarray[Any, Any]]
    ) -> None:
        """Write per-token arrays (leading axis = tokens) into ``blocks``, one
        contiguous copy per run of adjacent blocks."""
        for name, data in arrays.items():
            dst = self.array(name)
            n = data.shape[0]
            for start, length, src in self._runs(blocks, n):
                dst[start : start + length] = data[src : src + length]

    def gather(
        self,
        runs: Iterable[tuple[int, int]],
        name: str,
        out: np.ndarray[Any, Any],
        out_start: int,
    ) -> None:
        """Copy ``(pool_token, count)`` runs of ``name`` into ``out`` from ``out_start``."""
        src = self.array(name)
        pos = out_start
        for start, length in runs:
            out[pos : pos + length] = src[start : start + length]
            pos += length

    def _runs(self, blocks: Sequence[BlockId], count: int) -> list[tuple[int, int, int]]:
        bs = self.block_size
        runs: list[tuple[int, int, int]] = []
        done = 0
        for b in blocks:
            if done >= count:
                break
            n = min(bs, count - done)
            start = b * bs
            if runs and runs[-1][0] + runs[-1][1] == start:
                s, length, o = runs[-1]
                runs[-1] = (s, length + n, o)
            else:
                runs.append((start, n, done))
            done += n
        if done < count:
            raise ValueError(f"{count} tokens do not fit in {len(blocks)} blocks of {bs}")
        return runs


class BlockAllocator:
    """Hands out blocks of a pool; thread-safe.

    Exhaustion is a normal result (``None``), not an exception: callers apply
    back-pressure. Freeing a block that is not allocated (double free, or a
    block of another pool) raises ``ValueError`` and frees nothing. Allocation
    prefers one contiguous run (first fit), so copies merge; when no run is
    long enough it takes the longest runs first.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._starts: list[int] = [0]  # sorted starts of free extents
        self._lens: dict[int, int] = {0: num_blocks}
        self._used: set[int] = set()
        self._cond = threading.Condition()

    @property
    def num_free(self) -> int:
        with self._cond:
            return self.num_blocks - len(self._used)

    @property
    def num_used(self) -> int:
        with self._cond:
            return len(self._used)

    def alloc(self, num_blocks: int) -> list[BlockId] | None:
        """``num_blocks`` blocks, or ``None`` when fewer are free."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        with self._cond:
            return self._alloc_locked(num_blocks)

    def alloc_up_to(self, num_blocks: int) -> list[BlockId] | None:
        """Between 1 and ``num_blocks`` blocks (as many as are free), or ``None``."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        with self._cond:
            free = self.num_blocks - len(self._used)
            if free == 0:
                return None
            return self._alloc_locked(min(num_blocks, free))

    def alloc_wait(self, num_blocks: int, timeout: float | None) -> list[BlockId] | None:
        """Like :meth:`alloc`, waiting up to ``timeout`` seconds for blocks to be freed."""
        if num_blocks > self.num_blocks:
            raise ValueError(f"{num_blocks} blocks requested from a pool of {self.num_blocks}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                got = self._alloc_locked(num_blocks)
                if got is not None:
                    return got
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def wait_all_free(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every block is free; True if so."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._used:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def free(self, blocks: Iterable[BlockId]) -> None:
        """Return ``blocks``. All or nothing: an unallocated block raises ValueError."""
        blocks = sorted(blocks)
        with self._cond:
            if len(set(blocks)) != len(blocks):
                raise ValueError("free(): a block is listed twice")
            bad = [b for b in blocks if b not in self._used]
            if bad:
                raise ValueError(
                    f"free(): blocks {bad[:8]} are not allocated (double free or foreign)"
                )
            self._used.difference_update(blocks)
            i = 0
            while i < len(blocks):
                j = i
                while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
                    j += 1
                self._insert(blocks[i], j - i + 1)
                i = j + 1
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every :meth:`alloc_wait` so it re-checks (used on shutdown)."""
        with self._cond:
            self._cond.notify_all()

    # -- internals (lock held)

    def _alloc_locked(self, n: int) -> list[BlockId] | None:
        if self.num_blocks - len(self._used) < n:
            return None
        for s in self._starts:
            if self._lens[s] >= n:
                return self._take(s, n)
        out: list[BlockId] = []
        for s in sorted(self._starts, key=lambda x: -self._lens[x]):
            if len(out) == n:
                break
            out.extend(self._take(s, min(self._lens[s], n - len(out))))
        return out

    def _take(self, start: int, n: int) -> list[BlockId]:
        length = self._lens.pop(start)
        i = bisect.bisect_left(self._starts, start)
        del self._starts[i]
        if length > n:
            self._lens[start + n] = length - n
            bisect.insort(self._starts, start + n)
        got = list(range(start, start + n))
        self._used.update(got)
        return got

    def _insert(self, start: int, n: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        # merge with the extent after
        if i < len(self._starts) and self._starts[i] == start + n:
            n += self._lens.pop(self._starts[i])
            del self._starts[i]
        # merge with the extent before
        if i > 0:
            p = self._starts[i - 1]
            if p + self._lens[p] == start:
                self._lens[p] += n
                return
        self._starts.insert(i, start)
        self._lens[start] = n

    def extents(self) -> list[tuple[int, int]]:
        """Free ``(start, length)`` runs, for tests and diagnostics."""
        with self._cond:
            return [(s, self._lens[s]) for s in self._starts]
