"""Gemma4 vision multidimensional (2-D axial) RoPE, Triton op + torch twin.

Mirrors HF `modeling_gemma4.apply_multidimensional_rope(x, cos, sin, position_ids, unsqueeze_dim=2)`:
the head dim is split into ndim = position_ids.shape[-1] equal parts of P = 2 * (head_dim // (2 * ndim))
channels, and each part gets rotate-half RoPE with its own slice of cos / sin:
    y[c] = x[c] * cos[c] + sign(c) * x[partner(c)] * sin[c],   partner = c +- P/2 inside the part,
    sign = -1 in the first half of a part, +1 in the second.
cos / sin are HF's [B, L, head_dim] tables from `Gemma4VisionRotaryEmbedding` (any broadcastable shape);
x is [B, L, heads, head_dim] (unsqueeze_dim=2, as Gemma4 calls it) or [B, heads, L, head_dim]
(unsqueeze_dim=1). The kernel and its twin compute in fp32 and round once; HF rounds each product in x's dtype.

Substitution: `Gemma4VisionAttention.forward` looks the function up as a module global at call time, so
    import transformers.models.gemma4.modeling_gemma4 as m; m.apply_multidimensional_rope = rope_2d
swaps it for every Gemma4 vision attention (the text model uses `apply_rotary_pos_emb`, unaffected). A
runtime attention module can instead call `rope_2d(q, cos, sin, position_ids)` after q_norm / k_norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels._util import cast_rne, clamp_pow2, interpreted
from runtime.kernels.spec import DTYPES, ELEM, KernelSpec, Sweep, seeded


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, D1, D2, HD, PART,
                 stride_x0, stride_x1, stride_x2, stride_x3, stride_cb, stride_cl, stride_cd,
                 HEAD_AXIS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HD: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    c = tl.arange(0, BLOCK_HD)
    i2 = r % D2
    i1 = (r // D2) % D1
    i0 = r // (D1 * D2)
    if HEAD_AXIS == 2:  # sequence index: the axis that is not the head axis
        pos = i1
    else:
        pos = i2
    half = PART // 2
    j = c % PART
    first = j < half
    partner = tl.where(first, c + half, c - half)
    sign = tl.where(first, -1.0, 1.0)
    mask = (r < n_rows)[:, None] & (c < HD)[None, :]
    row = x_ptr + i0 * stride_x0 + i1 * stride_x1 + i2 * stride_x2
    x = tl.load(row[:, None] + c[None, :] * stride_x3, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(row[:, None] + partner[None, :] * stride_x3, mask=mask, other=0.0).to(tl.float32)
    cs = (i0 * stride_cb + pos * stride_cl)[:, None] + c[None, :] * stride_cd
    cos = tl.load(cos_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    y = x * cos + sign[None, :] * xp * sin
    tl.store(out_ptr + r[:, None] * HD + c[None, :], cast_rne(y, out_ptr.dtype.element_ty), mask=mask)


def _part(x: torch.Tensor, position_ids: torch.Tensor, unsqueeze_dim: int) -> int:
    if x.dim() != 4 or unsqueeze_dim not in (1, 2):
        raise ValueError(f"rope_2d takes 4-D x and unsqueeze_dim 1 or 2, got {tuple(x.shape)}, {unsqueeze_dim}")
    ndim, hd = position_ids.shape[-1], x.shape[-1]
    part = 2 * (hd // (2 * ndim))
    if part <= 0 or part * ndim != hd:
        raise ValueError(f"head_dim={hd} must split into {ndim} equal even parts (got part size {part})")
    return part


def _tables(x, cos, sin, unsqueeze_dim):
    seq_axis = 1 if unsqueeze_dim == 2 else 2
    shape = (x.shape[0], x.shape[seq_axis], x.shape[-1])
    return cos.expand(shape), sin.expand(shape)


def rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
            unsqueeze_dim: int = 2) -> torch.Tensor:
    """Drop-in for HF `apply_multidimensional_rope`; returns a new tensor (x's dtype promoted with cos's)."""
    part = _part(x, position_ids, unsqueeze_dim)
    cos, sin = _tables(x, cos, sin, unsqueeze_dim)
    if cos.stride() != sin.stride():  # the kernel shares one offset for both tables
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    D0, D1, D2, HD = x.shape
    n_rows = D0 * D1 * D2
    if n_rows == 0:
        return out
    block_hd = clamp_pow2(HD, 1, 1 << 16)  # a whole head per row: partners live in the same row
    block_rows = clamp_pow2(n_rows, 1, max(1, 65536 // block_hd)) if interpreted() else max(1, 2048 // block_hd)
    _rope_kernel[(triton.cdiv(n_rows, block_rows),)](
        x, cos, sin, out, n_rows, D1, D2, HD, part, *x.stride(), *cos.stride(),
        HEAD_AXIS=unsqueeze_dim, BLOCK_ROWS=block_rows, BLOCK_HD=block_hd)
    return out


def rope_2d_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
                  unsqueeze_dim: int = 2) -> torch.Tensor:
    """Twin: view the head dim as [parts, 2, P/2] and rotate each pair (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    part = _part(x, position_ids, unsqueeze_dim)
    out_dtype = torch.promote_types(x.dtype, cos.dtype)
    cos, sin = _tables(x, cos, sin, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim).float(), sin.unsqueeze(unsqueeze_dim).float()
    split = (*x.shape[:-1], x.shape[-1] // part, 2, part // 2)
    xs = x.float().reshape(split)
    rot = torch.stack([-xs[..., 1, :], xs[..., 0, :]], dim=-2).reshape(x.shape)
    return (x.float() * cos + rot * sin).to(out_dtype)


# ---- spec ----

def _sample(p: dict, device: torch.device):
    B, L, heads, hd, dt = p["batch"], p["T"], p["heads"], p["head_dim"], DTYPES[p["dtype"]]
    g = seeded()
    x = torch.randn(B, L, heads, hd, generator=g).to(device, dt)
    ang = torch.rand(B, L, hd, generator=g) * 6.28
    pos = torch.randint(0, 64, (B, L, 2), generator=g).to(device)
    return (x, ang.cos().to(device, dt), ang.sin().to(device, dt), pos), {"unsqueeze_dim": 2}


def rope_2d_work(p: dict) -> tuple[float, float]:
    """Reads x, writes y (heads x head_dim per row) and reads the cos / sin rows once per position."""
    elems = p["batch"] * p["T"] * p["heads"] * p["head_dim"]
    e = ELEM[p["dtype"]]
    return 2.0 * e * elems + 2.0 * e * p["batch"] * p["T"] * p["head_dim"], 3.0 * elems


# Kernel vs twin, max |err| <= rel * max |twin|: both compute in fp32 and round once, so only FMA contraction
# and the order of the two products differ: ~1 ulp of fp32 (1e-6); at fp16 / bf16 that fp32 difference can move
# one element across a rounding boundary, one ulp of the output (2^-10 / 2^-7 of the largest element), so
# 3e-3 / 2e-2 (HF itself, rounding each product in x's dtype, is judged by the verdict rule, not here).
_GPU = dict(dtype="bf16", T=4096, batch=8, heads=16, head_dim=72)
SPECS = (KernelSpec(
    "rope_2d", rope_2d, rope_2d_torch, _sample, rope_2d_work,
    lambda p: p["batch"] * p["T"], {torch.float32: 1e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2},
    {"smoke": Sweep(dict(dtype="fp32", T=64, batch=2, heads=2, head_dim=16), dict(T=[16, 256])),
     "nightly": Sweep(_GPU, dict(T=[1024, 16384], batch=[1, 32])),
     "full": Sweep(_GPU, grid=dict(T=[1024, 4096, 16384], batch=[1, 8, 32]))},
    params=("dtype", "T", "batch", "heads", "head_dim")),)
