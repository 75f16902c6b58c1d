"""Tiny Qwen2-VL and Qwen3-VL, and what each side of the split does with them.

Everything here is the real ``transformers`` code: the model classes
(``Qwen2VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``),
their image processor and processor, their vision towers, ``get_rope_index``
and forward passes. Only the sizes are small (a configuration written in
code) and the weights are random, drawn from a seed, so every process that
builds a model gets the same weights without anything being downloaded.

Stand-ins, and why:

* The tokenizer is a small word-level ``tokenizers`` tokenizer built in code
  (the real one is a 150k-entry byte-level BPE from the hub). It has the
  models' special tokens (``<|vision_start|>``, ``<|image_pad|>``, ...), so
  the real processor expands each image's ``<|image_pad|>`` to as many tokens
  as the image's grid has.
* The processor is the model's own class without its video processor:
  transformers' video processors need torchvision, which
  ``embedlink[examples]`` does not install (the demo moves images only). The
  image processor is ``Qwen2VLImageProcessorPil``, the PIL back end of
  ``Qwen2VLImageProcessor``, for the same reason.

The three paths (one per process in the demo):

* :meth:`TinyVL.encode` (encoder): processor, vision tower,
  ``get_rope_index``; returns the :class:`~embedlink.Embedding` to send: one
  row per prompt token (image rows from the vision tower, text rows zero:
  the language side has the token embedding table), ``token_ids``,
  ``mrope_positions`` ``[3, n]``, ``mrope_position_delta`` and, for Qwen3-VL,
  the DeepStack features per image token in ``extra["deepstack"]``.
* :meth:`TinyVL.generate_from_arrived` (language): prefill and greedy
  decoding from what arrived only. It never sees the image or the grid, so
  it cannot recompute positions: prefill uses the positions that came, each
  decode step ``cache length + mrope_position_delta``.
* :meth:`TinyVL.generate_monolithic` (the reference): the whole model from
  the processor's output, the way one process serves a request; the model
  computes its own positions and keeps its own ``rope_deltas``.

Both generating paths run the same loop (:func:`_greedy`): one prefill
forward over the whole prompt (logits for every position), then one forward
per new token. The shapes of every operation are the same both ways, which
is what makes bitwise equality a fair thing to ask for.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import ml_dtypes
import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from .. import _torch
from ..embedding import Embedding
from ..protocol import BufferSchema
from . import MODELS

__all__ = ["TESTED_TRANSFORMERS", "Encoded", "Generation", "Part", "TinyVL"]

#: The transformers release this module is tested with (embedlink[examples] pins it).
TESTED_TRANSFORMERS = "5.24.0"

Part = Literal["encoder", "language", "whole"]

_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_WORDS = [
    "[UNK]",
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "a",
    "helpful",
    "describe",
    "this",
    "image",
    "these",
    "two",
    "images",
    "what",
    "is",
    "in",
    "the",
    "picture",
    "colours",
    "shapes",
    "and",
    "lines",
    "count",
    "compare",
    "tell",
    "me",
    "about",
    "it",
]
_VOCAB = 512
_HIDDEN = 128
# Random weights' spread, wider than transformers' 0.02: with it a random
# model's greedy tokens follow its input more (at 0.02 they mostly repeat).
_INIT_STD = 0.08


def _tokenizer() -> Any:
    """A word-level tokenizer of :data:`_VOCAB` entries with Qwen's special
    tokens (every id is a token, so any generated id decodes)."""
    vocab = {t: i for i, t in enumerate(_SPECIAL + _WORDS)}
    for i in range(len(vocab), _VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=_SPECIAL,
    )


def _image_only(base: Any) -> Any:
    class ImageOnlyProcessor(base):  # type: ignore[misc]
        """``base`` without its video processor (see the module docstring)."""

        def __init__(
            self,
            image_processor: Any = None,
            tokenizer: Any = None,
            chat_template: Any = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(
                image_processor, tokenizer, None, chat_template=chat_template, **kwargs
            )

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"{base.__name__}ImageOnly"
    return ImageOnlyProcessor


def _special_ids(tok: Any) -> dict[str, int]:
    ids = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {k: int(tok.convert_tokens_to_ids(v)) for k, v in ids.items()}


def _qwen2_vl(tok: Any) -> tuple[Any, Any]:
    """Qwen2-VL's architecture at 1/28 of the 7B's width: the same mrope
    section proportions (16:24:24 of a head's rotary half, here 4:6:6), patch
    14, spatial merge 2, temporal patch 2."""
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=0,
            initializer_range=_INIT_STD,
        ),
        vision_config=dict(
            depth=2,
            embed_dim=64,
            hidden_size=_HIDDEN,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=_INIT_STD,
        ),
        initializer_range=_INIT_STD,
        **_special_ids(tok),
    )
    image_processor = transformers.Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4096, patch_size=14, merge_size=2
    )
    return config, _image_only(transformers.Qwen2VLProcessor)(image_processor, tok)


def _qwen3_vl(tok: Any) -> tuple[Any, Any]:
    """Qwen3-VL's architecture, small: patch 16, a learned position grid
    (8 x 8, interpolated to each image), interleaved M-RoPE, and DeepStack:
    features taken after vision layers 0 and 1 are added to the hidden states
    of the language model's first two layers at the image positions."""
    config = transformers.Qwen3VLConfig(
        text_config=dict(
            vocab_size=_VOCAB,
            hidden_size=_HIDDEN,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
            pad_token_id=0,
            initializer_range=_INIT_STD,
        ),
        vision_config=dict(
            depth=3,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=_HIDDEN,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
            initializer_range=_INIT_STD,
        ),
        initializer_range=_INIT_STD,
        **_special_ids(tok),
    )
    image_processor = transformers.Qwen2VLImageProcessorPil(
        min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 4096, patch_size=16, merge_size=2
    )
    return config, _image_only(transformers.Qwen3VLProcessor)(image_processor, tok)


_BUILDERS: dict[str, Callable[[Any], tuple[Any, Any]]] = {
    "qwen2-vl-tiny": _qwen2_vl,
    "qwen3-vl-tiny": _qwen3_vl,
}


def check_transformers() -> None:
    """Refuse, naming what is missing, when the installed transformers lacks
    a seam this module relies on (the demo would otherwise fail obscurely)."""
    missing = [
        name
        for name in (
            "Qwen2VLForConditionalGeneration",
            "Qwen3VLForConditionalGeneration",
            "Qwen2VLImageProcessorPil",
            "Qwen2VLProcessor",
            "Qwen3VLProcessor",
            "PreTrainedTokenizerFast",
        )
        if not hasattr(transformers, name)
    ]
    for cls in ("Qwen2VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"):
        if cls in missing:
            continue
        params = inspect.signature(getattr(transformers, cls).forward).parameters
        missing += [f"{cls}.forward({p}=)" for p in ("cache", "position_ids") if p not in params]
    if "mm_encoder_outputs" not in inspect.signature(transformers.Qwen3VLModel.forward).parameters:
        missing.append("Qwen3VLModel.forward(mm_encoder_outputs=)")
    if missing:
        raise RuntimeError(
            f"transformers {transformers.__version__} lacks {', '.join(missing)}; "
            f"embedlink's model demo is tested with transformers=={TESTED_TRANSFORMERS} "
            "(pip install 'embedlink[examples]')"
        )


@dataclass
class Encoded:
    """What the encoder made of one request: the embedding to send and what
    the demo prints about it."""

    embedding: Embedding
    prompt_tokens: int
    image_tokens: list[int]
    #: each image's size after the processor's resize, ``(width, height)``
    resized: list[tuple[int, int]]
    vision_seconds: float


@dataclass
class Generation:
    """One request's greedy decoding: the new tokens and the logits of every
    forward pass (``logits[0]``: prefill, ``[prompt_tokens, vocab]``; then
    ``[1, vocab]`` per decode step), as numpy arrays of the model's dtype."""

    tokens: list[int]
    logits: list[np.ndarray[Any, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _host(t: Any) -> np.ndarray[Any, Any]:
    """A numpy copy of tensor ``t`` with the same bytes (bfloat16 via ml_dtypes)."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else None
    if np_dtype is None:
        return np.array(t.detach().cpu().numpy(), copy=True)
    return np.array(_torch.to_host_numpy(t, np_dtype), copy=True)


def _tensor(x: Any) -> Any:
    """A torch view of an arrived numpy array (bfloat16 through its int16 bits)."""
    arr = np.ascontiguousarray(x)
    if arr.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _greedy(
    model: Any,
    first: dict[str, Any],
    new_tokens: int,
    position: Callable[[int], Any] | None,
) -> Generation:
    """Prefill with ``first`` (``model(**first)``), then ``new_tokens - 1``
    decode steps, each taking the argmax of the last position's logits.
    ``position(p)`` gives the ``position_ids`` of the token at sequence
    index ``p`` (None: the model works them out from its ``rope_deltas``)."""
    t0 = time.perf_counter()
    out = model(**first, use_cache=True)
    logits = [_host(out.logits[0])]
    length = int(out.logits.shape[1])
    tokens: list[int] = []
    for step in range(new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        if step == new_tokens - 1:
            break
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([[tokens[-1]]]),
            "cache": out.cache,
            "use_cache": True,
        }
        if position is not None:
            kwargs["position_ids"] = position(length + step)
        out = model(**kwargs)
        logits.append(_host(out.logits[0]))
    return Generation(tokens, logits, time.perf_counter() - t0)


class TinyVL:
    """One demo model in one dtype, holding only the ``part`` a process needs:
    ``"encoder"`` (processor and vision tower: the language model is
    deleted), ``"language"`` (the language model: the vision tower is
    deleted, so this side cannot look at an image even by mistake) or
    ``"whole"`` (the monolithic reference).

    Weights come from ``torch.manual_seed(seed)`` and the model's own
    initialisation, in float32, then cast to ``dtype``: every process that
    builds the same ``(name, seed, dtype)`` holds the same bytes
    (:meth:`fingerprint` lets the demo check).
    """

    def __init__(self, name: str, dtype: str, part: Part, seed: int = 0) -> None:
        if name not in _BUILDERS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(_BUILDERS)}")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        check_transformers()
        self.name = name
        self.dtype = dtype
        self.part = part
        tok = _tokenizer()
        config, self.processor = _BUILDERS[name](tok)
        self.tokenizer = tok
        self.config = config
        self.image_token_id = int(config.image_token_id)
        self.deepstack_layers = len(getattr(config.vision_config, "deepstack_visual_indexes", ()))
        torch.manual_seed(seed)
        model = getattr(transformers, MODELS[name].hf_class)(config)
        model = model.to(getattr(torch, dtype)).eval()
        # never stop early: both ways generate exactly the tokens asked for
        model.generation_config.eos_token_id = None
        if part == "encoder":
            del model.model.language_model
            del model.lm_head
        elif part == "language":
            del model.model.visual
        self.model = model

    @property
    def hidden_size(self) -> int:
        return int(self.config.text_config.hidden_size)

    def schema(self) -> BufferSchema:
        """The fields both endpoints agree on: the model's hidden size and
        dtype, plus ``deepstack`` ``[layers, hidden]`` for Qwen3-VL."""
        extra: dict[str, tuple[tuple[int, ...], str]] = {}
        if self.deepstack_layers:
            extra["deepstack"] = ((self.deepstack_layers, self.hidden_size), self.dtype)
        return BufferSchema(hidden_size=self.hidden_size, dtype=self.dtype, extra_fields=extra)

    def fingerprint(self) -> dict[str, str]:
        """SHA-256 of the weights this process holds, per half
        (``"vision"``, ``"language"``)."""
        halves = {"vision": ("model.visual.",), "language": ("model.language_model.", "lm_head.")}
        out: dict[str, str] = {}
        state = self.model.state_dict()
        for half, prefixes in halves.items():
            names = sorted(k for k in state if k.startswith(prefixes))
            if not names:
                continue
            h = hashlib.sha256()
            for k in names:
                h.update(k.encode())
                h.update(_host(state[k]).tobytes())
            out[half] = h.hexdigest()[:16]
        return out

    def _inputs(self, prompt: str, images: Sequence[Image.Image]) -> Any:
        return self.processor(text=[prompt], images=list(images), return_tensors="pt")

    @torch.inference_mode()
    def encode(self, prompt: str, images: Sequence[Image.Image]) -> Encoded:
        """The encoder's work for one request (see the module docstring)."""
        t0 = time.perf_counter()
        inputs = self._inputs(prompt, images)
        ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
        vision = self.model.model.get_image_features(inputs["pixel_values"], grid, return_dict=True)
        positions, delta = self.model.model.get_rope_index(
            ids, inputs["mm_token_type_ids"], image_grid_thw=grid
        )
        n = int(ids.shape[1])
        image_rows = ids[0] == self.image_token_id
        dt = getattr(torch, self.dtype)
        rows = torch.zeros(n, self.hidden_size, dtype=dt)
        rows[image_rows] = torch.cat(vision.pooler_output, dim=0)
        extra: dict[str, Any] = {}
        if self.deepstack_layers:
            deep = torch.zeros(n, self.deepstack_layers, self.hidden_size, dtype=dt)
            for layer, feats in enumerate(vision.deepstack_features):
                deep[image_rows, layer] = torch.cat(feats, dim=0)
            extra["deepstack"] = deep
        merge = int(self.config.vision_config.spatial_merge_size)
        patch = int(self.config.vision_config.patch_size)
        emb = Embedding(
            embedding=rows,
            token_ids=ids[0].to(torch.int32),
            mrope_positions=positions[:, 0, :].to(torch.int32).contiguous(),
            extra=extra,
            mrope_position_delta=int(delta.reshape(-1)[0]),
        )
        return Encoded(
            embedding=emb,
            prompt_tokens=n,
            image_tokens=[int(t * h * w) // merge**2 for t, h, w in grid.tolist()],
            resized=[(int(w) * patch, int(h) * patch) for _, h, w in grid.tolist()],
            vision_seconds=time.perf_counter() - t0,
        )

    @torch.inference_mode()
    def generate_from_arrived(self, emb: Embedding, new_tokens: int) -> Generation:
        """The language side: prefill and ``new_tokens`` greedy tokens from an
        embedding that arrived (numpy arrays, as a receiver returns them).

        Qwen2-VL: ``inputs_embeds`` is built here (the token embedding of
        every prompt token, the arrived rows put in at the image tokens, as
        the model's own forward does it) and passed with the arrived
        positions. Qwen3-VL's forward takes DeepStack features only with
        precomputed vision outputs, so the arrived rows go in as
        ``mm_encoder_outputs`` (transformers' way to hand a model vision
        features computed elsewhere) with the token ids and positions.
        """
        ids = _tensor(emb.token_ids).to(torch.long)[None, :]
        positions = _tensor(emb.mrope_positions).to(torch.long)[:, None, :]
        image_rows = ids[0] == self.image_token_id
        rows = _tensor(emb.embedding)[image_rows]
        delta = int(emb.mrope_position_delta)
        first: dict[str, Any] = {"position_ids": positions}
        if self.deepstack_layers:
            deep = _tensor(emb.extra["deepstack"])[image_rows]
            vision = _vision_output(
                pooler_output=(rows,),
                deepstack_features=[
                    (deep[:, layer].contiguous(),) for layer in range(self.deepstack_layers)
                ],
            )
            first.update(input_ids=ids, mm_encoder_outputs={"image": vision})
        else:
            embeds = self.model.get_input_embeddings()(ids)
            mask = image_rows[None, :, None].expand_as(embeds)
            first["inputs_embeds"] = embeds.masked_scatter(mask, rows)

        def position(p: int) -> Any:
            return torch.full((3, 1, 1), p + delta, dtype=torch.long)

        return _greedy(self.model, first, new_tokens, position)

    @torch.inference_mode()
    def generate_monolithic(
        self, prompt: str, images: Sequence[Image.Image], new_tokens: int
    ) -> Generation:
        """The reference: the whole model from the processor's output, its
        own vision tower, positions and ``rope_deltas``. The attention mask is
        left out (one unpadded prompt: it is all ones); :meth:`hf_generate`
        passes it, through ``generate()``."""
        inputs = self._inputs(prompt, images)
        self.model.model.rope_deltas = None
        first = {
            k: inputs[k]
            for k in ("input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        }
        return _greedy(self.model, first, new_tokens, None)

    @torch.inference_mode()
    def hf_generate(self, prompt: str, images: Sequence[Image.Image], new_tokens: int) -> list[int]:
        """``model.generate(**processor_output)``, greedy: how a user of
        transformers would run the request. Its tokens should match
        :meth:`generate_monolithic`'s; its logits are not compared: generate
        computes the prefill's logits for the last position only, a
        different matrix shape, so they may differ in the last bits."""
        inputs = self._inputs(prompt, images)
        self.model.model.rope_deltas = None
        out = self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]


def _vision_output(**kwargs: Any) -> Any:
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        BaseModelOutputWithDeepstackFeatures,
    )

    return BaseModelOutputWithDeepstackFeatures(**kwargs)


def perturb(emb: Embedding, kind: str, image_token_id: int) -> None:
    """Change ``emb`` in place, a little, as ``kind`` says (see
    :data:`embedlink.examples.vlm_demo.PERTURBATIONS`): a check that the
    comparison notices a difference must be able to fail.

    ``embedding`` and ``deepstack`` flip the lowest bit of every value of the
    first image token's row (each value moves by one unit in the last place).
    One value alone is not always enough in bfloat16: the change can vanish
    in the rounding of the next matrix product."""
    first_image_row = int((emb.token_ids == image_token_id).nonzero()[0])
    if kind in ("embedding", "deepstack"):
        t = emb.embedding if kind == "embedding" else emb.extra["deepstack"]
        bits = t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)
        bits.view(bits.shape[0], -1)[first_image_row] ^= 1
    elif kind == "positions":
        emb.mrope_positions = emb.mrope_positions[[0, 2, 1]].contiguous()
    elif kind == "delta":
        emb.mrope_position_delta += 1
    else:
        raise ValueError(f"unknown perturbation {kind!r}")
