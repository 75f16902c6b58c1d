"""What it takes to run SGLang 0.5.23's real EPD classes without a model, on
the CPU (docs/research/sglang-0.5.23-epd.md, section 8 and appendix B): for
tests/sglang and the bench (:mod:`.sglang_bench`), in SGLang's environment.

Real: ``ServerArgs`` and ``publish`` (over a config-only model directory),
a gloo tensor-parallel group, the scheduler-side ``MMReceiverHTTP`` with its
waiting requests, registration thread and all-reduce, the tokenizer-side
dispatch of ``/encode``, the encoder's FastAPI app and its request lifecycle
(``batch_encode``, ``send_with_url``, ``ReqState``, ``SendDestination``,
``EmbeddingData``, the delivery). Stand-ins, each only for what needs a
model: the model's multimodal processor (:class:`RecordingMMProcessor`), the
encoder's constructor (:func:`encoder_shell`: it loads weights), its HF
preprocessing and vision forward (:func:`fake_model_stage`), and the
scheduler fields ``create_req`` reads (:func:`scheduler_stub`).
:func:`language_rank_main` runs one scheduler rank of a TP group in a
process of its own (``python -m embedlink.tools.sglang_testbed
--language-rank``); without GPUs its TP group is gloo only (no NCCL).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import socket
import sys
from array import array
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("SGLANG_HOST_IP", "127.0.0.1")  # SGLang binds and registers this

HIDDEN = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: str) -> str:
    """A model directory holding only a Qwen2-VL ``config.json`` (no weights,
    no tokenizer): enough for ``ServerArgs`` and ``publish``."""
    import transformers

    cfg = transformers.Qwen2VLConfig()
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    cfg.save_pretrained(path)
    return path


def server_args(model_dir: str, **kw: Any) -> Any:
    from sglang.srt.server_args import ServerArgs

    base = dict(
        model_path=model_dir,
        device="cpu",
        skip_tokenizer_init=True,
        host="127.0.0.1",
        encoder_transfer_backend="zmq_to_scheduler",
    )
    base.update(kw)
    return ServerArgs(**base)


def publish_scheduler(sa: Any) -> None:
    from sglang.srt.runtime_context import SpawnRanks, publish

    publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))


def gloo_world_of_one() -> None:
    """SGLang's smallest real TP group (its all-reduce runs even at TP 1)."""
    from sglang.srt.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )

    init_distributed_environment(
        world_size=1,
        rank=0,
        local_rank=0,
        backend="gloo",
        distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
    )
    initialize_model_parallel()


def recv_req(rid: str, assigned: Any, urls: list[str]) -> Any:
    """A real ``TokenizedGenerateReqInput`` as the scheduler gets it in EPD
    mode (the tokenizer manager's dispatch filled ``num_items_assigned`` and
    ``encoder_urls``)."""
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    return TokenizedGenerateReqInput(
        rid=rid,
        input_text="<image> describe",
        input_ids=array("q", (1, 2, 3)),
        input_embeds=None,
        mm_inputs=None,
        token_type_ids=None,
        sampling_params=SamplingParams(max_new_tokens=4),
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        token_ids_logprob=None,
        stream=False,
        need_wait_for_mm_inputs=True,
        num_items_assigned=assigned,
        encoder_urls=urls,
    )


class RecordingMMProcessor:
    """Stand-in for the model's multimodal processor (the real one needs the
    model's HF processor files): what SGLang's ``_finish_assemble`` calls,
    returning SGLang's real output type, recording what it was given."""

    prefer_tokenized_input = False

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, dict[str, Any]]] = []

    def get_validated_mm_data(self, prompt: Any, embeddings: Any, **meta: Any) -> Any:
        from sglang.srt.managers.schedule_batch import (
            MultimodalDataItem,
            MultimodalProcessorOutput,
        )

        self.calls.append((prompt, embeddings, meta))
        items = [
            MultimodalDataItem(modality=m, precomputed_embeddings=e) for m, e in embeddings.items()
        ]
        return MultimodalProcessorOutput(mm_items=items, input_ids=[7, 7, 7, 7])


def scheduler_stub() -> Any:
    """Stand-in for the scheduler fields ``MMReceiverBase.create_req`` reads
    (it builds the real ``Req`` a failed request is aborted with)."""
    from sglang.srt.disaggregation.utils import DisaggregationMode

    return SimpleNamespace(
        model_config=SimpleNamespace(hf_eos_token_id=None, vocab_size=1000),
        disaggregation_mode=DisaggregationMode.NULL,
        metrics_reporter=SimpleNamespace(enable_metrics=False),
        metrics_collector=None,
        dllm_config=None,
        tokenizer=None,
    )


def part_seed(part_rid: str) -> int:
    return sum(map(ord, part_rid)) * 31 + len(part_rid)


_OUTPUTS: dict[tuple[int, int], Any] = {}


def bench_rows(n: int, width: int, seed: int) -> Any:
    """A ``[n, width]`` bfloat16 output for the bench: a cached random base
    (made once per size) copied into a buffer nothing else holds (one memcpy,
    as a vision tower writes its output into memory its caching allocator
    holds: :class:`~embedlink.tools.outputs.FreeBuffers`), with ``seed`` in
    its first row. ``randn`` per part would cost more than any transfer
    measured, and a fresh tensor per part would measure page faults."""
    from .outputs import FreeBuffers

    outputs = _OUTPUTS.get((n, width))
    if outputs is None:
        outputs = _OUTPUTS[(n, width)] = FreeBuffers(expected_rows(n, width, 12345), ready=2)
    out = outputs.take()
    out.copy_(outputs.like)
    out[0, 0] = float(seed % 251)
    return out


def expected_rows(n: int, width: int, seed: int) -> Any:
    """What the stand-in vision forward produces for a batch of ``n`` tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g).to(torch.bfloat16)


def encoder_shell(dim: int) -> Any:
    """Stand-in for ``MMEncoder.__init__`` (it loads the model's weights and
    sets up its TP group): the attributes the rank-0 request lifecycle reads,
    set as ``__init__`` sets them, and the delivery built by the same global
    lookup (``ZmqDelivery(...)``: the plugin's class once it is installed)."""
    import torch
    import zmq
    import zmq.asyncio
    from sglang.srt.disaggregation.encoder import server as srv
    from sglang.srt.managers.schedule_batch import Modality

    enc = object.__new__(srv.MMEncoder)
    enc.transfer_backend = "zmq_to_scheduler"
    enc.use_mooncake = False
    enc.rank = 0
    enc.dp_rank = 0
    enc.profiler = None
    enc.mm_global_cache = None
    enc.context = zmq.asyncio.Context(2)
    enc.sync_context = zmq.Context()
    enc.scheduler_send_sockets = {}
    enc.scheduler_send_locks = {}
    enc.executor = concurrent.futures.ThreadPoolExecutor(max_workers=10)
    enc.send_timeout = 30.0
    enc.background_tasks = set()
    enc._embedding_dtype = torch.bfloat16
    enc._element_size = 2
    enc._embedding_dims = {Modality.IMAGE: dim, Modality.VIDEO: dim, Modality.AUDIO: dim}
    enc.model_type = "qwen2_vl"
    enc.req_states = {}
    enc.abandoned_req_ids = set()
    enc.encode_dispatch_lock = asyncio.Lock()
    enc.delivery = srv.ZmqDelivery(enc, cleanup_receive_state=True)
    return enc


def fake_model_stage(
    enc: Any, tokens: dict[str, int], fail: str = "", hang: str = "", cheap: bool = False
) -> None:
    """Stand-ins for the two model stages of ``MMEncoder.batch_encode``:
    HF preprocessing (``tokens[rid]`` tokens per item, else ``tokens["*"]``,
    else 4) and the
    vision forward (seeded rows, or :func:`bench_rows` when ``cheap``; raises
    for a rid containing ``fail``, waits for a rid containing ``hang``).
    Everything around them is SGLang's."""
    import torch
    from sglang.srt.disaggregation.encoder import server as srv
    from sglang.srt.disaggregation.encoder.preprocessor import EncoderPreprocessResult

    every = int(tokens.get("*", 4))

    def count(rid: str) -> int:
        base = rid.rsplit("_local_part_", 1)[0]
        return int(tokens.get(rid, tokens.get(base, every)))

    async def _prepare_encode_context(
        requests: Any, modality: Any, *, use_global_cache: Any, is_health_check: bool = False
    ) -> Any:
        n_items = [len(r["mm_items"]) for r in requests]
        per = [
            count(r["req_id"]) for r, k in zip(requests, n_items, strict=False) for _ in range(k)
        ]
        grid = torch.tensor([[1, 2, 2 * t] for t in per])  # 2x2 merge: t tokens per item
        pre = EncoderPreprocessResult(mm_inputs={}, grid_thw=grid, token_counts=per)
        return srv.EncodeContext(
            req_id=requests[0]["req_id"],
            modality=modality,
            preprocess_result=pre,
            get_feature_fn=None,
            mm_feature=None,
            num_items=sum(n_items),
            items_per_req=n_items,
            aux_data={},
            str_mm_hashes=None,
            use_global_cache=False,
            is_health_check=is_health_check,
        )

    async def _compute_embedding(ctx: Any, *, keep_on_gpu: Any) -> Any:
        rid = str(ctx.req_id)
        if fail and fail in rid:
            raise RuntimeError(f"vision tower exploded on {rid}")
        if hang and hang in rid:
            await asyncio.Event().wait()  # a vision tower that never finishes
        n = sum(ctx.preprocess_result.token_counts)
        make = bench_rows if cheap else expected_rows
        return make(n, enc._embedding_dims[ctx.modality], part_seed(rid))

    enc._prepare_encode_context = _prepare_encode_context
    enc._compute_embedding = _compute_embedding


def encoder_main(argv: list[str]) -> None:
    """An SGLang encoder-only server without a model: SGLang's real FastAPI
    encoder app and request lifecycle, the model stages stood in for.
    Plugins load through SGLang's own ``load_plugins()`` (``EMBEDLINK_SGLANG=1``
    in the environment puts embedlink's delivery in place). Binds port 0,
    prints ``DELIVERY <class>`` and ``PORT <n>``, serves until killed.
    ``argv``: MODEL_DIR JSON (``{"tokens": {rid: n}, "fail": substr, "hang":
    substr, "dim": width, "cheap": bool}``)."""
    model_dir, spec = argv[0], json.loads(argv[1])
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import uvicorn
    from sglang.srt.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )
    from sglang.srt.runtime_context import get_parallel, publish

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sa = server_args(model_dir, encoder_only=True, port=port)
    publish(sa, role="encoder")
    # what MMEncoder.__init__ does for its TP group, on gloo, world size 1
    init_distributed_environment(
        backend="gloo",
        world_size=1,
        rank=0,
        local_rank=0,
        distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
    )
    get_parallel().override_permanently(
        tp_rank=0, pp_size=1, pp_rank=0, attn_dp_size=1, attn_dp_rank=0, attn_tp_size=1,
        attn_tp_rank=0, attn_cp_rank=0, attn_dcp_size=1, moe_ep_size=1, moe_ep_rank=0,
        moe_dp_size=1, moe_tp_size=1,
    )  # fmt: skip
    initialize_model_parallel()
    from sglang.srt.disaggregation.encoder import http_server

    enc = encoder_shell(int(spec.get("dim", HIDDEN)))
    fake_model_stage(
        enc,
        spec.get("tokens", {}),
        fail=spec.get("fail", ""),
        hang=spec.get("hang", ""),
        cheap=bool(spec.get("cheap", False)),
    )
    # what http_server.launch_server leaves behind for TP 1 without batching
    http_server.encoder = enc
    http_server.send_sockets = []
    http_server.encoder_scheduler = None
    http_server.local_runtime = None
    http_server.dp_dispatcher = None
    print(f"DELIVERY {type(enc.delivery).__module__}.{type(enc.delivery).__name__}", flush=True)
    sock.listen(2048)  # connections wait in the backlog until uvicorn serves
    print(f"PORT {port}", flush=True)
    config = uvicorn.Config(http_server.app, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


def _modality_keys(assigned: dict[str, list[int]]) -> Any:
    """``num_items_assigned`` from JSON (``{"IMAGE": [1, 1]}``) back to
    SGLang's ``{Modality.IMAGE: [1, 1]}``."""
    from sglang.srt.managers.schedule_batch import Modality

    return {Modality[name]: list(n) for name, n in assigned.items()}


def language_rank_main(argv: list[str]) -> None:
    """One scheduler rank of a language-only server with tensor parallelism,
    without a model: SGLang's config published for this rank
    (``ServerArgs(tp_size=N)``, ``SpawnRanks(world_rank=R)``), a real gloo TP
    group of N (SGLang's ``init_distributed_environment`` and
    ``initialize_model_parallel``), SGLang's scheduler-side ``MMReceiverHTTP``
    (plugins loaded by SGLang's ``load_plugins()``: ``EMBEDLINK_SGLANG=1``
    in the environment); the model's processor and the scheduler's fields
    stood in for (:class:`RecordingMMProcessor`, :func:`scheduler_stub`).

    ``argv``: MODEL_DIR JSON (``{"rank": R, "tp_size": N, "dist_port": P,
    "deadline": seconds}``). Prints ``READY <tp_rank>`` once the group is up,
    then reads one JSON line on stdin, the request as the tokenizer
    dispatched it (``{"rid", "assigned": {"IMAGE": [1, 1]}, "urls",
    "expect": [[part id, tokens], ...]}``; ``expect`` empty for a request
    meant to fail), ticks ``process_waiting_requests`` until it is ready or
    aborted (every rank ticks: SGLang all-reduces the statuses over the TP
    group on each tick) and prints one line ``RESULT {json}``: its status,
    whether the aggregated embedding is byte-identical to the expected rows
    (:func:`expected_rows` of :func:`part_seed`), the abort's text and code,
    the plugin's :func:`~embedlink.integrations.sglang.status_report` once
    the pools are free. Exits right after (``os._exit``: nothing to flush,
    and the gloo group and SGLang's threads need no teardown)."""
    model_dir, spec = argv[0], json.loads(argv[1])
    rank, tp_size = int(spec["rank"]), int(spec.get("tp_size", 2))
    # no GPUs: SGLang's TP groups would build a NCCL communicator over the
    # gloo group wherever torch finds libnccl (a CUDA build of torch); point
    # it at none, as on a machine without NCCL, so the groups are gloo only
    os.environ.setdefault("SGLANG_NCCL_SO_PATH", "/nonexistent/embedlink-no-nccl/libnccl.so.2")
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import hashlib
    import time

    import torch
    from sglang.srt.disaggregation.encoder.receiver import MMReceiverHTTP
    from sglang.srt.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish

    sa = server_args(model_dir, language_only=True, encoder_urls=[], tp_size=tp_size)
    publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=rank, dp_rank=None, gpu_id=0))
    init_distributed_environment(
        world_size=tp_size,
        rank=rank,
        local_rank=rank,
        backend="gloo",
        distributed_init_method=f"tcp://127.0.0.1:{int(spec['dist_port'])}",
    )
    initialize_model_parallel()  # at the published widths (tp_size)
    rx = MMReceiverHTTP(sa, dtype=torch.bfloat16, hf_config=None, scheduler=scheduler_stub())
    rx.mm_processor = RecordingMMProcessor()
    tp_rank = int(get_parallel().tp_rank)
    print(f"READY {tp_rank}", flush=True)

    job = json.loads(sys.stdin.readline())
    rid = str(job["rid"])
    req = recv_req(rid, _modality_keys(job["assigned"]), list(job["urls"]))
    deadline = time.monotonic() + float(spec.get("deadline", 120))
    ready: list[Any] = []
    aborted: list[Any] = []
    ticks = 1
    out, ab = rx.process_waiting_requests([req])
    waiting = rx.waiting_by_rid.get(rid)
    waiting_cls = None if waiting is None else type(waiting).__name__
    while True:
        ready += out
        aborted += ab
        if ready or aborted or time.monotonic() > deadline:
            break
        time.sleep(0.002)  # the scheduler's next tick
        out, ab = rx.process_waiting_requests([])
        ticks += 1

    result: dict[str, Any] = {
        "rank": rank,
        "tp_rank": tp_rank,
        "tp_size": int(rx.tp_size),
        "waiting_class": waiting_cls,
        "ticks": ticks,
        "status": "ready" if ready else "aborted" if aborted else "deadline",
    }
    if aborted:
        result["abort"] = [str(aborted[0][1]), int(aborted[0][2] or 0)]
    if ready:
        (_prompt, embeddings, meta) = rx.mm_processor.calls[-1]
        (got,) = embeddings.values()
        want = torch.cat(
            [expected_rows(int(n), HIDDEN, part_seed(str(p))) for p, n in job["expect"]]
        )
        raw = got.contiguous().view(torch.int16).numpy().tobytes()
        same = got.dtype == want.dtype and torch.equal(
            got.view(torch.int16), want.view(torch.int16)
        )
        result.update(
            shape=list(got.shape),
            dtype=str(got.dtype),
            bytes_equal=same,
            sha256=hashlib.sha256(raw).hexdigest(),
            want_sha256=hashlib.sha256(want.view(torch.int16).numpy().tobytes()).hexdigest(),
            grids=meta["img_grid_thw"].tolist() if "img_grid_thw" in meta else None,
        )
    from embedlink.integrations.sglang import status_report, wait_language_pools_free

    wait_language_pools_free(30.0)
    result["report"] = status_report()
    result["waiting_left"] = len(rx.waiting_list)
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--language-rank"]:
        language_rank_main(sys.argv[2:])
    else:
        encoder_main(sys.argv[1:])
