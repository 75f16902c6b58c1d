"""The user's handle on one room of an encoder: :class:`Sender`.

The user's thread copies an embedding into the encoder pool (``send``), or
writes it there itself (``buffer`` and ``commit``), and reads the room's
status (``poll``, ``wait``); the endpoint's loop does the rest. What every
sender of one endpoint shares comes in a :class:`SendContext`, made once by
the endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..._runtime.loop import Loop
from ...embedding import Embedding, to_pool_arrays
from ...memory import BlockAllocator, Borrowed, BufferPool, checksum
from ...protocol import (
    MAX_META_BYTES,
    BufferSchema,
    RoomId,
    SenderRoom,
    Status,
    TransferError,
)
from .rooms import Rooms
from .writes import WriteDispatch

__all__ = ["SendContext", "Sender"]


@dataclass(frozen=True)
class SendContext:
    """What the senders of one endpoint share: its pool and settings, and the
    parts a sender hands its room to."""

    schema: BufferSchema
    pool: BufferPool
    allocator: BlockAllocator
    block_size: int
    num_blocks: int
    room_timeout: float
    checksums: bool
    loop: Loop
    rooms: Rooms
    writes: WriteDispatch


def _check_meta(room: RoomId, meta: bytes | None) -> None:
    if meta is None:
        return
    if not isinstance(meta, bytes):
        raise ValueError(f"room {room}: meta must be bytes, got {type(meta).__name__}")
    if len(meta) > MAX_META_BYTES:
        raise ValueError(f"room {room}: meta of {len(meta)} bytes exceeds {MAX_META_BYTES}")


class Sender:
    """One room on the encoder side. Obtain from :meth:`EncoderEndpoint.sender`."""

    def __init__(self, context: SendContext, room: SenderRoom) -> None:
        self._ctx = context
        self._room = room
        self.room: RoomId = room.room
        self._sent = False
        self._buffer: tuple[int, list[int]] | None = None

    def send(
        self,
        emb: Embedding,
        *,
        timeout: float | None = None,
        borrow: bool = False,
        meta: bytes | None = None,
    ) -> None:
        """Copy ``emb`` into the encoder pool and start sending it.

        Called once per room (or :meth:`buffer` and :meth:`commit` instead).
        The caller may reuse its arrays as soon as this returns. Raises
        ValueError (naming the field) when ``emb`` does not match the schema or
        is larger than the whole pool; waits up to ``timeout`` seconds
        (default: the room timeout) for free blocks, then fails the room and
        raises :class:`TransferError`.

        ``borrow=True``: the room still reserves its blocks, but transports
        that can read any host memory (``shm``, ``tcp``) send straight from
        ``emb``'s arrays, saving the copy into the pool; others copy them into
        the blocks when they first write. The caller must then leave the
        arrays unchanged until the room ends (:meth:`poll` is terminal).
        Arrays on a GPU, or a pool on one, are copied as without it.

        ``meta``: up to 64 KiB the receiver reads as :attr:`Receiver.meta`
        (an engine's per-item metadata: image grids, timestamps, modality).
        """
        self._claim("send()")
        ctx = self._ctx
        try:
            _check_meta(self.room, meta)
            n, arrays = to_pool_arrays(emb, ctx.schema, torch_device=ctx.pool.device)
        except ValueError:
            self._sent = False
            raise
        blocks = self._alloc(n, timeout, contiguous=False)
        try:
            if borrow and Borrowed.usable(ctx.pool, arrays):
                ctx.writes.lend(self._room, Borrowed(ctx.pool, blocks, arrays))
            else:
                ctx.pool.scatter(blocks, arrays)
        except BaseException:
            ctx.allocator.free(blocks)
            raise
        self._start(n, blocks, emb.mrope_position_delta, arrays, meta)

    def buffer(self, num_tokens: int, *, timeout: float | None = None) -> Embedding:
        """Reserve ``num_tokens`` tokens in the encoder pool and return them as an
        :class:`Embedding` of views: write the encoder's output straight into
        them, then call :meth:`commit`. This is the one-copy path: the only
        copy left is the transport's, into the language pool.

        The views are contiguous (``mrope_positions`` is a ``[3, n]`` view of
        the pool's ``[n, 3]`` field); they belong to the pool and must not be
        used after :meth:`commit`. Same errors as :meth:`send`.
        """
        self._claim("buffer()")
        ctx = self._ctx
        if num_tokens <= 0:
            self._sent = False
            raise ValueError(f"room {self.room}: an embedding needs at least one token")
        blocks = self._alloc(num_tokens, timeout, contiguous=True)
        start = blocks[0] * ctx.block_size
        views = {f.name: ctx.pool.view(f.name, start, num_tokens) for f in ctx.schema.fields}
        self._buffer = (num_tokens, blocks)
        extra = {
            k: v for k, v in views.items() if k not in ("embedding", "token_ids", "mrope_positions")
        }
        mrope = views.get("mrope_positions")
        return Embedding(
            embedding=views.get("embedding"),
            token_ids=views.get("token_ids"),
            mrope_positions=None if mrope is None else mrope.T,
            extra=extra,
        )

    def commit(self, *, mrope_position_delta: int = 0, meta: bytes | None = None) -> None:
        """Start sending what was written into :meth:`buffer` (``meta`` as
        for :meth:`send`)."""
        if self._buffer is None:
            raise ValueError(f"room {self.room}: commit() without buffer()")
        _check_meta(self.room, meta)
        n, blocks = self._buffer
        self._buffer = None
        self._ctx.pool.synchronize()
        self._start(n, blocks, mrope_position_delta, None, meta)

    def _claim(self, what: str) -> None:
        if self._sent:
            raise ValueError(f"room {self.room}: {what} after the embedding was already given")
        self._sent = True

    def _alloc(self, n: int, timeout: float | None, *, contiguous: bool) -> list[int]:
        ctx = self._ctx
        need = -(-n // ctx.block_size)
        if need > ctx.num_blocks:
            self._sent = False
            raise ValueError(
                f"room {self.room}: {n} tokens need {need} blocks but the encoder pool has {ctx.num_blocks}"
            )
        wait = ctx.room_timeout if timeout is None else timeout
        if contiguous:
            blocks = ctx.allocator.alloc_contiguous_wait(need, wait)
        else:
            blocks = ctx.allocator.alloc_wait(need, wait)
        if blocks is None:
            kind = "adjacent " if contiguous else ""
            reason = f"no {kind}free encoder blocks for {n} tokens within {wait:g}s"
            ctx.rooms.abort_now(self._room, reason)
            raise TransferError(self.room, reason)
        return blocks

    def _start(
        self,
        n: int,
        blocks: list[int],
        delta: int,
        arrays: dict[str, Any] | None,
        meta: bytes | None = None,
    ) -> None:
        ctx = self._ctx
        checks = ctx.checksums and arrays is not None and not ctx.pool.is_torch
        try:
            ctx.pool.write_aux(
                blocks[0],
                total_tokens=n,
                mrope_position_delta=delta,
                checksum=checksum(arrays) if checks and arrays is not None else 0,
                flags=1 if checks else 0,
            )
        except BaseException:
            ctx.allocator.free(blocks)
            raise
        ctx.loop.call(ctx.rooms.data_ready, self._room, n, blocks, meta)

    def poll(self) -> Status:
        """The room's status now. Never blocks; safe from any thread."""
        return self._room.status

    @property
    def failure_reason(self) -> str | None:
        return self._room.failure_reason

    @property
    def history(self) -> list[tuple[Status, int]]:
        return self._room.history

    def wait(self, timeout: float | None = None) -> Status:
        """Block until the room is terminal (or ``timeout``); return its status."""
        ev = self._ctx.rooms.events.get(self._room)
        if ev is not None and not self._room.done:
            ev.wait(timeout)
        return self._room.status

    def abort(self, reason: str = "aborted by sender") -> None:
        """Give up on the room. When this returns, :meth:`poll` is ``Failed``
        and :attr:`failure_reason` is ``reason`` (and :meth:`wait` returns);
        destinations are told afterwards, off this thread, and the pool's
        blocks come back once no write of the room is in flight. Blocks
        handed out by :meth:`buffer` and never committed go back at once.
        No-op once the room has ended. Never blocks."""
        if self._buffer is not None:
            self._ctx.allocator.free(self._buffer[1])
            self._buffer = None
        self._ctx.rooms.abort_now(self._room, reason)

    def clear(self) -> None:
        """Forget the room (call after it ended); an unfinished room is
        aborted first (as :meth:`abort`). Never blocks."""
        ctx, room = self._ctx, self._room
        if self._buffer is not None:
            ctx.allocator.free(self._buffer[1])
            self._buffer = None
        ctx.rooms.abort_now(room, "cleared before it finished")
        # The room has ended; only bookkeeping is left (blocks come back when
        # the last write ends): forget the id now, so it can be reused at
        # once, and leave the rest to the loop's next wake-up (after the
        # abort's own work, queued before it).
        ctx.rooms.forget(room)
        ctx.loop.call_lazy(ctx.rooms.clear_room, room)
