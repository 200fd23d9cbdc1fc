"""Multi-LoRA shrink / expand (Punica-style segmented GEMM), one Triton op each, with pure-torch twins.

Shapes (S = adapter slots, R = r_max, ranks zero-padded; alpha/r already folded into B by the caller):
  lora_shrink(x[T,H], A_slices: n x [S,R,H], slot_ids[T])            -> v fp32 [n,T,R]  (-1 rows: 0)
  lora_expand(v[n,T,R], B_slices: n x [S,O_i,R], slot_ids, y[T,sum O_i], slice_offsets)  y[:, off_i:+O_i] += v_i B_i^T
Tokens are grouped as engines do: a stable sort by slot on device, per-slot counts and start offsets (no
host sync needed to build them). The grid is (row tiles x column tiles, slices, slots); the -1 group is
never launched and a slot with no rows exits at once, so -1 rows of y are never read or written. Each
output element is owned by exactly one program: no split-K atomics, results are deterministic.
Slices are reached through a small device table of (pointer, strides, width, offset) per slice, so
unequal widths (packed q/k/v) run in one launch; the table is cached per (pointers, shapes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from runtime.kernels._util import cast_rne, check_float, clamp_pow2, interpreted
from runtime.kernels.spec import DTYPES, ELEM, KernelSpec, Sweep, seeded


@triton.jit
def _shrink_kernel(x_ptr, a0_ptr, meta_ptr, out_ptr, order_ptr, start_ptr, count_ptr,
                   H, R, stride_xt, stride_xh, stride_on, stride_ot, FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    sl = tl.program_id(1)
    slot = tl.program_id(2)
    count = tl.load(count_ptr + slot + 1)  # group 0 holds the -1 rows; slot s is group s + 1
    if pid_m * BLOCK_M >= count:
        return
    start = tl.load(start_ptr + slot + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    rows = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    meta = meta_ptr + sl * 4  # (ptr, stride_slot, stride_r, stride_h)
    # a0_ptr (slice 0) only lends its element type; each slice's address comes from the table
    a_ptr = tl.load(meta).to(tl.pointer_type(a0_ptr.dtype.element_ty)) + slot * tl.load(meta + 1)
    s_r = tl.load(meta + 2)
    s_h = tl.load(meta + 3)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < H
        xt = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptr + offs_k[:, None] * s_h + offs_r[None, :] * s_r,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if FP32:  # fp32 operands use IEEE fp32 (no TF32 on CUDA): the fp32 path must stay fp32-exact
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at)
    tl.store(out_ptr + sl * stride_on + rows[:, None] * stride_ot + offs_r[None, :], acc,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(v_ptr, b0_ptr, meta_ptr, y_ptr, order_ptr, start_ptr, count_ptr,
                   R, n_col_tiles, stride_vn, stride_vt, stride_vr, stride_yt, stride_yo, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    sl = tl.program_id(1)
    slot = tl.program_id(2)
    pid_m = pid // n_col_tiles
    pid_n = pid % n_col_tiles
    count = tl.load(count_ptr + slot + 1)
    meta = meta_ptr + sl * 6  # (ptr, width, offset, stride_slot, stride_o, stride_r)
    width = tl.load(meta + 1)
    if (pid_m * BLOCK_M >= count) | (pid_n * BLOCK_N >= width):
        return
    start = tl.load(start_ptr + slot + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    rows = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    b_ptr = tl.load(meta).to(tl.pointer_type(b0_ptr.dtype.element_ty)) + slot * tl.load(meta + 3)
    offset = tl.load(meta + 2)
    s_o = tl.load(meta + 4)
    s_r = tl.load(meta + 5)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    vt = tl.load(v_ptr + sl * stride_vn + rows[:, None] * stride_vt + offs_r[None, :] * stride_vr,
                 mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    bt = tl.load(b_ptr + offs_r[:, None] * s_r + offs_n[None, :] * s_o,
                 mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    # v stays fp32 (never rounded to the weight dtype): the delta is fp32 until the single cast on store.
    delta = tl.dot(vt, bt, input_precision="ieee")
    mask = m_mask[:, None] & n_mask[None, :]
    y_tile = y_ptr + rows[:, None] * stride_yt + (offset + offs_n)[None, :] * stride_yo
    y = tl.load(y_tile, mask=mask, other=0.0)
    tl.store(y_tile, cast_rne(y.to(tl.float32) + delta, y_ptr.dtype.element_ty), mask=mask)


def lora_block_sizes(op: str, n_rows: int, width: int, rank: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_W, BLOCK_R) for op "shrink" (W tiles H) or "expand" (W tiles the slice width).

    Interpreter: cost is programs x loop trips, so one block spans all rows (up to 256) and all of H / O.
    CUDA: 16..64-row tiles (more row tiles when T is large), 64-wide K steps for shrink, up to 128 output
    columns for expand. Untuned here (no GPU on the build machine); chosen deterministically, no autotune.
    """
    block_r = clamp_pow2(rank, 16, 1 << 16)  # whole rank in one tile; tl.dot needs >= 16
    if interpreted():
        return clamp_pow2(n_rows, 16, 256), clamp_pow2(width, 16, 4096), block_r
    block_m = 16 if n_rows <= 64 else 32 if n_rows <= 1024 else 64
    if op == "shrink":
        return block_m, 64 if block_r <= 64 else 32, block_r
    return block_m, clamp_pow2(width, 32, 128), block_r


@functools.lru_cache(maxsize=512)
def _meta_table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    # Keyed by the values it holds, so a reused address with the same shape maps to an identical table.
    return torch.tensor(rows, dtype=torch.int64, device=device)


class TokenGrouping(NamedTuple):
    """Tokens in slot order, as the kernels read them: order[T] (int32 row ids, stable-sorted by slot) and
    per-slot starts[S+1] / counts[S+1] into it; entry 0 is slot -1 (no adapter), slot s is entry s + 1."""

    order: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor


def _group_tokens(slot_ids: torch.Tensor, n_slots: int, n_rows: int) -> TokenGrouping:
    """Stable sort by slot (see TokenGrouping)."""
    if slot_ids.dim() != 1 or slot_ids.shape[0] != n_rows:
        raise ValueError(f"slot_ids must have shape [{n_rows}], got {tuple(slot_ids.shape)}")
    if slot_ids.dtype.is_floating_point or slot_ids.dtype == torch.bool:
        raise ValueError(f"slot_ids must be an integer tensor, got {slot_ids.dtype}")
    s = slot_ids.long()
    if n_rows == 0:
        zeros = torch.zeros(n_slots + 1, dtype=torch.int32, device=s.device)
        return TokenGrouping(s.int(), zeros, zeros.clone())
    lo, hi = torch.stack(torch.aminmax(s)).tolist()  # one host sync; bad ids must be loud, not UB
    if lo < -1 or hi >= n_slots:
        raise ValueError(f"slot_ids must lie in [-1, {n_slots - 1}], got min {lo} max {hi}")
    order = torch.argsort(s, stable=True).to(torch.int32)
    counts = torch.bincount(s + 1, minlength=n_slots + 1)
    starts = torch.cumsum(counts, 0) - counts
    return TokenGrouping(order, starts.to(torch.int32), counts.to(torch.int32))


def _check_slices(name: str, slices: Sequence[torch.Tensor], rank: int | None = None) -> None:
    if len(slices) == 0:
        raise ValueError(f"{name} must hold at least one slice")
    s0 = slices[0]
    for i, t in enumerate(slices):
        if t.dim() != 3 or t.shape[0] != s0.shape[0] or t.dtype != s0.dtype or t.device != s0.device:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} {t.dtype}; expected [S={s0.shape[0]}, "
                             f"., .] {s0.dtype} on {s0.device}")
        if rank is not None and t.shape[2] != rank:
            raise ValueError(f"{name}[{i}] has rank dim {t.shape[2]}, expected {rank}")


def _shrink(x, A_slices, grouping: TokenGrouping) -> torch.Tensor:
    T, H = x.shape
    n, (S, R, H_in) = len(A_slices), A_slices[0].shape
    if any(a.shape != A_slices[0].shape for a in A_slices) or H_in != H or x.device != A_slices[0].device:
        raise ValueError(f"A slices must all be [S, R, H={H}] on {x.device}, got {[tuple(a.shape) for a in A_slices]}"
                         f" on {A_slices[0].device}")
    out = torch.zeros((n, T, R), dtype=torch.float32, device=x.device)
    if T == 0 or S == 0:
        return out
    a_dtype = A_slices[0].dtype
    check_float("x", x)
    check_float("A_slices", A_slices[0])
    fp32 = interpreted() or torch.float32 in (x.dtype, a_dtype) or x.dtype != a_dtype  # interp: bf16 dot is broken
    block_m, block_k, block_r = lora_block_sizes("shrink", T, H, R)
    meta = _meta_table(tuple((a.data_ptr(), *a.stride()) for a in A_slices), x.device)
    grid = (triton.cdiv(T, block_m), n, S)
    _shrink_kernel[grid](x, A_slices[0], meta, out, *grouping, H, R, x.stride(0), x.stride(1), out.stride(0),
                         out.stride(1), FP32=fp32, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r)
    return out


def _offsets(B_slices, y, slice_offsets):
    widths = [b.shape[1] for b in B_slices]
    if slice_offsets is None:
        slice_offsets = [sum(widths[:i]) for i in range(len(widths))]
    slice_offsets = [int(o) for o in slice_offsets]
    if len(slice_offsets) != len(widths):
        raise ValueError(f"{len(slice_offsets)} slice offsets for {len(widths)} B slices")
    for o, w in zip(slice_offsets, widths):
        if o < 0 or o + w > y.shape[1]:
            raise ValueError(f"slice [{o}, {o + w}) does not fit y with {y.shape[1]} columns")
    return slice_offsets


def _expand(v, B_slices, y, slice_offsets, grouping: TokenGrouping) -> torch.Tensor:
    n, T, R = v.shape
    S = B_slices[0].shape[0]
    if T == 0 or S == 0:
        return y
    check_float("B_slices", B_slices[0])
    check_float("y", y)
    max_w = max(b.shape[1] for b in B_slices)
    block_m, block_n, block_r = lora_block_sizes("expand", T, max_w, R)
    meta = _meta_table(tuple((b.data_ptr(), b.shape[1], o, *b.stride()) for b, o in zip(B_slices, slice_offsets)),
                       y.device)
    n_col_tiles = triton.cdiv(max_w, block_n)
    grid = (triton.cdiv(T, block_m) * n_col_tiles, n, S)
    _expand_kernel[grid](v, B_slices[0], meta, y, *grouping, R, n_col_tiles, v.stride(0), v.stride(1), v.stride(2),
                         y.stride(0), y.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)
    return y


def _check_expand(v, B_slices, y):
    if v.dim() != 3 or v.dtype != torch.float32 or v.shape[0] != len(B_slices):
        raise ValueError(f"v must be fp32 [n_slices={len(B_slices)}, T, R], got {tuple(v.shape)} {v.dtype}")
    n, T, R = v.shape
    _check_slices("B_slices", B_slices, R)
    if y.dim() != 2 or y.shape[0] != T or y.device != B_slices[0].device:
        raise ValueError(f"y must be [T={T}, O] on {B_slices[0].device}, got {tuple(y.shape)} on {y.device}")


def lora_shrink(x: torch.Tensor, A_slices: Sequence[torch.Tensor], slot_ids: torch.Tensor) -> torch.Tensor:
    """v[i, t] = A_i[slot_t] @ x[t] in fp32 for each slice i; rows with slot -1 are 0. Returns [n, T, R]."""
    _check_slices("A_slices", A_slices)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
    return _shrink(x, A_slices, _group_tokens(slot_ids, A_slices[0].shape[0], x.shape[0]))


def lora_expand(v: torch.Tensor, B_slices: Sequence[torch.Tensor], slot_ids: torch.Tensor, y: torch.Tensor,
                slice_offsets: Sequence[int] | None = None) -> torch.Tensor:
    """In place: y[t, off_i:off_i+O_i] += B_i[slot_t] @ v[i, t] (fp32 sum, one cast). -1 rows untouched."""
    _check_expand(v, B_slices, y)
    offsets = _offsets(B_slices, y, slice_offsets)
    return _expand(v, B_slices, y, offsets, _group_tokens(slot_ids, B_slices[0].shape[0], y.shape[0]))


def token_grouping(slot_ids: torch.Tensor, n_slots: int) -> TokenGrouping:
    """The grouping `lora_apply(..., grouping=)` accepts: a runtime computes it once per batch and group of
    modules instead of once per module (one host sync, one argsort)."""
    return _group_tokens(slot_ids, n_slots, slot_ids.shape[0])


def lora_apply(x: torch.Tensor, y: torch.Tensor, A_slices: Sequence[torch.Tensor],
               B_slices: Sequence[torch.Tensor], slot_ids: torch.Tensor,
               slice_offsets: Sequence[int] | None = None, grouping: TokenGrouping | None = None) -> torch.Tensor:
    """Shrink then expand with one token grouping; adds the LoRA delta into y in place and returns y.
    `grouping` (from `token_grouping(slot_ids, S)`) skips recomputing it; it must be slot_ids' grouping."""
    _check_slices("A_slices", A_slices)
    _check_slices("B_slices", B_slices, A_slices[0].shape[1])
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x [T, H] and y [T, O] must share T, got {tuple(x.shape)} and {tuple(y.shape)}")
    if B_slices[0].shape[0] != A_slices[0].shape[0]:
        raise ValueError(f"A has {A_slices[0].shape[0]} slots, B has {B_slices[0].shape[0]}")
    offsets = _offsets(B_slices, y, slice_offsets)  # validated before any work
    if grouping is None:
        grouping = _group_tokens(slot_ids, A_slices[0].shape[0], x.shape[0])
    elif grouping.order.shape[0] != x.shape[0]:
        raise ValueError(f"grouping was computed for {grouping.order.shape[0]} rows, x has {x.shape[0]}")
    v = _shrink(x, A_slices, grouping)
    _check_expand(v, B_slices, y)
    return _expand(v, B_slices, y, offsets, grouping)


# ---- pure-torch twins (the oracles): per-slot gather + matmul, fp32 accumulation ----

def lora_shrink_torch(x: torch.Tensor, A_slices: Sequence[torch.Tensor], slot_ids: torch.Tensor) -> torch.Tensor:
    n, R = len(A_slices), A_slices[0].shape[1]
    out = torch.zeros((n, x.shape[0], R), dtype=torch.float32, device=x.device)
    for s in slot_ids[slot_ids >= 0].unique().tolist():
        rows = (slot_ids == s).nonzero().squeeze(1)
        for i, a in enumerate(A_slices):
            out[i, rows] = x[rows].float() @ a[s].float().T
    return out


def lora_expand_torch(v: torch.Tensor, B_slices: Sequence[torch.Tensor], slot_ids: torch.Tensor, y: torch.Tensor,
                      slice_offsets: Sequence[int] | None = None) -> torch.Tensor:
    offsets = _offsets(B_slices, y, slice_offsets)
    for s in slot_ids[slot_ids >= 0].unique().tolist():
        rows = (slot_ids == s).nonzero().squeeze(1)
        for i, (b, o) in enumerate(zip(B_slices, offsets)):
            cols = slice(o, o + b.shape[1])
            y[rows, cols] = (y[rows, cols].float() + v[i, rows] @ b[s].float().T).to(y.dtype)
    return y


def lora_apply_torch(x: torch.Tensor, y: torch.Tensor, A_slices: Sequence[torch.Tensor],
                     B_slices: Sequence[torch.Tensor], slot_ids: torch.Tensor,
                     slice_offsets: Sequence[int] | None = None, grouping: TokenGrouping | None = None) -> torch.Tensor:
    """Twin of lora_apply (`grouping` accepted for a common signature; the twin groups by itself)."""
    return lora_expand_torch(lora_shrink_torch(x, A_slices, slot_ids), B_slices, slot_ids, y, slice_offsets)


# ---- specs: one per op (the bench case, the CSV rows and the tests use these names) ----

def _lora_sample(op: str):
    def sample(p: dict, device: torch.device):
        T, H, Ow, n, r, s = p["T"], p["H"], p["O"], p["n_adapters"], p["rank"], p["slices"]
        dt = DTYPES[p["dtype"]]
        g = seeded()
        S = n + 1  # the last slot is never used: a kernel must not read past the active ones
        x = torch.randn(T, H, generator=g).to(device, dt)
        A = [(torch.randn(S, r, H, generator=g) / math.sqrt(H)).to(device, dt) for _ in range(s)]
        B = [(torch.randn(S, Ow, r, generator=g) / (4 * math.sqrt(r))).to(device, dt) for _ in range(s)]
        # every token carries an adapter; adapters interleave as in a mixed batch
        slots = (torch.arange(T) % n)[torch.randperm(T, generator=g)].to(torch.int32).to(device)
        y = torch.zeros(T, s * Ow, dtype=dt, device=device)
        if op == "shrink":
            return (x, A, slots), {}
        if op == "expand":
            v = torch.randn(s, T, r, generator=seeded(1)).to(device)
            return (v, B, slots, y), {}
        return (x, y, A, B, slots), {}
    return sample


def lora_shrink_work(p: dict) -> tuple[float, float]:
    """x[T,H] . A[H,r] per slice: 2THr flops; bytes e·T·H (x read once across slices) + per slice e·n·H·r
    (the n adapters' A) + 4·T·r (the fp32 intermediate written)."""
    T, H, n, r, s, e = p["T"], p["H"], p["n_adapters"], p["rank"], p["slices"], ELEM[p["dtype"]]
    return e * T * H + s * (e * n * H * r + 4.0 * T * r), 2.0 * T * H * r * s


def lora_expand_work(p: dict) -> tuple[float, float]:
    """y[T,O] += v[T,r] . B[r,O] per slice: 2TrO flops; bytes 4·T·r (v read) + e·n·r·O (B) + 2·e·T·O (y read
    and written)."""
    T, Ow, n, r, s, e = p["T"], p["O"], p["n_adapters"], p["rank"], p["slices"], ELEM[p["dtype"]]
    return s * (4.0 * T * r + e * n * r * Ow + 2.0 * e * T * Ow), 2.0 * T * r * Ow * s


def lora_apply_work(p: dict) -> tuple[float, float]:
    """Shrink + expand as two launches: the fp32 intermediate is written and read back."""
    b1, f1 = lora_shrink_work(p)
    b2, f2 = lora_expand_work(p)
    return b1 + b2, f1 + f2


# Kernel vs twin, max |err| <= rel * max |twin|. fp32: only fp32 summation order differs (over H for shrink,
# over R for expand): ~1e-6 relative observed, 1e-5 leaves headroom without hiding a wrong index (errors
# ~O(1)). fp16 / bf16: both sides round one fp32 value once; an order difference can flip that rounding by
# one ulp at the largest element: 2^-10 ~ 9.8e-4 -> 2e-3 (fp16), 2^-7 ~ 7.8e-3 -> 1e-2 (bf16).
LORA_REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
_LORA_PARAMS = ("dtype", "T", "H", "O", "n_adapters", "rank", "slices")
_LORA_GPU = dict(dtype="bf16", T=4096, H=4096, O=4096, n_adapters=4, rank=16, slices=1)
_LORA_GPU_AXES = dict(T=[1, 16, 128, 1024, 16384], n_adapters=[1, 8, 16, 32], rank=[8, 32, 64, 128], slices=[3],
                      dtype=["fp16"])
LORA_SWEEPS = {
    # fp16: the one smoke point vLLM's kernels run at on CPU (fp32 is refused by vLLM, bf16 by the interpreter)
    "smoke": Sweep(dict(dtype="fp32", T=64, H=64, O=64, n_adapters=2, rank=8, slices=1),
                   dict(T=[16, 256], n_adapters=[4], rank=[16], slices=[3], dtype=["fp16"])),
    "nightly": Sweep(_LORA_GPU, _LORA_GPU_AXES),
    "full": Sweep(_LORA_GPU, _LORA_GPU_AXES, dict(T=[1, 16, 128, 1024, 4096, 16384], n_adapters=[1, 4, 8, 16, 32],
                                                 rank=[8, 16, 64, 128])),
}


def _lora_spec(op: str, fn, twin, work) -> KernelSpec:
    return KernelSpec(f"lora_{op}", fn, twin, _lora_sample(op), work, lambda p: p["T"], LORA_REL_TOL,
                      LORA_SWEEPS, family="lora", params=_LORA_PARAMS)


SPECS = (
    _lora_spec("shrink", lora_shrink, lora_shrink_torch, lora_shrink_work),
    _lora_spec("expand", lora_expand, lora_expand_torch, lora_expand_work),
    _lora_spec("apply", lora_apply, lora_apply_torch, lora_apply_work),
)
