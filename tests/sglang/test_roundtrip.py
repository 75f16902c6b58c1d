"""Requests through SGLang's real EPD classes with the plugin in place: the
scheduler-side receiver in this process, encoder-only servers in their own
processes, embedlink's endpoints between them (conftest,
embedlink.tools.sglang_testbed)."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import encoder_state, pools_free, tick_until_done
from embedlink import Status
from embedlink.tools.sglang_testbed import HIDDEN, expected_rows, part_seed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _part(rid: str, i: int) -> str:
    return f"{rid}_local_part_{i}"


@pytest.mark.parametrize("transports", ["shm,tcp", "tcp"])
def test_two_parts_one_resumed_arrive_byte_exact_through_sglangs_aggregation(
    scheduler, dispatch, spawn_encoder, transports
):
    from embedlink.integrations.sglang import status_report

    rid = f"rt-{transports.replace(',', '')}"
    # part 0: 2,000 tokens into the 1,024-token first reservation (it resumes)
    a = spawn_encoder(transports=transports, tokens={_part(rid, 0): 2000})
    b = spawn_encoder(transports=transports, tokens={_part(rid, 1): 300})
    assert a.delivery.endswith("EmbedlinkDelivery")
    rx = scheduler()
    req, _ = dispatch(rid, [a.url, b.url], images=2)  # one image to each encoder
    assert list(req.num_items_assigned.values()) == [[1, 1]]
    ready, aborted = tick_until_done(rx, [req])
    assert aborted == []
    assert [r.rid for r in ready] == [rid]
    (_prompt, embeddings, meta) = rx.mm_processor.calls[-1]
    (got,) = embeddings.values()
    want = torch.cat(
        [
            expected_rows(2000, HIDDEN, part_seed(_part(rid, 0))),
            expected_rows(300, HIDDEN, part_seed(_part(rid, 1))),
        ]
    )
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    # SGLang's metadata came with the embedding: the grids the encoders reported
    assert meta["img_grid_thw"].tolist() == [[1, 2, 4000], [1, 2, 600]]
    assert ready[0].mm_inputs is not None and list(ready[0].input_ids) == [7, 7, 7, 7]
    # the waiting request was the plugin's, and the big part resumed
    assert not rx.waiting_list
    rep = pools_free()
    assert all(v["used"] == 0 for v in rep["language"].values()), rep
    recent = {p["part"]: p for p in status_report()["recent_parts"]}
    big, small = recent[_part(rid, 0)]["history"], recent[_part(rid, 1)]["history"]
    # the 2,000-token part resumed once, at the 1,024-token default; the other did not
    assert [tuple(x) for x in big] == [
        ("Bootstrapping", 0), ("WaitingForInput", 0), ("Transferring", 1024), ("Success", 2000)
    ]  # fmt: skip
    assert [tuple(x) for x in small] == [
        ("Bootstrapping", 0),
        ("WaitingForInput", 0),
        ("Success", 300),
    ]
    for enc in (a, b):
        state = encoder_state(enc.url)
        assert state["active"] and state["open_rooms"] == 0, state
        assert all(p["used"] == 0 for p in state["pools"].values()), state


def test_an_encoder_error_fails_the_request_with_its_text(scheduler, dispatch, spawn_encoder):
    enc = spawn_encoder(fail="boom")
    rx = scheduler()
    req, _ = dispatch("boom-1", [enc.url])
    ready, aborted = tick_until_done(rx, [req])
    assert ready == []
    (abort,) = aborted
    _, msg, code = abort
    assert "embedlink" in msg and "vision tower exploded" in msg, msg
    assert int(code) == 502
    rep = pools_free()
    assert all(v["used"] == 0 for v in rep["language"].values()), rep
    state = encoder_state(enc.url, rooms=False)
    assert all(p["used"] == 0 for p in state["pools"].values()), state


def test_sglangs_timeout_releases_every_block(scheduler, dispatch, spawn_encoder):
    from embedlink.integrations.sglang import status_report

    enc = spawn_encoder(hang="slow")
    rx = scheduler(recv_timeout=3.0)
    req, _ = dispatch("slow-1", [enc.url])
    t0 = time.monotonic()
    ready, aborted = tick_until_done(rx, [req])
    assert ready == []
    (abort,) = aborted
    assert "Timeout waiting for image embedding" in abort[1]
    assert time.monotonic() - t0 < 60  # SGLang's, not embedlink's room timeout
    rep = pools_free()
    assert all(v["used"] == 0 for v in rep["language"].values()), rep
    assert status_report()["language"]


def test_a_user_abort_fails_the_request_and_frees_its_rooms(scheduler, dispatch, spawn_encoder):
    from sglang.srt.managers.io_struct import AbortReq

    enc = spawn_encoder(hang="gone")
    rx = scheduler()
    req, _ = dispatch("gone-1", [enc.url])
    out, ab = rx.process_waiting_requests([req])
    assert out == [] and ab == []
    # the part's room is open and holds its first reservation
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rx.process_waiting_requests([])
        w = rx.waiting_by_rid.get("gone-1")
        if w is not None and all(p.rx is not None for p in w._el_parts):
            break
        time.sleep(0.002)
    (part,) = rx.waiting_by_rid["gone-1"]._el_parts
    assert part.rx.poll() in (Status.Bootstrapping, Status.WaitingForInput)
    rx.abort_waiting_requests(AbortReq(rid="gone-1"))
    _, aborted = rx.process_waiting_requests([])
    assert [a[0].rid for a in aborted] == ["gone-1"]
    assert "Aborted by user" in aborted[0][1]
    assert part.rx.poll() is Status.Failed
    rep = pools_free()
    assert all(v["used"] == 0 for v in rep["language"].values()), rep


def test_an_encoder_without_the_plugin_still_serves_through_sglangs_own_path(
    scheduler, dispatch, spawn_encoder
):
    enc = spawn_encoder(plugin=False, tokens={"plain-1": 40})
    assert enc.delivery.endswith(".ZmqDelivery")
    rx = scheduler()
    req, _ = dispatch("plain-1", [enc.url])
    ready, aborted = tick_until_done(rx, [req])
    assert aborted == [] and [r.rid for r in ready] == ["plain-1"]
    (_, embeddings, _) = rx.mm_processor.calls[-1]
    (got,) = embeddings.values()
    want = expected_rows(40, HIDDEN, part_seed(_part("plain-1", 0)))
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
