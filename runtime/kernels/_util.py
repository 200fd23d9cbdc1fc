"""Helpers shared by the kernel files: interpreter detection, block-size arithmetic, dtype mapping."""

from __future__ import annotations

import os

import torch
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (the only way on a machine without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def clamp_pow2(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi] (tl.arange needs powers of two; tl.dot needs >= 16)."""
    return max(lo, min(hi, next_pow2(n)))


def tl_dtype(dtype: torch.dtype):
    if dtype not in _TL_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {sorted(map(str, _TL_DTYPES))}")
    return _TL_DTYPES[dtype]
