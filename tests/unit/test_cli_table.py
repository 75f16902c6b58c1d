"""The bench table fits the terminal it is printed on."""

import io
import json
from pathlib import Path

from rich.console import Console

from embedlink.service.cli import _bench_table
from embedlink.tools.bench import BenchRow

RESULTS = sorted(Path(__file__).parents[2].glob("benchmarks/results/bench_2core_*_run1.json"))


def _render(table, width):
    out = io.StringIO()
    Console(file=out, width=width).print(table)
    return out.getvalue()


def test_narrow_table_fits_80_columns_wide_one_has_every_column():
    rows = [BenchRow(**r) for r in json.loads(RESULTS[-1].read_text())]
    narrow = _render(_bench_table(rows, "bench", wide=False), 80)
    assert "…" not in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert "mooncake" in narrow and "16384" in narrow
    wide = _render(_bench_table(rows, "bench", wide=True), 200)
    assert "…" not in wide
    for header in ("p99 ms", "resumes/room", "RSS enc/lang MB", "in flight"):
        assert header in wide and header not in narrow
