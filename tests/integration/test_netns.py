"""Encoder and language in two network namespaces joined by a veth pair made
by the test: the bootstrap server, the control plane and the data plane all
cross it, so no address may be assumed to be 127.0.0.1. Traffic stays inside
the namespaces, which the test removes."""

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import uuid

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def netns_pair():
    if shutil.which("ip") is None:
        pytest.skip(
            "iproute2's `ip` is not installed (scripts/test.sh installs it when run as root)"
        )
    tag = uuid.uuid4().hex[:6]
    a, b = f"ela{tag}", f"elb{tag}"
    if _ip("netns", "add", a).returncode != 0:
        pytest.skip(
            f"cannot create network namespaces here: {_ip('netns', 'add', a).stderr.strip()}"
        )
    subnet = 10 + int(tag[:2], 16) % 200
    addr_a, addr_b = f"10.{subnet}.77.1", f"10.{subnet}.77.2"
    try:
        steps = [
            ("netns", "add", b),
            ("link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b"),
            ("link", "set", f"v{tag}a", "netns", a),
            ("link", "set", f"v{tag}b", "netns", b),
            ("-n", a, "addr", "add", f"{addr_a}/24", "dev", f"v{tag}a"),
            ("-n", b, "addr", "add", f"{addr_b}/24", "dev", f"v{tag}b"),
            ("-n", a, "link", "set", f"v{tag}a", "up"),
            ("-n", b, "link", "set", f"v{tag}b", "up"),
            ("-n", a, "link", "set", "lo", "up"),
            ("-n", b, "link", "set", "lo", "up"),
        ]
        for st in steps:
            r = _ip(*st)
            assert r.returncode == 0, f"ip {' '.join(st)}: {r.stderr}"
        yield (a, addr_a), (b, addr_b)
    finally:
        _ip("netns", "del", a)
        _ip("netns", "del", b)


def _peer(ns, *args, env=()):
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.integration.netns_peer", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **dict(env),
        },
    )


# nixl: UCX would reach a peer in another network namespace of the same
# kernel through cma (same PID and IPC namespaces); UCX_TLS=tcp (the nixl
# option tls) makes it cross the veth pair over TCP, as between two hosts.
# The encoder's UCX prints its protocol choices (UCX_PROTO_INFO): the test
# reads which transport carried the bytes.
NIXL_ENV = {"EMBEDLINK_NIXL_TLS": "tcp"}


@pytest.mark.parametrize("transport", ["mooncake", "tcp", "nixl"])
def test_pipeline_across_two_network_namespaces(netns_pair, transport):
    (ns_a, addr_a), (ns_b, addr_b) = netns_pair
    rooms = 6
    env = {**NIXL_ENV, "UCX_PROTO_INFO": "y"} if transport == "nixl" else {}
    enc = _peer(ns_a, "encoder", addr_a, str(rooms), transport, env=env)
    # read the encoder's output as it comes: UCX's tables would fill the pipe
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in enc.stdout], daemon=True)
    reader.start()
    lang = None
    try:
        line = lines.get(timeout=60)
        assert line.startswith("READY "), line + enc.stderr.read()
        boot = line.split()[1]
        assert boot.startswith(addr_a + ":")
        lang = _peer(
            ns_b,
            "language",
            addr_b,
            boot,
            str(rooms),
            transport,
            env=NIXL_ENV if transport == "nixl" else {},
        )
        out, err = lang.communicate(timeout=120)
        assert lang.returncode == 0, err
        results = json.loads(out.strip().splitlines()[-1])
        assert all(ok for ok, _ in results.values()), results
        assert any(3 in hist and 2 in hist for _, hist in results.values())  # some resumed
        before = []  # UCX's protocol tables come before the summary
        while not (enc_line := lines.get(timeout=60)).startswith("{"):
            before.append(enc_line)
        summary = json.loads(enc_line)
        assert all(st == 3 and why is None for st, why in summary["statuses"].values()), summary
        assert list(summary["sessions"].values()) == [transport]
        if transport == "nixl":
            from embedlink.tools.bench import ucx_put_path

            # the encoder's interface in its namespace: tcp over the veth, not loopback
            assert ucx_put_path("".join(before)) == f"tcp/v{ns_a[3:]}a", "".join(before)[-3000:]
    finally:
        for p in (enc, lang):
            if p is not None and p.poll() is None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
