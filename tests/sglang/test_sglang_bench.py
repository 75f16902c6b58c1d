"""The SGLang bench (embedlink.tools.sglang_bench) in a tiny
configuration: SGLang's own zmq_to_scheduler path and the plugin over shm and
tcp, real encoder servers and a real scheduler-side receiver in processes of
their own. Every request must arrive byte-identical; nothing is asserted
about speed."""

from __future__ import annotations

import json

import pytest

from embedlink.integrations import sglang_bench

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_every_path_moves_every_byte_and_reports_its_row(tmp_path):
    out = tmp_path / "rows.json"
    rc = sglang_bench.main(
        ["--rows", "300", "--width", "64", "--requests", "3", "--warmup", "1",
         "--in-flight", "2", "--json", str(out)]
    )  # fmt: skip
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["peer"] for r in rows] == list(sglang_bench.PEERS)
    for r in rows:
        assert r["ok"], r
        assert len(r["latencies_ms"]) == 3 and r["gbps"] > 0 and r["p50_ms"] > 0
        assert r["parts"] == 2 and r["rows"] == 300
    assert rc == 0
    assert data["machine"]["sglang"] == "0.5.23"
