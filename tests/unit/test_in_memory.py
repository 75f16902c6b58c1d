"""embedlink.testing.memory: in-memory lanes and data plane, alone and under
a real encoder/language pair in this process (no Unix socket, no data-plane
socket)."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable

import numpy as np
import pytest

from embedlink import (
    BufferPool,
    BufferSchema,
    EncoderEndpoint,
    LanguageEndpoint,
    Status,
    TransferError,
)
from embedlink._runtime import lane as _lane
from embedlink.protocol import AUX_FIELD, Copy
from embedlink.testing.memory import MemoryLane, MemoryLanes, MemoryTransport, in_memory
from embedlink.tools.workers import make_embedding, same_embedding
from embedlink.transports import DataPlaneError, WriteOutOfBounds, get_backend

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(os, "eventfd"), reason="in-memory lanes need eventfd"),
]
SCHEMA = BufferSchema(hidden_size=32)


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# -- lanes


def test_a_memory_lane_carries_messages_and_the_end_of_stream() -> None:
    a, b = MemoryLane.pair()
    assert not readable(b.fileno())
    assert a.send(b"one") and a.send(b"two")
    assert readable(b.fileno())
    assert b.receive() == ([b"one", b"two"], None)
    assert not readable(b.fileno())
    a.close()
    assert readable(b.fileno())
    assert b.receive() == ([], "connection closed by the peer") and b.closed
    assert not b.send(b"late") and b.dropped == 1
    b.close()


def test_an_oversized_message_is_dropped_like_zeromq_would() -> None:
    a, b = MemoryLane.pair()
    assert not a.send(b"x" * (_lane.MAX_FRAME + 1)) and a.dropped == 1
    a.close()
    b.close()


def test_memory_lanes_connect_only_to_a_listener_and_names_are_exclusive() -> None:
    lanes = MemoryLanes()
    assert lanes.connect("127.0.0.1:1") is None
    listener = lanes.listen("127.0.0.1:1")
    assert listener is not None and lanes.listen("127.0.0.1:1") is None
    mine = lanes.connect("127.0.0.1:1")
    assert mine is not None and readable(listener.fileno())
    (theirs,) = _lane.accept(listener)
    assert mine.send(b"hello") and theirs.receive() == ([b"hello"], None)
    listener.close()
    assert lanes.connect("127.0.0.1:1") is None  # gone with its listener
    assert lanes.listen("127.0.0.1:1") is not None  # and the name is free again
    mine.close()
    theirs.close()


# -- the data plane


def pools() -> tuple[MemoryTransport, BufferPool, BufferPool, object]:
    transport = MemoryTransport()
    src, dst = BufferPool(SCHEMA, 4, 8), BufferPool(SCHEMA, 4, 8)
    server = transport.server(dst, host="127.0.0.1").start()
    return transport, src, dst, server


def writer_for(transport: MemoryTransport, server: object, dst: BufferPool, link: str) -> object:
    names = [*SCHEMA.names, AUX_FIELD]
    regions = {n: dst.region(n)[1] for n in names}
    offer = server.offer_for(link)  # type: ignore[attr-defined]
    assert transport.reachable(offer, host_id="any")
    return transport.connect(offer, regions=regions, field_names=names, timeout=1.0)


def test_a_memory_write_lands_in_the_destination_pool_within_bounds() -> None:
    transport, src, dst, server = pools()
    w = writer_for(transport, server, dst, "link-1")
    src.field_bytes("embedding")[:64] = bytes(range(64))
    w.write([Copy("embedding", 0, 128, 64)], src, 1.0)  # type: ignore[attr-defined]
    assert bytes(dst.field_bytes("embedding")[128:192]) == bytes(range(64))
    assert transport.bytes_written == 64
    size = dst.region("embedding")[1]
    with pytest.raises(WriteOutOfBounds):
        w.write([Copy("embedding", 0, size - 8, 64)], src, 1.0)  # type: ignore[attr-defined]


def test_a_fenced_link_writes_no_more_and_others_still_do() -> None:
    transport, src, dst, server = pools()
    fenced, other = (writer_for(transport, server, dst, n) for n in ("a", "b"))
    calls: list[str] = []
    assert server.fence("a", lambda: calls.append("done"))  # type: ignore[attr-defined]
    assert calls == ["done"]  # nothing was in flight
    with pytest.raises(DataPlaneError, match="fenced"):
        fenced.write([Copy("embedding", 0, 0, 8)], src, 1.0)  # type: ignore[attr-defined]
    other.write([Copy("embedding", 0, 0, 8)], src, 1.0)  # type: ignore[attr-defined]


def test_fail_writes_makes_every_write_fail_until_switched_off() -> None:
    transport, src, dst, server = pools()
    w = writer_for(transport, server, dst, "a")
    transport.fail_writes("the wire is cut")
    with pytest.raises(DataPlaneError, match="the wire is cut"):
        w.write([Copy("embedding", 0, 0, 8)], src, 1.0)  # type: ignore[attr-defined]
    transport.fail_writes(None)
    w.write([Copy("embedding", 0, 0, 8)], src, 1.0)  # type: ignore[attr-defined]


def test_in_memory_registers_the_backend_and_the_lanes_only_for_its_block() -> None:
    with in_memory() as (transport, _):
        assert get_backend("memory") is transport
    with pytest.raises(ValueError, match="unknown transport 'memory'"):
        get_backend("memory")
    assert _lane.use_provider(None) is None


# -- a real endpoint pair over them


def pair(
    **lang: object,
) -> tuple[EncoderEndpoint, LanguageEndpoint]:
    enc = EncoderEndpoint(
        SCHEMA, num_blocks=32, block_size=8, transports=["memory"], heartbeat_interval=0.2
    ).start()
    options: dict[str, object] = {
        "num_blocks": 32,
        "block_size": 8,
        "default_tokens": 16,
        "transports": ["memory"],
        "heartbeat_interval": 0.2,
        **lang,
    }
    return enc, LanguageEndpoint(SCHEMA, **options).start()  # type: ignore[arg-type]


def test_a_room_that_resumes_moves_entirely_through_memory() -> None:
    with in_memory() as (transport, lanes):
        enc, lang = pair()
        try:
            emb = make_embedding(SCHEMA, 50, 3, 1)  # 50 tokens, 16 reserved: it resumes
            rx = lang.receiver(room=1, encoder=enc.address)
            enc.sender(1).send(emb)
            got = rx.wait(timeout=20)
            assert same_embedding(got, emb)
            assert rx.poll() is Status.Success and len({s for s, _ in rx.history}) >= 3
            assert lanes.connections == 1 and transport.bytes_written > 0
            (peer,) = lang.status()["peers"]
            assert peer["control"] == "unix"  # a lane, not ZeroMQ
            assert enc.sessions() == {lang.session: "memory"}
        finally:
            lang.close()
            enc.close()


def test_a_direct_room_waits_for_every_rank_it_is_told_of() -> None:
    """``encoder=`` given directly and ``required_dst_info_num=2`` (two
    language TP ranks, as the SGLang plugin opens a part): the encoder's room
    sends once both asked, and each rank gets the whole embedding."""
    with in_memory():
        enc, lang0 = pair(tp_rank=0, tp_size=2)
        lang1 = LanguageEndpoint(
            SCHEMA, num_blocks=32, block_size=8, default_tokens=16, transports=["memory"],
            heartbeat_interval=0.2, tp_rank=1, tp_size=2,
        ).start()  # fmt: skip
        try:
            emb = make_embedding(SCHEMA, 50, 3, 1)  # resumes at each rank
            with pytest.raises(ValueError, match="at least 1"):
                lang0.receiver(room=5, encoder=enc.address, required_dst_info_num=0)
            rx0 = lang0.receiver(room=5, encoder=enc.address, required_dst_info_num=2)
            rx1 = lang1.receiver(room=5, encoder=enc.address, required_dst_info_num=2)
            enc.sender(5).send(emb)
            assert same_embedding(rx0.wait(timeout=20), emb)
            assert same_embedding(rx1.wait(timeout=20), emb)
            assert enc.stats.write_failures == 0
            assert set(enc.sessions()) == {lang0.session, lang1.session}
        finally:
            lang1.close()
            lang0.close()
            enc.close()


def test_a_failing_write_fails_the_room_with_the_transport_reason() -> None:
    with in_memory() as (transport, _):
        enc, lang = pair()
        try:
            transport.fail_writes("injected failure")
            rx = lang.receiver(room=2, encoder=enc.address)
            enc.sender(2).send(make_embedding(SCHEMA, 10, 1, 2))
            with pytest.raises(TransferError, match="injected failure"):
                rx.wait(timeout=20)
            until(lambda: lang.pool_usage()[0] == 0, "the language pool to drain")
        finally:
            lang.close()
            enc.close()


def test_an_encoder_that_closes_fails_its_rooms_and_the_fence_gives_blocks_back() -> None:
    with in_memory() as (_, _lanes):
        enc, lang = pair(stale_write_grace=600.0)  # only the fence can give them back
        try:
            rx = lang.receiver(room=3, encoder=enc.address)
            until(lambda: lang.pool_usage()[0] > 0, "the first reservation")
            enc.close()
            with pytest.raises(TransferError, match=enc.address):
                rx.wait(timeout=20)
            rx.clear()
            until(lambda: lang.pool_usage()[0] == 0, "the fenced blocks to come back")
            assert lang.status()["counters"]["dead_encoders"] == 1
        finally:
            lang.close()
            enc.close()


def test_arrays_of_the_result_are_the_callers() -> None:
    with in_memory():
        enc, lang = pair()
        try:
            emb = make_embedding(SCHEMA, 12, 9, 4)
            rx = lang.receiver(room=4, encoder=enc.address)
            enc.sender(4).send(emb)
            got = rx.wait(timeout=20)
            rx.clear()
            assert got.embedding is not None and emb.embedding is not None
            np.testing.assert_array_equal(
                np.asarray(got.embedding, dtype=np.float32),
                np.asarray(emb.embedding, dtype=np.float32),
            )
        finally:
            lang.close()
            enc.close()


def test_the_data_plane_error_keeps_its_old_name() -> None:
    from embedlink.transports import DataPlaneError
    from embedlink.transports import TransportError as Old

    assert Old is DataPlaneError and issubclass(WriteOutOfBounds, DataPlaneError)


def test_both_endpoints_share_one_lifecycle_and_report_it_publicly() -> None:
    """EndpointBase: running before, during and after; start once; health and
    status without reaching into the loop."""
    with in_memory():
        enc = EncoderEndpoint(SCHEMA, num_blocks=8, block_size=16, transports=("memory",))
        lang = LanguageEndpoint(
            SCHEMA, num_blocks=8, block_size=16, default_tokens=16, transports=("memory",)
        )
        try:
            for ep, side in ((enc, "encoder"), (lang, "language")):
                assert not ep.running and ep.metrics_address is None
                with ep as same:
                    assert same is ep and ep.running
                    with pytest.raises(RuntimeError, match="already started"):
                        ep.start()
                    status = ep.status()
                    assert status["side"] == side and status["loop_errors"] == ep.loop_errors == 0
                    assert ep.pool_usage() == (0, 8) and ep.busy_poll_us == pytest.approx(400)
                assert not ep.running
                with pytest.raises(RuntimeError, match="closed"):
                    ep.start()
        finally:
            lang.close()
            enc.close()
