"""The ``nixl`` transport (NVIDIA NIXL over UCX) between real processes: writes
land byte for byte with their notifications, NIXL's errors and passed
deadlines are DataPlaneErrors, the process is left as it was found (no
SIGSEGV at exit, the environment restored, no INFO chatter), a missing NIXL is
one clear error, and negotiation falls back where one side lacks it. The
pipeline's scenarios over ``nixl`` (seed rooms, resumes, 500 concurrent rooms,
killed peers, two network namespaces) are in test_pipeline.py, test_faults.py
and test_netns.py, parametrized with the other transports."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from embedlink import BufferPool, BufferSchema, LanguageEndpoint, TransferError
from embedlink.protocol import AUX_FIELD, Copy, TransportOffer
from embedlink.tools.workers import make_embedding, same_embedding
from embedlink.transports import (
    DataPlaneError,
    TransportUnavailable,
    WriteOutOfBounds,
    get_backend,
    nixl,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "src")
HIDDEN = 256
SCHEMA = BufferSchema(hidden_size=HIDDEN)
NAMES = [*SCHEMA.names, AUX_FIELD]

# A receiving process: a pool (one token per block) registered with its NIXL
# agent; prints the offer and the regions, then answers commands on stdin.
_PEER = """
import hashlib, json, sys
from embedlink import BufferPool, BufferSchema
from embedlink.transports import get_backend
from embedlink.transports.base import regions_of
pool = BufferPool(BufferSchema(hidden_size=int(sys.argv[1])), int(sys.argv[2]), 1)
server = get_backend("nixl").server(pool, host="127.0.0.1").start()
offer = server.offer()
print(json.dumps({"params": offer.params, "regions": regions_of(pool.layout)}), flush=True)
for line in sys.stdin:
    if line.strip() == "digest":
        print(hashlib.sha256(pool.backing).hexdigest(), flush=True)
    elif line.strip() == "notifications":
        print(json.dumps(server.agent.drain()), flush=True)
server.close()
"""


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra)
    return env


class Peer:
    def __init__(self, hidden=HIDDEN, blocks=64, **env):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PEER, str(hidden), str(blocks)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(**env),
        )
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        got = json.loads(line)
        self.offer = TransportOffer("nixl", got["params"])
        self.regions = got["regions"]

    def ask(self, what):
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self):
        for sig in (signal.SIGCONT, None):
            try:
                if sig is not None:
                    os.kill(self.proc.pid, sig)
                self.proc.stdin.close()
            except (OSError, ValueError):
                pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def peer():
    peers = []

    def make(**kw):
        p = Peer(**kw)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()


def _writer(p, timeout=10, options=None, regions=None):
    return get_backend("nixl").connect(
        p.offer,
        regions=regions or p.regions,
        field_names=NAMES,
        timeout=timeout,
        options=options,
    )


def _src(blocks=64, hidden=HIDDEN, seed=1):
    pool = BufferPool(BufferSchema(hidden_size=hidden), blocks, 1)
    pool.backing[:] = np.random.default_rng(seed).integers(0, 256, pool.nbytes, dtype=np.uint8)
    return pool


def test_writes_between_two_processes_land_byte_for_byte_with_notifications(peer):
    """Several plans of merged copies (every field, the aux records), each one
    NIXL transfer: the receiver's pool is exactly what the copies say, and a
    notification came with every write."""
    p = peer()
    src = _src()
    want = np.zeros(src.nbytes, np.uint8)
    w = _writer(p)
    rng = random.Random(3)
    writes = 0
    for _ in range(12):
        copies = []
        for name in NAMES:
            size = p.regions[name]
            n = rng.randint(1, size // 4)
            copies.append(Copy(name, rng.randrange(size - n), rng.randrange(size - n), n))
        w.write(copies, src, timeout=10)
        writes += 1
        for c in copies:
            off = src.layout[c.field][0]  # both pools have the same layout
            want[off + c.dst_offset : off + c.dst_offset + c.length] = src.backing[
                off + c.src_offset : off + c.src_offset + c.length
            ]
    assert p.ask("digest") == hashlib.sha256(want).hexdigest()
    agent = nixl.local_agent("127.0.0.1")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen = json.loads(p.ask("notifications")).get(agent.name, 0)
        if seen >= writes:
            break
        time.sleep(0.05)
    assert seen == writes
    w.close()
    assert p.close() == 0  # no SIGSEGV at exit either


def test_a_write_outside_the_offered_regions_never_reaches_nixl(peer):
    p = peer()
    w = _writer(p)
    size = p.regions["embedding"]
    with pytest.raises(WriteOutOfBounds, match="exceeds"):
        w.write([Copy("embedding", 0, size - 2, 4)], _src(), timeout=5)
    w.close()


def test_a_write_nixl_refuses_is_a_transport_error_and_the_writer_goes_on(peer):
    """Regions claimed larger than what the peer registered pass our own
    bounds check: NIXL itself refuses the write (the room would fail with its
    error), never a crash or a hang; the writer still writes what is there."""
    p = peer()
    big = {k: v * 4 for k, v in p.regions.items()}
    w = _writer(p, regions=big)
    with pytest.raises(DataPlaneError, match=r"nixl: .*(NOT_FOUND|not found|failed)"):
        w.write([Copy("embedding", 0, p.regions["embedding"] * 2, 1024)], _src(), timeout=5)
    w.write([Copy("token_ids", 0, 0, 64)], _src(), timeout=5)
    w.close()


def test_a_peer_that_stops_reading_fails_the_write_at_its_deadline(peer):
    """Over UCX's TCP (as between hosts) a peer that stops (SIGSTOP) leaves a
    large write in progress: it fails at the writer's own deadline, naming
    it, and the writer drops that connection; once the peer runs again the
    same writer connects again and writes."""
    tcp = {"tls": "tcp"}
    hidden = 8192
    p = peer(hidden=hidden, blocks=4096, EMBEDLINK_NIXL_TLS="tcp")
    src = _src(blocks=4096, hidden=hidden)
    nbytes = p.regions["embedding"]  # 64 MiB: far more than the socket buffers hold
    copies = [Copy("embedding", 0, 0, nbytes)]
    w = _writer(p, options=tcp)
    w.write(copies, src, timeout=60)  # connected, and the peer is sound
    os.kill(p.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(DataPlaneError, match=r"timed out after 1 s"):
        w.write(copies, src, timeout=1)
    assert time.monotonic() - t0 < 10
    os.kill(p.proc.pid, signal.SIGCONT)
    w.write([Copy("token_ids", 0, 0, 64)], src, timeout=30)
    w.write(copies, src, timeout=60)
    w.close()


def test_an_offer_with_garbage_metadata_fails_the_write_not_the_process():
    offer = TransportOffer(
        "nixl",
        {
            "agent": "nobody",
            "addrs": "1,2,3,4",
            "md_parts": "1",
            "md0": "Z2FyYmFnZQ==",  # "garbage"
        },
    )
    w = get_backend("nixl").connect(
        offer, regions={n: 16 for n in NAMES}, field_names=NAMES, timeout=5
    )
    with pytest.raises(DataPlaneError, match="adding the remote agent failed"):
        w.write([Copy("token_ids", 0, 0, 4)], _src(), timeout=5)
    w.close()
    for bad in ({"agent": "x", "addrs": "1,2", "md_parts": "0"}, {"agent": "x", "addrs": "a"}):
        with pytest.raises(TransportUnavailable, match="malformed offer"):
            get_backend("nixl").connect(
                TransportOffer("nixl", {**bad, "md_parts": bad.get("md_parts", "1")}),
                regions={},
                field_names=NAMES,
                timeout=5,
            )


def test_ucx_is_kept_to_the_endpoints_interface():
    env, force = nixl.ucx_env("127.0.0.1")
    assert env == {"UCX_MODULES": "^ib", "UCX_NET_DEVICES": "lo"} and not force
    assert nixl.net_devices_for("localhost") == "lo"
    assert nixl.net_devices_for("0.0.0.0") == "all"
    with pytest.raises(TransportUnavailable, match="no network interface here has"):
        nixl.net_devices_for("192.0.2.77")  # TEST-NET-1: on no interface here
    # RDMA devices: the InfiniBand module stays loaded, the devices are named
    env, force = nixl.ucx_env("127.0.0.1", {"rdma_devices": "mlx5_0, mlx5_1:2", "tls": "rc,cma"})
    assert env == {"UCX_NET_DEVICES": "mlx5_0:1,mlx5_1:2,lo", "UCX_TLS": "rc,cma"}
    assert force == {"UCX_NET_DEVICES", "UCX_TLS"}
    env, force = nixl.ucx_env("127.0.0.1", {"net_devices": "eth0"})
    assert env["UCX_NET_DEVICES"] == "eth0" and force == {"UCX_NET_DEVICES"}


_START = """
import os, sys
before = dict(os.environ)
from embedlink import BufferPool, BufferSchema
from embedlink.transports import get_backend
pool = BufferPool(BufferSchema(hidden_size=16), 4, 4)
server = get_backend("nixl").server(pool, host="127.0.0.1").start()
assert server.offer().params["agent"]
os.write(2, b"after start\\n")
print("environment as before:", dict(os.environ) == before, file=sys.stderr, flush=True)
"""


def _start(**env):
    base = {k: v for k, v in _env().items() if not k.startswith(("UCX_", "NIXL_"))}
    return subprocess.run(
        [sys.executable, "-c", _START],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **env},
    )


def test_starting_nixl_leaves_the_process_as_it_was_and_it_exits_cleanly():
    """The UCX backend is made with UCX_MODULES=^ib (without it such a process
    died with SIGSEGV at exit here), UCX_NET_DEVICES and NIXL_LOG_LEVEL set
    only while they are read: afterwards the environment is as it was; the
    process exits 0; NIXL's INFO lines (which go to standard output) stay off
    unless asked for; a user's own NIXL_LOG_LEVEL wins."""
    quiet = _start()
    assert quiet.returncode == 0, quiet.stderr  # -11 would be the SIGSEGV at exit
    assert quiet.stdout == ""
    assert "environment as before: True" in quiet.stderr
    assert " INFO " not in quiet.stderr and "I1" not in quiet.stderr
    loud = _start(EMBEDLINK_NIXL_VERBOSE="1")
    assert loud.returncode == 0, loud.stderr
    assert "NIXL version" in loud.stderr and "UCX  INFO" in loud.stdout + loud.stderr
    assert "environment as before: True" in loud.stderr
    mine = _start(NIXL_LOG_LEVEL="INFO")
    assert mine.returncode == 0, mine.stderr
    assert "NIXL version" in mine.stderr
    assert "environment as before: True" in mine.stderr


_MISSING = """
import sys
# a stand-in for "NIXL is not installed": every import of it fails
sys.modules["nixl_cu12"] = None
sys.modules["nixl_cu13"] = None
from embedlink import BufferSchema, EncoderEndpoint, LanguageEndpoint
for cls in (EncoderEndpoint, LanguageEndpoint):
    try:
        cls(BufferSchema(hidden_size=16), num_blocks=16, transports=("nixl", "tcp"))
    except Exception as exc:
        print(cls.__name__, type(exc).__name__, exc)
    else:
        print(cls.__name__, "made")
if len(sys.argv) > 1:
    from embedlink.service.cli import main
    sys.argv = ["embedlink", *sys.argv[1:]]
    main()
"""


def test_choosing_nixl_without_nixl_installed_is_one_clear_error():
    r = subprocess.run(
        [sys.executable, "-c", _MISSING],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines] == [
        ["EncoderEndpoint", "TransportUnavailable"],
        ["LanguageEndpoint", "TransportUnavailable"],
    ]
    assert all("pip install --no-deps nixl-cu12==1.5.1" in ln for ln in lines)
    for args in (["encoder", "--transports", "nixl,tcp"], ["bench", "-t", "nixl"]):
        r = subprocess.run(
            [sys.executable, "-c", _MISSING, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: "), r.stderr  # no traceback
        assert "pip install --no-deps nixl-cu12==1.5.1" in err[0]


_ENCODER_WITHOUT_NIXL = """
import sys
sys.modules["nixl_cu12"] = None  # this process has no NIXL
sys.modules["nixl_cu13"] = None
from embedlink import BufferSchema, EncoderEndpoint
from embedlink.tools.workers import make_embedding
schema = BufferSchema(hidden_size=int(sys.argv[2]))
with EncoderEndpoint(schema, bootstrap=sys.argv[1], num_blocks=32, transports=("tcp",)) as enc:
    tx = enc.sender(1)
    tx.send(make_embedding(schema, 1500, 0, 1))
    print(int(tx.wait(60)), enc.sessions(), flush=True)
"""


def test_an_encoder_without_nixl_falls_back_to_what_both_have(boot):
    """The language side offers nixl first; an encoder process that has no
    NIXL at all (and so names only tcp) is served over tcp."""
    with LanguageEndpoint(SCHEMA, num_blocks=32, transports=("nixl", "tcp")) as lang:
        rx = lang.receiver(bootstrap=boot.address, room=1)
        enc = subprocess.run(
            [sys.executable, "-c", _ENCODER_WITHOUT_NIXL, boot.address, str(HIDDEN)],
            capture_output=True,
            text=True,
            timeout=90,
            env=_env(),
        )
        assert enc.returncode == 0, enc.stderr
        assert same_embedding(rx.wait(timeout=30), make_embedding(SCHEMA, 1500, 0, 1))
        status, sessions = enc.stdout.split(" ", 1)
        assert status == "3" and "'tcp'" in sessions and "nixl" not in sessions


def test_200_concurrent_rooms_byte_exact_over_ucx_tcp(boot, spawn_encoder, spawn_language):
    """The multi-node path (UCX over TCP, on loopback here) under load: 200
    rooms of 1-4096 tokens in flight at once, every byte checked, both pools
    free afterwards."""
    os.environ["EMBEDLINK_NIXL_TLS"] = "tcp"  # inherited by the spawned processes
    try:
        rng = random.Random(19)
        jobs = [(5000 + i, rng.randint(1, 4096)) for i in range(200)]
        enc = spawn_encoder(
            bootstrap=boot.address,
            hidden_size=HIDDEN,
            num_blocks=256,
            block_size=128,
            transports=("nixl",),
            room_timeout=60.0,
        )
        lang = spawn_language(
            dict(
                bootstrap=boot.address,
                hidden_size=HIDDEN,
                num_blocks=64,
                default_tokens=1024,
                transports=("nixl",),
                window=200,
                room_timeout=60.0,
            ),
            jobs,
        )
        for room, n in jobs:
            enc.call("send", room, n)
        results, (tag, usage, errors) = lang.results(len(jobs), timeout=120)
    finally:
        del os.environ["EMBEDLINK_NIXL_TLS"]
    assert tag == "done"
    bad = [(r.room, r.reason) for r in results if not r.ok]
    assert not bad, bad[:5]
    assert len(results) == 200 and usage[0] == 0 and errors == 0
    assert any(any(s == 2 for s, _ in r.history) for r in results)  # some resumed
    _, statuses, enc_usage = enc.call("wait_idle", 30)
    assert enc_usage[0] == 0 and all(st == 3 for st, _ in statuses.values())
    assert list(enc.call("stats")[3].values()) == ["nixl"]


def test_a_language_endpoint_that_closes_mid_room_fails_it_with_a_reason(boot, spawn_encoder):
    enc = spawn_encoder(
        bootstrap=boot.address, hidden_size=HIDDEN, num_blocks=64, transports=("nixl",)
    )
    with LanguageEndpoint(SCHEMA, num_blocks=32, transports=("nixl",)) as lang:
        rx = lang.receiver(bootstrap=boot.address, room=4)
        enc.call("open", 4)
    with pytest.raises(TransferError, match="closed"):
        rx.wait(timeout=10)


def test_closed_endpoints_leave_no_registration_and_no_thread():
    """The process's agent stays (NIXL's progress thread with it); what an
    endpoint registered is deregistered when it closes, and the thread that
    collects notifications ends with the last endpoint that needed it."""
    import threading

    agent = nixl.local_agent("127.0.0.1")
    for _ in range(3):
        with LanguageEndpoint(SCHEMA, num_blocks=8, default_tokens=128, transports=("nixl",)):
            assert agent._registered
            assert "embedlink-nixl-notifs" in {t.name for t in threading.enumerate()}
    assert agent._registered == {}
    assert "embedlink-nixl-notifs" not in {t.name for t in threading.enumerate()}
