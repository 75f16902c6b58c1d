"""Bench the SGLang plugin against SGLang's own ``zmq_to_scheduler`` path, in one run.

``python -m embedlink.tools.sglang_bench`` (in an environment with
SGLang 0.5.23: ``scripts/setup_sglang.sh`` makes ``.venv-sglang``; ``embedlink
bench --peers sglang`` finds it) moves the same embeddings (``--rows`` x
``--width`` bfloat16 per part, default 2,000 and 16,384 x 3,584, ``--parts``
parts per request, one per encoder) from encoder-only servers to a language
scheduler rank, three ways:

* ``sglang``: SGLang's own ``ZmqDelivery`` and ``WaitingZmqRequest`` (the
  plugin off on both sides): the raw tensor over ZeroMQ PUSH/PULL;
* ``embedlink-shm``, ``embedlink-tcp``: the plugin on both sides, with that
  one transport.

What is real: each encoder is SGLang's FastAPI encoder app in a process of
its own, with its real request lifecycle (``/encode``, ``batch_encode``,
``send_with_url``, the delivery); the language side, in another process, is
SGLang's tokenizer-side dispatch and its scheduler-side ``MMReceiverHTTP``
(waiting requests, registration thread, gloo all-reduce, aggregation),
ticked as the scheduler loop does. Stood in for (what needs a model): the
encoder's preprocessing and vision tower (each part's output is one copy of
a cached random tensor into a buffer nothing else holds, as a vision tower
writes its output into memory its allocator holds:
:class:`~embedlink.tools.outputs.FreeBuffers`) and the model's processor on
the language side (records what it is given).

Per request the latency runs from the tokenizer's dispatch to the request
being ready in the scheduler (every part arrived, aggregated, processed);
throughput is the parts' bytes over the span from the first dispatch to the
last ready, with ``--in-flight`` requests outstanding. Every byte of every
request is compared with what the encoder produced (after its latency was
taken); a difference fails the row. Each row moves ``--warmup`` requests
untimed first.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PEERS", "SglangBenchRow", "main"]

PEERS = ("sglang", "embedlink-shm", "embedlink-tcp")
ROWS = (2000, 16384)
WIDTH = 3584
PARTS = 2
REQUESTS = 20
IN_FLIGHT = 2
WARMUP = 3


@dataclass
class SglangBenchRow:
    peer: str
    rows: int
    width: int
    parts: int
    requests: int
    in_flight: int
    gbps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    ok: bool = False
    error: str | None = None
    latencies_ms: list[float] = field(default_factory=list)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# --------------------------------------------------------------------------- the language process


def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    """The language side (its own process): dispatch, tick, time, check."""
    import torch

    from . import sglang_testbed as tb

    if os.environ.get("EMBEDLINK_SGLANG") == "1":
        from sglang.srt.plugins import load_plugins

        load_plugins()
    from sglang.srt.disaggregation.encoder.receiver import MMReceiverHTTP
    from sglang.srt.managers.io_struct import GenerateReqInput

    urls: list[str] = spec["urls"]
    rows, width = int(spec["rows"]), int(spec["width"])
    sa = tb.server_args(spec["model_dir"], language_only=True, encoder_urls=urls)
    tb.publish_scheduler(sa)
    tb.gloo_world_of_one()
    torch.set_num_threads(1)  # this process only copies and compares
    rx = MMReceiverHTTP(sa, dtype=torch.bfloat16, hf_config=None, scheduler=tb.scheduler_stub())
    rx.mm_processor = tb.RecordingMMProcessor()
    tm = MMReceiverHTTP(sa, hf_config=None, scheduler=None, encode_urls=list(urls))
    base = tb.expected_rows(rows, width, 12345)
    total = int(spec["warmup"]) + int(spec["requests"])
    in_flight = int(spec["in_flight"])
    started: dict[str, float] = {}
    done: dict[str, float] = {}
    bad: list[str] = []
    aborted_rids: set[str] = set()
    order = [f"{spec['peer']}-{rows}-{i}" for i in range(total)]
    pending: list[Any] = []
    nxt = 0
    deadline = time.monotonic() + float(spec["timeout"])
    checked = 0
    while len(done) < total and time.monotonic() < deadline:
        while nxt < total and nxt - len(done) < in_flight:
            rid = order[nxt]
            obj = GenerateReqInput(
                text="<image>" * len(urls) + " describe",
                rid=rid,
                image_data=[f"http://example.invalid/{i}.png" for i in range(len(urls))],
            )
            started[rid] = time.monotonic()
            ready_ev = tm.send_encode_request(obj, on_dispatch_error=lambda e: None)
            pending.append(tb.recv_req(rid, obj.num_items_assigned, obj.encoder_urls))
            ready_ev.set()
            nxt += 1
        out, aborted = rx.process_waiting_requests(pending)
        pending = []
        now = time.monotonic()
        for r in out:
            done[r.rid] = now
        for req, msg, _ in aborted:
            done[req.rid] = now
            aborted_rids.add(req.rid)
            bad.append(f"{req.rid}: {msg}")
        # check what arrived (after its time was taken), then let it go: an
        # output held until the end of the row would make every later one
        # land on memory this VM has not backed yet (10 us a page, where a
        # page freed and taken again costs about 1.5 us), in every path
        checked = _check_calls(rx.mm_processor.calls, checked, base, len(urls), bad)
        if not out and not aborted:
            time.sleep(0.0005)  # the scheduler loop's next tick
    checked = _check_calls(rx.mm_processor.calls, checked, base, len(urls), bad)
    if checked != len(done) - len(aborted_rids):
        bad.append(f"{len(done) - len(aborted_rids)} requests ready, {checked} processed")
    timed = order[int(spec["warmup"]) :]
    missing = [r for r in timed if r not in done]
    if missing:
        bad.append(f"{len(missing)} requests never finished within {spec['timeout']}s")
    lat = [1e3 * (done[r] - started[r]) for r in timed if r in done]
    span = max((done[r] for r in timed if r in done), default=0.0) - min(started[r] for r in timed)
    nbytes = len(lat) * len(urls) * rows * width * 2
    return {
        "latencies_ms": lat,
        "gbps": nbytes / span / 1e9 if span > 0 else 0.0,
        "errors": bad[:5],
    }


def _check_calls(calls: list[Any], start: int, base: Any, parts: int, bad: list[str]) -> int:
    """Check what the processor was given from ``calls[start]`` on, letting
    each go once checked; returns how many have been checked."""
    while start < len(calls):
        _, embeddings, _ = calls[start]
        calls[start] = (None, None, None)
        (got,) = embeddings.values()
        problem = _check(got, base, parts)
        if problem:
            bad.append(problem)
        start += 1
    return start


def _check(got: Any, base: Any, parts: int) -> str | None:
    """None when ``got`` is ``parts`` copies of ``base`` (each with its
    encoder's seed in its first value), else what differs."""
    import torch

    rows = base.shape[0]
    if tuple(got.shape) != (parts * rows, base.shape[1]) or got.dtype != torch.bfloat16:
        return f"got {tuple(got.shape)} {got.dtype}"
    got = got.contiguous()
    size = base.numel() * base.element_size()
    skip = base.element_size()  # the seed
    for i in range(parts):
        # memcmp: a quarter of torch.equal's time on this check, which runs
        # in the loop being timed (the same for every path)
        if _memcmp(got.data_ptr() + i * size + skip, base.data_ptr() + skip, size - skip):
            part = got[i * rows : (i + 1) * rows].view(torch.int16)
            want = base.view(torch.int16)
            if not torch.equal(part[0, 1:], want[0, 1:]):
                return f"part {i}: its first row differs"
            return f"part {i}: rows differ from what the encoder produced"
    return None


def _memcmp(a: int, b: int, n: int) -> int:
    return int(_libc_memcmp()(a, b, n))


@functools.cache
def _libc_memcmp() -> Any:
    import ctypes

    fn = ctypes.CDLL(None).memcmp
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


# --------------------------------------------------------------------------- orchestration


def _spawn_encoder(model_dir: str, env: dict[str, str], rows: int, width: int) -> Any:
    spec = {"dim": width, "cheap": True, "tokens": {"*": rows}}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedlink.tools.sglang_testbed",
            model_dir,
            json.dumps(spec),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("PORT "):
            return proc, f"http://127.0.0.1:{int(line.split()[1])}"
    proc.kill()
    raise RuntimeError("an encoder did not start")


def run_row(peer: str, rows: int, args: argparse.Namespace, model_dir: str) -> SglangBenchRow:
    row = SglangBenchRow(peer, rows, args.width, args.parts, args.requests, args.in_flight)
    env = dict(os.environ)
    env["SGLANG_HOST_IP"] = "127.0.0.1"
    env["EMBEDLINK_SGLANG"] = "0" if peer == "sglang" else "1"
    if peer != "sglang":
        env["EMBEDLINK_TRANSPORTS"] = peer.split("-", 1)[1]
    # pools: every request in flight, plus the warm-up's, in 128-token blocks
    per_part = -(-rows // 128)
    env["EMBEDLINK_NUM_BLOCKS"] = str(per_part * (args.in_flight + 2) * max(1, args.parts))
    env["EMBEDLINK_BLOCK_SIZE"] = "128"
    encoders = []
    try:
        for _ in range(args.parts):
            encoders.append(_spawn_encoder(model_dir, env, rows, args.width))
        spec = {
            "peer": peer,
            "rows": rows,
            "width": args.width,
            "urls": [u for _, u in encoders],
            "model_dir": model_dir,
            "warmup": args.warmup,
            "requests": args.requests,
            "in_flight": args.in_flight,
            "timeout": args.timeout,
        }
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "embedlink.tools.sglang_bench",
                "--drive",
                json.dumps(spec),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout + 300,
        )
        lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
        if p.returncode != 0 or not lines:
            tail = (p.stderr or p.stdout or "no output").strip().splitlines()
            row.error = f"the language process failed: {tail[-1] if tail else p.returncode}"
            return row
        res = json.loads(lines[-1])
        row.latencies_ms = [round(x, 3) for x in res["latencies_ms"]]
        row.gbps = round(res["gbps"], 3)
        row.p50_ms = round(_pct(res["latencies_ms"], 0.5), 2)
        row.p99_ms = round(_pct(res["latencies_ms"], 0.99), 2)
        row.error = "; ".join(res["errors"]) or None
        row.ok = row.error is None and len(row.latencies_ms) == args.requests
        return row
    finally:
        for proc, _ in encoders:
            proc.kill()
            proc.wait(timeout=30)


def _table(rows: list[SglangBenchRow]) -> str:
    out = [
        f"{'path':<15} {'rows':>7} {'parts':>5} {'reqs':>5} {'GB/s':>7} {'p50 ms':>8} "
        f"{'p99 ms':>8}  ok"
    ]
    for r in rows:
        out.append(
            f"{r.peer:<15} {r.rows:>7,} {r.parts:>5} {r.requests:>5} {r.gbps:>7.3f} "
            f"{r.p50_ms:>8.1f} {r.p99_ms:>8.1f}  {'yes' if r.ok else 'NO: ' + str(r.error)}"
        )
    for n in sorted({r.rows for r in rows}):
        mine = [r for r in rows if r.rows == n and r.peer != "sglang" and r.ok]
        theirs = [r for r in rows if r.rows == n and r.peer == "sglang" and r.ok]
        if not mine or not theirs:
            continue
        best = max(mine, key=lambda r: r.gbps)
        fast = min(mine, key=lambda r: r.p50_ms)
        t = theirs[0]
        tput, lat = best.gbps / t.gbps, fast.p50_ms / t.p50_ms
        met = tput >= 2 and lat <= 0.5
        out.append(
            f"{n:,} rows: throughput {best.peer} {best.gbps:.3f} / sglang {t.gbps:.3f} GB/s = "
            f"{tput:.2f}x (target >= 2x); p50 {fast.peer} {fast.p50_ms:.1f} / sglang "
            f"{t.p50_ms:.1f} ms = {lat:.2f}x (target <= 0.5x): {'met' if met else 'NOT met'}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m embedlink.tools.sglang_bench")
    ap.add_argument("--drive", help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--parts", type=int, default=PARTS, help="parts per request (one per encoder)")
    ap.add_argument("--requests", type=int, default=REQUESTS)
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="2,000 rows, 5 requests")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.drive:
        print(json.dumps(_drive(json.loads(args.drive))), flush=True)
        return 0
    if args.quick:
        args.rows, args.requests, args.warmup = "2000", 5, 1
    from . import sglang_testbed as tb

    rows: list[SglangBenchRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tb.write_config(tmp)
        for n in [int(x) for x in args.rows.split(",")]:
            for peer in args.peers.split(","):
                print(f"{peer}: {n} x {args.width} bfloat16 x {args.parts} parts", flush=True)
                rows.append(run_row(peer, n, args, model_dir))
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _machine(), "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0 if all(r.ok for r in rows) else 1


def _machine() -> dict[str, Any]:
    import platform
    from importlib import metadata

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "sglang": metadata.version("sglang"),
    }


if __name__ == "__main__":
    sys.exit(main())
