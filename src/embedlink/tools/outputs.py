"""Output buffers for the benches' stand-in encoders, handed out as a
model runner's caching allocator hands out its memory.

A vision or audio tower on a GPU writes each output into memory its caching
allocator already holds; torch's CPU allocator instead maps fresh pages for
every large tensor, and faulting them in costs several times the copy (on a
2-core VM a fresh 117 MB bfloat16 tensor took 70 ms to fill, a held one about
15 ms). A bench that allocated per output would measure that cost in every
path alike. :class:`FreeBuffers` keeps the buffers it made and hands out
again only one that nothing else holds any more: a buffer still referenced
(by an engine's cache, by a connector still sending from it, by a view of
it) is never written over, because that would change a tensor someone is
still reading; when every buffer is held, it makes a new one.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["FreeBuffers", "storage_uses"]


def storage_uses(t: Any) -> int:
    """How many references the storage under tensor ``t`` has (``t`` itself
    and the storage object made to ask count two); 0 where torch cannot say,
    and then the tensor's own reference count decides alone."""
    import torch

    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return 0
    return int(use_count(t.untyped_storage()._cdata))


class FreeBuffers:
    """Buffers shaped like ``like`` (module docstring). :meth:`take` returns
    one nothing else holds; its contents are whatever was last written
    there, so the caller writes every byte it hands on. ``ready`` buffers
    are made up front and written once, so that their pages are faulted in
    before anything is timed (as a long-running runner's memory)."""

    def __init__(self, like: Any, ready: int = 0) -> None:
        import torch

        self.like = like
        self.slots: list[Any] = []
        for _ in range(ready):
            slot = torch.empty_like(like)
            slot.copy_(like)
            self.slots.append(slot)
        #: buffers made after the ``ready`` ones, because every one was held
        self.grown = 0

    def take(self) -> Any:
        for slot in self.slots:
            # this list, the loop variable and getrefcount's argument hold
            # the tensor; a view of it (a torch slice) holds its storage
            if sys.getrefcount(slot) <= 3 and storage_uses(slot) <= 2:
                return slot
        import torch

        slot = torch.empty_like(self.like)
        self.slots.append(slot)
        self.grown += 1
        return slot
