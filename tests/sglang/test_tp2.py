"""The language side at SGLang tensor parallelism 2: two scheduler ranks, each
in its own process (``embedlink.tools.sglang_testbed.language_rank_main``),
forming a real gloo TP group of 2, each with SGLang's scheduler-side
``MMReceiverHTTP`` holding the plugin's waiting request for the same request
id and ticking in lock step (SGLang MIN-all-reduces the statuses over the
group each tick). The request is dispatched once, by the tokenizer side in
this process (the ``dispatch`` fixture), to encoder-only servers of their own
(``spawn_encoder``); embedlink delivers each part to both ranks."""

from __future__ import annotations

import pytest

from conftest import encoder_state
from embedlink.protocol.layout import AUX_SIZE
from embedlink.tools.sglang_testbed import HIDDEN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def _part(rid: str, i: int) -> str:
    return f"{rid}_local_part_{i}"


def _job(req, expect):
    return {
        "rid": req.rid,
        "assigned": {m.name: list(n) for m, n in req.num_items_assigned.items()},
        "urls": list(req.encoder_urls),
        "expect": expect,
    }


def test_tp2_both_ranks_get_every_part_byte_exact_once_each(
    dispatch, spawn_encoder, spawn_language_ranks
):
    rid = "tp2-rt"
    # part 0: 2,000 tokens into the 1,024-token first reservation (it resumes)
    a = spawn_encoder(tokens={_part(rid, 0): 2000})
    b = spawn_encoder(tokens={_part(rid, 1): 300})
    assert a.delivery.endswith("EmbedlinkDelivery")
    ranks = spawn_language_ranks(tp_size=2)
    req, errors = dispatch(rid, [a.url, b.url], images=2)  # one image to each encoder
    assert list(req.num_items_assigned.values()) == [[1, 1]]
    job = _job(req, [[_part(rid, 0), 2000], [_part(rid, 1), 300]])
    for lr in ranks:
        lr.send(job)
    results = [lr.result(timeout=180) for lr in ranks]
    assert errors == []
    for r, res in enumerate(results):
        assert res["tp_rank"] == r and res["tp_size"] == 2, res
        assert res["waiting_class"] == "EmbedlinkWaitingRequest", res
        assert res["status"] == "ready", res.get("abort")
        assert res["shape"] == [2300, HIDDEN] and res["dtype"] == "torch.bfloat16", res
        assert res["bytes_equal"] and res["sha256"] == res["want_sha256"], res
        assert res["grids"] == [[1, 2, 4000], [1, 2, 600]], res
        assert res["waiting_left"] == 0
        rep = res["report"]
        assert rep["language"] and all(v["used"] == 0 for v in rep["language"].values()), rep
        # each part arrived once at this rank; the big one resumed at 1,024
        hist = {p["part"]: [tuple(x) for x in p["history"]] for p in rep["recent_parts"]}
        assert hist == {
            _part(rid, 0): [
                ("Bootstrapping", 0), ("WaitingForInput", 0), ("Transferring", 1024),
                ("Success", 2000),
            ],
            _part(rid, 1): [("Bootstrapping", 0), ("WaitingForInput", 0), ("Success", 300)],
        }, rep  # fmt: skip
    # both ranks aggregated the same bytes
    assert results[0]["sha256"] == results[1]["sha256"]
    # each encoder's room served both ranks, each part written once to each
    # (the 2,000-token part in two chunks: the first reservation, the resume;
    # the room's aux record goes with the first chunk)
    for enc, tokens, chunks in ((a, 2000, 2), (b, 300, 1)):
        state = encoder_state(enc.url)
        assert state["active"] and state["open_rooms"] == 0, state
        assert all(p["used"] == 0 for p in state["pools"].values()), state
        (sent,) = state["delivered"].values()
        assert sent == {
            "sessions": 2,
            "chunks_written": 2 * chunks,
            "bytes_written": 2 * (tokens * HIDDEN * 2 + AUX_SIZE),
            "write_failures": 0,
        }, state


def test_tp2_an_encoder_error_fails_the_request_on_both_ranks_with_its_text(
    dispatch, spawn_encoder, spawn_language_ranks
):
    enc = spawn_encoder(fail="boom")
    ranks = spawn_language_ranks(tp_size=2)
    req, _ = dispatch("tp2-boom", [enc.url])
    for lr in ranks:
        lr.send(_job(req, []))
    results = [lr.result(timeout=180) for lr in ranks]
    for res in results:
        assert res["status"] == "aborted", res
        msg, code = res["abort"]
        assert "embedlink" in msg and "vision tower exploded" in msg, msg
        assert code == 502
        rep = res["report"]
        assert all(v["used"] == 0 for v in rep["language"].values()), rep
    # SGLang shares the best error text over the group; at least one rank's
    # room heard the encoder's abort itself (the other may have been released
    # by the all-reduce first)
    reasons = [p["reason"] or "" for res in results for p in res["report"]["recent_parts"]]
    assert any("vision tower exploded" in r for r in reasons), reasons
    state = encoder_state(enc.url, rooms=False)
    assert all(p["used"] == 0 for p in state["pools"].values()), state
