"""Real models on both sides of embedlink (``pip install 'embedlink[examples]'``).

``embedlink demo --model NAME`` runs a Hugging Face ``transformers``
vision-language model split in two: its processor and vision tower in an
encoder process, its language model in a language process, the embeddings,
token ids and M-RoPE positions moving between them through embedlink; and the
same prompts through the whole model in a third process. The answers must be
bitwise identical (:mod:`embedlink.examples.vlm_demo`).

This module is light on purpose: the command line lists the models and checks
the dependencies without importing torch or transformers.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

__all__ = ["MODELS", "PERTURBATIONS", "ModelSpec", "missing_dependencies"]


@dataclass(frozen=True)
class ModelSpec:
    """What the orchestrating process needs to know about a demo model
    without loading it."""

    #: the ``transformers`` class the demo builds
    hf_class: str
    #: pixels per image token along each side: the vision tower's patch size
    #: times its spatial merge size (28 for Qwen2-VL, 32 for Qwen3-VL)
    pixels_per_token: int
    #: per-token fields sent besides embedding, token_ids and mrope_positions
    extra_fields: tuple[str, ...] = ()


#: The models ``embedlink demo --model`` knows, each a small configuration
#: written in code with seeded random weights (nothing is downloaded).
MODELS: dict[str, ModelSpec] = {
    "qwen2-vl-tiny": ModelSpec("Qwen2VLForConditionalGeneration", 28),
    "qwen3-vl-tiny": ModelSpec("Qwen3VLForConditionalGeneration", 32, ("deepstack",)),
}

#: What the demo's ``perturb`` can change in a request's embedding at the
#: encoder, after the model computed it and before it is sent, to show that
#: the comparison notices: the lowest bit of every value of one image token's
#: row (``embedding``, ``deepstack``), the height and width rows of the M-RoPE
#: positions swapped (``positions``), or ``mrope_position_delta + 1``
#: (``delta``: the prefill is unchanged, every decode step is not).
PERTURBATIONS = ("embedding", "positions", "delta", "deepstack")

_DEPENDENCIES = ("torch", "transformers", "tokenizers", "PIL")


def missing_dependencies() -> list[str]:
    """The import names of the examples' dependencies that are not installed
    (empty when ``embedlink[examples]`` and torch are there)."""
    return [m for m in _DEPENDENCIES if importlib.util.find_spec(m) is None]
