#!/usr/bin/env python3
"""Where a one-at-a-time room's time goes, hop by hop, in both processes.

Runs the bench's own encoder and language workers (``embedlink bench``'s
one-copy path: ``buffer()``/``commit()`` on the encoder, zero-copy receives)
with one room in flight, after wrapping a fixed list of the endpoints'
methods so that each call records when it began and ended
(``time.perf_counter_ns``: CLOCK_MONOTONIC on Linux, one clock for every
process on the host). The language side's ``receiver()`` starts a room and its
``wait()`` ends it; every call either process made in between belongs to that
room. The table gives, for each call in the order it happens, the median of
its start (microseconds after ``receiver()`` began) and of its length, and the
gap between one call's end and the next one's start, which is where
wake-ups across threads and processes show.

The wrappers cost about a microsecond a call, so the traced p50 is a little
above the bench's. Used by ``benchmarks/gpu_check.py`` (``cuda_ipc`` on a GPU)
and alone: ``python benchmarks/trace_room.py --transport shm --tokens 64``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

# (module, class, method, label). Both processes wrap all of them; each only
# calls its own side's.
TRACED: list[tuple[str, str, str, str]] = [
    ("embedlink.endpoints.language", "LanguageEndpoint", "receiver", "L receiver()"),
    ("embedlink.endpoints.language.fastpath", "FastPath", "start_here", "L start_here"),
    ("embedlink.endpoints.language.receiver", "Receiver", "wait", "L wait()"),
    ("embedlink.endpoints.language.fastpath", "FastPath", "serve_until_done", "L serve lane"),
    ("embedlink.endpoints.language.events", "RoomEvents", "_on_payload", "L on_payload"),
    ("embedlink.protocol.rooms", "ReceiverRoom", "status_update", "L core status"),
    ("embedlink.endpoints.language.assembly", "Assembler", "harvest", "L harvest"),
    ("embedlink._runtime.lane", "Lane", "send", "lane send"),
    ("embedlink._runtime.lane", "Lane", "receive", "lane receive"),
    ("embedlink.endpoints.encoder.dispatch", "Dispatcher", "dispatch", "E dispatch"),
    ("embedlink.protocol.rooms", "SenderRoom", "request", "E core request"),
    ("embedlink.endpoints.encoder.writes", "WriteDispatch", "write", "E write"),
    ("embedlink.transports.cuda_ipc", "CudaIpcWriter", "write", "E cuda copy+sync"),
    ("embedlink.transports.shm", "ShmWriter", "write", "E shm copy"),
    ("embedlink.transports.tcp", "TcpWriter", "write", "E tcp write"),
    ("embedlink.protocol.rooms", "SenderRoom", "write_done", "E core write_done"),
    ("embedlink.endpoints.encoder.control", "ControlLinks", "send", "E control send"),
]

EVENTS: list[tuple[str, int, int, int]] = []  # (label, pid, start ns, end ns)


def install() -> None:
    """Wrap every method in :data:`TRACED` that this installation has."""
    pid = os.getpid()
    clock = time.perf_counter_ns
    append = EVENTS.append
    for mod, cls, meth, label in TRACED:
        try:
            owner = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError):
            continue
        fn = owner.__dict__.get(meth)
        if fn is None:
            continue

        def wrapped(*a: Any, _fn: Any = fn, _label: str = label, **k: Any) -> Any:
            t0 = clock()
            try:
                return _fn(*a, **k)
            finally:
                append((_label, pid, t0, clock()))

        setattr(owner, meth, wrapped)


def _traced(target: str) -> Any:
    from embedlink.tools import bench

    return getattr(bench, target)


def traced_worker(target: str, cfg: dict[str, Any], cmds: Any, replies: Any) -> None:
    """One of the bench's workers with the wrappers installed; on ``stop`` it
    sends its events as a last reply."""
    install()
    _traced(target)(cfg, cmds, replies)
    replies.put(("trace", EVENTS))


def run(
    *,
    transport: str = "shm",
    tokens: int = 64,
    rooms: int = 300,
    device: str | None = None,
    hidden_size: int = 3584,
    busy_poll_us: float | None = None,
    pin: bool = False,
) -> dict[str, Any]:
    """Trace ``rooms`` one-at-a-time rooms of ``tokens`` tokens; return the
    table (see the module's docstring) and the traced p50."""
    from embedlink import BootstrapServer
    from embedlink.tools.bench import BUSY_POLL_S, worker_cpus

    ctx = mp.get_context("spawn")
    enc_cpu, lang_cpu = worker_cpus(pin)
    base = dict(
        hidden_size=hidden_size,
        block_size=128,
        transport=transport,
        device=device,
        busy_poll_us=BUSY_POLL_S * 1e6 if busy_poll_us is None else busy_poll_us,
    )
    with BootstrapServer(host="127.0.0.1", port=0) as boot:
        blocks = max(8, 3 * (-(-tokens // 128)) + 8)
        procs = []
        queues = []
        for target, extra in (
            ("_bench_encoder", dict(num_blocks=blocks, cpu=enc_cpu)),
            ("_bench_language", dict(num_blocks=blocks, cpu=lang_cpu)),
        ):
            cmds, replies = ctx.Queue(), ctx.Queue()
            cfg = {**base, **extra, "bootstrap": boot.address}
            p = ctx.Process(target=traced_worker, args=(target, cfg, cmds, replies), daemon=True)
            p.start()
            procs.append(p)
            queues.append((cmds, replies))
        try:
            for _, replies in queues:
                assert replies.get(timeout=120)[0] == "ready"
            jobs = [(900_000 + i, tokens) for i in range(rooms)]
            (ecmd, erep), (lcmd, lrep) = queues
            ecmd.put(("row", jobs))
            lcmd.put(("row", jobs, True, 1))
            lang_done = lrep.get(timeout=300)
            erep.get(timeout=300)
            traces = []
            for cmds, replies in queues:
                cmds.put(("stop",))
                traces.append(replies.get(timeout=60))
        finally:
            for p in procs:
                p.join(15)
                if p.is_alive():
                    p.kill()
    events = sorted((e for t in traces for e in t[1]), key=lambda e: e[2])
    _, done, created, *_ = lang_done
    e2e = sorted((done[r] - created[r]) * 1e3 for r in done)
    return {"transport": transport, "tokens": tokens, "device": device, **table(events, e2e)}


def table(events: list[tuple[str, int, int, int]], e2e_ms: list[float]) -> dict[str, Any]:
    """Cut the events into rooms at each ``receiver()`` call and take the
    median of each step (the n-th call of a label within a room)."""
    lang_pid = next((e[1] for e in events if e[0] == "L receiver()"), None)
    # calls both sides make (the lane's) get their side's letter
    events = [
        (e[0] if e[0][:2] in ("L ", "E ") else ("L " if e[1] == lang_pid else "E ") + e[0], *e[1:])
        for e in events
    ]
    per_room: list[list[tuple[str, int, int, int]]] = []
    for ev in events:
        if ev[0] == "L receiver()":
            per_room.append([])
        if per_room:
            per_room[-1].append(ev)
    # the first rooms warm up; the last one may have trailing calls cut off
    per_room = per_room[5:-1] if len(per_room) > 10 else per_room
    steps: dict[tuple[str, int], list[tuple[float, float]]] = {}
    totals = []
    for evs in per_room:
        t0 = evs[0][2]
        seen: dict[str, int] = {}
        end = (
            max(e[3] for e in evs if e[0] == "L wait()")
            if any(e[0] == "L wait()" for e in evs)
            else evs[-1][3]
        )
        totals.append((end - t0) / 1e3)
        for label, _pid, s, e in evs:
            if s > end:
                continue  # after wait() returned: the next room's prologue
            k = seen.get(label, 0)
            seen[label] = k + 1
            steps.setdefault((label, k), []).append(((s - t0) / 1e3, (e - s) / 1e3))
    # steps every room has (at least half of them), in the order they happen
    keep = [(key, v) for key, v in steps.items() if len(v) >= max(1, len(per_room) // 2)]
    keep.sort(key=lambda kv: statistics.median(s for s, _ in kv[1]))
    rows: list[dict[str, Any]] = []
    ends: list[float] = []
    for (label, k), v in keep:
        start = statistics.median(s for s, _ in v)
        dur = statistics.median(d for _, d in v)
        # the gap since the last step that had ended by then (a step that
        # encloses this one has not): time no traced call accounts for
        before = [e for e in ends if e <= start]
        rows.append(
            {
                "step": label + (f" #{k + 1}" if k else ""),
                "start_us": round(start, 1),
                "us": round(dur, 1),
                "gap_us": round(start - max(before), 1) if before else 0.0,
                "rooms": len(v),
            }
        )
        ends.append(start + dur)
    return {
        "rooms": len(per_room),
        "traced_p50_us": round(statistics.median(totals), 1) if totals else None,
        "e2e_p50_ms": round(statistics.median(e2e_ms), 4) if e2e_ms else None,
        "steps": rows,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['transport']} {result['tokens']} tokens on {result['device'] or 'host'}: "
        f"{result['rooms']} rooms, traced p50 {result['traced_p50_us']} us, "
        f"bench p50 {result['e2e_p50_ms']} ms",
        f"{'step':28} {'start':>8} {'us':>8} {'gap':>8}",
    ]
    for r in result["steps"]:
        lines.append(f"{r['step']:28} {r['start_us']:8.1f} {r['us']:8.1f} {r['gap_us']:8.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", default="shm")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rooms", type=int, default=300)
    ap.add_argument("--device", default=None)
    ap.add_argument("--pin", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = run(
        transport=args.transport,
        tokens=args.tokens,
        rooms=args.rooms,
        device=args.device,
        pin=args.pin,
    )
    print(json.dumps(out, indent=2) if args.json else render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
