"""Helpers shared by the kernel files: interpreter detection, block-size arithmetic, dtype mapping."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _add(a, b):
    return a + b


# The combine function tl.sum / tl.cumsum use. Kernels that run once per program in the interpreter call
# tl.reduce / tl.associative_scan with it directly: tl.sum is itself a jit function, and the interpreter
# (triton 3.9) re-patches the language module on every nested jit call (~3 ms each, as much as a whole
# small program), while it recognises this combine function and sums with numpy. On CUDA both compile to
# the same reduction. Falls back to a plain add where triton names it differently.
SUM = getattr(getattr(tl, "standard", None), "_sum_combine", _add)


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (the only way on a machine without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def clamp_pow2(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi] (tl.arange needs powers of two; tl.dot needs >= 16)."""
    return max(lo, min(hi, next_pow2(n)))


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in FLOAT_DTYPES]}")


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even. The interpreter (triton 3.9) truncates fp32 -> bf16 while
    CUDA rounds, so bf16 is rounded by hand: the same bits on both (NaN kept as NaN)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True)).to(tl.bfloat16)
    else:
        return x.to(dtype)
