"""The same-host control lane: framing over a real Unix stream socket pair."""

import select
import socket
import struct
import uuid

import pytest

from embedlink._runtime import lane as _lane
from embedlink._runtime.lane import MAX_FRAME, Lane

pytestmark = pytest.mark.skipif(not _lane.SUPPORTED, reason="lanes need Linux abstract sockets")


def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Lane(a), Lane(b)


def drain(rx, want, tx=None, timeout=5.0):
    """Receive until ``want`` messages arrived, flushing ``tx`` meanwhile."""
    got = []
    while len(got) < want:
        if tx is not None:
            tx.flush()
        ready, _, _ = select.select([rx.fileno()], [], [], timeout)
        assert ready, f"only {len(got)} of {want} messages arrived"
        frames, closed = rx.receive()
        got += frames
        assert closed is None
    return got


def test_lane_delivers_messages_whole_and_in_order():
    a, b = pair()
    sent = [b"", b"x", bytes(range(256)) * 300, b"y" * (1 << 20), b"end"]
    for p in sent:
        assert a.send(p)
    # the 1 MiB message does not fit the socket buffer: the rest queues
    assert drain(b, len(sent), tx=a) == sent
    assert not a.wants_write and a.dropped == 0


def test_lane_queues_for_a_peer_that_does_not_read_then_flushes_in_order():
    a, b = pair()
    payloads = [i.to_bytes(4, "big") * 1000 for i in range(200)]  # 800 KB in all
    for p in payloads:
        assert a.send(p)
    assert a.wants_write  # more than the kernel takes without a reader
    assert drain(b, len(payloads), tx=a) == payloads
    assert not a.wants_write


def test_lane_drops_and_counts_beyond_its_backlog(monkeypatch):
    monkeypatch.setattr(_lane, "MAX_BACKLOG", 64 << 10)
    a, b = pair()
    results = [a.send(b"z" * 4096) for _ in range(400)]  # 1.6 MB, nobody reads
    assert results.count(False) == a.dropped > 0
    assert results[: results.index(False)] == [True] * results.index(False)
    # what was accepted still arrives, whole and in order
    accepted = results.count(True)
    assert drain(b, accepted, tx=a) == [b"z" * 4096] * accepted


def test_lane_refuses_to_send_a_message_over_the_limit():
    a, _ = pair()
    assert not a.send(b"\0" * (MAX_FRAME + 1))
    assert a.dropped == 1 and not a.wants_write


def test_lane_closes_on_an_oversized_frame_from_the_peer():
    raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    rx = Lane(theirs)
    raw.sendall(struct.pack(">I", 3) + b"abc" + struct.pack(">I", MAX_FRAME + 1) + b"junk")
    select.select([rx.fileno()], [], [], 5)
    frames, closed = rx.receive()
    assert frames == [b"abc"]  # what came before the bad frame is kept
    assert closed is not None and "limit" in closed
    assert rx.closed and not rx.send(b"after")


def test_lane_reports_the_end_after_the_last_messages():
    a, b = pair()
    a.send(b"one")
    a.send(b"two")
    a.close()
    a.close()  # idempotent
    got, closed = [], None
    while closed is None:
        select.select([b.fileno()], [], [], 5)
        frames, closed = b.receive()
        got += frames
    assert got == [b"one", b"two"]
    assert "closed by the peer" in closed and b.closed


def test_lane_reassembles_a_frame_split_across_reads():
    raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    rx = Lane(theirs)
    frame = struct.pack(">I", 10) + b"0123456789"
    raw.sendall(frame[:2])
    select.select([rx.fileno()], [], [], 5)
    assert rx.receive() == ([], None)
    raw.sendall(frame[2:7])
    select.select([rx.fileno()], [], [], 5)
    assert rx.receive() == ([], None)
    raw.sendall(frame[7:] + frame)
    assert drain(rx, 2) == [b"0123456789"] * 2


def test_listen_connect_accept_by_address():
    address = f"test-{uuid.uuid4().hex}:7000"
    listener = _lane.listen(address)
    assert listener is not None
    try:
        assert _lane.listen(address) is None  # the name is taken
        assert _lane.connect(f"test-{uuid.uuid4().hex}:7000") is None  # nobody there
        client = _lane.connect(address)
        assert client is not None
        select.select([listener.fileno()], [], [], 5)
        (server,) = _lane.accept(listener)
        assert _lane.accept(listener) == []
        client.send(b"hello")
        assert drain(server, 1) == [b"hello"]
        server.send(b"back")
        assert drain(client, 1) == [b"back"]
        client.close()
        server.close()
    finally:
        listener.close()
    assert _lane.connect(address) is None  # gone with the listener


def test_a_failed_send_stops_the_lane_but_leaves_closing_to_its_owner():
    import os

    a, b = pair()
    b.close()
    assert not a.send(b"to nobody")  # EPIPE: the peer is gone
    assert a.closed and a.dropped == 1
    os.fstat(a.fileno())  # still open: a poller may still be watching it
    frames, why = a.receive()
    assert frames == [] and why is not None
    a.close()
    with pytest.raises(OSError):
        os.fstat(a.fileno())
