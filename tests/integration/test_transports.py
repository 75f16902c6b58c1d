"""Data-plane backends on real sockets and real shared memory."""

import socket
import struct

import numpy as np
import pytest

from embedlink import BufferPool, BufferSchema
from embedlink._runtime.host import host_id
from embedlink.protocol import AUX_FIELD, Copy
from embedlink.transports import DataPlaneError, WriteOutOfBounds, get_backend
from embedlink.transports.base import regions_of
from embedlink.transports.shm import create_shared_pool

pytestmark = pytest.mark.integration
SCHEMA = BufferSchema(hidden_size=16)
NAMES = [*SCHEMA.names, AUX_FIELD]


def src_pool():
    p = BufferPool(SCHEMA, 8, 4)
    p.backing[:] = np.arange(p.nbytes, dtype=np.uint64).astype(np.uint8)
    return p


@pytest.fixture(params=["tcp", "shm", "mooncake", "mooncake:spin", "nixl"])
def endpoint(request):
    shared = create_shared_pool(SCHEMA, 8, 4)
    name, _, wait = request.param.partition(":")
    backend = get_backend(name)
    server = backend.server(shared.pool, host="127.0.0.1").start()
    offer = server.offer()
    assert backend.reachable(offer, host_id=host_id())
    writer = backend.connect(
        offer,
        regions=regions_of(shared.pool.layout),
        field_names=NAMES,
        timeout=5,
        options={"wait": wait} if wait else None,
    )
    if name == "mooncake":
        assert writer.wait == (wait or "poll")  # auto picks poll over tcp
        assert writer.max_concurrent_writes == (2 if writer.wait == "poll" else 1)
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


HELLO = struct.pack("<4sH", b"ELTH", 0)


def _batch(field_id: int, data: bytes) -> bytes:
    return (
        struct.pack("<4sIQ", b"ELT1", 1, len(data))
        + struct.pack("<HQQ", field_id, 0, len(data))
        + data
    )


def test_tcp_fence_stops_a_link_whose_batch_is_half_delivered():
    """A batch held up mid-payload (a stalled link) never lands once its link
    is fenced: the fence's callback runs only after the thread that served the
    link has ended, and the link's token is refused from then on."""
    import threading

    pool = BufferPool(SCHEMA, 8, 4)
    server = get_backend("tcp").server(pool, host="127.0.0.1").start()
    try:
        offer = server.offer_for("link-a")
        assert offer.params["token"] == "link-a"
        other = get_backend("tcp").connect(
            server.offer_for("link-b"),
            regions=regions_of(pool.layout),
            field_names=NAMES,
            timeout=5,
        )
        token = b"link-a"
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(struct.pack("<4sH", b"ELTH", len(token)) + token)
            whole = _batch(1, b"\1\2\3\4")
            s.sendall(whole[:-2])  # the rest is "held up in the network"
            done = threading.Event()
            assert server.fence("link-a", done.set) is True
            assert done.wait(5), "the fence never settled"
            # what the server read into the pool before the fence settled
            # (the first bytes may or may not have been read by then)
            before = bytes(pool.field_bytes("token_ids")[:4])
            assert before[2:] == b"\0\0"
            # the held-back bytes arrive after the fence: nothing lands
            try:
                s.sendall(whole[-2:])
            except OSError:
                pass
            assert bytes(pool.field_bytes("token_ids")[:4]) == before
        # a new connection for the fenced link is refused, with a reason
        w = get_backend("tcp").connect(
            offer, regions=regions_of(pool.layout), field_names=NAMES, timeout=5
        )
        with pytest.raises(DataPlaneError, match=r"fenced|failed"):
            w.write([Copy("token_ids", 0, 0, 4)], src_pool(), timeout=5)
        w.close()
        assert bytes(pool.field_bytes("token_ids")[:4]) == before
        # another link is not affected
        other.write([Copy("token_ids", 0, 0, 4)], src_pool(), timeout=5)
        assert bytes(pool.field_bytes("token_ids")[:4]) == bytes(
            src_pool().field_bytes("token_ids")[:4]
        )
        other.close()
        # fencing a link with no connection settles at once
        quiet = threading.Event()
        server.offer_for("link-c")
        assert server.fence("link-c", quiet.set) and quiet.is_set()
    finally:
        server.close()


def test_tcp_server_refuses_raw_out_of_bounds_batch_and_stays_up():
    pool = BufferPool(SCHEMA, 8, 4)
    server = get_backend("tcp").server(pool, host="127.0.0.1").start()
    try:
        before = pool.backing.copy()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(HELLO)  # the default link (no token)
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
        # garbage instead of a hello, or instead of a batch header: the
        # connection is dropped, the server lives on
        for opening in (b"", HELLO):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(opening + b"GARBAGE!" * 4)
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
    with pytest.raises(DataPlaneError, match="cannot connect"):
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


# -- mooncake: failures of the polled wait --------------------------------------

_MC_PEER = """
import os, sys, numpy as np
os.environ["MC_LOG_LEVEL"] = "ERROR"
from mooncake.engine import TransferEngine
e = TransferEngine()
assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
buf = np.zeros(int(sys.argv[1]), np.uint8)
assert e.batch_register_memory([buf.ctypes.data], [buf.nbytes]) == 0
print(f"127.0.0.1:{e.get_rpc_port()} {buf.ctypes.data}", flush=True)
sys.stdin.read()
"""


def _mooncake_writer(session, addr, nbytes, wait="poll"):
    from embedlink.transports.mooncake import MooncakeWriter, local_engine

    return MooncakeWriter(
        local_engine("127.0.0.1"), session, {"embedding": addr}, {"embedding": nbytes}, wait=wait
    )


def _big_src(nbytes):
    p = BufferPool(BufferSchema(hidden_size=nbytes // 2 // 16), 16, 1)
    p.backing[:] = 7
    return p


def test_mooncake_write_to_a_stopped_peer_times_out_and_the_writer_recovers():
    """A peer that stops reading (SIGSTOP) leaves the requests pending: the
    write fails with a timeout naming what was pending, within its deadline;
    the writer still works for a peer that answers."""
    import os
    import signal
    import subprocess
    import sys
    import time

    nbytes = 64 << 20  # far more than the socket buffers hold
    peer = subprocess.Popen(
        [sys.executable, "-c", _MC_PEER, str(nbytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        session, addr = peer.stdout.readline().split()
        src = _big_src(nbytes)
        w = _mooncake_writer(session, int(addr), nbytes)
        copies = [Copy("embedding", 0, 0, nbytes)]
        w.write(copies, src, timeout=20)  # handshake, and the peer is sound
        os.kill(peer.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        # 64 MiB goes as four requests (see SPLIT_BYTES)
        with pytest.raises(DataPlaneError, match=r"timed out after 1 s with \d of 4 requests"):
            w.write(copies, src, timeout=1)
        assert time.monotonic() - t0 < 10
        assert 1 <= len(w._abandoned) <= 4
        os.kill(peer.pid, signal.SIGCONT)
        w.write(copies, src, timeout=20)  # looks at the abandoned one on the way
        w.close()
    finally:
        os.kill(peer.pid, signal.SIGCONT)
        peer.kill()
        peer.wait(10)


@pytest.mark.parametrize("wait", ["poll", "spin"])
def test_mooncake_write_the_engine_refuses_is_a_transport_error(wait):
    """A destination the peer never registered: the engine fails the request;
    the room gets a DataPlaneError with the code, never a hang or a -1."""
    shared = create_shared_pool(SCHEMA, 8, 4)
    server = get_backend("mooncake").server(shared.pool, host="127.0.0.1").start()
    try:
        session = server.offer().params["session"]
        w = _mooncake_writer(session, 4096, 1 << 20, wait=wait)  # not registered there
        with pytest.raises(DataPlaneError, match=r"failed|returned -1"):
            w.write([Copy("embedding", 0, 0, 1024)], _big_src(1 << 20), timeout=5)
        w.close()
    finally:
        server.close()
        shared.close()


def test_mooncake_unknown_wait_option_is_refused():
    with pytest.raises(DataPlaneError, match="wait='busy' is not one of auto, poll, spin"):
        _mooncake_writer("127.0.0.1:1", 0, 1, wait="busy")


def test_mooncake_engine_start_leaves_the_process_as_it_was():
    """Starting the engine changes no process-wide state: the environment is
    as before (MC_LOG_LEVEL is set only around the library's import, unless
    the user set it), file descriptor 2 is never redirected; the engine's
    INFO chatter stays off by default and verbose shows it."""
    import subprocess
    import sys

    code = (
        "import os\n"
        "before = dict(os.environ)\n"
        "dup2 = os.dup2\n"
        "redirected = []\n"
        "os.dup2 = lambda a, b, *k: (redirected.append(b), dup2(a, b, *k))[1]\n"
        "from embedlink.transports import mooncake\n"
        "print(mooncake.local_engine('127.0.0.1').session)\n"
        "os.write(2, b'after start\\n')\n"
        "print(redirected, dict(os.environ) == before, flush=True)\n"
    )

    def start(**env):
        import os

        return subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={**{k: v for k, v in os.environ.items() if k != "MC_LOG_LEVEL"}, **env},
        )

    quiet = start()
    assert quiet.returncode == 0, quiet.stderr
    session, state = quiet.stdout.splitlines()
    assert session.startswith("127.0.0.1:")
    # nothing redirected, the environment as it was
    assert state == "[] True"
    assert "after start" in quiet.stderr
    assert "tcp_transport" not in quiet.stderr and "listening on" not in quiet.stderr
    loud = start(EMBEDLINK_MOONCAKE_VERBOSE="1")
    assert loud.returncode == 0, loud.stderr
    assert "listening on" in loud.stderr  # the engine's INFO lines
    assert loud.stdout.splitlines()[1] == "[] True"
    mine = start(MC_LOG_LEVEL="INFO")  # the user's own setting wins, and stays
    assert mine.returncode == 0, mine.stderr
    assert "listening on" in mine.stderr
    assert mine.stdout.splitlines()[1] == "[] True"


@pytest.mark.parametrize("wait", ["poll", "spin"])
def test_mooncake_writers_in_one_process_keep_their_own_deadlines(wait):
    """Two writers made by the backend as two endpoints would (one engine,
    room timeouts 1 s and 3 s) to a peer that stopped reading: each write
    times out at its own deadline, named in its error (the engine's
    process-wide MC_TRANSFER_TIMEOUT is not what bounds them)."""
    import os
    import signal
    import subprocess
    import sys

    from embedlink.protocol import TransportOffer

    nbytes = 64 << 20  # far more than the socket buffers hold
    peer = subprocess.Popen(
        [sys.executable, "-c", _MC_PEER, str(nbytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        session, addr = peer.stdout.readline().split()
        offer = TransportOffer("mooncake", {"session": session, "protocol": "tcp", "addrs": addr})
        backend = get_backend("mooncake")
        writers = {
            t: backend.connect(
                offer,
                regions={"embedding": nbytes},
                field_names=["embedding"],
                timeout=t,
                options={"wait": wait},
            )
            for t in (1, 3)
        }
        src = _big_src(nbytes)
        copies = [Copy("embedding", 0, 0, nbytes)]
        writers[3].write(copies, src, timeout=30)  # handshake; the peer is sound
        assert "MC_TRANSFER_TIMEOUT" not in os.environ
        os.kill(peer.pid, signal.SIGSTOP)
        for t, w in writers.items():
            with pytest.raises(DataPlaneError, match=rf"timed out after {t} s"):
                w.write(copies, src, timeout=t)
        os.kill(peer.pid, signal.SIGCONT)
        for w in writers.values():
            w.close()
    finally:
        os.kill(peer.pid, signal.SIGCONT)
        peer.kill()
        peer.wait(10)


def test_mooncake_large_copies_go_as_several_requests():
    import itertools

    from embedlink.transports.mooncake import SPLIT_ABOVE, SPLIT_BYTES, _pieces

    mb = 1 << 20
    # small copies stay whole; a 14 MB one is four; a 117 MB one stays whole
    assert _pieces([0], [100], [2 * mb]) == [(0, 100, 2 * mb)]
    four = _pieces([1000], [5000], [14_368_000])
    assert len(four) == 4
    assert [(s - 1000, d - 5000) for s, d, _ in four] == [
        (o, o) for o in (0, 3592000, 7184000, 10776000)
    ]
    assert sum(n for _, _, n in four) == 14_368_000
    assert _pieces([0], [0], [SPLIT_ABOVE + 1]) == [(0, 0, SPLIT_ABOVE + 1)]
    # pieces tile each copy exactly, whatever its length
    for n in (SPLIT_BYTES * 2 + 1, 10 * mb + 7, 63 * mb):
        got = _pieces([7], [9], [n])
        assert got[0][:2] == (7, 9) and sum(k for _, _, k in got) == n
        assert all(a[0] + a[2] == b[0] and a[1] + a[2] == b[1] for a, b in itertools.pairwise(got))
