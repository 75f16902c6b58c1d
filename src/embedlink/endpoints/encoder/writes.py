"""Write dispatch: carrying out a room's ``WriteChunk`` actions.

A write runs inline on the loop when its transport says a local copy that
small is cheaper than two thread hand-offs; else on the session's own writer
threads (a transport that limits concurrent writes) or on the endpoint's
shared writer pool. Payloads sent with ``borrow=True`` are read from the
caller's arrays (:class:`~embedlink.memory.Borrowed`) until their room frees
its blocks. Every write is reported back to the loop exactly once
(``report``), then counted.

:attr:`WriteDispatch.outstanding` counts the writes on worker threads not yet
reported back: while there are any, the loop does not busy-poll.

Runs on the loop thread, except :meth:`WriteDispatch.write` on the worker
threads (it reads the session's writer and the borrowed payload, and hands
its report to the loop).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..._runtime.loop import Loop
from ...memory import Borrowed, BufferPool
from ...observability.metrics import EndpointMetrics
from ...protocol import SenderRoom, SessionId, WriteChunk
from ...transports import DataPlaneError, PeerWriter
from .sessions import Peer
from .stats import EndpointStats

__all__ = ["WriteDispatch"]


class WriteDispatch:
    """The writer threads of one encoder endpoint and the writes they run.

    ``report(room, dst, ok, reason)`` hands a finished write to the room (on
    the loop thread); the stats are counted after it.
    """

    def __init__(
        self,
        loop: Loop,
        pool: BufferPool,
        *,
        workers: int,
        room_timeout: float,
        stats: EndpointStats,
        metrics: EndpointMetrics,
        report: Callable[[SenderRoom, SessionId, bool, str | None], None],
    ) -> None:
        self._loop = loop
        self.pool = pool
        self.room_timeout = room_timeout
        self._stats = stats
        self._metrics = metrics
        self._report = report
        self._write_workers = workers
        self._workers = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="embedlink-write"
        )
        #: payloads sent with ``borrow=True``, until their room frees its blocks
        self._borrowed: dict[SenderRoom, Borrowed] = {}
        # Writes on worker threads not yet reported back to the loop: while
        # there are any, the loop sleeps between events rather than take a CPU
        # from the copies (it is woken when they end).
        self.outstanding = 0

    def executor_for(self, writer: PeerWriter, transport: str) -> ThreadPoolExecutor | None:
        """A session's own writer threads, when its ``writer`` allows fewer
        concurrent writes than the shared pool has threads (else None)."""
        limit = writer.max_concurrent_writes
        if limit is not None and limit < self._write_workers:
            return ThreadPoolExecutor(
                max_workers=limit, thread_name_prefix=f"embedlink-write-{transport}"
            )
        return None

    # -- borrowed payloads

    def lend(self, room: SenderRoom, lent: Borrowed) -> None:
        """Send ``room`` from the caller's arrays in ``lent`` (``borrow=True``)."""
        self._borrowed[room] = lent

    def release(self, room: SenderRoom) -> None:
        """``room`` freed its blocks: no write of it is in flight, its payload is no longer read."""
        self._borrowed.pop(room, None)

    def clear_borrowed(self) -> None:
        """Closing: forget every payload (the callers' arrays, no longer read)."""
        self._borrowed.clear()

    # -- writes

    def dispatch(self, room: SenderRoom, a: WriteChunk, peer: Peer | None) -> None:
        """Start the write ``a`` of ``room`` to ``peer`` (the destination
        session as it is now; None when it is unknown)."""
        limit = peer.writer.inline_max_bytes if peer and peer.writer else 0
        if a.plan.nbytes <= limit:
            # A local copy this small costs less than two thread hand-offs.
            self.write(room, a, peer, inline=True)
        elif peer is not None and peer.executor is not None:
            self.outstanding += 1
            peer.executor.submit(self.write, room, a, peer)
        else:
            self.outstanding += 1
            self._workers.submit(self.write, room, a, peer)

    def write(
        self, room: SenderRoom, w: WriteChunk, peer: Peer | None, inline: bool = False
    ) -> None:
        """Move the bytes, then report to the loop (directly when ``inline``,
        i.e. already on the loop thread). ``peer`` is the session as it was
        when the write was planned: if it has died or registered again since,
        its writer is closed and the write fails, rather than landing in a pool
        whose blocks may have been handed to other rooms."""
        ok, reason = True, None
        t0 = time.perf_counter()
        writer = None if peer is None else peer.writer  # the loop may drop it meanwhile
        if writer is None:
            ok, reason = False, f"no data-plane connection to {w.dst}"
        else:
            try:
                lent = self._borrowed.get(room)
                if lent is None:
                    writer.write(w.plan.copies, self.pool, timeout=self.room_timeout)
                elif writer.reads_any_memory:
                    counts = [seg.count for seg in w.plan.segments]
                    sources = lent.sources(w.plan.copies, w.plan.start_token, counts)
                    writer.write_from(w.plan.copies, sources, timeout=self.room_timeout)
                else:
                    lent.place()
                    writer.write(w.plan.copies, self.pool, timeout=self.room_timeout)
            except DataPlaneError as exc:
                ok, reason = False, str(exc)
            except Exception as exc:  # a bug in a backend must still end the room
                ok, reason = False, f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        # report first (a room's status reply waits on it), count afterwards;
        # the stats are counted on the loop (one writer), the metrics are
        # thread-safe
        if inline:
            self._done(room, w.dst, ok, reason, w.plan.nbytes)
        else:
            self._loop.call(self._returned, room, w.dst, ok, reason, w.plan.nbytes)
        if ok:
            transport = peer.transport if peer is not None and peer.transport else "?"
            self._metrics.moved(transport, "sent", w.plan.nbytes, seconds)

    def _returned(
        self, room: SenderRoom, dst: SessionId, ok: bool, reason: str | None, nbytes: int
    ) -> None:
        """A write done on a worker thread, reported on the loop."""
        self.outstanding -= 1
        self._done(room, dst, ok, reason, nbytes)

    def _done(
        self, room: SenderRoom, dst: SessionId, ok: bool, reason: str | None, nbytes: int
    ) -> None:
        self._report(room, dst, ok, reason)
        if ok:
            self._stats.bytes_written += nbytes
            self._stats.chunks_written += 1
        else:
            self._stats.write_failures += 1

    def shutdown(self) -> None:
        """Closing: wait for the shared writer threads (queued writes cancelled)."""
        self._workers.shutdown(wait=True, cancel_futures=True)
