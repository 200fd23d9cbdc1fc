"""The verdict rule and every constant it uses, in one place, with the measurements behind them.

A compared tensor (a module's output, or a LoRA module's delta: its output minus the base Linear's output
on the same input) passes when the runtime's error against a high-precision truth stays within k times the
reference's own error against that truth, plus a floor (the rule FlashAttention's tests use):

    err(runtime, truth) <= k * err(reference, truth) + floor * size(truth)

checked on two statistics of the same tensor, each with its own k:
  max  the largest element error: catches a few wrong rows (one token on the wrong adapter)
  rms  the root-mean-square error: catches a small error spread over every element (a LoRA scale off by
       a few percent), which the max cannot see under bf16 rounding
The truth is the same module (replay: on the reference's own recorded inputs; e2e: the whole reference
model on the same model inputs) computed in float64 on CPU (fp32 with IEEE matmuls on CUDA) with the very
same weights: the run-dtype weights upcast, the adapter weights as the adapter file holds them.

Why a ratio to the reference's own error: bf16 rounding alone moves a module's output by ~2^-9 of its
size, more than a realistic LoRA delta's subtle faults; an absolute tolerance large enough for bf16 passes
a runtime that drops LoRA. The reference's own error measures what the dtype costs on this very tensor.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    k_max: float      # runtime max error <= k_max * reference max error + floor_max * max |truth|
    k_rms: float      # runtime rms error <= k_rms * reference rms error + floor_rms * rms |truth|
    floor_max: float  # what no comparison of the largest element can resolve (about one unit in the last place)
    floor_rms: float  # the same for the rms: far smaller, rounding averages out
    why: str


# k: the runtime may round along another path than the reference (another GEMM blocking for a batch of
# requests than for one, another summation order): two independent roundings instead of one give an rms
# about sqrt(2) ~ 1.4 times the reference's and a max up to ~2-3 times; e2e compounds that over the layers.
# Healthy runs, all 12 tiny models, realistic adapters, CPU (docs/verdict.md, "The verdict rule"), worst ratio seen:
#   bf16 replay: max 2.2, rms 1.32   bf16 e2e: max 1.8, rms 2.1   fp16 replay: max 1.6, rms 1.31
#   fp16 e2e: max 2.0, rms 1.5       fp32: ratios up to 13 on errors of ~1e-7 of the size (floors decide)
# floor: a row with no adapter has a delta of exactly 0 on the reference, while the runtime's base output on
# a batch may differ from one computed per request by one unit in the last place on a few elements: the
# max floor is one ulp of the dtype (2^-8 bf16, 2^-10 fp16); fp32 keeps tight absolute bounds.
RULES: dict[tuple[str, str], Rule] = {
    ("fp32", "replay"): Rule(3.0, 1.5, 1e-5, 2e-6, "fp32: both sides err by summation order (~1e-7 of the "
                             "size); the floors sit 10-100x above that and far below a 1% fault"),
    ("fp32", "e2e"): Rule(4.0, 2.5, 1e-4, 2e-5, "fp32 e2e: order differences compound over the layers (~1e-6)"),
    ("fp16", "replay"): Rule(3.0, 1.5, 1e-3, 5e-5, "fp16: output rounding (2^-11 of the size) dominates both "
                             "sides; max floor one fp16 ulp"),
    ("fp16", "e2e"): Rule(4.0, 2.5, 1e-2, 1e-3, "fp16 e2e: each side's rounding takes its own path"),
    ("bf16", "replay"): Rule(3.0, 1.5, 4e-3, 3e-4, "bf16: output rounding (2^-9 of the size) dominates both "
                             "sides; max floor one bf16 ulp"),
    ("bf16", "e2e"): Rule(4.0, 2.5, 3e-2, 5e-3, "bf16 e2e: each side's rounding takes its own path through "
                          "the layers (gemma4's LM drifts most)"),
}


def rule(dtype: str, mode: str) -> Rule:
    try:
        return RULES[(dtype, mode)]
    except KeyError:
        raise ValueError(f"no verdict rule for dtype={dtype!r} mode={mode!r}") from None


# Generated adapters: rms(delta) / rms(base output) per LoRA module. Trained LoRA adapters change a module's
# output by a few percent to a few tens of percent; 0.1 sits in the middle of that range (on a log scale),
# small enough that a dropped or mis-scaled LoRA is a subtle fault, not an O(1) one.
DEFAULT_ADAPTER_SCALE = 0.1

# An adapter whose delta on a group is below this fraction of the base output changes nothing a comparison
# at that dtype can resolve (about one unit in the last place of the output): the comparison is trivial.
NEGLIGIBLE_DELTA = {"fp32": 1e-6, "fp16": 5e-4, "bf16": 4e-3}
