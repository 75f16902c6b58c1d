"""The benches' stand-in output buffers (embedlink.tools.outputs): a buffer
is handed out again only once nothing holds it, neither the tensor nor a
view of its storage; a held one is never written over."""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (EMBEDLINK_TEST_TORCH=0)")

from embedlink.tools.outputs import FreeBuffers, storage_uses  # noqa: E402


def test_a_buffer_nothing_holds_is_handed_out_again():
    bufs = FreeBuffers(torch.zeros(4, 8), ready=1)
    first = bufs.take()
    ptr = first.data_ptr()
    del first
    again = bufs.take()
    assert again.data_ptr() == ptr and bufs.grown == 0


def test_ready_buffers_are_written_once_up_front():
    like = torch.arange(32, dtype=torch.float32).reshape(4, 8)
    bufs = FreeBuffers(like, ready=2)
    assert len(bufs.slots) == 2
    assert all(torch.equal(s, like) for s in bufs.slots)


def test_a_held_tensor_is_not_handed_out():
    bufs = FreeBuffers(torch.zeros(4, 8), ready=1)
    held = bufs.take()
    other = bufs.take()
    assert other.data_ptr() != held.data_ptr() and bufs.grown == 1


def test_a_view_of_a_buffer_holds_it():
    bufs = FreeBuffers(torch.zeros(4, 8), ready=1)
    t = bufs.take()
    ptr = t.data_ptr()
    view = t[1:3]  # a sender still reading a slice of the output
    del t
    gc.collect()
    assert bufs.take().data_ptr() != ptr
    del view
    assert bufs.take().data_ptr() == ptr and bufs.grown == 1


def test_storage_uses_counts_views():
    t = torch.zeros(16)
    base = storage_uses(t)
    if base == 0:
        pytest.skip("this torch cannot report storage use counts")
    v = t[2:4]
    assert storage_uses(t) == base + 1
    del v
    assert storage_uses(t) == base
