import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def run(*args, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_import_prints_failed_value():
    p = run(sys.executable, "-c", "import embedlink; print(embedlink.Status.Failed.value)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "4"


def test_cli_version():
    p = run(sys.executable, "-m", "embedlink.service.cli", "version")
    assert p.returncode == 0 and "protocol 1" in p.stdout


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_cli_demo_verifies_every_request(transport):
    p = run(
        sys.executable,
        "-m",
        "embedlink.service.cli",
        "demo",
        "-n",
        "12",
        "--hidden-size",
        "64",
        "--max-tokens",
        "3000",
        "--transport",
        transport,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "12/12" in p.stdout
    assert "resumes" in p.stdout
    assert f"over {transport}" in p.stdout
    assert "0, 0" in p.stdout  # both pools fully free at the end


def test_cli_demo_rejects_bad_flags():
    p = run(
        sys.executable,
        "-m",
        "embedlink.service.cli",
        "demo",
        "--min-tokens",
        "10",
        "--max-tokens",
        "5",
    )
    assert p.returncode != 0
    assert "min-tokens" in p.stdout + p.stderr


def test_cli_demo_model_rejects_an_unknown_model_and_misplaced_flags():
    # no model is loaded for any of these: they need no embedlink[examples]
    bad = run(sys.executable, "-m", "embedlink.service.cli", "demo", "--model", "llava-huge")
    assert bad.returncode == 2
    assert "'llava-huge' is not one of 'qwen2-vl-tiny', 'qwen3-vl-tiny'" in bad.stderr
    bad = run(
        sys.executable,
        "-m",
        "embedlink.service.cli",
        "demo",
        "--model",
        "qwen2-vl-tiny",
        "--hidden-size",
        "64",
    )
    assert bad.returncode == 2 and "--hidden-size: not with --model" in bad.stderr
    bad = run(sys.executable, "-m", "embedlink.service.cli", "demo", "--new-tokens", "3")
    assert bad.returncode == 2 and "--new-tokens: only with --model" in bad.stderr


def quick_bench(*args):
    """``embedlink bench --quick --json`` at hidden size 256, plus ``args``."""
    cmd = [sys.executable, "-m", "embedlink.service.cli", "bench", "--quick", "--json"]
    return run(*cmd, "--hidden-size", "256", *args, timeout=300)


def test_cli_bench_quick_json_and_plot(tmp_path):
    png = tmp_path / "bench.png"
    p = quick_bench("--rooms", "12", "--plot", str(png))
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    rows = json.loads(p.stdout)
    assert {(r["transport"], r["tokens"], r["mode"], r["window"]) for r in rows} == {
        (t, n, m, w)
        for t in ("shm", "tcp", "mooncake")
        for n in (64, 2000)
        for m in ("exact", "resume")
        for w in (8, 1)
        if w == 8 or n == 2000 or m == "exact"  # one-in-flight probes
    }
    for r in rows:
        for key in (
            "transport",
            "tokens",
            "mode",
            "gbps",
            "raw_gbps",
            "ratio_to_raw",
            "rooms_per_s",
            "p50_ms",
            "p99_ms",
        ):
            assert key in r
        assert r["verified"] and r["gbps"] > 0 and r["raw_gbps"] > 0
    assert png.stat().st_size > 10_000
    # the reference figures, beside the rows' raw limits
    assert "hot in" in p.stderr and "polled as the" in p.stderr.replace("\n", " ")
    # the endpoints ran with their default busy polling, and the rows say so
    assert {r["busy_poll_us"] for r in rows} == {400.0}
    assert "busy-poll 400 us" in p.stderr


def test_cli_bench_nixl_rows_beside_a_raw_nixl_write_and_its_ucx_path():
    import json

    p = quick_bench("-t", "nixl", "--rooms", "12")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout)
    assert {r["transport"] for r in rows} == {"nixl"} and len(rows) == 7
    assert all(r["verified"] and r["gbps"] > 0 and r["raw_gbps"] > 0 for r in rows)
    # the raw write's UCX transport, from UCX's own protocol tables (cma here,
    # or another shared-memory or TCP path where cma is not allowed)
    said = " ".join(p.stderr.split())
    assert "UCX carried the bytes over" in said and "(2000 tokens)" in said, p.stderr[-2000:]
    assert "? (2000 tokens)" not in said


def test_cli_bench_busy_poll_zero_runs_and_is_recorded_in_the_rows():
    import json

    p = quick_bench("-t", "shm", "--rooms", "8", "--busy-poll-us", "0")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout)
    assert rows and {r["busy_poll_us"] for r in rows} == {0.0}
    assert all(r["verified"] for r in rows)
    assert "sleep between messages" in p.stderr
    bad = quick_bench("-t", "shm", "--busy-poll-us", "-1")
    assert bad.returncode == 2 and "--busy-poll-us" in bad.stderr


def test_bench_fails_fast_when_a_worker_dies():
    import multiprocessing as mp
    import time

    from embedlink.tools.bench import _reply

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    dead = ctx.Process(target=sys.exit, args=(3,), name="bench-encoder-x")
    dead.start()
    dead.join(30)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="worker bench-encoder-x exited with code 3"):
        _reply(q, [dead], 60, "start of x")
    assert time.monotonic() - t0 < 30  # not the 60 s timeout
    q.put(("ready",))
    assert _reply(q, [dead], 60, "start of x") == ("ready",)  # a reply wins


def test_cli_log_level_and_json_lines_reach_the_child_processes():
    import json

    p = run(
        sys.executable,
        "-m",
        "embedlink.service.cli",
        "--log-level",
        "info",
        "--log-json",
        "demo",
        "-n",
        "2",
        "--hidden-size",
        "64",
        "--max-tokens",
        "300",
        "--transport",
        "tcp",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    records = []
    for line in p.stderr.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    loggers = {r["logger"] for r in records}
    assert "embedlink.endpoints.encoder" in loggers, p.stderr[-2000:]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)


def test_cli_rejects_unknown_log_level():
    p = run(sys.executable, "-m", "embedlink.service.cli", "--log-level", "loud", "version")
    assert p.returncode != 0 and "log-level" in (p.stdout + p.stderr)


def test_zmq_round_trip_runs_between_two_processes_placed_as_asked():
    import os

    from embedlink.tools.bench import worker_cpus, zmq_round_trip_ms

    assert worker_cpus(False) == (None, None)
    cpus = worker_cpus(True)
    available = sorted(os.sched_getaffinity(0))
    if len(available) >= 2:
        assert cpus == (available[0], available[1])
    else:
        assert cpus == (None, None)  # nothing to pin apart on one CPU
    for placed in ((None, None), cpus):
        rtt = zmq_round_trip_ms(n=200, cpus=placed)
        assert 0 < rtt < 1000


def test_cli_bench_pin_runs_each_worker_on_its_own_cpu():
    import json
    import os

    p = quick_bench("--pin", "-t", "shm", "--rooms", "8")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout)
    available = sorted(os.sched_getaffinity(0))
    # the bench checks that each worker reports the one CPU it was given
    want = f"{available[0]}/{available[1]}" if len(available) >= 2 else ""
    assert rows and {r["cpus"] for r in rows} == {want}
    assert all(r["verified"] for r in rows)
    assert ("pinned to CPUs" if want else "--pin needs two CPUs") in p.stderr
