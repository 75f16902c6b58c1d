"""Lossy, slow, stalling and flapping links between an encoder and a language process.

Three network namespaces made by the test: the encoder (with the bootstrap
server) in A, the language endpoint in B, and a router M between them (two
veth pairs, ``ip_forward=1``), so every byte of the bootstrap lookups, the
control plane and the data plane crosses M. The faults are put on M:

* 2% random loss: an nftables rule on M's forward hook,
  ``numgen random mod 100 < 2 drop``;
* a link slowed to 200 Mbit/s: a TBF qdisc on both of M's veths;
* 20 ms of added latency, every connection stalled, connections cut
  mid-stream (RST): a fault-injecting TCP proxy (``faultproxy.py``,
  Toxiproxy's model) on M, which an nftables ``nat prerouting ... redirect``
  rule puts transparently between the peers (it reads each connection's
  original destination); embedlink is not told;
* a flap: M's veth towards B is taken down for three heartbeat deadlines
  and brought back.

Each run moves 500 rooms of 64-8,192 tokens (default reservation, 1,024
tokens; most resume, many several times where the language pool is short)
over ``tcp``, ``mooncake`` or ``nixl`` (UCX's TCP), with a small hidden size so that it stays
short. Every room must end ``Success`` byte-exact or ``Failed`` with a reason;
no room may still be unfinished past its deadline on either side (the
language side's ``wait(timeout)`` must never raise ``TimeoutError``);
afterwards both pools are wholly free (``pool_usage() == (0, num_blocks)``,
polled with a deadline). Loss, delay and a slow link must fail no room. After
a flap, a stall or resets, the rooms in flight have ended and 200 rooms
started afterwards all succeed, with nothing restarted. Traffic stays inside
the namespaces, which the test removes; skipped (with the reason) only where
network namespaces or nftables cannot be used.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRANSPORTS = ["tcp", "mooncake", "nixl"]
SUCCESS, FAILED = 3, 4

ROOMS = 500
MIN_TOKENS, MAX_TOKENS = 64, 8192
HIDDEN = 64  # 144 bytes a token: 500 rooms are about 300 MB
ROOM_TIMEOUT = 20.0
#: how long after it was created a room must have ended: a room may outlive
#: one room timeout while it keeps making progress (each chunk and resume
#: restarts it), so the deadline here is two of them and a margin
DEADLINE = 2 * ROOM_TIMEOUT + 10.0
BASE = dict(
    hidden_size=HIDDEN,
    encoder_blocks=512,  # 64K tokens: about 16 rooms ahead of the language side
    language_blocks=128,  # 16K tokens for 16 rooms in flight: resumes queue for blocks
    default_tokens=1024,
    room_timeout=ROOM_TIMEOUT,
    deadline=DEADLINE,
)
WORKERS = 16
#: flaps and stalls: a peer is dead after 1.5 s of silence; the outage lasts three of that
FLAP_HB = dict(heartbeat_interval=0.5, heartbeat_misses=3)
FLAP_ROOM_TIMEOUT = 8.0


def jobs(n: int, first: int = 0, seed: int = 7) -> list[list[int]]:
    """``n`` rooms from id ``first``, of 64-8,192 tokens (both ends included)."""
    rng = random.Random(seed + first)
    sizes = [MIN_TOKENS, MAX_TOKENS] + [rng.randint(MIN_TOKENS, MAX_TOKENS) for _ in range(n - 2)]
    rng.shuffle(sizes)
    return [[first + i, s] for i, s in enumerate(sizes)]


def run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, input=input)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def poll_until(what: str, cond: Any, timeout: float, interval: float = 0.05) -> Any:
    """Call ``cond()`` until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)


class Net:
    """Namespaces A - M - B: A and B each joined to the router M by a veth pair."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.tag = tag
        self.a, self.m, self.b = f"ela{tag}", f"elm{tag}", f"elb{tag}"
        s = 10 + int(tag[:2], 16) % 200
        self.addr_a, self.addr_ma = f"10.{s}.81.2", f"10.{s}.81.1"
        self.addr_b, self.addr_mb = f"10.{s}.82.2", f"10.{s}.82.1"
        self.dev_a, self.dev_ma = f"v{tag}a", f"v{tag}ma"  # A's end, M's end
        self.dev_b, self.dev_mb = f"v{tag}b", f"v{tag}mb"
        self.made: list[str] = []

    def setup(self) -> None:
        for ns in (self.a, self.m, self.b):
            run("ip", "netns", "add", ns)
            self.made.append(ns)
        steps = [
            ("link", "add", self.dev_a, "type", "veth", "peer", "name", self.dev_ma),
            ("link", "add", self.dev_b, "type", "veth", "peer", "name", self.dev_mb),
            ("link", "set", self.dev_a, "netns", self.a),
            ("link", "set", self.dev_ma, "netns", self.m),
            ("link", "set", self.dev_b, "netns", self.b),
            ("link", "set", self.dev_mb, "netns", self.m),
            ("-n", self.a, "addr", "add", f"{self.addr_a}/24", "dev", self.dev_a),
            ("-n", self.m, "addr", "add", f"{self.addr_ma}/24", "dev", self.dev_ma),
            ("-n", self.b, "addr", "add", f"{self.addr_b}/24", "dev", self.dev_b),
            ("-n", self.m, "addr", "add", f"{self.addr_mb}/24", "dev", self.dev_mb),
        ]
        for ns in (self.a, self.m, self.b):
            steps.append(("-n", ns, "link", "set", "lo", "up"))
        for ns, dev in (
            (self.a, self.dev_a),
            (self.m, self.dev_ma),
            (self.m, self.dev_mb),
            (self.b, self.dev_b),
        ):
            steps.append(("-n", ns, "link", "set", dev, "up"))
        steps += [
            ("-n", self.a, "route", "add", "default", "via", self.addr_ma),
            ("-n", self.b, "route", "add", "default", "via", self.addr_mb),
        ]
        for st in steps:
            run("ip", *st)
        self.exec(self.m, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def exec(self, ns: str, *cmd: str, check: bool = True, input: str | None = None):
        return run("ip", "netns", "exec", ns, *cmd, check=check, input=input)

    def nft(self, ruleset: str) -> None:
        """Load ``ruleset`` (nft syntax) into M."""
        self.exec(self.m, "nft", "-f", "-", input=ruleset)

    def nft_json(self) -> dict[str, Any]:
        return json.loads(self.exec(self.m, "nft", "-j", "list", "ruleset").stdout)

    def link(self, up: bool) -> None:
        """M's end of the veth towards B, up or down (B's end loses its carrier)."""
        run("ip", "-n", self.m, "link", "set", self.dev_mb, "up" if up else "down")

    def cleanup(self) -> None:
        for ns in self.made:
            run("ip", "netns", "del", ns, check=False)
        for dev in (self.dev_a, self.dev_b):  # still here if setup failed before moving it
            if os.path.exists(f"/sys/class/net/{dev}"):
                run("ip", "link", "del", dev, check=False)


def _need_tools() -> None:
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed (scripts/setup.sh installs it as root)")
    if shutil.which("nft") is None:
        pytest.skip("nftables' `nft` is not installed (scripts/setup.sh installs it as root)")


#: what the tests ask of nftables: nat redirect (the proxy) and random drops
PROBE = """table ip probe {
  chain pre {
    type nat hook prerouting priority dstnat;
    tcp dport 9 redirect to :9
  }
  chain forward {
    type filter hook forward priority 0;
    numgen random mod 100 < 2 counter
  }
}
"""


@pytest.fixture
def net():
    _need_tools()
    n = Net()
    probe = run("ip", "netns", "add", n.m, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
    run("ip", "netns", "del", n.m, check=False)
    try:
        n.setup()
        # nftables usable in the router namespace, nat included (the proxy's redirect)
        probe = n.exec(n.m, "nft", "-f", "-", check=False, input=PROBE)
        if probe.returncode != 0:
            assert "syntax error" not in probe.stderr, probe.stderr  # ours, not the kernel's
            pytest.skip(f"nftables cannot be used in a namespace here: {probe.stderr.strip()}")
        n.exec(n.m, "nft", "delete", "table", "ip", "probe")
        yield n
    finally:
        n.cleanup()


class Proc:
    """A process in a namespace that answers JSON commands with ``@@ `` lines."""

    def __init__(self, ns: str, name: str, *argv: str) -> None:
        self.name = name
        self.err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by stop())
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, *argv],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env={
                **os.environ,
                "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                # nixl: UCX would reach the other namespace of this kernel
                # through cma, around the router; over TCP it crosses M
                "EMBEDLINK_NIXL_TLS": "tcp",
            },
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def stderr(self, whole: bool = False) -> str:
        self.err.seek(0)
        text = self.err.read()
        return text if whole else text[-6000:]

    def line(self, timeout: float, prefix: str = "@@ ") -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no answer within {timeout:g}s\n{self.stderr()}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"{self.name} exited ({self.p.poll()}) without answering\n{self.stderr()}"
                )
            if line.startswith(prefix):
                return line[len(prefix) :]

    def call(self, op: str, *, answer_within: float = 30.0, **args: Any) -> dict[str, Any]:
        """Send command ``op`` with ``args``; its answer, within ``answer_within`` s."""
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.p.stdin.flush()
        out = json.loads(self.line(answer_within))
        assert out.get("ok"), f"{self.name} {op}: {out.get('error')}\n{self.stderr()}"
        return out

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.call("quit", answer_within=20)
            except (AssertionError, OSError, ValueError):
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self.err.close()


class Pair:
    """An encoder in A and a language endpoint in B (and, on demand, the proxy in M)."""

    def __init__(self, net: Net, transport: str, **cfg: Any) -> None:
        self.net = net
        self.transport = transport
        self.cfg = {**BASE, **cfg}
        self.procs: list[Proc] = []
        self.proxy: Proc | None = None

    def start_proxy(self) -> Proc:
        """The fault proxy on M, with every TCP connection between A and B
        redirected to it (transparently)."""
        p = Proc(
            self.net.m,
            "proxy",
            "-m",
            "tests.integration.faultproxy",
            "--listen",
            "0.0.0.0:0",
            "--transparent",
        )
        self.procs.append(p)
        port = int(json.loads(p.line(30))["ready"])
        n = self.net
        self.net.nft(
            "table ip faultproxy {\n"
            "  chain pre {\n"
            "    type nat hook prerouting priority dstnat;\n"
            f'    iifname {{ "{n.dev_ma}", "{n.dev_mb}" }} ip daddr != {{ {n.addr_ma}, {n.addr_mb} }} '
            f"meta l4proto tcp counter redirect to :{port}\n"
            "  }\n"
            "}\n"
        )
        self.proxy = p
        return p

    def start(self) -> tuple[Proc, Proc]:
        n, t, cfg = self.net, self.transport, json.dumps(self.cfg)
        enc = Proc(
            n.a, "encoder", "-m", "tests.integration.lossy_peer", "encoder", n.addr_a, t, cfg
        )
        self.procs.append(enc)
        boot = json.loads(enc.line(60))["ready"]
        assert boot.startswith(n.addr_a + ":"), boot
        lang = Proc(
            n.b,
            "language",
            "-m",
            "tests.integration.lossy_peer",
            "language",
            n.addr_b,
            boot,
            t,
            cfg,
        )
        self.procs.append(lang)
        json.loads(lang.line(60))
        self.enc, self.lang = enc, lang
        return enc, lang

    def go(self, batch: list[list[int]], workers: int = WORKERS) -> None:
        self.enc.call("send", jobs=batch)
        self.lang.call("run", jobs=batch, workers=workers)

    def drain(self, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """Both sides' outcomes once every room given so far has ended and
        been cleared and the pools are free (or ``timeout`` passed)."""
        lang = self.lang.call("drain", answer_within=timeout + 30, timeout=timeout)
        enc = self.enc.call("drain", answer_within=timeout + 30, timeout=timeout)
        return lang, enc

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def _reasons(reasons: Any) -> dict[str, int]:
    """Failure reasons counted (their first 70 characters)."""
    out: dict[str, int] = {}
    for why in reasons:
        key = (why or "")[:70]
        out[key] = out.get(key, 0) + 1
    return out


def _first_traceback(text: str) -> str:
    at = text.find("Traceback")
    return text[max(0, at - 200) : at + 2500] if at >= 0 else text[-1500:]


def check(
    pair: Pair, batch: list[list[int]], lang: dict[str, Any], enc: dict[str, Any]
) -> tuple[list[int], dict[int, str]]:
    """The invariants of every scenario, all checked, every breach reported
    together; returns (rooms that succeeded, failed rooms: reason)."""
    cfg = pair.cfg
    want = {room: n for room, n in batch}
    problems: list[str] = []
    if lang["crashes"]:
        problems.append(f"language worker crashed: {lang['crashes'][:2]}")
    for side in (lang, enc):
        if side["violations"]:
            n = len(side["violations"])
            problems.append(f"{n} rooms unfinished past their deadline: {side['violations'][:5]}")
    if lang["unfinished_threads"]:
        stuck = lang["stuck"]
        problems.append(
            f"language: {lang['unfinished_threads']} workers still on rooms after the drain: "
            f"{len(stuck)} live, e.g. {dict(list(stuck.items())[:3])}"
        )
    if enc["unfinished_threads"]:
        problems.append(f"encoder: {enc['unfinished_threads']} threads still sending or waiting")
    got = {int(k): v for k, v in lang["rooms"].items()}
    erooms = {int(k): v for k, v in enc["rooms"].items()}
    ok, failed = [], {}
    bad: list[str] = []
    for room in want:
        r = got.get(room)
        if r is None:
            continue  # counted below
        if r["status"] == SUCCESS and r["ok"]:
            ok.append(room)
        elif r["status"] == SUCCESS:
            bad.append(f"room {room} ended Success but is not byte-exact: {r}")
        elif r["status"] == FAILED and r["reason"] and r["failure_reason"]:
            failed[room] = r["reason"]
        else:
            bad.append(f"room {room} ended {r['status']} (reason {r['reason']!r})")
        e = erooms.get(room)
        if e is not None and (
            e["status"] not in (SUCCESS, FAILED) or (e["status"] == FAILED and not e["reason"])
        ):
            bad.append(f"encoder room {room} ended {e['status']} (reason {e['reason']!r})")
    if bad:
        problems.append(f"{len(bad)} rooms ended badly: {bad[:5]}")
    if lang.get("forensics"):
        problems.append(f"what arrived instead: {lang['forensics']}")
    missing = sorted(set(want) - set(got))
    if missing:
        problems.append(f"language: {len(missing)} rooms never ended: {missing[:10]}")
    missing = sorted(set(want) - set(erooms))
    if missing:
        problems.append(f"encoder: {len(missing)} rooms never ended: {missing[:10]}")
    if lang["pool"] != [0, cfg["language_blocks"]]:
        d = lang.get("diagnosis") or {}
        zombies = d.get("zombies", [])
        problems.append(
            f"language pool not free: {lang['pool']} (used, total); {d.get('n_zombies')} cleared "
            f"rooms still hold blocks, e.g. {zombies[:2]}; "
            f"live rooms {(d.get('status') or {}).get('rooms')}"
        )
    if enc["pool"] != [0, cfg["encoder_blocks"]]:
        problems.append(f"encoder pool not free: {enc['pool']} (used, total)")
    for name, side in (("language", lang), ("encoder", enc)):
        if side["loop_errors"]:
            proc = pair.lang if name == "language" else pair.enc
            problems.append(
                f"{name}: {side['loop_errors']} errors in its loop thread; the first:\n"
                + _first_traceback(proc.stderr(whole=True))
            )
    if problems:
        problems.append(
            f"language failures by reason: {_reasons(failed.values())}; {len(ok)} rooms succeeded"
        )
    assert not problems, "\n".join(problems)
    return ok, failed


def resumed(lang: dict[str, Any], rooms: list[int]) -> int:
    """How many of ``rooms`` resumed at least once (went through Transferring)."""
    out = 0
    for room in rooms:
        hist = lang["rooms"][str(room)]["history"]
        if any(s == 2 for s, _ in hist):
            out += 1
    return out


def summary(what: str, transport: str, lang: dict[str, Any], enc: dict[str, Any], ok, failed):
    """One line for the log (shown with -s, or when the test fails)."""
    resumes = [sum(1 for s, _ in lang["rooms"][str(r)]["history"] if s == 2) for r in ok]
    print(
        f"[{what}/{transport}] success {len(ok)} failed {len(failed)} "
        f"resumed {sum(1 for k in resumes if k)} (at most {max(resumes, default=0)} times) "
        f"dead_encoders {lang['dead_encoders']} encoder {enc['stats']} "
        f"failures {_reasons(failed.values())}"
    )


def steady(net: Net, transport: str, fault: Any, evidence: Any, **cfg: Any) -> None:
    """500 rooms under a fault that lasts the whole run."""
    pair = Pair(net, transport, **cfg)
    try:
        fault(pair)
        pair.start()
        batch = jobs(ROOMS)
        pair.go(batch)
        lang, enc = pair.drain(DEADLINE + 60)
        ok, failed = check(pair, batch, lang, enc)
        # the pipeline resumed rooms and survived the fault: TCP hides loss,
        # delay and a slow link, so rooms do not fail for them
        summary("steady", transport, lang, enc, ok, failed)
        assert not failed, dict(list(failed.items())[:10])
        assert resumed(lang, ok) > ROOMS // 2
        evidence(pair)
    finally:
        pair.stop()


# -- the proxy itself, on loopback (no namespaces needed)


@pytest.fixture
def echo():
    """A TCP echo server on 127.0.0.1; yields its port."""
    srv = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve(c: socket.socket) -> None:
        with c:
            try:
                while data := c.recv(1 << 16):
                    c.sendall(data)
                c.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def accept() -> None:
        while not done.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield srv.getsockname()[1]
    finally:
        done.set()
        srv.close()


def _roundtrip(port: int, payload: bytes) -> bytes:
    """Send ``payload`` through the proxy to the echo server; what came back."""
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        reader = threading.Thread(target=lambda: _read_all(c, got), daemon=True)
        reader.start()
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        reader.join(60)
    return bytes(got)


def _read_all(c: Any, into: bytearray) -> None:
    while data := c.recv(1 << 16):
        into.extend(data)


@pytest.mark.timeout(60)
def test_faultproxy_forwards_intact_under_latency_and_bandwidth(echo):
    from tests.integration.faultproxy import FaultProxy

    payload = os.urandom(3 << 20)
    with FaultProxy(("127.0.0.1", 0), upstream=("127.0.0.1", echo)) as proxy:
        assert _roundtrip(proxy.port, payload) == payload
        proxy.set_toxic("latency", latency=5, jitter=2)
        proxy.set_toxic("bandwidth", "upstream", rate=20e6)
        assert _roundtrip(proxy.port, payload) == payload
        st = proxy.stats()
        assert st["bytes"] == {"upstream": 2 * len(payload), "downstream": 2 * len(payload)}
        assert st["connect_failures"] == 0


@pytest.mark.timeout(60)
def test_faultproxy_resets_stalls_and_closes(echo):
    from tests.integration.faultproxy import FaultProxy

    with FaultProxy(("127.0.0.1", 0), upstream=("127.0.0.1", echo)) as proxy:
        # reset_all: an open connection is cut with RST
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as c:
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
            assert proxy.reset_all() == 1
            with pytest.raises(ConnectionResetError):
                c.recv(4)
        # reset_peer: each connection is cut that long after it starts under it
        proxy.set_toxic("reset_peer", timeout=50)
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as c,
            pytest.raises(ConnectionResetError),
        ):
            c.recv(4)
        proxy.remove_toxic("reset_peer")
        # timeout held until removed: nothing is lost
        proxy.set_toxic("timeout", "upstream", timeout=0)
        before = proxy.stats()["bytes"]["upstream"]
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as c:
            c.sendall(b"held back")
            poll_until(
                "the proxy accepted the connection",
                lambda: proxy.stats()["live"] == 1,
                timeout=10,
            )
            assert proxy.stats()["bytes"]["upstream"] == before  # nothing forwarded
            proxy.remove_toxic("timeout")
            got = bytearray()
            while len(got) < 9:
                got.extend(c.recv(16))
            assert bytes(got) == b"held back"
        # timeout with a limit: the connection is closed after it
        proxy.set_toxic("timeout", timeout=100)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as c:
            c.sendall(b"x")
            assert c.recv(4) == b""
        proxy.clear()
        assert _roundtrip(proxy.port, b"after") == b"after"


# -- steady faults


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_percent_random_loss(net, transport):
    def fault(pair: Pair) -> None:
        net.nft(
            "table inet loss {\n"
            "  chain forward {\n"
            "    type filter hook forward priority 0;\n"
            "    numgen random mod 100 < 2 counter drop\n"
            "  }\n"
            "}\n"
        )

    def evidence(pair: Pair) -> None:
        rules = [x["rule"] for x in net.nft_json()["nftables"] if "rule" in x]
        dropped = [e["counter"]["packets"] for r in rules for e in r["expr"] if "counter" in e]
        assert dropped and dropped[0] > 0, rules  # packets were lost

    # a lost segment stalls its connection for a retransmission timeout, and
    # mooncake has two writes per peer in flight: fewer chunks keep it short
    steady(net, transport, fault, evidence, language_blocks=512)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_twenty_ms_added_latency(net, transport):
    def fault(pair: Pair) -> None:
        proxy = pair.start_proxy()
        # Toxiproxy's default stream: every round trip takes 20 ms longer,
        # whichever side connected
        proxy.call("set", toxic="latency", stream="downstream", attrs={"latency": 20})

    def evidence(pair: Pair) -> None:
        assert pair.proxy is not None
        st = pair.proxy.call("stats")
        # everything went through the proxy: lookups, control and data
        assert st["accepted"] >= 2 and st["bytes"]["upstream"] > ROOMS * MIN_TOKENS * 144, st

    # Each chunk costs round trips (a mooncake write takes about three, two in
    # flight per peer): a pool with room for every resume keeps it to about
    # two chunks a room instead of three and a half (rooms still resume).
    steady(net, transport, fault, evidence, language_blocks=512)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_link_slowed_to_200_mbit(net, transport):
    def fault(pair: Pair) -> None:
        for dev in (net.dev_ma, net.dev_mb):
            net.exec(
                net.m, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                "rate", "200mbit", "burst", "256kb", "latency", "50ms",
            )  # fmt: skip

    def evidence(pair: Pair) -> None:
        out = net.exec(net.m, "tc", "-s", "-j", "qdisc", "show", "dev", net.dev_mb).stdout
        q = [x for x in json.loads(out) if x.get("kind") == "tbf"]
        assert q and q[0]["bytes"] > ROOMS * MIN_TOKENS * 144, q  # the data crossed it
        assert q[0].get("overlimits", 0) > 0, q  # and was held back by it

    steady(net, transport, fault, evidence)


# -- faults that come and go


def _phase_two(pair: Pair, first: int, n: int) -> None:
    """Rooms started after the faults are over all succeed; nothing restarted."""
    batch = jobs(n, first=first)
    pair.go(batch)
    lang, enc = pair.drain(DEADLINE + 30)
    ok, failed = check(pair, batch, lang, enc)
    summary("after", pair.transport, lang, enc, ok, failed)
    assert not failed, f"rooms started after recovery failed: {dict(list(failed.items())[:10])}"
    assert resumed(lang, ok) > n // 2


def _outage(net: Net, transport: str, what: str, begin: Any, end: Any, proxy: bool) -> None:
    """300 rooms; once 60 are done, ``begin(pair)`` cuts the peers off for
    three heartbeat deadlines (and until each side has declared the other
    dead), then ``end(pair)`` undoes it. Rooms in flight end Failed with
    reasons; once they have all ended, 200 new rooms all succeed."""
    hb_deadline = FLAP_HB["heartbeat_interval"] * FLAP_HB["heartbeat_misses"]
    # mooncake cannot fence a dead encoder's writes: its blocks come back after
    # the grace, which must outlast the outage (what is held back lands then)
    cfg = dict(
        FLAP_HB,
        room_timeout=FLAP_ROOM_TIMEOUT,
        deadline=2 * FLAP_ROOM_TIMEOUT + 10,
        stale_write_grace=3 * hb_deadline + 10,
    )
    pair = Pair(net, transport, **cfg)
    try:
        if proxy:
            pair.start_proxy()
        pair.start()
        before = jobs(300)
        pair.go(before)
        poll_until(
            f"60 rooms done before the {what}",
            lambda: pair.lang.call("progress")["done"] >= 60,
            timeout=120,
        )
        in_flight = pair.lang.call("live")["rooms"]
        begin(pair)
        # and those live once the fault is in place: a fast transport (nixl)
        # may finish every room of the first look while the fault goes in
        in_flight += pair.lang.call("live")["rooms"]
        since = time.monotonic()
        try:
            poll_until(
                "both sides declared their peer dead",
                lambda: (
                    time.monotonic() - since >= 3 * hb_deadline
                    and pair.lang.call("progress")["dead_encoders"] >= 1
                    and pair.enc.call("progress")["dead_sessions"] >= 1
                ),
                timeout=3 * hb_deadline + 30,
                interval=0.1,
            )
        finally:
            end(pair)
        lang, enc = pair.drain(cfg["deadline"] + 20)
        ok, failed = check(pair, before, lang, enc)
        summary(what, transport, lang, enc, ok, failed)
        lost = [r for r in in_flight if r in failed]
        assert lost, f"no room in flight at the {what} failed: {in_flight}"
        _phase_two(pair, 10_000, 200)
    finally:
        pair.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_link_flap(net, transport):
    """M's veth towards B goes down (B's end loses its carrier) and comes back."""
    _outage(
        net,
        transport,
        "flap",
        begin=lambda pair: net.link(False),
        end=lambda pair: net.link(True),
        proxy=False,
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_connection_stalls(net, transport):
    """The proxy stops forwarding on every connection (Toxiproxy's ``timeout``
    toxic, held until removed): the connections stay open, and what was held
    back is delivered when it is removed, after both sides gave up."""
    _outage(
        net,
        transport,
        "stall",
        begin=lambda pair: pair.proxy.call("set", toxic="timeout", attrs={"timeout": 0}),
        end=lambda pair: pair.proxy.call("remove", toxic="timeout"),
        proxy=True,
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connections_reset_mid_stream(net, transport):
    cfg = dict(room_timeout=8.0, deadline=2 * 8.0 + 10)
    pair = Pair(net, transport, **cfg)
    try:
        proxy = pair.start_proxy()
        pair.start()
        before = jobs(300)
        pair.go(before)
        cut = 0
        for mark in (60, 120, 180):
            poll_until(
                f"{mark} rooms done",
                lambda m=mark: pair.lang.call("progress")["done"] >= m,
                timeout=120,
            )
            cut += proxy.call("reset_all")["reset"]
        assert cut >= 3, "the proxy cut no connection"
        lang, enc = pair.drain(cfg["deadline"] + 20)
        ok, failed = check(pair, before, lang, enc)
        summary(f"reset x{cut}", transport, lang, enc, ok, failed)
        _phase_two(pair, 10_000, 200)
    finally:
        pair.stop()
