"""The vLLM connector bench (embedlink.tools.vllm_bench) in a tiny
configuration: real Schedulers, real worker processes and hooks, two items of
64 x 64 bfloat16 rows through ECExampleConnector, EmbedlinkECConnector over
tcp and shm, and ECMooncakeConnector where the Mooncake Transfer Engine is
installed. Every row must arrive byte-identical; nothing is asserted about
speed.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("embedlink.integrations.vllm")

import torch

from embedlink.integrations import vllm_bench

ROW_FIELDS = {
    "connector",
    "transport",
    "rows",
    "width",
    "dtype",
    "items",
    "throughput_gbps",
    "p50_ms",
    "p99_ms",
    "ok",
}
RATIO_FIELDS = {
    "rows",
    "throughput_ratio",
    "p50_ratio",
    "best_embedlink",
    "best_vllm",
    "best_embedlink_p50",
    "best_vllm_p50",
}


def _refuse(constant):
    raise AssertionError(f"{constant} in the bench's JSON")


def test_verify_names_a_wrong_or_corrupted_item():
    base = vllm_bench._make_base(64, 16, "bfloat16", seed=3)
    slot = torch.empty_like(base)
    vllm_bench._fill(slot, base, 5)
    assert vllm_bench._verify(slot.clone(), base, 5) is None
    assert "rows differ" in vllm_bench._verify(slot, base, 6)  # another item's rows
    bad = slot.clone()
    bad.view(torch.int16)[17, 3] ^= 1  # one bit
    assert vllm_bench._verify(bad, base, 5) == "1 of 64 rows differ (first: row 17)"
    assert "shape" in vllm_bench._verify(slot[:-1], base, 5)
    assert "dtype" in vllm_bench._verify(slot.to(torch.float16), base, 5)


def _row(peer, gbps, p50):
    r = vllm_bench.VllmBenchRow(
        peer=peer, connector="c", transport="t", rows=8, width=4, dtype="bfloat16",
        items=2, nbytes_per_item=64, throughput_gbps=gbps, items_per_s=1.0,
        p50_ms=p50, p99_ms=p50, ok=True, in_flight=2, runner="v1", warmup=0,
    )  # fmt: skip
    return r


def test_a_mismatch_or_a_failed_request_fails_the_row_naming_the_item():
    rec = vllm_bench._Recorder()
    rec.note({"a-1": 0, "a-2": 0}, {"a-1": 2_000_000, "a-2": 3_000_000}, {})
    rec.finish("a-1", None)
    rec.finish("a-2", None)
    ok = vllm_bench._summarise(_row("example", 0, 0), rec, ["a-1", "a-2"])
    assert ok.ok and ok.verified == 2 and ok.error == ""
    assert ok.p50_ms == 2.5 and ok.throughput_gbps == pytest.approx(128 / 3e-3 / 1e9, rel=1e-3)
    rec.note({}, {}, {"a-2": "received tensor differs from the one sent: 1 of 8 rows differ"})
    bad = vllm_bench._summarise(_row("example", 0, 0), rec, ["a-1", "a-2"])
    assert not bad.ok and bad.verified == 1 and "a-2: received tensor differs" in bad.error
    rec.finish("w-0", "the prefill request failed (error)")
    failed = vllm_bench._summarise(_row("example", 0, 0), rec, ["a-1"], "", ["w-0"])
    assert not failed.ok and "w-0: the prefill request failed" in failed.error


def test_ratios_take_each_side_s_best_ok_row():
    rows = [
        _row("example", 1.0, 20.0),
        _row("mooncake", 2.0, 40.0),
        _row("embedlink-shm", 5.0, 10.0),
        _row("embedlink-tcp", 3.0, 8.0),
    ]
    rows[1].ok = True
    (q,) = vllm_bench.ratios(rows)
    assert (q.best_embedlink, q.best_vllm) == ("embedlink-shm", "mooncake")
    assert q.throughput_ratio == 2.5 and q.p50_ratio == 0.4 and q.target_met
    assert "embedlink-tcp against example" in q.note
    assert (q.best_embedlink_p50, q.best_vllm_p50) == ("embedlink-tcp", "example")
    rows[0].ok = rows[1].ok = False
    (q,) = vllm_bench.ratios(rows)
    assert not q.target_met and q.note == "no ok vLLM row"


@pytest.mark.timeout(900)
def test_every_connector_moves_byte_identical_items(tmp_path):
    peers = ["example", "embedlink-tcp", "embedlink-shm"]
    if importlib.util.find_spec("mooncake") is not None:
        peers.append("mooncake")
    out = tmp_path / "bench.json"
    rc = vllm_bench.main(
        [
            "--items", "2",
            "--warmup", "0",
            "--rows", "64",
            "--width", "64",
            "--in-flight", "2",
            "--timeout", "120",
            "--peers", ",".join(peers),
            "--json", str(out),
        ]
    )  # fmt: skip
    data = json.loads(out.read_text(), parse_constant=_refuse)  # strict JSON: no NaN
    rows = data["rows"]
    assert [r["peer"] for r in rows] == peers
    for r in rows:
        assert set(r) >= ROW_FIELDS, r
        assert r["ok"], (r["peer"], r["error"])
        assert r["verified"] == r["items"] == 2
        assert (r["rows"], r["width"], r["dtype"]) == (64, 64, "bfloat16")
        assert r["throughput_gbps"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert rc == 0
    (ratio,) = data["ratios"]
    assert set(ratio) >= RATIO_FIELDS
    assert ratio["rows"] == 64
    assert ratio["best_vllm"] in ("example", "mooncake")
    assert ratio["best_embedlink"] in ("embedlink-tcp", "embedlink-shm")
    assert ratio["throughput_ratio"] > 0
    assert data["config"]["runner"] == "auto"
    by_peer = {r["peer"]: r for r in rows}
    assert by_peer["example"]["runner"] == "v1"
    if "mooncake" in by_peer:
        assert by_peer["mooncake"]["runner"] == "v2"
        assert "no_forward" in by_peer["mooncake"]["note"]
