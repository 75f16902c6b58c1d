"""An in-process link between one :class:`SenderRoom` and N :class:`ReceiverRoom`.

It carries out the core's actions against real :class:`BufferPool` memory
(copies are real byte copies) but moves control messages through a list that
the caller drives, so a test can deliver, drop, duplicate and reorder them
(after h11's ``ConnectionPair``). No threads, sockets or clocks: time is a
number the caller advances. Used by the unit and property tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..memory import BlockAllocator, BufferPool, checksum
from ..protocol import (
    Abort,
    Action,
    BufferSchema,
    Drop,
    FreeBlocks,
    Harvest,
    Message,
    ReceiverRoom,
    Reserve,
    Resume,
    Send,
    SenderRoom,
    Status,
    StatusChanged,
    StatusUpdate,
    TransferRequest,
    WriteChunk,
)

__all__ = ["Endpoint", "InFlight", "Link", "checksum"]


@dataclass
class Endpoint:
    """One side's pool and allocator."""

    pool: BufferPool
    alloc: BlockAllocator


@dataclass
class InFlight:
    """A message on its way: ``to`` is a destination session, or ``None`` for the sender."""

    to: str | None
    frm: str | None
    msg: Message


@dataclass
class _Dest:
    session: str
    ep: Endpoint
    room: ReceiverRoom
    result: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    aux: Any = None
    pending_reserve: int | None = None


class Link:
    """One room, one sender, ``len(sessions)`` receivers, real pools on both ends."""

    def __init__(
        self,
        schema: BufferSchema,
        *,
        block_size: int,
        sender_blocks: int,
        receiver_blocks: int,
        default_tokens: int,
        n_dst: int = 1,
        room: int = 7,
        timeout: float = 30.0,
    ) -> None:
        self.schema = schema
        self.block_size = block_size
        self.now = 0.0
        self.sender_ep = Endpoint(
            BufferPool(schema, sender_blocks, block_size), BlockAllocator(sender_blocks)
        )
        self.sender = SenderRoom(
            room,
            schema=schema,
            block_size=block_size,
            now=0.0,
            timeout=timeout,
            src_num_blocks=sender_blocks,
        )
        self.dests: dict[str, _Dest] = {}
        for i in range(n_dst):
            s = f"lang-{i}"
            ep = Endpoint(
                BufferPool(schema, receiver_blocks, block_size), BlockAllocator(receiver_blocks)
            )
            r = ReceiverRoom(
                room,
                session=s,
                epoch=1000 + i,
                block_size=block_size,
                now=0.0,
                timeout=timeout,
                default_tokens=default_tokens,
                required_dst_info_num=n_dst,
            )
            self.dests[s] = _Dest(s, ep, r)
        self.wire: list[InFlight] = []
        self.writes: list[tuple[str, WriteChunk]] = []  # pending data-plane writes
        self.drops: list[str] = []
        #: every byte range written into each destination pool: (session, field, start, end)
        self.written: list[tuple[str, str, int, int]] = []
        self.reservations: dict[str, list[tuple[str, int, int]]] = {s: [] for s in self.dests}

    # -- driving

    def start(self) -> None:
        for d in self.dests.values():
            self._run_receiver(d, d.room.start(self.now))

    def send(
        self,
        arrays: dict[str, np.ndarray[Any, Any]],
        mrope_delta: int = 0,
        meta: bytes | None = None,
    ) -> bool:
        """Copy an embedding into the sender pool; False when the pool is full."""
        n = next(iter(arrays.values())).shape[0]
        blocks = self.sender_ep.alloc.alloc(-(-n // self.block_size))
        if blocks is None:
            return False
        self.sender_ep.pool.scatter(blocks, arrays)
        self.sender_ep.pool.write_aux(
            blocks[0],
            total_tokens=n,
            mrope_position_delta=mrope_delta,
            checksum=checksum(arrays),
            flags=1,
        )
        self._run_sender(self.sender.data_ready(n, blocks, self.now, meta))
        return True

    def deliver(self, i: int = 0, *, keep: bool = False) -> None:
        """Deliver message ``i`` of :attr:`wire`; ``keep`` leaves a copy (a duplicate)."""
        m = self.wire[i] if keep else self.wire.pop(i)
        if m.to is None:
            msg = m.msg
            if isinstance(msg, TransferRequest):
                acts = self.sender.request(
                    msg, self.now, dst_num_blocks=self.dests[msg.session].ep.pool.num_blocks
                )
            elif isinstance(msg, Resume):
                acts = self.sender.resume(msg, self.now)
            elif isinstance(msg, Abort):
                acts = self.sender.peer_abort(msg, self.now)
            else:
                raise AssertionError(f"unexpected {msg!r}")
            self._run_sender(acts)
        else:
            d = self.dests[m.to]
            if isinstance(m.msg, StatusUpdate):
                self._run_receiver(d, d.room.status_update(m.msg, self.now))
            elif isinstance(m.msg, Abort):
                self._run_receiver(d, d.room.peer_abort(m.msg, self.now))
            else:
                raise AssertionError(f"unexpected {m.msg!r}")

    def complete_write(self, i: int = 0, ok: bool = True) -> None:
        """Carry out pending data-plane write ``i`` (really copying bytes when ``ok``)."""
        dst, w = self.writes.pop(i)
        if ok:
            d = self.dests[dst]
            for c in w.plan.copies:
                src = self.sender_ep.pool.field_bytes(c.field)
                out = d.ep.pool.field_bytes(c.field)
                out[c.dst_offset : c.dst_offset + c.length] = src[
                    c.src_offset : c.src_offset + c.length
                ]
                self.written.append((dst, c.field, c.dst_offset, c.dst_offset + c.length))
        self._run_sender(
            self.sender.write_done(dst, ok, self.now, None if ok else "injected failure")
        )

    def retry_reservations(self) -> None:
        for d in self.dests.values():
            if d.pending_reserve is not None:
                want, d.pending_reserve = d.pending_reserve, None
                self._run_receiver(d, [Reserve(want)])

    def tick(self, dt: float) -> None:
        self.now += dt
        self._run_sender(self.sender.tick(self.now))
        for d in self.dests.values():
            self._run_receiver(d, d.room.tick(self.now))

    def run(self, max_steps: int = 100_000) -> None:
        """Deliver everything in order until quiet."""
        for _ in range(max_steps):
            if self.writes:
                self.complete_write(0)
            elif self.wire:
                self.deliver(0)
            elif any(d.pending_reserve is not None for d in self.dests.values()):
                before = [d.pending_reserve for d in self.dests.values()]
                self.retry_reservations()
                if [d.pending_reserve for d in self.dests.values()] == before and not self.wire:
                    return
            else:
                return
        raise AssertionError("link did not go quiet")

    # -- action execution

    def _run_sender(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                assert a.to is not None
                self.wire.append(InFlight(a.to, None, a.msg))
            elif isinstance(a, WriteChunk):
                self.writes.append((a.dst, a))
            elif isinstance(a, FreeBlocks):
                self.sender_ep.alloc.free(a.blocks)
            elif isinstance(a, Drop):
                self.drops.append(a.reason)
            elif isinstance(a, StatusChanged):
                pass
            else:
                raise AssertionError(f"sender cannot {a!r}")

    def _run_receiver(self, d: _Dest, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.wire.append(InFlight(None, d.session, a.msg))
            elif isinstance(a, Reserve):
                bs = self.block_size
                blocks = d.ep.alloc.alloc_up_to(-(-a.tokens // bs))
                if blocks is None:
                    d.pending_reserve = a.tokens
                    continue
                tokens = min(a.tokens, len(blocks) * bs)
                self.reservations[d.session].append(("+", blocks[0], len(blocks)))
                self._run_receiver(d, d.room.reserved(blocks, tokens, self.now))
            elif isinstance(a, Harvest):
                self._harvest(d, a)
            elif isinstance(a, FreeBlocks):
                d.ep.alloc.free(a.blocks)
            elif isinstance(a, Drop):
                self.drops.append(a.reason)
            elif isinstance(a, StatusChanged):
                pass
            else:
                raise AssertionError(f"receiver cannot {a!r}")

    def _harvest(self, d: _Dest, h: Harvest) -> None:
        if not d.result:
            for f in self.schema.fields:
                d.result[f.name] = np.zeros((h.total_tokens, *f.shape), dtype=f.np_dtype)
        for f in self.schema.fields:
            d.ep.pool.gather(h.runs, f.name, d.result[f.name], h.start_token)
        if h.with_aux:
            d.aux = d.ep.pool.read_aux(h.aux_block)

    # -- inspection

    def status(self, session: str) -> Status:
        return self.dests[session].room.status

    def result(self, session: str) -> dict[str, np.ndarray[Any, Any]]:
        return self.dests[session].result
