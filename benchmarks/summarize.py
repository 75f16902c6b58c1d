"""The README's bench table from several runs of ``embedlink bench --json``.

    python benchmarks/summarize.py benchmarks/results/bench_2core_*_run{1,2,3}.json

Each row is matched across the runs by (transport, tokens, mode, window);
every figure is the median over the runs, and the ratio column also gives the
range, since one run on a shared machine can differ from the next by 2x.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def _key(r: dict[str, Any]) -> tuple[str, int, str, int]:
    return (r["transport"], r["tokens"], r["mode"], r.get("window", 8))


def table(runs: list[list[dict[str, Any]]]) -> str:
    order = [_key(r) for r in runs[0]]
    by_key = [{_key(r): r for r in run} for run in runs]
    lines = [
        "| transport | tokens | mode | in flight | GB/s | raw GB/s | ratio (min-max) | rooms/s "
        "| p50 ms | p99 ms | CPU ms/room enc/lang |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in order:
        rows = [run[key] for run in by_key if key in run]

        def med(field: str, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.median(float(r[field]) for r in rows)

        ratios = [float(r["ratio_to_raw"]) for r in rows]
        t, n, m, w = key
        lines.append(
            f"| {t} | {n} | {m} | {w} | {med('gbps'):.2f} | {med('raw_gbps'):.2f} "
            f"| {med('ratio_to_raw'):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| {med('rooms_per_s'):,.0f} | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} "
            f"| {med('cpu_ms_per_room_encoder'):.2f} / {med('cpu_ms_per_room_language'):.2f} |"
        )
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit(__doc__)
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    print(table(runs))


if __name__ == "__main__":
    main(sys.argv[1:])
