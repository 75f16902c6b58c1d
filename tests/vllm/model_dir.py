"""A config-only multimodal model directory and a real vLLM 0.33.0 Scheduler.

For the vLLM virtual environment (scripts/setup_vllm.sh creates .venv-vllm).
The module itself imports only the standard library, so it imports anywhere;
its functions import vllm, torch, transformers and tokenizers when called.
Importing it sets VLLM_TARGET_DEVICE=cpu unless already set, so import it
before anything imports vllm (or set the variable in the environment).

``make_model_dir`` writes a tiny Qwen2-Audio directory (no weights): a WordLevel
``tokenizer.json``, a WhisperFeatureExtractor and a Qwen2AudioProcessor saved
with ``save_pretrained``, and a hand-sized ``config.json`` (hidden size 64).
Qwen2-Audio needs no torchvision, and vLLM computes its per-item token maximum
analytically (30 s of audio -> 750 embeddings), so the Scheduler gets a
non-zero encoder cache without running any processor on dummy data.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

# vLLM picks its platform on first use; without this it is "unspecified" on a
# machine without a GPU. Set before any vllm import in the test process.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

if TYPE_CHECKING:
    from vllm.config import ECTransferConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

__all__ = [
    "AUDIO_TOKEN_ID",
    "BLOCK_SIZE",
    "EOS_TOKEN_ID",
    "HIDDEN_SIZE",
    "MAX_MODEL_LEN",
    "NUM_GPU_BLOCKS",
    "TEXT_TOKEN_ID",
    "VOCAB_SIZE",
    "make_model_dir",
    "make_request",
    "make_scheduler",
]

# the tiny model's vocabulary: the bench's (one definition; stdlib-only import)
from embedlink.tools.vllm_bench import (
    AUDIO_TOKEN_ID,
    EOS_TOKEN_ID,
    TEXT_TOKEN_ID,
    VOCAB_SIZE,
)

HIDDEN_SIZE = 64
MAX_MODEL_LEN = 4096
BLOCK_SIZE = 16
NUM_GPU_BLOCKS = 1024


def make_model_dir(path: pathlib.Path) -> pathlib.Path:
    """Write a weightless tiny Qwen2-Audio model directory at ``path`` (hidden
    size 64, float16); return it. The bench makes the same directory at other
    sizes: one writer of it, in embedlink.tools.vllm_bench.

    Idempotent: an existing directory is overwritten file by file.
    """
    from embedlink.tools.vllm_bench import make_model_dir as make

    return make(pathlib.Path(path), width=HIDDEN_SIZE, dtype="float16", max_len=MAX_MODEL_LEN)


def make_scheduler(
    model_dir: pathlib.Path,
    ec_transfer_config: ECTransferConfig | None,
    *,
    max_num_batched_tokens: int = 2048,
    encoder_cache_size: int | None = None,
    max_num_seqs: int = 16,
    log_stats: bool = True,
    tensor_parallel_size: int = 1,
) -> Scheduler:
    """A real vLLM ``Scheduler`` for ``model_dir`` (see make_model_dir).

    Built as in docs/research/vllm-0.33-ec-connector.md section 8: a single
    full-attention KV group of ``NUM_GPU_BLOCKS`` blocks of ``BLOCK_SIZE``.
    The encoder cache is ``max(max_num_batched_tokens, 750)`` embeddings unless
    ``encoder_cache_size`` is given; then the scheduler's encoder cache manager
    is rebuilt (same class) with exactly that many slots.
    """
    import torch
    from vllm.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype="float16",
        seed=42,
        max_model_len=MAX_MODEL_LEN,
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=MAX_MODEL_LEN,
        enable_chunked_prefill=True,
        is_encoder_decoder=model_config.is_encoder_decoder,
    )
    cache_config = CacheConfig(block_size=BLOCK_SIZE)
    cache_config.num_gpu_blocks = NUM_GPU_BLOCKS  # Scheduler asserts > 0
    vllm_config = VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        # the scheduler only counts the ranks (its connector expects one
        # answer from each); no process group is made here
        parallel_config=ParallelConfig(tensor_parallel_size=tensor_parallel_size),
        ec_transfer_config=ec_transfer_config,
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=NUM_GPU_BLOCKS,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"],
                FullAttentionSpec(
                    block_size=BLOCK_SIZE, num_kv_heads=1, head_size=1, dtype=torch.float32
                ),
            )
        ],
    )
    scheduler = Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK_SIZE,
        log_stats=log_stats,
    )
    if encoder_cache_size is not None:
        manager = scheduler.encoder_cache_manager
        scheduler.encoder_cache_manager = type(manager).create_manager(
            cache_size=encoder_cache_size, vllm_config=vllm_config
        )
    return scheduler


def make_request(
    request_id: str,
    prompt_len: int,
    items: Iterable[tuple[str, int, int]],
    ec_transfer_params: Mapping[str, Any] | None = None,
    max_tokens: int = 4,
) -> Request:
    """A real vLLM ``Request`` with one audio ``MultiModalFeatureSpec`` per item.

    ``items`` are ``(identifier, offset, length)``: the item's placeholder is
    prompt positions ``offset .. offset+length-1``, which hold ``AUDIO_TOKEN_ID``
    (features are sorted by offset, as vLLM expects);
    the rest of the prompt is plain word tokens. ``data`` is None (as for an
    item the front end has cached), and ``mm_hash`` equals the identifier.
    ``ec_transfer_params`` goes where the OpenAI layer puts it:
    ``SamplingParams.extra_args["ec_transfer_params"]``, and vLLM copies it to
    ``request.ec_transfer_params``; empty or None leaves that None, as in vLLM.
    """
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    prompt = [TEXT_TOKEN_ID + (i % (VOCAB_SIZE - TEXT_TOKEN_ID)) for i in range(prompt_len)]
    features: list[MultiModalFeatureSpec] = []
    for identifier, offset, length in sorted(items, key=lambda item: item[1]):
        if offset < 0 or length <= 0 or offset + length > prompt_len:
            raise ValueError(f"item {identifier!r} ({offset}, {length}) is outside the prompt")
        prompt[offset : offset + length] = [AUDIO_TOKEN_ID] * length
        features.append(
            MultiModalFeatureSpec(
                data=None,
                modality="audio",
                identifier=identifier,
                mm_position=PlaceholderRange(offset=offset, length=length),
                mm_hash=identifier,
            )
        )
    extra_args = {"ec_transfer_params": dict(ec_transfer_params)} if ec_transfer_params else None
    sampling_params = SamplingParams(max_tokens=max_tokens, extra_args=extra_args)
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=sampling_params,
        pooling_params=None,
        mm_features=features,
    )
