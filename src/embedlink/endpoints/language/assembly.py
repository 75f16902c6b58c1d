"""Assembly: turning the chunks that landed in the language pool into the
room's result.

A chunk is copied out into arrays of the room's own (``gather``), after which
its blocks can go back to the pool. On a ``zero_copy`` endpoint the result is
instead views into the pool where the whole embedding can lie in one
contiguous run: an embedding that arrived in one contiguous chunk is handed
out as it lies; one that must resume is arranged to end up contiguous
(:meth:`Assembler._assemble_in_pool`), the rest being reserved right after
the first chunk (:attr:`LiveRoom.extension`). Views pin their blocks until the
user clears the room.

Loop thread only.
"""

from __future__ import annotations

from ...memory import BlockAllocator, BufferPool
from ...observability.metrics import EndpointMetrics
from ...protocol import BufferSchema, Harvest
from .receiver import LiveRoom

__all__ = ["Assembler"]


class Assembler:
    """Builds results in ``pool`` (blocks from ``allocator``) for rooms of ``schema``."""

    def __init__(
        self,
        schema: BufferSchema,
        pool: BufferPool,
        allocator: BlockAllocator,
        block_size: int,
        metrics: EndpointMetrics,
        *,
        zero_copy: bool,
    ) -> None:
        self.schema = schema
        self.pool = pool
        self.allocator = allocator
        self.block_size = block_size
        self.metrics = metrics
        self.zero_copy = zero_copy
        self._token_bytes = schema.token_bytes

    def harvest(self, live: LiveRoom, h: Harvest) -> None:
        """Take in the chunk ``h`` describes (it has landed in the pool)."""
        self.metrics.moved("all", "received", h.count * self._token_bytes)
        if live.area_start is not None:
            # a resumed zero-copy room: this chunk landed in its assembly run
            if h.start_token + h.count == h.total_tokens:
                live.result = {
                    f.name: self.pool.view(f.name, live.area_start, h.total_tokens)
                    for f in self.schema.fields
                }
            return
        if (
            self.zero_copy
            and h.with_aux
            and h.count < h.total_tokens
            and len(h.runs) == 1
            and h.blocks
            and self._assemble_in_pool(live, h)
        ):
            return
        if (
            self.zero_copy
            and h.with_aux
            and h.count == h.total_tokens
            and len(h.runs) == 1
            and h.blocks
        ):
            # The whole embedding arrived in one contiguous chunk: hand out views.
            start, count = h.runs[0]
            live.result = {f.name: self.pool.view(f.name, start, count) for f in self.schema.fields}
            live.pinned = h.blocks
            live.aux = self.pool.read_aux(h.aux_block)
            return
        if not live.result:
            for f in self.schema.fields:
                live.result[f.name] = self.pool.empty(f.name, h.total_tokens)
        for f in self.schema.fields:
            self.pool.gather(h.runs, f.name, live.result[f.name], h.start_token)
        self.pool.synchronize()
        if h.with_aux:
            live.aux = self.pool.read_aux(h.aux_block)

    def _assemble_in_pool(self, live: LiveRoom, h: Harvest) -> bool:
        """Arrange for a zero-copy room that must resume to end up contiguous in
        the pool, so its result is a view like a single-chunk room's: grow the
        first chunk's blocks in place when the blocks after them are free, else
        move the chunk to the start of a free run long enough for the whole
        embedding (one copy inside the pool, no fresh memory). The rest is then
        reserved right after it (:attr:`LiveRoom.extension`). False when neither
        fits, or the chunk does not end on a block boundary (the rest must start
        where it ends): the result is then assembled in fresh memory."""
        bs = self.block_size
        start, count = h.runs[0]
        k = count // bs
        if count % bs or len(h.blocks) != k or start != h.blocks[0] * bs:
            return False
        need = -(-h.total_tokens // bs)
        grown = self.allocator.alloc_at(h.blocks[0] + k, need - k)
        live.aux = self.pool.read_aux(h.aux_block)
        if grown is not None:
            live.pinned = (*h.blocks, *grown)
            live.area_start = start
            live.extension = grown
            return True
        run = self.allocator.alloc_contiguous(need)
        if run is None:
            return False
        dst = run[0] * bs
        for f in self.schema.fields:
            self.pool.view(f.name, dst, count)[...] = self.pool.view(f.name, start, count)
        self.pool.synchronize()
        live.pinned = tuple(run)
        live.area_start = dst
        live.extension = run[k:]
        return True
