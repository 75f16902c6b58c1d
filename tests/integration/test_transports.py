"""Data-plane backends on real sockets and real shared memory."""

import socket
import struct

import numpy as np
import pytest

from embedlink import BufferPool, BufferSchema
from embedlink._host import host_id
from embedlink.protocol import AUX_FIELD, Copy
from embedlink.transports import TransportError, WriteOutOfBounds, get_backend
from embedlink.transports.base import regions_of
from embedlink.transports.shm import create_shared_pool

pytestmark = pytest.mark.integration
SCHEMA = BufferSchema(hidden_size=16)
NAMES = [*SCHEMA.names, AUX_FIELD]


def src_pool():
    p = BufferPool(SCHEMA, 8, 4)
    p.backing[:] = np.arange(p.nbytes, dtype=np.uint64).astype(np.uint8)
    return p


@pytest.fixture(params=["tcp", "shm", "mooncake"])
def endpoint(request):
    shared = create_shared_pool(SCHEMA, 8, 4)
    backend = get_backend(request.param)
    server = backend.server(shared.pool, host="127.0.0.1").start()
    offer = server.offer()
    assert backend.reachable(offer, host_id=host_id())
    writer = backend.connect(
        offer, regions=regions_of(shared.pool.layout), field_names=NAMES, timeout=5
    )
    yield shared.pool, writer, server
    writer.close()
    server.close()
    shared.close()


def test_write_lands_byte_for_byte(endpoint):
    dst, writer, _ = endpoint
    src = src_pool()
    copies = [
        Copy("embedding", 64, 128, 256),
        Copy("token_ids", 0, 12, 8),
        Copy(AUX_FIELD, 0, 32, 32),
    ]
    writer.write(copies, src, timeout=5)
    for c in copies:
        assert bytes(dst.field_bytes(c.field)[c.dst_offset : c.dst_offset + c.length]) == bytes(
            src.field_bytes(c.field)[c.src_offset : c.src_offset + c.length]
        )


def test_write_outside_region_is_refused_and_writes_nothing(endpoint):
    dst, writer, _ = endpoint
    before = dst.backing.copy()
    size = len(dst.field_bytes("embedding"))
    with pytest.raises(WriteOutOfBounds, match="exceeds"):
        writer.write(
            [Copy("token_ids", 0, 0, 4), Copy("embedding", 0, size - 2, 4)], src_pool(), timeout=5
        )
    assert np.array_equal(before, dst.backing)
    writer.write([Copy("token_ids", 0, 0, 4)], src_pool(), timeout=5)  # still usable


def test_tcp_server_refuses_raw_out_of_bounds_batch_and_stays_up():
    pool = BufferPool(SCHEMA, 8, 4)
    server = get_backend("tcp").server(pool, host="127.0.0.1").start()
    try:
        before = pool.backing.copy()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            # claims field 0 at an offset past its region
            s.sendall(
                struct.pack("<4sIQ", b"ELT1", 1, 4) + struct.pack("<HQQ", 0, 1 << 40, 4) + b"abcd"
            )
            status, n = struct.unpack("<BI", s.recv(5))
            msg = s.recv(n).decode()
            assert status == 1 and "exceeds" in msg
            # unknown field id
            s.sendall(struct.pack("<4sIQ", b"ELT1", 1, 1) + struct.pack("<HQQ", 99, 0, 1) + b"x")
            status, n = struct.unpack("<BI", s.recv(5))
            assert status == 1 and "unknown field" in s.recv(n).decode()
            # a good batch on the same connection
            s.sendall(
                struct.pack("<4sIQ", b"ELT1", 1, 4) + struct.pack("<HQQ", 1, 0, 4) + b"\1\2\3\4"
            )
            assert struct.unpack("<BI", s.recv(5)) == (0, 0)
        off = pool.layout["token_ids"][0]
        changed = np.flatnonzero(before != pool.backing)
        assert set(changed) <= set(range(off, off + 4))  # only the good batch landed
        assert bytes(pool.field_bytes("token_ids")[:4]) == b"\1\2\3\4"
        assert server.refused == 2
        # garbage header: the connection is dropped, the server lives on
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GARBAGE!" * 4)
            try:
                assert s.recv(1) == b""  # closed...
            except ConnectionResetError:
                pass  # ...or reset, since it left our bytes unread
        w = get_backend("tcp").connect(
            server.offer(), regions=regions_of(pool.layout), field_names=NAMES, timeout=5
        )
        w.write([Copy("token_ids", 0, 0, 4)], src_pool(), timeout=5)
        w.close()
    finally:
        server.close()


def test_tcp_writer_to_dead_peer_raises_transport_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from embedlink.protocol import TransportOffer

    w = get_backend("tcp").connect(
        TransportOffer("tcp", {"host": "127.0.0.1", "port": str(port)}),
        regions={"token_ids": 100},
        field_names=NAMES,
        timeout=1,
    )
    with pytest.raises(TransportError, match="cannot connect"):
        w.write([Copy("token_ids", 0, 0, 4)], src_pool(), timeout=1)


def test_shm_not_offered_across_hosts():
    shared = create_shared_pool(SCHEMA, 2, 4)
    try:
        offer = get_backend("shm").server(shared.pool, host="127.0.0.1").offer()
        assert not get_backend("shm").reachable(offer, host_id="another-boot/another-host")
    finally:
        shared.close()


def test_unknown_transport_name():
    with pytest.raises(ValueError, match="unknown transport"):
        get_backend("carrier-pigeon")
