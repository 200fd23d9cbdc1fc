"""The verdict rule on synthetic tensors against an exact truth: what it lets pass (rounding like the
reference's, a more accurate runtime) and what it catches (a scale error, one wrong row), with the row named."""

from __future__ import annotations

import pytest
import torch

from harness.correctness.compare import check, judge
from harness.correctness.rules import RULES, Rule

RULE = Rule(k_max=3.0, k_rms=1.5, floor_max=1e-4, floor_rms=1e-5, why="test")


def _case(seed: int = 0, rows: int = 64, cols: int = 48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    base = x * 2.0
    delta = 0.1 * torch.randn(rows, cols, generator=g, dtype=torch.float64)  # a realistic 10% delta
    return base, delta


def _bf16(t):
    return t.to(torch.bfloat16).double()


def test_rounding_like_the_reference_passes():
    base, delta = _case()
    truth = base + delta
    ref = _bf16(truth)
    got = _bf16(base.float().double() + delta.float().double())  # another order, same final rounding
    c = check(got, ref, truth, RULE)
    assert c.ok and c.first_bad == -1, c


def test_a_more_accurate_runtime_passes():
    base, delta = _case(1)
    truth = base + delta
    c = check(truth.float().double(), _bf16(truth), truth, RULE)
    assert c.ok and c.margin < 0.1


@pytest.mark.parametrize("scale,caught", [(1.10, True), (1.0, False)])
def test_a_scale_error_on_the_delta_is_caught_at_bf16(scale, caught):
    base, delta = _case(2)
    truth = base + delta
    c = check(_bf16(base + scale * delta), _bf16(truth), truth, RULE)
    assert (not c.ok) is caught, c


def test_one_wrong_row_is_caught_and_named():
    base, delta = _case(3)
    truth = base + delta
    wrong = base + delta
    wrong[17] = base[17] + 0.1 * torch.randn(48, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    c = check(_bf16(wrong), _bf16(truth), truth, RULE)
    assert not c.ok and c.first_bad == 17


def test_the_delta_is_judged_against_its_own_size():
    """A delta 1% of the output: a 20% error on it is 0.2% of the output, invisible to an output check with an
    output-sized floor at fp32 rules, and caught by the delta check."""
    base, delta = _case(4)
    delta = delta / 10
    truth = base + delta
    got = base + 1.2 * delta
    ref = truth.float().double()
    fp32 = RULES[("fp32", "replay")]
    m = judge(got, ref, truth, fp32, (base, base, base))
    assert m.status == "mismatch" and m.delta is not None and not m.delta.ok


def test_exact_match_with_zero_reference_error_passes_and_any_difference_beyond_the_floor_fails():
    base, delta = _case(5)
    truth = base + delta
    assert check(truth, truth, truth, RULE).ok
    bumped = truth.clone()
    bumped[3, 4] += 1e-2 * truth.abs().max()
    assert not check(bumped, truth, truth, RULE).ok


def test_nonfinite_is_reported_as_such():
    base, delta = _case(6)
    truth = base + delta
    got = truth.clone()
    got[0, 0] = float("nan")
    m = judge(got, truth, truth, RULE)
    assert m.status == "nonfinite" and m.nonfinite_got == 1 and not m.ok
