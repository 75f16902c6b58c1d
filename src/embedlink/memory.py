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
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import _torch
from .protocol.layout import AUX_DTYPE, AUX_FIELD, AUX_SIZE, BufferSchema
from .protocol.types import BlockId

__all__ = [
    "BlockAllocator",
    "Borrowed",
    "BufferPool",
    "PoolLayout",
    "pool_layout",
    "pool_status",
]

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

    Host pools (``device=None``, the default) are numpy arrays. ``buffer``,
    when given, is a writable buffer of at least :attr:`nbytes` bytes to lay
    the pool out in (shared memory, pinned memory); otherwise the pool
    allocates its own; ``segment`` names the shared-memory segment that
    ``buffer`` belongs to, so the ``shm`` transport can offer it to peers. The
    pool never frees a buffer it did not allocate.

    ``device="cuda:0"`` (or ``"cpu"``) backs the pool with one torch tensor on
    that device instead: :meth:`array` returns torch views and results are
    torch tensors on the device. A ``"cpu"`` torch pool also has host views,
    so every transport works with it; a CUDA pool has none and works with the
    GPU transports (``cuda_ipc``, ``mooncake``) only.
    """

    def __init__(
        self,
        schema: BufferSchema,
        num_blocks: int,
        block_size: int,
        *,
        buffer: Any | None = None,
        segment: str | None = None,
        device: str | None = None,
    ) -> None:
        self.schema = schema
        #: Name of the shared-memory segment holding ``buffer``, if any.
        self.segment = segment
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        self.layout, self.nbytes = pool_layout(schema, num_blocks, block_size)
        self._tensor: Any = None
        self._backing: np.ndarray[Any, Any] | None
        if device is not None:
            t = _torch.torch()
            if buffer is not None:
                if device != "cpu":
                    raise ValueError(
                        f"an external buffer is host memory; device={device!r} cannot use it"
                    )
                self._tensor = t.frombuffer(buffer, dtype=t.uint8, count=self.nbytes)
            else:
                self._tensor = t.zeros(self.nbytes, dtype=t.uint8, device=device)
            self._backing = self._tensor.numpy() if self._tensor.device.type == "cpu" else None
        elif buffer is None:
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
        self._arrays: dict[str, Any] = {}
        for f in schema.fields:
            off, nbytes = self.layout[f.name]
            if self._tensor is not None:
                raw_t = self._tensor[off : off + nbytes]
                self._arrays[f.name] = raw_t.view(_torch.torch_dtype(f.dtype)).reshape(
                    (tokens, *f.shape)
                )
            else:
                assert self._backing is not None
                raw = self._backing[off : off + nbytes]
                self._arrays[f.name] = raw.view(f.np_dtype).reshape((tokens, *f.shape))

    def release(self) -> None:
        """Drop the pool's own views of its memory, so that memory (a shared
        segment's mapping and its descriptor) can go as soon as nobody else
        holds a view of it. The pool is unusable afterwards; its owner calls
        this when it closes."""
        self._arrays = {}
        self._backing = None
        self._tensor = None

    # -- shape and addresses

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def is_torch(self) -> bool:
        return self._tensor is not None

    @property
    def on_host(self) -> bool:
        """Whether the memory is host memory (reachable by host transports)."""
        return self._backing is not None

    @property
    def base_addr(self) -> int:
        """Address of the backing buffer (a device pointer for CUDA pools)."""
        if self._tensor is not None:
            return int(self._tensor.data_ptr())
        assert self._backing is not None
        return int(self._backing.ctypes.data)

    @property
    def backing(self) -> np.ndarray[Any, Any]:
        """The whole backing buffer as flat uint8 host memory."""
        if self._backing is None:
            raise TypeError(f"a pool on {self.device} has no host view; use a GPU transport")
        return self._backing

    @property
    def tensor(self) -> Any:
        """The backing torch tensor (torch pools only)."""
        if self._tensor is None:
            raise TypeError("a host pool has no torch tensor")
        return self._tensor

    def array(self, name: str) -> Any:
        """Field ``name`` as a ``[capacity_tokens, *shape]`` view (numpy, or
        torch for torch pools)."""
        try:
            return self._arrays[name]
        except KeyError:
            raise KeyError(f"no field {name!r}; pool has {list(self._arrays)}") from None

    def field_bytes(self, name: str) -> memoryview:
        """Field ``name`` (or :data:`AUX_FIELD`) as a flat writable host byte view."""
        off, nbytes = self._region(name)
        return memoryview(self.backing[off : off + nbytes])  # type: ignore[arg-type]

    def region(self, name: str) -> tuple[int, int]:
        """``(address, nbytes)`` of field ``name`` (or the aux records)."""
        off, nbytes = self._region(name)
        return self.base_addr + off, nbytes

    def _region(self, name: str) -> tuple[int, int]:
        try:
            return self.layout[name]
        except KeyError:
            raise KeyError(f"no field {name!r}; pool has {list(self.layout)}") from None

    # -- aux records

    def read_aux(self, block: BlockId) -> np.void:
        """A copy of the aux record in ``block``'s slot (a numpy record)."""
        off = self.layout[AUX_FIELD][0] + block * AUX_SIZE
        if self._backing is not None:
            raw = self._backing[off : off + AUX_SIZE].copy()
        else:
            raw = self._tensor[off : off + AUX_SIZE].cpu().numpy()
        rec: np.void = raw.view(AUX_DTYPE)[0]
        return rec

    def write_aux(
        self,
        block: BlockId,
        *,
        total_tokens: int,
        mrope_position_delta: int,
        checksum: int,
        flags: int,
    ) -> None:
        """Fill the aux record in ``block``'s slot."""
        rec = np.zeros(1, AUX_DTYPE)
        rec["total_tokens"], rec["mrope_position_delta"] = total_tokens, mrope_position_delta
        rec["checksum"], rec["flags"] = checksum, flags
        off = self.layout[AUX_FIELD][0] + block * AUX_SIZE
        raw = rec.view(np.uint8)
        if self._backing is not None:
            self._backing[off : off + AUX_SIZE] = raw
        else:
            t = _torch.torch()
            self._tensor[off : off + AUX_SIZE].copy_(t.from_numpy(raw))

    # -- copies in and out

    def token_index(self, blocks: Sequence[BlockId], count: int) -> np.ndarray[Any, Any]:
        """Pool token indices of the first ``count`` tokens of a reservation."""
        bs = self.block_size
        if count > len(blocks) * bs:
            raise ValueError(f"{count} tokens do not fit in {len(blocks)} blocks of {bs}")
        idx = (np.asarray(blocks, dtype=np.int64)[:, None] * bs + np.arange(bs)).reshape(-1)
        return idx[:count]

    def scatter(self, blocks: Sequence[BlockId], arrays: Mapping[str, Any]) -> None:
        """Write per-token arrays (leading axis = tokens) into ``blocks``, one
        contiguous copy per run of adjacent blocks. Torch pools take tensors
        (on any device) or numpy arrays; host pools take numpy arrays."""
        for name, data in arrays.items():
            dst = self.array(name)
            if self._tensor is not None and not _torch.is_tensor(data):
                data = _torch.torch().from_numpy(np.ascontiguousarray(data))
            n = data.shape[0]
            for start, length, src in self._runs(blocks, n):
                if self._tensor is not None:
                    dst[start : start + length].copy_(data[src : src + length], non_blocking=True)
                else:
                    dst[start : start + length] = data[src : src + length]
        self.synchronize()

    def view(self, name: str, start_token: int, tokens: int) -> Any:
        """Field ``name`` for pool tokens ``[start_token, start_token + tokens)``,
        as a view (numpy, or torch for torch pools): writes land in the pool."""
        return self.array(name)[start_token : start_token + tokens]

    def empty(self, name: str, tokens: int) -> Any:
        """A new, uninitialised ``[tokens, *shape]`` array for field ``name``,
        on the pool's device (numpy for host pools)."""
        f = self.schema.field(name)
        if self._tensor is not None:
            t = _torch.torch()
            return t.empty(
                (tokens, *f.shape), dtype=_torch.torch_dtype(f.dtype), device=self._tensor.device
            )
        return np.empty((tokens, *f.shape), dtype=f.np_dtype)

    def gather(self, runs: Iterable[tuple[int, int]], name: str, out: Any, out_start: int) -> None:
        """Copy ``(pool_token, count)`` runs of ``name`` into ``out`` from ``out_start``."""
        src = self.array(name)
        pos = out_start
        for start, length in runs:
            if self._tensor is not None:
                out[pos : pos + length].copy_(src[start : start + length], non_blocking=True)
            else:
                out[pos : pos + length] = src[start : start + length]
            pos += length

    def synchronize(self) -> None:
        """Wait for copies queued on a CUDA pool's device (no-op elsewhere)."""
        if self._tensor is not None and self._tensor.device.type == "cuda":
            _torch.torch().cuda.synchronize(self._tensor.device)

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


class Borrowed:
    """A room's payload read where the caller keeps it, not from the pool.

    The room still holds its blocks in the encoder pool (its aux record lives
    there, and so does the payload once :meth:`place` ran), but a transport
    that can read any host memory (``shm``, ``tcp``) takes each chunk straight
    from the caller's arrays: one copy fewer per room. The caller must leave
    the arrays unchanged until the room ends.
    """

    def __init__(
        self, pool: BufferPool, blocks: Sequence[BlockId], arrays: Mapping[str, Any]
    ) -> None:
        self._pool = pool
        self._blocks = list(blocks)
        self._arrays = dict(arrays)
        self._raw: dict[str, memoryview] = {}
        for f in pool.schema.fields:
            a = self._arrays[f.name]
            # flat bytes, in token order (a transposed field is copied here,
            # it is the small one)
            flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            self._raw[f.name] = memoryview(flat)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._placed = False

    @staticmethod
    def usable(pool: BufferPool, arrays: Mapping[str, Any]) -> bool:
        """Whether ``arrays`` (from :func:`~embedlink.embedding.to_pool_arrays`)
        can be lent: host numpy arrays for a host pool."""
        return pool.on_host and all(isinstance(a, np.ndarray) for a in arrays.values())

    def sources(self, copies: Sequence[Any], start_token: int, counts: Sequence[int]) -> list[Any]:
        """The source bytes of each of a plan's ``copies`` (per field, one per
        segment of ``counts`` tokens from ``start_token``, then the aux
        record, as :func:`~embedlink.protocol.plan_chunk` orders them)."""
        out: list[Any] = []
        i = 0
        for f in self._pool.schema.fields:
            raw, tb = self._raw[f.name], f.token_bytes
            t = start_token
            for n in counts:
                c = copies[i]
                if c.field != f.name or c.length != n * tb:
                    raise ValueError(f"copy {i} ({c.field}, {c.length} B) is not the plan's")
                out.append(raw[t * tb : (t + n) * tb])
                t += n
                i += 1
        for c in copies[i:]:
            out.append(self._pool.field_bytes(c.field)[c.src_offset : c.src_offset + c.length])
        return out

    def place(self) -> None:
        """Copy the payload into its blocks (once), for a transport that
        reads only the pool (registered memory)."""
        with self._lock:
            if not self._placed:
                self._pool.scatter(self._blocks, self._arrays)
                self._placed = True


class BlockAllocator:
    """Hands out blocks of a pool; thread-safe.

    Exhaustion is a normal result (``None``), not an exception: callers apply
    back-pressure. Freeing a block that is not allocated (double free, or a
    block of another pool) raises ``ValueError`` and frees nothing. Allocation
    prefers one contiguous run (first fit), so copies merge; when no run is
    long enough it takes the longest runs first. A reservation that may grow
    can ask for free blocks after it (``alloc_up_to(..., spare=)``).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._starts: list[int] = [0]  # sorted starts of free extents
        self._lens: dict[int, int] = {0: num_blocks}
        self._used: set[int] = set()
        # first block of a growable reservation's spare -> its length (see alloc_up_to)
        self._spares: dict[int, int] = {}
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

    def alloc_up_to(self, num_blocks: int, spare: int = 0) -> list[BlockId] | None:
        """Between 1 and ``num_blocks`` blocks (as many as are free), or ``None``.

        ``spare``: a reservation that may have to grow (a zero-copy room that
        may resume) asks for ``spare`` free blocks right after it. It gets the
        first free run with room for both that does not start inside another
        such reservation's spare (which it skips), so it can later grow in
        place (:meth:`alloc_at`) and leaves the others their room to grow. The
        spare is a preference, not a reservation: it lapses when its blocks are
        taken or the blocks before it are freed. Without such a run, as without
        ``spare``."""
        if num_blocks <= 0 or spare < 0:
            raise ValueError(
                f"num_blocks must be positive and spare >= 0, got {num_blocks}, {spare}"
            )
        with self._cond:
            free = self.num_blocks - len(self._used)
            if free == 0:
                return None
            n = min(num_blocks, free)
            if spare:
                for s in self._starts:
                    start = s + self._spares.get(s, 0)
                    if s + self._lens[s] - start >= n + spare:
                        got = self._take_at(s, start, n)  # the skipped spare stays free
                        self._spares[start + n] = spare
                        return got
            return self._alloc_locked(n)

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

    def alloc_contiguous_wait(self, num_blocks: int, timeout: float | None) -> list[BlockId] | None:
        """``num_blocks`` adjacent blocks (one run), waiting up to ``timeout``
        seconds for one to free up; ``None`` when none did."""
        if num_blocks > self.num_blocks:
            raise ValueError(f"{num_blocks} blocks requested from a pool of {self.num_blocks}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                got = self._first_fit_locked(num_blocks)
                if got is not None:
                    return got
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def alloc_contiguous(self, num_blocks: int) -> list[BlockId] | None:
        """``num_blocks`` adjacent blocks (one run, first fit), or ``None`` now."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        with self._cond:
            return self._first_fit_locked(num_blocks)

    def alloc_at(self, start: BlockId, num_blocks: int) -> list[BlockId] | None:
        """Exactly blocks ``[start, start + num_blocks)`` when all are free
        (e.g. to grow a reservation in place), else ``None``."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if start < 0 or start + num_blocks > self.num_blocks:
            return None
        with self._cond:
            i = bisect.bisect_right(self._starts, start) - 1
            if i < 0:
                return None
            s = self._starts[i]
            if s + self._lens[s] < start + num_blocks:
                return None
            return self._take_at(s, start, num_blocks)

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
                # the reservation before a spare ended (or shrank): it will not grow
                self._spares.pop(blocks[j] + 1, None)
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
        got = self._first_fit_locked(n)
        if got is not None:
            return got
        out: list[BlockId] = []
        for s in sorted(self._starts, key=lambda x: -self._lens[x]):
            if len(out) == n:
                break
            out.extend(self._take(s, min(self._lens[s], n - len(out))))
        return out

    def _first_fit_locked(self, n: int) -> list[BlockId] | None:
        """The first free run of ``n`` blocks, taken, or ``None``."""
        for s in self._starts:
            if self._lens[s] >= n:
                return self._take(s, n)
        return None

    def _take_at(self, s: int, start: int, n: int) -> list[BlockId]:
        """Take ``n`` blocks from ``start``, inside the free extent that begins
        at ``s`` (split in two first when ``start > s``)."""
        if start > s:
            self._lens[start] = s + self._lens[s] - start
            self._lens[s] = start - s
            bisect.insort(self._starts, start)
        return self._take(start, n)

    def _take(self, start: int, n: int) -> list[BlockId]:
        length = self._lens.pop(start)
        i = bisect.bisect_left(self._starts, start)
        del self._starts[i]
        if length > n:
            self._lens[start + n] = length - n
            bisect.insort(self._starts, start + n)
        got = list(range(start, start + n))
        self._used.update(got)
        if self._spares:
            for b in got:  # a spare whose first block is taken has lapsed
                self._spares.pop(b, None)
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


def pool_status(pool: BufferPool, allocator: BlockAllocator) -> dict[str, Any]:
    """A pool's use as JSON-ready numbers (for ``/status``)."""
    return {
        "blocks_total": pool.num_blocks,
        "blocks_used": allocator.num_used,
        "blocks_free": allocator.num_free,
        "block_size": pool.block_size,
        "bytes_total": pool.nbytes,
        "device": str(pool.device or "cpu"),
    }


def checksum(arrays: dict[str, np.ndarray[Any, Any]]) -> int:
    """CRC-32 over every field's bytes, in schema order; stored in the aux record."""
    crc = 0
    for a in arrays.values():
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), crc)  # type: ignore[arg-type]
    return crc
