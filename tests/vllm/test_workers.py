"""vLLM's real worker hooks, in worker processes of their own: the V1
runner's mixin and Model Runner V2's ``ActiveECConnector`` drive the
connector (tests/vllm/worker_proc.py), real Schedulers drive the steps, and
each worker's embedlink endpoint moves the tensors over ``tcp`` or ``shm``.
An item larger than the consumer's whole pool arrives through resumes; a
consumer with two tensor-parallel ranks gets every item on both.
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing
import time
import uuid

import pytest
import torch
from tests.vllm.model_dir import make_model_dir, make_request, make_scheduler

from embedlink import BootstrapServer

pytest.importorskip("embedlink.integrations.vllm")

from vllm.config import ECTransferConfig
from vllm.v1.engine import FinishReason
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

WIDTH = 64
STEP_TIMEOUT = 60.0
_rooms = itertools.count(int(time.time()) % 100_000 * 1000 + 500)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("qwen2-audio-tiny"))


class Worker:
    """A worker process with the process-wide connector vLLM makes."""

    def __init__(self, vllm_config, runner: str) -> None:
        from tests.vllm import worker_proc

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_proc.main, args=(child, vllm_config, runner))
        self.proc.start()
        kind, name = self.recv()
        assert (kind, name) == ("ready", "EmbedlinkECConnector")

    def recv(self):
        if not self.conn.poll(STEP_TIMEOUT):
            raise AssertionError(f"worker {self.proc.pid} did not answer in {STEP_TIMEOUT}s")
        msg = self.conn.recv()
        if msg[0] == "crash":
            raise AssertionError(f"worker crashed:\n{msg[1]}")
        return msg

    def step(self, so, encoded):
        self.conn.send(("step", so, encoded))
        _, ran, cache = self.recv()
        return ran, cache

    def evict(self) -> None:
        self.conn.send(("evict",))
        self.recv()

    def pool_used(self) -> int:
        self.conn.send(("pool",))
        return self.recv()[1][0]

    def stop(self):
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
                self.recv()
            except (AssertionError, OSError, EOFError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


class Instance:
    """A vLLM instance: a real Scheduler here, its workers in processes."""

    def __init__(self, model_dir, role, extra, runner, tp=1):
        ec = ECTransferConfig(
            ec_connector="EmbedlinkECConnector",
            ec_connector_module_path="embedlink.integrations.vllm",
            ec_role=role,
            engine_id=uuid.uuid4().hex,
            ec_connector_extra_config=extra,
        )
        self.sched = make_scheduler(model_dir, ec, tensor_parallel_size=tp)
        self.workers = []
        for rank in range(tp):
            cfg = copy.deepcopy(self.sched.vllm_config)
            cfg.parallel_config.rank = rank
            self.workers.append(Worker(cfg, runner))
        self.outputs = {}
        self.caches = [{} for _ in range(tp)]

    def step(self, encode=None):
        so = self.sched.schedule()
        encoded = {}
        for req_id, inputs in so.scheduled_encoder_inputs.items():
            req = self.sched.requests[req_id]
            for i in inputs:
                ident = req.mm_features[i].identifier
                encoded[ident] = encode(ident, req.get_num_encoder_embeds(i))
        for k, w in enumerate(self.workers):
            _, self.caches[k] = w.step(so, encoded)
        ids = list(so.num_scheduled_tokens)
        mro = (
            ModelRunnerOutput(
                req_ids=ids,
                req_id_to_index={r: i for i, r in enumerate(ids)},
                sampled_token_ids=[[7] for _ in ids],
            )
            if ids
            else EMPTY_MODEL_RUNNER_OUTPUT
        )
        for outs in self.sched.update_from_output(so, mro).values():
            for o in outs.outputs:
                if o.finish_reason is not None:
                    self.outputs[o.request_id] = o
        return so

    def run_until(self, rid, encode=None, timeout=120.0):
        t0 = time.monotonic()
        steps = []
        while rid not in self.outputs:
            assert time.monotonic() - t0 < timeout, f"{rid} not finished after {timeout}s"
            steps.append(self.step(encode))
        return steps

    def close(self):
        for w in self.workers:
            w.stop()
        self.sched.shutdown()


def wait_free(workers, timeout=30.0):
    """The encoder caches let go of everything, then every pool empties."""
    for w in workers:
        w.evict()
    t0 = time.monotonic()
    while any(w.pool_used() for w in workers):
        assert time.monotonic() - t0 < timeout, "a worker's pool is not free"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("transport", "runner", "tp"),
    [("tcp", "v1", 1), ("shm", "v1", 1), ("tcp", "v2", 1), ("tcp", "v1", 2), ("shm", "v2", 2)],
)
def test_the_real_worker_hooks_move_byte_identical_tensors(model_dir, transport, runner, tp):
    made: dict[str, torch.Tensor] = {}

    def encode(ident, rows):
        made[ident] = torch.randn(rows, WIDTH, dtype=torch.float16)
        return made[ident]

    with BootstrapServer(host="127.0.0.1", port=0) as boot:
        common = {"bootstrap": boot.address, "transports": [transport], "block_size": 16}
        prod = Instance(model_dir, "ec_producer", {**common, "num_blocks": 256}, runner)
        cons = None
        try:
            # 8 blocks of 16 rows: the 300-row item arrives in several chunks
            cons = Instance(model_dir, "ec_consumer", {**common, "num_blocks": 8}, runner, tp)
            items = [("aud-big", 4, 300), ("aud-small", 320, 24)]
            rooms = [next(_rooms), next(_rooms)]
            prod.sched.add_request(
                make_request("p", 400, items, {"embedlink": {"rooms": rooms}}, max_tokens=1)
            )
            prod.run_until("p", encode)
            params = prod.outputs["p"].ec_transfer_params
            cons.sched.add_request(make_request("c", 400, items, params, max_tokens=2))
            steps = cons.run_until("c")
            assert steps[0].total_num_scheduled_tokens == 0  # deferred until arrival
            first = next(s for s in steps if s.total_num_scheduled_tokens)
            assert not first.scheduled_encoder_inputs  # nothing left to encode
            assert cons.outputs["c"].finish_reason == FinishReason.LENGTH
            for rank, cache in enumerate(cons.caches):
                for ident, t in made.items():
                    assert torch.equal(cache[ident], t), (rank, ident)
            wait_free(cons.workers)
            wait_free(prod.workers)
        finally:
            if cons is not None:
                cons.close()
            prod.close()
