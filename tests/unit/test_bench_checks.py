"""The SGLang bench's byte check (embedlink.tools.sglang_bench._check): a
row fails on any byte that differs from what its encoder produced, wherever
it is, and on the wrong shape; the seed in each part's first value is the
one value it may differ in."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (EMBEDLINK_TEST_TORCH=0)")

from embedlink.tools.sglang_bench import _check  # noqa: E402


def _parts() -> tuple[object, list[object]]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(50, 16, generator=g).to(torch.bfloat16)
    parts = []
    for seed in (3.0, 4.0):
        p = base.clone()
        p[0, 0] = seed
        parts.append(p)
    return base, parts


def test_copies_of_the_base_with_their_seeds_pass():
    base, parts = _parts()
    assert _check(torch.cat(parts), base, 2) is None


@pytest.mark.parametrize(
    ("part", "row", "col", "why"),
    [
        (0, 49, 15, "part 0: rows differ"),  # the very last byte of a part
        (1, 20, 3, "part 1: rows differ"),
        (1, 0, 1, "part 1: its first row differs"),  # next to the seed
    ],
)
def test_one_changed_value_anywhere_fails(part, row, col, why):
    base, parts = _parts()
    parts[part][row, col] += 1
    problem = _check(torch.cat(parts), base, 2)
    assert problem is not None and problem.startswith(why)


def test_the_wrong_shape_or_dtype_fails():
    base, parts = _parts()
    assert "got (50, 16)" in str(_check(parts[0], base, 2))
    assert "float32" in str(_check(torch.cat(parts).float(), base, 2))


def test_a_non_contiguous_tensor_is_compared_by_value():
    base, parts = _parts()
    wide = torch.cat([torch.cat(parts), torch.cat(parts)], dim=1)[:, :16]
    assert not wide.is_contiguous()
    assert _check(wide, base, 2) is None
