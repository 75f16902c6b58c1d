"""``shm``: same host. The language pool lives in POSIX shared memory; the
encoder maps it once per peer and copies straight into it (one memcpy per
merged copy, no staging). Offered only when both ends run on the same kernel
(:func:`embedlink._runtime.host.host_id`) and the segment can actually be opened.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from .._runtime.host import host_id as local_host_id
from ..memory import BufferPool, pool_layout
from ..protocol import AUX_FIELD, BufferSchema, Copy, TransportOffer
from . import Backend
from .base import DataPlaneError, PeerWriter, TransportServer, TransportUnavailable, check_bounds

log = logging.getLogger(__name__)

__all__ = ["BACKEND", "SharedPool", "ShmBackend", "ShmServer", "ShmWriter", "create_shared_pool"]


def _attach(name: str) -> mmap.mmap:
    """Map another process's segment without involving a resource tracker.

    ``SharedMemory(name)`` would register the segment with this process's
    tracker (before Python 3.13), which then unlinks it when this process
    exits, destroying the owner's pool; or, with a tracker shared by sibling
    processes, unregistering it would drop the owner's entry. Only the creator
    tracks and unlinks its segment.
    """
    import _posixshmem  # type: ignore[import-not-found]  # CPython's shm_open binding

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _close_mapping(shm: shared_memory.SharedMemory) -> None:
    """Close a segment's mapping, or, while numpy views of it still live, leave
    the mapping to be released with the last view (and keep ``__del__`` quiet)."""
    try:
        shm.close()
    except BufferError:
        shm._buf = None  # type: ignore[attr-defined]
        shm._mmap = None  # type: ignore[attr-defined]
        fd = getattr(shm, "_fd", -1)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
            shm._fd = -1  # type: ignore[attr-defined]


class SharedPool:
    """A :class:`BufferPool` in a shared-memory segment this process owns.

    ``close()`` unlinks the segment (so nothing leaks in /dev/shm); a crash
    leaves the unlinking to Python's resource tracker.
    """

    def __init__(
        self, schema: BufferSchema, num_blocks: int, block_size: int, device: str | None = None
    ) -> None:
        _, nbytes = pool_layout(schema, num_blocks, block_size)
        name = f"embedlink-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        self.pool = BufferPool(
            schema, num_blocks, block_size, buffer=self.shm.buf, segment=name, device=device
        )
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass
        # the pool's views would keep the mapping (and its descriptor) open
        # until the pool is garbage collected
        self.pool.release()
        _close_mapping(self.shm)


def create_shared_pool(
    schema: BufferSchema, num_blocks: int, block_size: int, device: str | None = None
) -> SharedPool:
    return SharedPool(schema, num_blocks, block_size, device)


class ShmServer(TransportServer):
    """Offers the pool's segment; the peer writes into it directly."""

    name = "shm"

    def __init__(self, pool: BufferPool, *, host: str) -> None:
        super().__init__(pool, host=host)
        if pool.segment is None:
            raise TransportUnavailable(
                "shm: the pool is not in shared memory (create it with create_shared_pool)"
            )

    def offer(self) -> TransportOffer:
        assert self.pool.segment is not None
        names = [*self.pool.schema.names, AUX_FIELD]
        offsets = ",".join(str(self.pool.layout[n][0]) for n in names)
        return TransportOffer(
            "shm",
            {
                "segment": self.pool.segment,
                "host_id": local_host_id(),
                "nbytes": str(self.pool.nbytes),
                "offsets": offsets,
            },
        )

    def fence(self, peer: str, done: Callable[[], None], *, gone: bool = False) -> bool:
        # The sender's own process copies into the mapping, synchronously: once
        # that process is gone (or closed its endpoint, which waits for its
        # writes), nothing more can land. A sender that only fell silent may
        # still be copying: that needs the grace period.
        if gone:
            done()
        return gone


class ShmWriter(PeerWriter):
    """Copies into a peer's mapped segment."""

    name = "shm"
    inline_max_bytes = 1 << 20  # a memcpy of 1 MiB takes ~100 us: less than two thread hops

    def __init__(
        self, segment: str, nbytes: int, offsets: dict[str, int], regions: dict[str, int]
    ) -> None:
        try:
            self._map: mmap.mmap | None = _attach(segment)
        except OSError as exc:
            raise TransportUnavailable(f"shm: cannot open segment {segment!r}: {exc}") from exc
        if len(self._map) < nbytes:
            raise TransportUnavailable(f"shm: segment {segment!r} is smaller than advertised")
        self._mem: np.ndarray[Any, Any] | None = np.frombuffer(
            self._map, dtype=np.uint8, count=nbytes
        )
        self.offsets = offsets
        self.regions = regions
        self._lock = threading.Lock()
        for name, size in regions.items():
            if name not in offsets or offsets[name] + size > nbytes:
                raise TransportUnavailable(f"shm: region {name!r} lies outside the segment")

    reads_any_memory = True

    def write(self, copies: Sequence[Copy], src: BufferPool, timeout: float) -> None:
        mem = self._mem
        if mem is None:
            raise DataPlaneError("shm: writer closed")
        check_bounds(copies, self.regions, src)
        back = src.backing
        for c in copies:
            d = self.offsets[c.field] + c.dst_offset
            s = src.layout[c.field][0] + c.src_offset
            mem[d : d + c.length] = back[s : s + c.length]

    def write_from(self, copies: Sequence[Copy], sources: Sequence[Any], timeout: float) -> None:
        mem = self._mem
        if mem is None:
            raise DataPlaneError("shm: writer closed")
        check_bounds(copies, self.regions)
        for c, data in zip(copies, sources, strict=True):
            d = self.offsets[c.field] + c.dst_offset
            mem[d : d + c.length] = np.frombuffer(data, dtype=np.uint8, count=c.length)

    def close(self) -> None:
        with self._lock:
            mapping, self._map, self._mem = self._map, None, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a write still holds a view; the mapping goes with it


class ShmBackend:
    name = "shm"
    host_memory_only = True

    def server(
        self, pool: BufferPool, *, host: str, options: Mapping[str, str] | None = None
    ) -> TransportServer:
        return ShmServer(pool, host=host)

    def reachable(self, offer: TransportOffer, *, host_id: str) -> bool:
        return offer.params.get("host_id") == host_id and "segment" in offer.params

    def connect(
        self,
        offer: TransportOffer,
        *,
        regions: dict[str, int],
        field_names: list[str],
        timeout: float,
        local_host: str = "127.0.0.1",
        options: Mapping[str, str] | None = None,
    ) -> PeerWriter:
        p = offer.params
        try:
            offs = [int(x) for x in p["offsets"].split(",")]
            nbytes = int(p["nbytes"])
        except (KeyError, ValueError) as exc:
            raise TransportUnavailable(f"shm: malformed offer: {exc}") from exc
        if len(offs) != len(field_names):
            raise TransportUnavailable("shm: offer's offsets do not match the schema")
        return ShmWriter(p["segment"], nbytes, dict(zip(field_names, offs, strict=True)), regions)


BACKEND: Backend = ShmBackend()
