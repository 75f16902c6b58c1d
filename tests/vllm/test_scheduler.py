"""vLLM's real Scheduler drives the connector, on both instances: a producer
(encoder) instance and a consumer (prefill/decode) instance, each with its
worker-role connector and a real embedlink endpoint, over tcp on loopback.

The one thing only a model can give, the audio tower's output, is stood in
for by a random tensor of the right shape put into the producer's encoder
cache (as vLLM's runner does after encoding). Nothing else is a stand-in.
"""

from __future__ import annotations

import itertools
import time
import uuid

import pytest
import torch
from tests.vllm.model_dir import make_model_dir, make_request, make_scheduler

from embedlink import BootstrapServer

pytest.importorskip("embedlink.integrations.vllm")

from vllm.config import ECTransferConfig
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole
from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory
from vllm.v1.engine import FinishReason
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.request import RequestStatus

WIDTH = 64  # the tiny model's hidden size
_rooms = itertools.count(int(time.time()) % 100_000 * 1000)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("qwen2-audio-tiny"))


class Instance:
    """One vLLM instance: its real Scheduler (with the scheduler-role
    connector inside) and a worker-role connector, as one worker process
    would hold it."""

    def __init__(self, model_dir, role: str, extra: dict) -> None:
        ec = ECTransferConfig(
            ec_connector="EmbedlinkECConnector",
            ec_connector_module_path="embedlink.integrations.vllm",
            ec_role=role,
            engine_id=uuid.uuid4().hex,
            ec_connector_extra_config=extra,
        )
        self.sched = make_scheduler(model_dir, ec)
        self.worker = ECConnectorFactory.create_connector(
            self.sched.vllm_config, ECConnectorRole.WORKER
        )
        self.cache: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, object] = {}

    def step(self, encode=None):
        """One engine step: schedule, run the worker hooks as vLLM's V1
        runner does (only when tokens are scheduled; a producer's every
        step), sample one token per scheduled request, update."""
        so = self.sched.schedule()
        w = self.worker
        # the runner's _update_states: evictions first, on every step
        for h in so.free_encoder_mm_hashes or ():
            self.cache.pop(h, None)
        ran_hooks = so.total_num_scheduled_tokens > 0 or w.is_producer
        if ran_hooks:
            w.bind_connector_metadata(so.ec_connector_metadata)
            try:
                if w.is_producer:
                    w.start_save_caches(encoder_cache=self.cache)
                    for req_id, inputs in so.scheduled_encoder_inputs.items():
                        req = self.sched.requests[req_id]
                        for i in inputs:
                            ident = req.mm_features[i].identifier
                            self.cache[ident] = encode(ident, req.get_num_encoder_embeds(i))
                            w.save_caches(encoder_cache=self.cache, mm_hash=ident)
                else:
                    w.start_load_caches(self.cache)
            finally:
                w.clear_connector_metadata()
        ids = list(so.num_scheduled_tokens)
        if ids:
            mro = ModelRunnerOutput(
                req_ids=ids,
                req_id_to_index={r: i for i, r in enumerate(ids)},
                sampled_token_ids=[[7] for _ in ids],
            )
        else:
            mro = EMPTY_MODEL_RUNNER_OUTPUT
        for outs in self.sched.update_from_output(so, mro).values():
            for o in outs.outputs:
                if o.finish_reason is not None:
                    self.outputs[o.request_id] = o
        return so

    def close(self):
        self.worker.shutdown()
        self.sched.shutdown()


@pytest.fixture
def pair(model_dir):
    with BootstrapServer(host="127.0.0.1", port=0) as boot:
        common = {"bootstrap": boot.address, "transports": ["tcp"], "block_size": 16}
        # A producer room nobody ever asks for (a consumer that went away
        # before its worker opened it) is given up at the producer's own
        # deadline: keep it short here, so the pools are seen free.
        prod = Instance(
            model_dir, "ec_producer", {**common, "num_blocks": 256, "room_timeout": 8.0}
        )
        # a consumer pool of 8 x 16 rows: larger items arrive through resumes
        cons = Instance(
            model_dir,
            "ec_consumer",
            {**common, "num_blocks": 8, "default_tokens": 64, "room_timeout": 4.0},
        )
        try:
            yield prod, cons
        finally:
            cons.close()
            prod.close()


def run_until(inst, done, what, *, timeout=60.0, **kw):
    t0 = time.monotonic()
    steps = []
    while not done():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not after {timeout}s ({len(steps)} steps)")
        steps.append(inst.step(**kw))
        time.sleep(0.002)  # a real engine steps this fast when only waiting
    return steps


def tensors():
    made: dict[str, torch.Tensor] = {}

    def encode(ident, rows):
        made[ident] = torch.randn(rows, WIDTH, dtype=torch.float16)
        return made[ident]

    return made, encode


def produce(prod, rid, items, rooms):
    """Run a request through the producer instance; its ec_transfer_params."""
    made, encode = tensors()
    mine = {} if rooms is None else {"rooms": rooms}
    prod.sched.add_request(make_request(rid, 200, items, {"embedlink": mine}, max_tokens=1))
    run_until(prod, lambda: rid in prod.outputs, f"producer request {rid}", encode=encode)
    out = prod.outputs[rid]
    got = out.ec_transfer_params["embedlink"]["rooms"]
    if rooms is None:  # the producer gave each item a room of its own
        assert len(set(got)) == len(items), got
    else:
        assert got == rooms
    return out.ec_transfer_params, made


def pools_free(*insts):
    """Each instance's encoder cache lets go of what it holds (vLLM evicts
    when it needs the room; items lent out of a consumer's pool go back
    with their tensors), then: are the pools empty?"""
    for inst in insts:
        inst.cache.clear()

    def free():
        usages = []
        for inst in insts:
            part = inst.worker._consumer or inst.worker._producer
            usages.append(part.ep.pool_usage()[0])
        return all(u == 0 for u in usages)

    return free


def wait_for(cond, what, timeout=45.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.01)


def test_a_request_waits_for_its_items_then_runs_with_nothing_to_encode(pair):
    prod, cons = pair
    rooms = [next(_rooms), next(_rooms)]
    # 150 rows: more than the consumer's whole pool (128): it arrives through resumes
    items = [("aud-a", 4, 150), ("aud-b", 160, 30)]
    params, made = produce(prod, "p1", items, rooms)
    cons.sched.add_request(make_request("c1", 200, items, params, max_tokens=2))
    steps = run_until(cons, lambda: "c1" in cons.outputs, "consumer request c1")
    # deferred (nothing scheduled) until both items had arrived ...
    assert steps[0].total_num_scheduled_tokens == 0
    first = next(s for s in steps if s.total_num_scheduled_tokens)
    # ... then admitted with nothing left to encode: both came from embedlink
    assert not first.scheduled_encoder_inputs
    for ident, t in made.items():
        assert torch.equal(cons.cache[ident], t), ident  # byte-identical
    out = cons.outputs["c1"]
    assert out.finish_reason == FinishReason.LENGTH
    # aud-b (30 rows) was lent to the encoder cache out of the pool, not
    # copied; aud-a came through resumes into memory of its own
    consumer = cons.worker._consumer
    assert consumer.lent_blocks == 2
    assert consumer.held == 0
    # vLLM keeps a finished request's items cached until it needs the room;
    # the blocks come back when the cache lets go of the tensor
    wait_for(pools_free(prod), "the producer's pool free")
    assert cons.worker._consumer.ep.pool_usage()[0] == 2
    cons.cache.clear()
    wait_for(pools_free(prod, cons), "pools free once the cache let go")
    assert consumer.lent_blocks == 0


def test_a_failed_room_ends_the_request_with_finish_reason_error(pair):
    prod, cons = pair
    # the producer never hears of this room: the consumer's room times out
    params = {"embedlink": {"rooms": [next(_rooms)], "bootstrap": cons.worker._bootstrap}}
    cons.sched.add_request(make_request("lost", 100, [("aud-x", 4, 20)], params))
    ok_rooms = [next(_rooms)]
    ok_params, _ = produce(prod, "p-ok", [("aud-y", 4, 20)], ok_rooms)
    cons.sched.add_request(make_request("fine", 100, [("aud-y", 4, 20)], ok_params))
    run_until(cons, lambda: {"lost", "fine"} <= set(cons.outputs), "both requests end")
    assert cons.outputs["lost"].finish_reason == FinishReason.ERROR
    assert cons.outputs["fine"].finish_reason == FinishReason.LENGTH  # the engine served on
    wait_for(pools_free(prod, cons), "pools free")


def test_a_row_count_mismatch_fails_only_that_request(pair):
    prod, cons = pair
    rooms = [next(_rooms)]
    params, _ = produce(prod, "p-rows", [("aud-r", 4, 30)], rooms)
    # the consumer's request says 20 placeholders for what was encoded as 30 rows
    cons.sched.add_request(make_request("rows", 100, [("aud-r", 4, 20)], params))
    run_until(cons, lambda: "rows" in cons.outputs, "the mismatched request ends")
    assert cons.outputs["rows"].finish_reason == FinishReason.ERROR
    assert "aud-r" not in cons.cache  # nothing was written into the cache
    wait_for(pools_free(prod, cons), "pools free")


def test_an_aborted_request_leaves_both_pools_free(pair):
    prod, cons = pair
    rooms = [next(_rooms)]
    cons.sched.add_request(
        make_request("gone", 100, [("aud-z", 4, 20)], {"embedlink": {"rooms": rooms}})
    )
    cons.step()  # opens the room on the worker: it waits for the producer
    wait_for(lambda: cons.worker._consumer.ep.pool_usage()[0] > 0, "the room reserved blocks")
    cons.sched.finish_requests("gone", RequestStatus.FINISHED_ABORTED)
    wait_for(pools_free(cons), "the consumer pool is free after the abort")
    # the producer's late output for it is dropped, and its pool frees too
    produce(prod, "p-late", [("aud-z", 4, 20)], rooms)
    wait_for(pools_free(prod), "the producer pool is free")


def test_the_same_item_in_two_concurrent_requests(pair):
    prod, cons = pair
    items = [("aud-same", 4, 40)]
    pa, made = produce(prod, "pa", items, [next(_rooms)])
    pb, _ = produce(prod, "pb", items, [next(_rooms)])
    cons.sched.add_request(make_request("ca", 100, items, pa))
    cons.sched.add_request(make_request("cb", 100, items, pb))
    run_until(cons, lambda: {"ca", "cb"} <= set(cons.outputs), "both requests end")
    assert cons.outputs["ca"].finish_reason == FinishReason.LENGTH
    assert cons.outputs["cb"].finish_reason == FinishReason.LENGTH
    assert torch.equal(cons.cache["aud-same"], made["aud-same"])
    wait_for(pools_free(prod, cons), "pools free")


def test_parallel_samples_share_their_parents_rooms(pair):
    """``n > 1``: vLLM's front end makes one engine request per sample, each
    with the parent's transfer params, so every sample names the same rooms.
    Each sample waits for the shared rooms and runs; the rooms close when the
    last sample ends."""
    prod, cons = pair
    items = [("aud-n", 4, 40), ("aud-n2", 60, 24)]
    params, made = produce(prod, "pn", items, None)
    for i in range(3):
        cons.sched.add_request(make_request(f"{i}_cn", 100, items, params))
    done = {f"{i}_cn" for i in range(3)}
    run_until(cons, lambda: done <= set(cons.outputs), "every sample ends")
    for rid in done:
        assert cons.outputs[rid].finish_reason == FinishReason.LENGTH, cons.outputs[rid]
    for ident, _start, _rows in items:
        assert torch.equal(cons.cache[ident], made[ident])
    wait_for(pools_free(prod, cons), "pools free")


def test_a_sample_aborted_before_its_rooms_arrive_leaves_them_to_the_others(pair):
    prod, cons = pair
    rooms = [next(_rooms)]
    items = [("aud-ab", 4, 20)]
    params = {"embedlink": {"rooms": rooms}}
    for i in range(2):
        cons.sched.add_request(make_request(f"{i}_ab", 100, items, params))
    cons.step()  # the shared room opens on the worker, once
    wait_for(lambda: cons.worker._consumer.ep.pool_usage()[0] > 0, "the room reserved blocks")
    cons.sched.finish_requests("0_ab", RequestStatus.FINISHED_ABORTED)
    _, made = produce(prod, "p-ab", items, rooms)
    run_until(cons, lambda: "1_ab" in cons.outputs, "the other sample ends")
    assert cons.outputs["1_ab"].finish_reason == FinishReason.LENGTH
    assert torch.equal(cons.cache["aud-ab"], made["aud-ab"])
    wait_for(pools_free(prod, cons), "pools free")


def test_a_room_named_by_two_requests_for_different_items_fails_the_second(pair):
    _prod, cons = pair
    rooms = [next(_rooms)]
    cons.sched.add_request(
        make_request("first", 100, [("aud-p", 4, 20)], {"embedlink": {"rooms": rooms}})
    )
    cons.sched.add_request(
        make_request("second", 100, [("aud-q", 4, 20)], {"embedlink": {"rooms": rooms}})
    )
    run_until(cons, lambda: "second" in cons.outputs, "the second request fails")
    assert cons.outputs["second"].finish_reason == FinishReason.ERROR
    why = cons.sched.ec_connector._consumer_sched.last_failure("second")
    assert f"room {rooms[0]} carries 'aud-p'" in why and "not 'aud-q'" in why, why
    assert "first" not in cons.outputs  # still waiting for its producer
    cons.sched.finish_requests("first", RequestStatus.FINISHED_ABORTED)
    wait_for(pools_free(cons), "the consumer pool is free")


def test_the_producer_assigns_rooms_when_the_router_gives_none(pair):
    """A proxy need not count a request's items: it sends an empty
    ``{"embedlink": {}}`` and passes on what the producer returns."""
    prod, cons = pair
    items = [("aud-p", 4, 40), ("aud-q", 50, 40)]
    params, made = produce(prod, "p-auto", items, None)
    again, _ = produce(prod, "p-auto-2", items, None)
    assert not set(params["embedlink"]["rooms"]) & set(again["embedlink"]["rooms"])
    cons.sched.add_request(make_request("c-auto", 100, items, params))
    run_until(cons, lambda: "c-auto" in cons.outputs, "the request ends")
    assert cons.outputs["c-auto"].finish_reason == FinishReason.LENGTH
    for ident, t in made.items():
        assert torch.equal(cons.cache[ident], t)


def _consumer(model_dir, boot_address):
    return Instance(
        model_dir,
        "ec_consumer",
        {
            "bootstrap": boot_address,
            "transports": ["tcp"],
            "block_size": 16,
            "num_blocks": 8,
            "room_timeout": 4.0,
        },
    )


def test_one_producer_serves_two_consumers(pair, model_dir):
    prod, cons = pair
    other = _consumer(model_dir, cons.worker._bootstrap)
    try:
        items = [("aud-shared", 4, 40)]
        pa, made = produce(prod, "pa2", items, None)
        pb, _ = produce(prod, "pb2", items, None)
        cons.sched.add_request(make_request("ca2", 100, items, pa))
        other.sched.add_request(make_request("cb2", 100, items, pb))
        t0 = time.monotonic()
        while not ("ca2" in cons.outputs and "cb2" in other.outputs):
            assert time.monotonic() - t0 < 60, "both consumers' requests end"
            cons.step()
            other.step()
            time.sleep(0.002)
        for inst, rid in ((cons, "ca2"), (other, "cb2")):
            assert inst.outputs[rid].finish_reason == FinishReason.LENGTH
            assert torch.equal(inst.cache["aud-shared"], made["aud-shared"])
        wait_for(pools_free(prod, cons, other), "pools free")
    finally:
        other.close()


def test_a_restarted_consumer_is_served(pair, model_dir):
    """A consumer instance goes away with a request still waiting; a new one
    (new sessions, the same producer) gets its requests through at once, and
    the producer gives back what it held for the old one (at once when the old
    consumer had asked for it, else at the producer's room deadline)."""
    prod, cons = pair
    boot = cons.worker._bootstrap
    first = _consumer(model_dir, boot)
    items = [("aud-r1", 4, 40)]
    p1, _ = produce(prod, "p-before", items, None)
    first.sched.add_request(make_request("c-before", 100, items, p1))
    first.step()  # its worker opens the room; the data starts to flow
    first.close()  # the instance is gone (its endpoints closed)
    again = _consumer(model_dir, boot)
    try:
        p2, made = produce(prod, "p-after", [("aud-r2", 4, 40)], None)
        again.sched.add_request(make_request("c-after", 100, [("aud-r2", 4, 40)], p2))
        run_until(again, lambda: "c-after" in again.outputs, "the new consumer's request")
        assert again.outputs["c-after"].finish_reason == FinishReason.LENGTH
        assert torch.equal(again.cache["aud-r2"], made["aud-r2"])
        wait_for(pools_free(prod, again), "pools free")
    finally:
        again.close()


def test_a_width_mismatch_fails_the_request_naming_both_widths(pair, model_dir):
    """A consumer configured for another width (hidden_size) than the
    producer sends: its requests fail with both schemas named, nothing is
    written into its cache, and the engine keeps serving."""
    prod, cons = pair
    narrow = Instance(
        model_dir,
        "ec_consumer",
        {
            "bootstrap": cons.worker._bootstrap,
            "transports": ["tcp"],
            "block_size": 16,
            "num_blocks": 8,
            "room_timeout": 4.0,
            "hidden_size": 32,
        },
    )
    try:
        items = [("aud-w", 4, 20)]
        params, _ = produce(prod, "p-wide", items, None)
        narrow.sched.add_request(make_request("c-narrow", 100, items, params))
        run_until(narrow, lambda: "c-narrow" in narrow.outputs, "the request ends")
        assert narrow.outputs["c-narrow"].finish_reason == FinishReason.ERROR
        assert "aud-w" not in narrow.cache
        # the reason, as logged and kept by the consumer's scheduler side
        why = narrow.sched.ec_connector._consumer_sched.last_failure("c-narrow")
        assert "schema mismatch" in why and "64" in why and "32" in why, why
    finally:
        narrow.close()
