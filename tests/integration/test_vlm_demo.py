"""A real vision-language model split by embedlink gives exactly the monolithic
model's output (issue: a real VLM end to end).

Qwen2-VL and Qwen3-VL (DeepStack) from transformers, small configurations
with seeded random weights, in three real processes (encoder, language,
monolithic) over real endpoints and a real bootstrap server on loopback. A
small case of ``embedlink demo --model``: float32 and bfloat16, one image
whose room resumes, two images in one prompt, every room of a case in
flight at once; plus rooms perturbed at the encoder, which must come out
different (the comparison can fail).
"""

import pytest

from embedlink import Status
from embedlink.examples import missing_dependencies

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        bool(missing_dependencies()),
        reason=f"needs embedlink[examples] (missing: {', '.join(missing_dependencies())})",
    ),
]

NEW_TOKENS = 4
DEFAULT_TOKENS = 256


@pytest.fixture(scope="module")
def result():
    from embedlink.examples.images import ImageSpec
    from embedlink.examples.vlm_demo import run

    specs = [
        ((ImageSpec(8, 8),), "describe this image"),  # 64 image tokens
        ((ImageSpec(5, 15),), "count the shapes"),  # tall
        ((ImageSpec(18, 15),), "describe the colours"),  # 270: more than 256, resumes
        ((ImageSpec(6, 3), ImageSpec(4, 4)), "compare these two images"),
        ((ImageSpec(3, 2),), "what is in this image"),  # 4..7: perturbed
        ((ImageSpec(2, 3),), "what is in this image"),
        ((ImageSpec(3, 3),), "what is in this image"),
        ((ImageSpec(4, 2),), "what is in this image"),
    ]
    return run(
        ["qwen2-vl-tiny", "qwen3-vl-tiny"],
        ["float32", "bfloat16"],
        specs=specs,
        new_tokens=NEW_TOKENS,
        threads=1,
        default_tokens=DEFAULT_TOKENS,
        block_size=64,
        perturb={4: "embedding", 5: "positions", 6: "delta", 7: "deepstack"},
        timeout=200,
    )


def cases(result):
    return {(c.model, c.dtype): c for c in result.cases}


def test_every_case_ran_with_one_thread_per_process_and_the_same_weights(result):
    assert set(cases(result)) == {
        (m, d) for m in ("qwen2-vl-tiny", "qwen3-vl-tiny") for d in ("float32", "bfloat16")
    }
    assert {v["threads"] for v in result.versions.values()} == {1}
    assert len({v["pid"] for v in result.versions.values()}) == 3
    for c in result.cases:
        assert c.weights_match, c.fingerprints
        assert set(c.fingerprints["monolithic"]) == {"vision", "language"}
        # each side holds only its half
        assert set(c.fingerprints["encoder"]) == {"vision"}
        assert set(c.fingerprints["language"]) == {"language"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", ["qwen2-vl-tiny", "qwen3-vl-tiny"])
def test_disaggregated_prefill_is_bitwise_the_monolithic_one(result, model, dtype):
    case = cases(result)[(model, dtype)]
    unperturbed = [r for r in case.requests if r.perturbed is None]
    assert len(unperturbed) >= 4
    for r in unperturbed:
        assert r.failure is None, r.failure
        assert len(r.disaggregated) == NEW_TOKENS
        assert r.disaggregated == r.monolithic, r.room
        assert r.prefill_equal, (r.room, r.max_abs_diff)
        assert r.decode_equal == r.decode_steps == NEW_TOKENS - 1, r.room
        assert r.max_abs_diff == 0.0
        assert r.identical
    assert all(st == (int(Status.Success), None) for st in case.encoder_statuses.values())
    assert case.language_pool[0] == 0


@pytest.mark.parametrize("model", ["qwen2-vl-tiny", "qwen3-vl-tiny"])
def test_the_room_larger_than_the_reservation_resumed(result, model):
    for dtype in ("float32", "bfloat16"):
        by_room = {r.room: r for r in cases(result)[(model, dtype)].requests}
        big = by_room[2]
        assert big.image_tokens == [270]
        assert big.prompt_tokens > DEFAULT_TOKENS
        assert big.resumed_at == [DEFAULT_TOKENS]
        assert big.history[-1] == (int(Status.Success), big.prompt_tokens)
        assert big.identical
        # the smaller ones arrived in one chunk; two images in one prompt
        assert not any(by_room[i].resumed for i in (0, 1, 3))
        assert by_room[3].image_tokens == [18, 16]
        assert len(by_room[3].sizes) == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", ["qwen2-vl-tiny", "qwen3-vl-tiny"])
def test_a_perturbed_room_comes_out_different(result, model, dtype):
    """The comparison is sensitive: one unit in the last place of one image
    token's values, or swapped positions, changes the prefill's logits; a
    delta off by one leaves the prefill alone and changes every decode step
    (so the language side uses the delta that arrived)."""
    by_room = {r.room: r for r in cases(result)[(model, dtype)].requests}
    emb, pos, delta, deep = by_room[4], by_room[5], by_room[6], by_room[7]
    assert (emb.perturbed, pos.perturbed, delta.perturbed) == ("embedding", "positions", "delta")
    for r in (emb, pos):
        assert not r.prefill_equal and not r.identical and r.max_abs_diff > 0
    assert delta.prefill_equal
    assert delta.decode_equal == 0 and not delta.identical
    if model == "qwen3-vl-tiny":
        assert deep.perturbed == "deepstack"
        assert not deep.prefill_equal and not deep.identical
    else:
        assert deep.perturbed is None and deep.identical
    assert not result.ok


def test_the_model_demo_refuses_a_perturbation_its_model_cannot_have():
    from click.testing import CliRunner

    from embedlink.service.cli import main

    bad = CliRunner().invoke(main, ["demo", "--model", "qwen2-vl-tiny", "--perturb", "1:deepstack"])
    assert bad.exit_code == 2 and "needs a model with DeepStack" in bad.output


def test_the_example_script_gives_the_monolithic_answer():
    """examples/qwen2_vl_disaggregated.py, as a user runs it."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    p = subprocess.run(
        [sys.executable, str(root / "examples" / "qwen2_vl_disaggregated.py"), "--new-tokens", "3"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("bitwise equal") == 3
    assert p.stdout.count("resumed at [256]") == 2
    assert "['Success', 'Success', 'Success']" in p.stdout
