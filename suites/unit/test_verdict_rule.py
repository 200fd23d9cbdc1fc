"""The verdict rule on synthetic tensors against an exact truth: what it lets pass (rounding like the
reference's, a more accurate runtime) and what it catches (a scale error, one wrong row), with the row named."""

from __future__ import annotations

import pytest
import torch

from harness.correctness.compare import check, judge_tensor
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
    m = judge_tensor(got, ref, truth, fp32, (base, base, base))
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
    m = judge_tensor(got, truth, truth, RULE)
    assert m.status == "nonfinite" and m.nonfinite_got == 1 and not m.ok


# ---- an adapter held at the run dtype (a serving runtime) against PEFT's fp32 adapter (the reference)
def _lora_case(scale: float, seed: int = 3, rows: int = 96, h: int = 64, o: int = 48, r: int = 8):
    """A bf16 Linear with a LoRA whose delta is `scale` times the base output (rms): the truth in float64,
    the reference as PEFT computes it (fp32 adapter, the delta added in fp32, one rounding of the sum), a
    healthy runtime holding A and 2 * B in bf16 (the scale folded in), fp32 delta, one rounding. The base
    output is the exact one rounded once, as an fp32-accumulating GEMM gives it: the CPU's own bf16 GEMM
    rounds differently from one CPU to the next (AMX or not), which would make the case machine-dependent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, h, generator=g).bfloat16()
    w = (torch.randn(o, h, generator=g) / h ** 0.5).bfloat16()
    A = torch.randn(r, h, generator=g) / h ** 0.5
    B = torch.randn(o, r, generator=g)
    base = x.double() @ w.double().T
    B = B * float(scale * base.pow(2).mean().sqrt() / ((x.double() @ A.double().T) @ B.double().T * 2).pow(2)
                  .mean().sqrt())
    truth = base + (x.double() @ A.double().T) @ B.double().T * 2
    base_rt = base.bfloat16().double()  # the bf16 base output both sides add to
    ref = (base_rt + ((x.double() @ A.double().T) @ B.double().T * 2).float().double()).bfloat16().double()
    held = ((x.double() @ A.bfloat16().double().T) @ (B.double() * 2).bfloat16().double().T).float().double()
    return x, A, B, truth, ref, (base_rt + held).bfloat16().double()


def test_held_adapter_is_the_brute_force_difference():
    from harness.correctness.compare import held_adapter

    x, A, B, *_ = _lora_case(1.0, rows=5, h=6, o=4, r=2)
    got = held_adapter(x, A, B, 2.0, torch.bfloat16)
    xs, a, b = x.double().tolist(), A.double().tolist(), (B.double() * 2).tolist()
    ah, bh = A.bfloat16().double().tolist(), (B.double() * 2).bfloat16().double().tolist()
    for t in range(5):
        for c in range(4):
            exact = sum(b[c][k] * sum(xs[t][i] * a[k][i] for i in range(6)) for k in range(2))
            rounded = sum(bh[c][k] * sum(xs[t][i] * ah[k][i] for i in range(6)) for k in range(2))
            assert abs(float(got[t, c]) - abs(rounded - exact)) <= 1e-12 * max(1.0, abs(exact))


@pytest.mark.parametrize("scale,off", [(0.1, 1.2), (1.0, 1.02), (3.0, 1.02)])
def test_the_held_adapter_allowance_passes_health_and_still_catches_a_scale_error(scale, off):
    """With the allowance a healthy held-adapter runtime passes with room (it is one rounding of the delta,
    not a wider k) and a LoRA scale off by what bf16 resolves there (2% of a delta the size of the output, 20%
    of one a tenth of it: 2% of the output either way) still fails. That the allowance is what removes the false alarm
    of real models at --adapter-scale 1 is shown on them: suites/correctness/test_adapter_sizes.py (this
    Gaussian case alone stays just below 1 without it)."""
    from harness.correctness.compare import held_adapter

    x, A, B, truth, ref, got = _lora_case(scale)
    bf16 = RULES[("bf16", "replay")]
    allowance = held_adapter(x, A, B, 2.0, torch.bfloat16)
    delta = (x.double() @ A.double().T) @ B.double().T * 2
    # the allowance is about one bf16 rounding of the delta, nowhere near the delta itself
    assert float(allowance.max()) < 2 ** -6 * float(delta.abs().max())
    c = check(got, ref, truth, bf16, held=allowance)
    assert c.ok and c.margin < 0.75, c
    base = truth - delta
    wrong = (base.bfloat16().double() + delta * off).bfloat16().double()  # the LoRA scale off
    assert not check(wrong, ref, truth, bf16, held=allowance).ok
