"""Bench embedlink's vLLM connector against vLLM's own EC connectors, in one run.

``python -m embedlink.tools.vllm_bench`` (in an environment with vLLM
0.33.0; ``VLLM_TARGET_DEVICE`` defaults to ``cpu``) moves the same encoder
outputs (``--rows`` x ``--width`` of ``--dtype``, default 2,000 and 16,384
rows of 3,584 bfloat16) from an encoder (``ec_producer``) instance to a
prefill (``ec_consumer``) instance through each connector:

* ``example``: vLLM's ``ECExampleConnector``, safetensors files in a fresh
  directory under ``/dev/shm`` (removed afterwards);
* ``mooncake``: vLLM's ``ECMooncakeConnector``, the Mooncake Transfer Engine
  over TCP (P2P handshake, host-memory buffers; needs
  ``mooncake-transfer-engine``: the row says so when it is missing);
* ``embedlink-shm``, ``embedlink-tcp``, ``embedlink-mooncake``:
  ``EmbedlinkECConnector`` with that one transport and a bootstrap server in
  this process.

What is real and what stands in:

* each instance is a real ``vllm.v1.core.sched.scheduler.Scheduler`` (built
  on a config-only Qwen2-Audio directory written here, hidden size
  ``--width``, dtype ``--dtype``), with the connector's real scheduler-role
  instance inside: vLLM itself calls ``ensure_cache_available``,
  ``has_cache_item``, ``update_state_after_alloc``, ``build_connector_meta``,
  ``take_unavailable_requests``, ``update_connector_output`` and
  ``request_finished``. One thread per instance runs its engine loop as
  ``EngineCore.step`` does (schedule, execute, ``update_from_output``);
* each instance has one worker process holding the worker-role connector
  made by vLLM's ``ensure_ec_transfer_initialized`` (and
  ``start_worker_services``, as the GPU worker calls it), driven through the
  real runner code: the V1 runner's ``ECConnectorModelRunnerMixin`` (the
  hooks run on a producer's every step and on a consumer's steps that
  schedule tokens, as V1 does; the producer's ``ECConnectorOutput`` is
  dropped, as V1's encoder-only path drops it), or Model Runner V2's
  ``ActiveECConnector`` (``no_forward`` on empty steps; every output reaches
  the scheduler). ``--runner auto`` (the default) uses V1's for every
  connector that works with them and V2's for ``ECMooncakeConnector``, which
  does not (:attr:`Peer.needs_v2` says why; the row says which ran);
  ``--runner v1`` or ``v2`` forces one for all;
* the stand-ins: the audio tower (the producer's worker writes each item's
  tensor into a preallocated slot, then puts it into its encoder cache and
  calls the save hook), the sampler (one token per scheduled request) and the
  proxy (this process: it sends each request to the encoder instance first
  and, when that finishes, to the prefill instance with the transfer params
  the encoder returned, converted as each connector's proxy would).

Per item the latency runs from the producer's save (the tensor entering the
producer's hook) to the tensor being in the consumer's encoder cache (after
``start_load_caches``, in the step that schedules the request): for the
connectors that defer a request until its items arrived, that includes the
scheduler admitting it. Both ends are read on the host's monotonic clock in
the two worker processes. Throughput is the items' bytes over the span from
the first save to the last load, with up to ``--in-flight`` items between
the proxy's first send and the prefill instance finishing them. The
consumer's worker reads every byte of every item in the step that loads it
(the gather's read of the cache): it compares it with what the producer
wrote, and any difference fails that row, naming the item.

Each row first moves ``--warmup`` items untimed (connections, handshakes,
first-touch faults: by default enough items to pass once through the
largest pool, ``2 * max(2, in_flight) + 2``, as a long-running server's pools
are), then its ``--items``. Both engine loops sleep
``--idle-sleep-ms`` after a step that scheduled nothing (``EngineCore``
spins; on a small host that spinning would take the CPUs the transfers
need); the same for every connector.

Sizing, the same rule for every connector: each scheduler's budget takes
``max(2, in_flight)`` whole prompts in one step (nothing is chunked) and its
encoder cache as many items; Mooncake's ``ec_buffer_size`` holds twice that
many plus two (its receive pool also keeps the items the encoder cache still
holds), at least vLLM's default 1e9 bytes; embedlink's pools (both sides) the
same number of items in 128-row blocks (the consumer lends at most half of
its pool to the encoder cache, without copying). The example connector's files
are removed after each row (as each item finishes in a row of more than
4 GB).

The summary compares, per item size, embedlink's best throughput with the
best of vLLM's connectors and embedlink's best p50 with vLLM's best p50 (ok
rows only), against the target of at least 2x and at most 0.5x, whatever
the numbers are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import pathlib
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .outputs import FreeBuffers

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

__all__ = [
    "PEERS",
    "Peer",
    "Ratio",
    "VllmBenchResult",
    "VllmBenchRow",
    "main",
    "run_vllm_bench",
]

ROWS = (2000, 16384)
WIDTH = 3584
DTYPE = "bfloat16"
ITEMS = 40
QUICK_ITEMS = 6
IN_FLIGHT = 4
#: untimed items first: once through the largest pool (see the module docstring)
WARMUP = 2 * max(2, IN_FLIGHT) + 2
EMBEDLINK_BLOCK = 128
#: where an item's placeholder starts in its prompt; the prompt is a few
#: words, the item's placeholder, a few more words
OFFSET = 4
TAIL = 4
#: the tiny model's vocabulary (as tests/vllm/model_dir.py's)
SPECIAL_TOKENS = (
    "<unk>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
)
VOCAB_SIZE = 256
AUDIO_TOKEN_ID = SPECIAL_TOKENS.index("<|AUDIO|>")
EOS_TOKEN_ID = SPECIAL_TOKENS.index("<|endoftext|>")
TEXT_TOKEN_ID = len(SPECIAL_TOKENS)
KV_BLOCK = 16
STEP_TIMEOUT = 120.0


@dataclass(frozen=True)
class Peer:
    """One connector configuration the bench moves items through."""

    name: str
    connector: str
    transport: str
    #: one of vLLM's own connectors (the baseline)
    vllm: bool
    #: why ``--runner auto`` runs it with Model Runner V2's hooks (empty:
    #: it works with V1's)
    needs_v2: str = ""


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("example", "ECExampleConnector", "files (/dev/shm)", True),
        Peer(
            "mooncake",
            "ECMooncakeConnector",
            "mooncake tcp",
            True,
            needs_v2="ECMooncakeConnector hands a deferred request's load to its worker in "
            "the metadata of a step that schedules nothing, which V1 never shows a worker "
            "(no hooks on empty steps): on an idle V1 engine the load stays LOADING until "
            "push_wait_timeout_s fails the request; V2's no_forward runs it",
        ),
        Peer("embedlink-shm", "EmbedlinkECConnector", "shm", False),
        Peer("embedlink-tcp", "EmbedlinkECConnector", "tcp", False),
        Peer("embedlink-mooncake", "EmbedlinkECConnector", "mooncake", False),
    )
}


@dataclass
class VllmBenchRow:
    peer: str
    connector: str
    transport: str
    rows: int
    width: int
    dtype: str
    items: int
    nbytes_per_item: int
    throughput_gbps: float
    items_per_s: float
    p50_ms: float
    p99_ms: float
    #: every item arrived, byte-identical, and its request finished
    ok: bool
    in_flight: int
    runner: str
    warmup: int
    #: the row did not run (its reason in ``error``)
    skipped: bool = False
    #: why the row is not ok (empty when it is)
    error: str = ""
    #: items that arrived byte-identical
    verified: int = 0
    #: mean per-item latency (ms) and the slowest item's
    mean_ms: float = float("nan")
    max_ms: float = float("nan")
    #: CPU time (user + system, all threads) per item: this process (both
    #: instances' schedulers and engine loops, the proxy, the bootstrap
    #: server), the encoder's worker process and the prefill's
    cpu_ms_per_item_driver: float = float("nan")
    cpu_ms_per_item_producer: float = float("nan")
    cpu_ms_per_item_consumer: float = float("nan")
    #: engine steps per item (the prefill instance's steps while it waits)
    producer_steps_per_item: float = float("nan")
    consumer_steps_per_item: float = float("nan")
    #: why this row ran on another runner than asked, and the like
    note: str = ""


@dataclass
class Ratio:
    """embedlink against vLLM's best for one item size (the issue's target:
    throughput at least 2x, p50 at most 0.5x)."""

    rows: int
    best_embedlink: str
    best_vllm: str
    embedlink_gbps: float
    vllm_gbps: float
    throughput_ratio: float
    embedlink_p50_ms: float
    vllm_p50_ms: float
    p50_ratio: float
    target_met: bool
    note: str = ""
    #: the rows whose p50s are compared (each side's lowest p50)
    best_embedlink_p50: str = ""
    best_vllm_p50: str = ""


@dataclass
class VllmBenchResult:
    rows: list[VllmBenchRow]
    ratios: list[Ratio]
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON data (a number that is not one: null)."""
        return {
            "bench": "vllm-ec-connectors",
            "config": self.config,
            "rows": [_finite(asdict(r)) for r in self.rows],
            "ratios": [_finite(asdict(r)) for r in self.ratios],
        }


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}


# --------------------------------------------------------------------------- items


def _ident(tag: str, k: int) -> str:
    return f"{tag}-{k}"


def _index(ident: str) -> int:
    return int(ident.rsplit("-", 1)[1])


def _shift(k: int, rows: int) -> int:
    """Item ``k`` is the base tensor rotated by this many rows: every row of
    every item is in a place of its own, so a stale or mixed-up item cannot
    pass for another, and both sides build and check it without a copy."""
    return (k * 7919 + 1) % rows if rows > 1 else 0


def _make_base(rows: int, width: int, dtype: str, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g, dtype=getattr(torch, dtype))


def _fill(slot: Any, base: Any, k: int) -> None:
    rows = base.shape[0]
    s = _shift(k, rows)
    slot[: rows - s].copy_(base[s:])
    slot[rows - s :].copy_(base[:s])


def _verify(t: Any, base: Any, k: int) -> str | None:
    """None when ``t`` is byte for byte item ``k``, else what differs."""
    import torch

    rows, width = base.shape
    if not isinstance(t, torch.Tensor):
        return f"not a tensor: {type(t).__name__}"
    if tuple(t.shape) != (rows, width):
        return f"shape {tuple(t.shape)}, sent ({rows}, {width})"
    if t.dtype != base.dtype:
        return f"dtype {t.dtype}, sent {base.dtype}"
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    bits, ref = t.view(torch.int16), base.view(torch.int16)
    s = _shift(k, rows)
    if torch.equal(bits[: rows - s], ref[s:]) and torch.equal(bits[rows - s :], ref[:s]):
        return None
    want = torch.cat([ref[s:], ref[:s]])
    bad = (bits != want).any(dim=1).nonzero().flatten()
    return f"{bad.numel()} of {rows} rows differ (first: row {int(bad[0])})"


# --------------------------------------------------------------------------- worker process


def _worker_main(conn: Any, vllm_config: Any, runner: str) -> None:
    """A vLLM worker process: the process-wide worker-role connector, driven
    through the real V1 mixin or V2 ``ActiveECConnector`` (module docstring)."""
    try:
        _serve(conn, vllm_config, runner)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("crash", traceback.format_exc()))
        raise


def _serve(conn: Any, vllm_config: Any, runner: str) -> None:
    import torch
    from vllm.distributed.ec_transfer.ec_transfer_state import (
        ensure_ec_transfer_initialized,
        ensure_ec_transfer_shutdown,
        get_ec_transfer,
    )

    # One intra-op thread: this runner only copies and compares tensors (the
    # stand-in for the encoder, the check of what arrived), and torch's
    # OpenMP workers spin-wait after every parallel copy; on a small machine
    # those spins took about 40% of a worker's CPU from the connector being
    # measured, the same for every connector. (A real vLLM CPU worker sizes
    # its threads for its model; this one has none.)
    torch.set_num_threads(1)
    ensure_ec_transfer_initialized(vllm_config)
    connector = get_ec_transfer()
    connector.start_worker_services()  # the GPU worker's call after load_model
    runner_state = _Runner(vllm_config, runner)
    conn.send(("ready", type(connector).__name__))
    while True:
        op, *args = conn.recv()
        if op == "stop":
            runner_state.cache.clear()
            ensure_ec_transfer_shutdown()
            conn.send(("stopped",))
            return
        if op == "prepare":
            runner_state.prepare(*args)
            conn.send(("prepared",))
            continue
        if op == "cpu":
            conn.send(("cpu", _cpu_s()))
            continue
        conn.send(("step", *runner_state.step(*args)))


class _Runner:
    """What a model runner does with the connector, minus the model: the
    encoder cache, the EC hooks around the encoder and the gather, through
    vLLM's V1 mixin or V2 ``ActiveECConnector``."""

    def __init__(self, vllm_config: Any, runner: str) -> None:
        from vllm.v1.worker.gpu.ec_connector import ActiveECConnector

        self.cache: dict[str, Any] = {}
        self.v2 = ActiveECConnector(vllm_config, self.cache) if runner == "v2" else None
        self.base: Any = None
        self.outputs: FreeBuffers | None = None
        self.seen: set[str] = set()

    def prepare(self, rows: int, width: int, dtype: str, seed: int, n_slots: int) -> None:
        self.cache.clear()
        self.base = _make_base(rows, width, dtype, seed)
        # the encoder's output buffers, faulted in before the timed part
        self.outputs = FreeBuffers(self.base, ready=n_slots)

    @property
    def grown(self) -> int:
        """Output buffers made in the timed part because every one was held."""
        return 0 if self.outputs is None else self.outputs.grown

    def step(
        self, so: Any, encode: Sequence[str], expect: Sequence[str]
    ) -> tuple[Any, dict[str, int], dict[str, int], dict[str, str]]:
        """One ``execute_model``: ``encode`` the items the scheduler asks the
        encoder for, read the ``expect`` items from the cache (a consumer's
        gather). Returns the ECConnectorOutput, when each item was saved and
        loaded (monotonic ns), and what was wrong with any."""
        from vllm.v1.worker.ec_connector_model_runner_mixin import (
            ECConnectorModelRunnerMixin as Mixin,
        )

        # _process_encoder_cache_scheduler_output: evictions before the hooks
        for h in so.free_encoder_mm_hashes or ():
            self.cache.pop(h, None)
        saved: dict[str, int] = {}
        loaded: dict[str, int] = {}
        bad: dict[str, str] = {}
        out = None
        if self.v2 is not None:
            if so.total_num_scheduled_tokens == 0 and not encode:
                out = self.v2.no_forward(so).ec_connector_output
            else:
                with self.v2.maybe_get_output(so) as out:
                    self._gather(expect, loaded, bad)
                    # V2 saves the new keys when the body ends
                    self._encode(encode, saved, None)
        else:
            with Mixin.maybe_get_ec_connector_output(so, encoder_cache=self.cache) as out:
                self._gather(expect, loaded, bad)
                self._encode(
                    encode,
                    saved,
                    lambda ident: Mixin.maybe_save_ec_to_connector(self.cache, ident),
                )
        return out, saved, loaded, bad

    def _gather(self, expect: Sequence[str], loaded: dict[str, int], bad: dict[str, str]) -> None:
        # what the runner's gather reads this step: every item of the
        # requests it schedules must be in the cache (vLLM raises "Encoder
        # cache miss" otherwise); start_load_caches ran on entering the hooks
        t_load = time.monotonic_ns()
        for ident in expect:
            if ident in self.seen:
                continue
            self.seen.add(ident)
            t = self.cache.get(ident)
            if t is None:
                bad[ident] = "encoder cache miss: not in the cache when its request ran"
                continue
            loaded[ident] = t_load
            why = _verify(t, self.base, _index(ident))
            if why is not None:
                bad[ident] = f"received tensor differs from the one sent: {why}"

    def _encode(
        self, encode: Sequence[str], saved: dict[str, int], save: Callable[[str], None] | None
    ) -> None:
        for ident in encode:
            k = _index(ident)
            # a buffer nothing holds: writing into one a connector is still
            # sending from would change a tensor it is reading (vLLM never
            # rewrites a cached encoder output)
            assert self.outputs is not None
            slot = self.outputs.take()
            _fill(slot, self.base, k)  # the audio tower computing the output
            saved[ident] = time.monotonic_ns()
            self.cache[ident] = slot  # _cache_encoder_output, then the save hook
            if save is not None:
                save(ident)


class _Worker:
    """The driver's end of one worker process."""

    def __init__(self, ctx: Any, vllm_config: Any, runner: str, name: str) -> None:
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main, args=(child, vllm_config, runner), name=name, daemon=True
        )
        self.proc.start()
        child.close()
        self.connector = ""
        self._lock = threading.Lock()

    def wait_ready(self, timeout: float = 300.0) -> None:
        msg = self.recv(timeout)
        if msg[0] != "ready":
            raise RuntimeError(f"{self.name}: unexpected first message {msg[0]!r}")
        self.connector = msg[1]

    def recv(self, timeout: float = STEP_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.5):
            if not self.proc.is_alive():
                raise RuntimeError(f"{self.name} exited with code {self.proc.exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer in {timeout:g} s")
        try:
            msg = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name} closed its pipe") from None
        if msg[0] == "crash":
            raise RuntimeError(f"{self.name} crashed:\n{msg[1]}")
        return msg

    def call(self, *msg: Any, timeout: float = STEP_TIMEOUT) -> Any:
        with self._lock:  # the engine's thread and the driver's share the pipe
            self.conn.send(msg)
            return self.recv(timeout)

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.call("stop", timeout=30)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


# --------------------------------------------------------------------------- model, scheduler, requests


def make_model_dir(path: pathlib.Path, *, width: int, dtype: str, max_len: int) -> pathlib.Path:
    """A weightless Qwen2-Audio directory of hidden size ``width`` and dtype
    ``dtype`` (tests/vllm/model_dir.py's, sized for the bench)."""
    import importlib

    # (vLLM's dependencies: imported by name, so that type checks run without them)
    tk = importlib.import_module("tokenizers")
    tf = importlib.import_module("transformers")
    models = importlib.import_module("tokenizers.models")
    pre_tokenizers = importlib.import_module("tokenizers.pre_tokenizers")

    path.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), VOCAB_SIZE)})
    backend = tk.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[2:]),
        model_max_length=max_len,
    )
    processor = tf.Qwen2AudioProcessor(
        feature_extractor=tf.WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer
    )
    processor.save_pretrained(str(path))
    config = tf.Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": 128,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 128,
            "d_model": 64,
            "max_source_positions": 1500,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": VOCAB_SIZE,
            "hidden_size": width,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": max_len,
            "eos_token_id": EOS_TOKEN_ID,
            "bos_token_id": EOS_TOKEN_ID,
            "torch_dtype": dtype,
        },
        audio_token_index=AUDIO_TOKEN_ID,
    )
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    config.save_pretrained(str(path))
    return path


@dataclass(frozen=True)
class _Budget:
    max_len: int
    batched_tokens: int
    kv_blocks: int
    max_seqs: int


def _budget(max_rows: int, in_flight: int) -> _Budget:
    """Room for ``in_flight`` whole prompts in one step: no prompt is ever
    chunked, and the encoder cache holds every item in flight."""
    max_len = -(-(max_rows + OFFSET + TAIL + 16) // KV_BLOCK) * KV_BLOCK
    n = max(2, in_flight)
    return _Budget(
        max_len=max_len,
        batched_tokens=n * max_len,
        kv_blocks=(n + 2) * (max_len // KV_BLOCK),
        max_seqs=max(16, 2 * n),
    )


def make_scheduler(
    model_dir: pathlib.Path,
    ec_transfer_config: Any,
    *,
    dtype: str,
    budget: _Budget,
    encoder_widths: Mapping[str, int] | None = None,
) -> Any:
    """A real vLLM ``Scheduler`` (tests/vllm/model_dir.py's recipe, sized by
    ``budget``). ``encoder_widths``: what an EC producer's EngineCore measures
    at start-up (``mm_encoder_output_widths``; Mooncake sizes its pushes by it)."""
    import torch
    from vllm.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=dtype,
        seed=42,
        max_model_len=budget.max_len,
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=budget.max_seqs,
        max_num_batched_tokens=budget.batched_tokens,
        max_model_len=budget.max_len,
        enable_chunked_prefill=True,
        is_encoder_decoder=model_config.is_encoder_decoder,
    )
    cache_config = CacheConfig(block_size=KV_BLOCK)
    cache_config.num_gpu_blocks = budget.kv_blocks
    vllm_config = VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        parallel_config=ParallelConfig(tensor_parallel_size=1),
        ec_transfer_config=ec_transfer_config,
    )
    if encoder_widths:
        vllm_config.ec_transfer_config.mm_encoder_output_widths = dict(encoder_widths)
    kv_cache_config = KVCacheConfig(
        num_blocks=budget.kv_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"],
                FullAttentionSpec(
                    block_size=KV_BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32
                ),
            )
        ],
    )
    return Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=KV_BLOCK,
        log_stats=False,
    )


def make_request(request_id: str, ident: str, rows: int, params: Mapping[str, Any] | None) -> Any:
    """A real vLLM ``Request``: a few words, one audio item of ``rows``
    embeddings (cache key ``ident``), a few more words; one output token."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    n = OFFSET + rows + TAIL
    prompt = [TEXT_TOKEN_ID + (i % (VOCAB_SIZE - TEXT_TOKEN_ID)) for i in range(n)]
    prompt[OFFSET : OFFSET + rows] = [AUDIO_TOKEN_ID] * rows
    feature = MultiModalFeatureSpec(
        data=None,
        modality="audio",
        identifier=ident,
        mm_position=PlaceholderRange(offset=OFFSET, length=rows),
        mm_hash=ident,
    )
    extra = {"ec_transfer_params": dict(params)} if params else None
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=1, extra_args=extra),
        pooling_params=None,
        mm_features=[feature],
    )


# --------------------------------------------------------------------------- engines


class _Recorder:
    """What the two engines report about the items, for the driver thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.saved: dict[str, int] = {}
        self.loaded: dict[str, int] = {}
        self.bad: dict[str, str] = {}
        self.done: dict[str, str | None] = {}  # ident -> None (fine) or why it failed
        self.error: str | None = None

    def note(
        self, saved: Mapping[str, int], loaded: Mapping[str, int], bad: Mapping[str, str]
    ) -> None:
        if saved or loaded or bad:
            with self.cond:
                self.saved.update(saved)
                self.loaded.update(loaded)
                self.bad.update(bad)
                self.cond.notify_all()

    def finish(self, ident: str, why: str | None) -> None:
        with self.cond:
            self.done.setdefault(ident, why)
            self.cond.notify_all()

    def fail(self, why: str) -> None:
        with self.cond:
            if self.error is None:
                self.error = why
            self.cond.notify_all()


class _Engine:
    """One vLLM instance: its real Scheduler, stepped on a thread of this
    process as ``EngineCore.step`` does, and its worker process."""

    def __init__(
        self,
        name: str,
        sched: Any,
        worker: _Worker,
        *,
        producer: bool,
        runner: str,
        idle_sleep: float,
        recorder: _Recorder,
        on_finished: Callable[[Any], None],
    ) -> None:
        self.name = name
        self.sched = sched
        self.worker = worker
        self.producer = producer
        self.runner = runner
        self.idle_sleep = idle_sleep
        self.recorder = recorder
        self.on_finished = on_finished
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"bench-{name}", daemon=True)
        self.steps = 0

    def start(self) -> _Engine:
        self._thread.start()
        return self

    def submit(self, request: Any) -> None:
        self._inbox.put(("add", request))
        self._wake.set()

    def abort(self, request_ids: Sequence[str]) -> None:
        """End these requests (on the engine's thread), as a client abort does."""
        self._inbox.put(("abort", list(request_ids)))
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(30)

    @property
    def idle(self) -> bool:
        return self._inbox.empty() and not self.sched.has_requests()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                while True:
                    try:
                        op, arg = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if op == "add":
                        self.sched.add_request(arg)
                    else:
                        from vllm.v1.request import RequestStatus

                        live = [r for r in arg if r in self.sched.requests]
                        if live:
                            self.sched.finish_requests(live, RequestStatus.FINISHED_ABORTED)
                if not self.sched.has_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                if not self._step() and self.idle_sleep > 0:
                    time.sleep(self.idle_sleep)
        except Exception:
            self.recorder.fail(f"{self.name} engine:\n{traceback.format_exc()}")

    def _step(self) -> bool:
        from vllm.v1.outputs import (
            EMPTY_MODEL_RUNNER_OUTPUT,
            ModelRunnerOutput,
            make_empty_encoder_model_runner_output,
        )

        sched = self.sched
        so = sched.schedule()
        self.steps += 1
        tokens = bool(so.total_num_scheduled_tokens > 0)
        encode: list[str] = []
        expect: list[str] = []
        if self.producer:
            for req_id, inputs in so.scheduled_encoder_inputs.items():
                req = sched.requests[req_id]
                encode += [req.mm_features[i].identifier for i in inputs]
        else:
            expect = [f.identifier for r in so.scheduled_new_reqs for f in (r.mm_features or ())]
        out = None
        # V1 runs a producer's hooks every step and a consumer's only on steps
        # that schedule tokens (an empty step returns before them); V2 always
        if self.runner == "v2" or self.producer or tokens:
            _, out, saved, loaded, bad = self.worker.call("step", so, encode, expect)
            self.recorder.note(saved, loaded, bad)
        if self.producer:
            mro = make_empty_encoder_model_runner_output(so)
            if self.runner == "v1":
                out = None  # V1's encoder-only path returns without it
        elif tokens:
            ids = list(so.num_scheduled_tokens)
            mro = ModelRunnerOutput(
                req_ids=ids,
                req_id_to_index={r: i for i, r in enumerate(ids)},
                sampled_token_ids=[[TEXT_TOKEN_ID] for _ in ids],
            )
        else:
            mro = EMPTY_MODEL_RUNNER_OUTPUT
        mro = ModelRunnerOutput.with_ec_conn_output(mro, out)
        for outs in sched.update_from_output(so, mro).values():
            for o in outs.outputs:
                if o.finish_reason is not None:
                    self.on_finished(o)
        return tokens


# --------------------------------------------------------------------------- per connector


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mooncake_missing() -> str | None:
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as exc:
        return (
            f"the Mooncake Transfer Engine is not installed ({exc}): "
            "pip install mooncake-transfer-engine (or -non-cuda)"
        )
    return None


class _Pair:
    """A producer instance and a consumer instance for one peer: their
    transfer configs, their schedulers here and their worker processes, and
    what the proxy puts into each request's transfer params."""

    def __init__(
        self,
        peer: Peer,
        *,
        model_dir: pathlib.Path,
        dtype: str,
        width: int,
        budget: _Budget,
        max_rows: int,
        in_flight: int,
        runner: str,
        bootstrap: str | None,
        ctx: Any,
    ) -> None:
        from vllm.config import ECTransferConfig

        self.peer = peer
        self.tmpdir: str | None = None
        self.consumer_zmq = ""
        item_bytes = max_rows * width * _itemsize(dtype)
        common: dict[str, Any] = {}
        extra_p: dict[str, Any] = {}
        extra_c: dict[str, Any] = {}
        if peer.name == "example":
            root = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.tmpdir = tempfile.mkdtemp(prefix="embedlink-vllm-bench-", dir=root)
            extra_p = extra_c = {"shared_storage_path": self.tmpdir}
            name, module = "ECExampleConnector", None
        elif peer.name == "mooncake":
            port = _free_port()
            self.consumer_zmq = f"tcp://127.0.0.1:{port}"
            # the receive pool holds the items in flight and those still in the
            # encoder cache (pinned there until the scheduler evicts them; the
            # cache holds max(2, in_flight) items); the producer stages into a
            # pool of the same size. vLLM's default is 1e9.
            n = max(2, in_flight)
            pool = max(1e9, float((2 * n + 2) * item_bytes))
            common = {
                "ec_ip": "127.0.0.1",
                "ec_port": port,
                "ec_buffer_device": "cpu",
                "ec_buffer_size": pool,
            }
            extra_p = extra_c = {"mooncake_protocol": "tcp"}
            name, module = "ECMooncakeConnector", None
        else:
            assert bootstrap is not None
            # the memory ECMooncakeConnector's receive pool gets: the consumer
            # lends at most half of its pool to the encoder cache (n items
            # there, n + 1 lendable), the rest takes the items in flight
            n = max(2, in_flight)
            blocks = -(-(2 * n + 2) * max_rows // EMBEDLINK_BLOCK) + 16
            extra_p = extra_c = {
                "bootstrap": bootstrap,
                "transports": [peer.transport],
                "num_blocks": blocks,
                "block_size": EMBEDLINK_BLOCK,
            }
            name, module = "EmbedlinkECConnector", "embedlink.integrations.vllm"
        self.scheds: list[Any] = []
        self.workers: list[_Worker] = []
        try:
            for role, extra in (("ec_producer", extra_p), ("ec_consumer", extra_c)):
                ec = ECTransferConfig(
                    ec_connector=name,
                    ec_connector_module_path=module,
                    ec_role=role,
                    engine_id=uuid.uuid4().hex,
                    ec_connector_extra_config=dict(extra),
                    **common,
                )
                sched = make_scheduler(
                    model_dir,
                    ec,
                    dtype=dtype,
                    budget=budget,
                    encoder_widths={"audio": width} if role == "ec_producer" else None,
                )
                self.scheds.append(sched)
                cfg = sched.vllm_config
                cfg.parallel_config.rank = 0
                self.workers.append(_Worker(ctx, cfg, runner, f"{peer.name}-{role}"))
        except BaseException:
            self.close()  # what was made so far, and the example's directory
            raise

    def wait_ready(self) -> None:
        for w in self.workers:
            w.wait_ready()
            if w.connector != self.peer.connector:
                raise RuntimeError(f"{w.name} built {w.connector}, not {self.peer.connector}")

    def producer_params(self, ident: str) -> dict[str, Any] | None:
        if self.peer.name == "mooncake":
            # the proxy tells the encoder where the prefill instance listens
            return {
                "consumer_zmq": self.consumer_zmq,
                "ec_items": [{"mm_hash": ident, "transfer_id": f"{ident}:xfer"}],
            }
        if self.peer.connector == "EmbedlinkECConnector":
            return {"embedlink": {}}  # the encoder assigns the rooms
        return None

    def consumer_params(self, ident: str, returned: Mapping[str, Any] | None) -> Any:
        """The prefill request's params from what the encoder returned."""
        if self.peer.name == "mooncake":
            item = (returned or {}).get(ident)
            if not item or "transfer_id" not in item:
                raise ValueError(f"the encoder returned no transfer_id for {ident}: {returned}")
            return {"ec_items": [{"mm_hash": ident, "transfer_id": item["transfer_id"]}]}
        return returned

    def clean_item(self, ident: str) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(os.path.join(self.tmpdir, ident), ignore_errors=True)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        for s in self.scheds:
            with contextlib.suppress(Exception):
                s.shutdown()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _itemsize(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _run_items(
    pair: _Pair,
    engines: tuple[_Engine, _Engine],
    recorder: _Recorder,
    idents: list[str],
    rows: int,
    in_flight: int,
    timeout: float,
) -> None:
    """Push ``idents`` through the pair, ``in_flight`` at a time; return when
    each one's prefill request finished (or failed), raise on a stall."""
    prod, _ = engines
    deadline = time.monotonic() + timeout
    pending = list(idents)
    sent = 0
    with recorder.cond:
        while True:
            if recorder.error is not None:
                raise RuntimeError(recorder.error)
            finished = sum(1 for i in idents[:sent] if i in recorder.done)
            if finished == len(idents):
                return
            while pending and sent - finished < in_flight:
                ident = pending.pop(0)
                sent += 1
                prod.submit(make_request(f"p-{ident}", ident, rows, pair.producer_params(ident)))
            if time.monotonic() > deadline:
                missing = [i for i in idents if i not in recorder.done]
                arrived = sum(1 for i in idents if i in recorder.loaded)
                raise TimeoutError(
                    f"{len(missing)} of {len(idents)} items not through after {timeout:g} s "
                    f"({arrived} arrived; first missing {missing[0]}, saved: "
                    f"{missing[0] in recorder.saved})"
                )
            recorder.cond.wait(0.1)


def _bench_peer(
    peer: Peer,
    *,
    sizes: Sequence[int],
    width: int,
    dtype: str,
    items: int,
    warmup: int,
    in_flight: int,
    runner: str,
    idle_sleep: float,
    timeout: float,
    model_dir: pathlib.Path,
    budget: _Budget,
    bootstrap: str | None,
    ctx: Any,
    progress: Callable[[str], None],
) -> list[VllmBenchRow]:
    note = ""
    if runner == "auto":
        runner = "v2" if peer.needs_v2 else "v1"
        note = f"on V2's hooks: {peer.needs_v2}" if peer.needs_v2 else ""
    elif runner == "v1" and peer.needs_v2:
        note = f"expected to fail on V1: {peer.needs_v2}"

    def row(n: int, **kw: Any) -> VllmBenchRow:
        base = VllmBenchRow(
            peer=peer.name,
            connector=peer.connector,
            transport=peer.transport,
            rows=n,
            width=width,
            dtype=dtype,
            items=items,
            nbytes_per_item=n * width * _itemsize(dtype),
            throughput_gbps=float("nan"),
            items_per_s=float("nan"),
            p50_ms=float("nan"),
            p99_ms=float("nan"),
            ok=False,
            in_flight=in_flight,
            runner=runner,
            warmup=warmup,
            note=note,
        )
        return replace(base, **kw)

    if peer.name == "mooncake" or peer.transport == "mooncake":
        why = _mooncake_missing()
        if why is not None:
            return [row(n, skipped=True, error=why) for n in sizes]
    progress(f"{peer.name}: starting the encoder and prefill instances")
    try:
        pair = _Pair(
            peer,
            model_dir=model_dir,
            dtype=dtype,
            width=width,
            budget=budget,
            max_rows=max(sizes),
            in_flight=in_flight,
            runner=runner,
            bootstrap=bootstrap,
            ctx=ctx,
        )
    except Exception as exc:
        return [row(n, error=f"could not build the instances: {exc}") for n in sizes]
    out: list[VllmBenchRow] = []
    try:
        pair.wait_ready()
        recorder = _Recorder()
        engines: list[_Engine] = []

        def producer_finished(o: Any) -> None:
            ident = o.request_id[2:]
            if _is_error(o.finish_reason):
                recorder.finish(ident, f"the encoder failed the request ({o.finish_reason})")
                return
            try:
                params = pair.consumer_params(ident, o.ec_transfer_params)
            except Exception as exc:
                recorder.finish(ident, str(exc))
                return
            # the proxy: the same request, to the prefill instance
            engines[1].submit(make_request(f"c-{ident}", ident, rows_of[ident], params))

        def consumer_finished(o: Any) -> None:
            ident = o.request_id[2:]
            if eager_clean:
                pair.clean_item(ident)  # a long row's files would fill /dev/shm
            bad = _is_error(o.finish_reason)
            recorder.finish(
                ident, f"the prefill request failed ({o.finish_reason})" if bad else None
            )

        rows_of: dict[str, int] = {}
        eager_clean = (warmup + items) * max(sizes) * width * _itemsize(dtype) > 4e9
        for sched, w, producer, cb in (
            (pair.scheds[0], pair.workers[0], True, producer_finished),
            (pair.scheds[1], pair.workers[1], False, consumer_finished),
        ):
            engines.append(
                _Engine(
                    w.name,
                    sched,
                    w,
                    producer=producer,
                    runner=runner,
                    idle_sleep=idle_sleep,
                    recorder=recorder,
                    on_finished=cb,
                ).start()
            )
        try:
            for n in sizes:
                tag = uuid.uuid4().hex[:8]
                seed = int(tag, 16) % (1 << 31)
                for w in pair.workers:
                    w.call("prepare", n, width, dtype, seed, in_flight + 1, timeout=300)
                progress(f"{peer.name}: {n} x {width} {dtype}, {warmup} warm-up + {items} items")
                warm = [_ident(f"{peer.name}-{n}-{tag}w", k) for k in range(warmup)]
                timed = [_ident(f"{peer.name}-{n}-{tag}", k) for k in range(warmup, warmup + items)]
                for ident in warm + timed:
                    rows_of[ident] = n
                try:
                    if warm:
                        _run_items(
                            pair, (engines[0], engines[1]), recorder, warm, n, in_flight, timeout
                        )
                    cpu0 = [_cpu_s()] + [w.call("cpu")[1] for w in pair.workers]
                    steps0 = [e.steps for e in engines]
                    _run_items(
                        pair, (engines[0], engines[1]), recorder, timed, n, in_flight, timeout
                    )
                    cpu = [_cpu_s()] + [w.call("cpu")[1] for w in pair.workers]
                    per = [(b - a) * 1e3 / items for a, b in zip(cpu0, cpu, strict=True)]
                    steps = [(e.steps - s0) / items for e, s0 in zip(engines, steps0, strict=True)]
                    usage = dict(
                        cpu_ms_per_item_driver=round(per[0], 2),
                        cpu_ms_per_item_producer=round(per[1], 2),
                        cpu_ms_per_item_consumer=round(per[2], 2),
                        producer_steps_per_item=round(steps[0], 1),
                        consumer_steps_per_item=round(steps[1], 1),
                    )
                except Exception as exc:
                    out.append(_summarise(row(n), recorder, timed, f"{exc}", warm))
                    if recorder.error is not None:
                        break
                    # what is left of the row must not run into the next one
                    engines[0].abort([f"p-{i}" for i in warm + timed])
                    engines[1].abort([f"c-{i}" for i in warm + timed])
                    continue
                finally:
                    _wait_idle(engines, 30)
                    for ident in warm + timed:
                        pair.clean_item(ident)
                out.append(_summarise(row(n, **usage), recorder, timed, "", warm))
        finally:
            for e in engines:
                e.stop()
    except Exception as exc:
        done = {r.rows for r in out}
        out += [row(n, error=f"{exc}") for n in sizes if n not in done]
    finally:
        pair.close()
    return out


def _is_error(reason: Any) -> bool:
    return str(reason).lower().endswith("error")


def _wait_idle(engines: Sequence[_Engine], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(e.idle for e in engines) and time.monotonic() < deadline:
        time.sleep(0.01)


def _summarise(
    r: VllmBenchRow,
    rec: _Recorder,
    idents: Sequence[str],
    error: str = "",
    warm: Sequence[str] = (),
) -> VllmBenchRow:
    """The row's figures from the timed ``idents``; a warm-up item that did
    not arrive byte-identical fails the row as well."""
    with rec.cond:
        lat = [
            (rec.loaded[i] - rec.saved[i]) / 1e6
            for i in idents
            if i in rec.loaded and i in rec.saved
        ]
        bad = {i: rec.bad[i] for i in (*warm, *idents) if i in rec.bad}
        failed = {i: rec.done[i] for i in (*warm, *idents) if rec.done.get(i)}
        t0 = [rec.saved[i] for i in idents if i in rec.saved]
        t1 = [rec.loaded[i] for i in idents if i in rec.loaded]
    verified = sum(1 for i in idents if i in rec.loaded and i not in bad)
    problems = [error] if error else []
    problems += [f"{i}: {why}" for i, why in list(bad.items())[:3]]
    problems += [f"{i}: {why}" for i, why in list(failed.items())[:3] if i not in bad]
    if bad:
        print(
            f"vllm_bench: {r.peer} {r.rows} rows: {len(bad)} item(s) not byte-identical or "
            f"missing: {problems}",
            file=sys.stderr,
        )
    r.verified = verified
    r.ok = not problems and verified == len(idents)
    if not r.ok and not problems:
        problems.append(f"only {verified} of {len(idents)} items arrived byte-identical")
    r.error = "; ".join(problems)
    if t0 and t1 and len(t1) == len(idents):
        span = (max(t1) - min(t0)) / 1e9
        r.throughput_gbps = float(f"{r.nbytes_per_item * len(idents) / span / 1e9:.4g}")
        r.items_per_s = round(len(idents) / span, 2)
    if lat:
        r.p50_ms = round(_pct(lat, 50), 3)
        r.p99_ms = round(_pct(lat, 99), 3)
        r.mean_ms = round(sum(lat) / len(lat), 3)
        r.max_ms = round(max(lat), 3)
    return r


# --------------------------------------------------------------------------- driver


def ratios(rows: Sequence[VllmBenchRow]) -> list[Ratio]:
    """Per item size: embedlink's best throughput over the best vLLM
    connector's, and embedlink's best p50 over vLLM's best p50 (ok rows only)."""
    out = []
    for n in dict.fromkeys(r.rows for r in rows):
        ours = [r for r in rows if r.rows == n and r.ok and not PEERS[r.peer].vllm]
        theirs = [r for r in rows if r.rows == n and r.ok and PEERS[r.peer].vllm]
        if not ours or not theirs:
            missing = "embedlink" if not ours else "vLLM"
            nan = float("nan")
            out.append(
                Ratio(n, "", "", nan, nan, nan, nan, nan, nan, False, f"no ok {missing} row")
            )
            continue
        a = max(ours, key=lambda r: r.throughput_gbps)
        b = max(theirs, key=lambda r: r.throughput_gbps)
        a50 = min(ours, key=lambda r: r.p50_ms)
        b50 = min(theirs, key=lambda r: r.p50_ms)
        tr = a.throughput_gbps / b.throughput_gbps if b.throughput_gbps else float("inf")
        pr = a50.p50_ms / b50.p50_ms if b50.p50_ms else float("inf")
        note = (
            ""
            if a50.peer == a.peer and b50.peer == b.peer
            else (f"best p50: {a50.peer} against {b50.peer}")
        )
        out.append(
            Ratio(
                rows=n,
                best_embedlink=a.peer,
                best_vllm=b.peer,
                embedlink_gbps=a.throughput_gbps,
                vllm_gbps=b.throughput_gbps,
                throughput_ratio=round(tr, 3),
                embedlink_p50_ms=a50.p50_ms,
                vllm_p50_ms=b50.p50_ms,
                p50_ratio=round(pr, 3),
                target_met=tr >= 2.0 and pr <= 0.5,
                note=note,
                best_embedlink_p50=a50.peer,
                best_vllm_p50=b50.peer,
            )
        )
    return out


def run_vllm_bench(
    *,
    peers: Sequence[str] = tuple(PEERS),
    sizes: Sequence[int] = ROWS,
    width: int = WIDTH,
    dtype: str = DTYPE,
    items: int = ITEMS,
    warmup: int = WARMUP,
    in_flight: int = IN_FLIGHT,
    runner: str = "auto",
    idle_sleep_ms: float = 0.5,
    timeout: float = 300.0,
    progress: Callable[[str], None] | None = None,
) -> VllmBenchResult:
    """Run every (peer, size) row (module docstring); rows that cannot run
    say why. Each peer's two instances are started once for all its sizes."""
    from vllm import __version__ as vllm_version

    from ..bootstrap import BootstrapServer

    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    if runner not in ("auto", "v1", "v2"):
        raise ValueError(f"runner must be auto, v1 or v2, not {runner!r}")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"unsupported dtype {dtype!r}")
    say = progress or (lambda _msg: None)
    budget = _budget(max(sizes), in_flight)
    ctx = mp.get_context("spawn")
    rows: list[VllmBenchRow] = []
    config = {
        "vllm": vllm_version,
        "platform": os.environ.get("VLLM_TARGET_DEVICE", ""),
        "peers": list(peers),
        "rows": list(sizes),
        "width": width,
        "dtype": dtype,
        "items": items,
        "warmup": warmup,
        "in_flight": in_flight,
        "runner": runner,
        "idle_sleep_ms": idle_sleep_ms,
        "scheduler": "vllm.v1.core.sched.scheduler.Scheduler per instance",
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    with tempfile.TemporaryDirectory(prefix="embedlink-vllm-bench-model-") as tmp:
        model_dir = make_model_dir(
            pathlib.Path(tmp) / "qwen2-audio", width=width, dtype=dtype, max_len=budget.max_len
        )
        boot_cm: Any = (
            BootstrapServer(host="127.0.0.1", port=0)
            if any(not PEERS[p].vllm for p in peers)
            else contextlib.nullcontext()
        )
        with boot_cm as boot:
            for name in peers:
                rows += _bench_peer(
                    PEERS[name],
                    sizes=sizes,
                    width=width,
                    dtype=dtype,
                    items=items,
                    warmup=warmup,
                    in_flight=in_flight,
                    runner=runner,
                    idle_sleep=idle_sleep_ms / 1e3,
                    timeout=timeout,
                    model_dir=model_dir,
                    budget=budget,
                    bootstrap=None if boot is None else boot.address,
                    ctx=ctx,
                    progress=say,
                )
    order = {n: i for i, n in enumerate(sizes)}
    rows.sort(key=lambda r: (order[r.rows], list(peers).index(r.peer)))
    return VllmBenchResult(rows=rows, ratios=ratios(rows), config=config)


def table(result: VllmBenchResult) -> Any:
    """The rows as a rich table (the style of ``embedlink bench``)."""
    from rich import box
    from rich.table import Table

    c = result.config
    t = Table(
        title=f"vLLM {c.get('vllm', '')} EC connectors: {c.get('width')}-wide {c.get('dtype')} "
        f"items, {c.get('in_flight')} in flight",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    left = ("connector", "transport")
    cols = ("rows", "items", "runner", "GB/s", "p50 ms", "p99 ms", "CPU ms/item d/e/p", "ok")
    for name in (*left, *cols):
        t.add_column(name, justify="left" if name in left else "right", no_wrap=True)
    for r in result.rows:
        t.add_row(
            r.connector,
            r.transport,
            f"{r.rows:,}",
            str(r.items),
            r.runner,
            f"{r.throughput_gbps:.3f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.cpu_ms_per_item_driver:.0f}/{r.cpu_ms_per_item_producer:.0f}/"
            f"{r.cpu_ms_per_item_consumer:.0f}",
            "skipped" if r.skipped else ("yes" if r.ok else "NO"),
        )
    return t


def summary(result: VllmBenchResult) -> list[str]:
    """One line per item size: the target's two ratios, whatever they are;
    then why each row that is not ok is not."""
    lines = []
    for q in result.ratios:
        if q.note and not q.best_embedlink:
            lines.append(f"{q.rows:,} rows: no ratio ({q.note})")
            continue
        lines.append(
            f"{q.rows:,} rows: throughput {q.best_embedlink} {q.embedlink_gbps:.3f} / "
            f"{q.best_vllm} {q.vllm_gbps:.3f} GB/s = {q.throughput_ratio:.2f}x (target >= 2x); "
            f"p50 {q.best_embedlink_p50} {q.embedlink_p50_ms:.1f} / {q.best_vllm_p50} "
            f"{q.vllm_p50_ms:.1f} ms = {q.p50_ratio:.2f}x "
            f"(target <= 0.5x): {'met' if q.target_met else 'NOT met'}"
        )
    for r in result.rows:
        if not r.ok:
            lines.append(
                f"{r.peer} {r.rows:,} rows {'skipped' if r.skipped else 'FAILED'}: {r.error}"
            )
    for note in dict.fromkeys(f"{r.peer}: {r.note}" for r in result.rows if r.note):
        lines.append(f"note: {note}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m embedlink.tools.vllm_bench",
        description="Move the same encoder outputs through vLLM's ECExampleConnector, "
        "ECMooncakeConnector and EmbedlinkECConnector (real Schedulers, real worker hooks); "
        "report throughput and p50/p99 per row.",
    )
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_ITEMS} items, 1 warm-up")
    ap.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    ap.add_argument("--items", type=int, default=None, help=f"items per row (default {ITEMS})")
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed items first (default {WARMUP}: once through the largest pool)",
    )
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="item sizes in rows")
    ap.add_argument("--width", type=int, default=WIDTH, help="row width (the model's hidden size)")
    ap.add_argument("--dtype", default=DTYPE, choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--peers", default=",".join(PEERS), help="connectors to run, in order")
    ap.add_argument("--in-flight", type=int, default=IN_FLIGHT, help="items in flight")
    ap.add_argument(
        "--runner",
        default="auto",
        choices=("auto", "v1", "v2"),
        help="the model runner whose hooks drive the workers: auto is V1's, except for "
        "a connector that does not work with them (ECMooncakeConnector: V2's)",
    )
    ap.add_argument("--idle-sleep-ms", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per row")
    args = ap.parse_args(argv)
    items = args.items if args.items is not None else (QUICK_ITEMS if args.quick else ITEMS)
    warmup = args.warmup
    if warmup is None:
        warmup = 1 if args.quick else 2 * max(2, args.in_flight) + 2
    sizes = [int(x) for x in args.rows.split(",") if x.strip()]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    from rich.console import Console

    # a log or a pipe gets the whole table, not 80 columns of it
    console = Console(width=None if sys.stdout.isatty() else 132)
    result = run_vllm_bench(
        peers=peers,
        sizes=sizes,
        width=args.width,
        dtype=args.dtype,
        items=items,
        warmup=warmup,
        in_flight=args.in_flight,
        runner=args.runner,
        idle_sleep_ms=args.idle_sleep_ms,
        timeout=args.timeout,
        progress=lambda m: console.print(f"[dim]{m}[/dim]"),
    )
    console.print(table(result))
    for line in summary(result):
        console.print(line, markup=False, highlight=False)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0 if all(r.ok or r.skipped for r in result.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
