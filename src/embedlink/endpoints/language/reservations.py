"""The language side's reservation queue: who gets the pool's blocks, in
what order, when there are not enough for everyone.

Deadlock avoidance (the argument in :mod:`embedlink.endpoints.language`):
a first reservation can wait for data the encoder cannot produce until its
own pool drains, and the encoder pool drains only when the rooms it holds are
resumed. So resumes are served before first reservations, and first
reservations never take the last ``resume_headroom`` blocks: a resume always
finds blocks eventually, every resumed room finishes, the encoder frees its
pool, and the rooms waiting on it can proceed. Within each class it is first
come, first served.

The queue knows blocks and tokens only: what a room does with its blocks is
the ``grant`` callback's business, so the policy is tested on a
:class:`~embedlink.memory.BlockAllocator` alone (tests/unit/test_language_parts.py).
Not thread-safe by itself: the endpoint's loop thread owns the queues; the one
call another thread makes (:meth:`take` for the caller-thread fast start) runs
under ``lock``, which every allocation here also takes.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from ...memory import BlockAllocator

__all__ = ["ReservationQueue"]

T = TypeVar("T")


class ReservationQueue(Generic[T]):
    """Rooms (any hashable-by-identity ``T``) waiting for blocks.

    ``grant(item, blocks, tokens)`` hands ``blocks`` to ``item``, which asked
    for ``tokens`` (the blocks may hold fewer); it is called by
    :meth:`request` and :meth:`retry` and may itself free blocks and call
    :meth:`retry` again (a granted room can end at once). ``zero_copy``: a
    first reservation asks for as many free blocks after it as it takes, so a
    room that resumes can grow in place (``BlockAllocator.alloc_up_to``'s
    ``spare``). ``handed`` counts rooms promised a first reservation that have
    not asked yet (the endpoint's fast start must not overtake them).
    """

    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        resume_headroom: int,
        *,
        lock: threading.Lock,
        zero_copy: bool = False,
        handed: Callable[[], int] = lambda: 0,
    ) -> None:
        if not 0 <= resume_headroom < allocator.num_blocks:
            raise ValueError(
                f"resume_headroom={resume_headroom} must be in [0, {allocator.num_blocks})"
            )
        self.allocator = allocator
        self.block_size = block_size
        self.resume_headroom = resume_headroom
        self.zero_copy = zero_copy
        self._lock = lock
        self._handed = handed
        self.resumes: collections.deque[tuple[T, int]] = collections.deque()
        self.firsts: collections.deque[tuple[T, int]] = collections.deque()
        self._queued: set[int] = set()  # id() of the items in either deque

    def __len__(self) -> int:
        return len(self.resumes) + len(self.firsts)

    def queued(self, item: T) -> bool:
        return id(item) in self._queued

    def take(self, tokens: int, *, resume: bool, only_if_idle: bool = False) -> list[int] | None:
        """Blocks for ``tokens`` (fewer when the pool is short), or None. A
        room's first reservation (not a ``resume``) leaves ``resume_headroom``
        blocks. Under the lock, so the caller's fast start and the loop cannot
        both take the headroom; ``only_if_idle``: only if no room queues for
        blocks (nor was handed to the loop to start)."""
        want = -(-tokens // self.block_size)
        with self._lock:
            if only_if_idle and (self.firsts or self.resumes or self._handed()):
                return None
            if not resume:
                want = min(want, self.allocator.num_free - self.resume_headroom)
                if want <= 0:
                    return None
            return self.allocator.alloc_up_to(want, want if self.zero_copy and not resume else 0)

    def request(
        self, item: T, tokens: int, *, resume: bool, grant: Callable[[T, list[int], int], None]
    ) -> bool:
        """Grant ``item`` its blocks now, or queue it: True when granted. It
        queues behind earlier rooms of its class, and a first reservation
        also behind any resume."""
        q = self.resumes if resume else self.firsts
        if q or (not resume and self.resumes) or not self._try(item, tokens, resume, grant):
            self._queued.add(id(item))
            q.append((item, tokens))
            return False
        return True

    def remove(self, item: T) -> None:
        """Take ``item`` out of the queues (it ended, or its encoder died)."""
        if id(item) in self._queued:
            self.resumes = collections.deque(x for x in self.resumes if x[0] is not item)
            self.firsts = collections.deque(x for x in self.firsts if x[0] is not item)
            self._queued.discard(id(item))

    def retry(self, grant: Callable[[T, list[int], int], None], done: Callable[[T], bool]) -> None:
        """Serve the queues in order after blocks came back: resumes, then
        first reservations, each until one does not fit (it keeps its place).
        Items for which ``done`` holds are dropped."""
        for q, resume in ((self.resumes, True), (self.firsts, False)):
            while q:
                item, tokens = q[0]
                q.popleft()
                self._queued.discard(id(item))
                if done(item):
                    continue
                if not self._try(item, tokens, resume, grant):
                    q.appendleft((item, tokens))
                    self._queued.add(id(item))
                    return

    def _try(
        self, item: T, tokens: int, resume: bool, grant: Callable[[T, list[int], int], None]
    ) -> bool:
        blocks = self.take(tokens, resume=resume)
        if blocks is None:
            return False
        grant(item, blocks, tokens)
        return True
