"""Multi-LoRA shrink / expand (Punica-style segmented GEMM) as Triton ops, with pure-torch twins.

Shapes (S = adapter slots, R = r_max, ranks zero-padded; alpha/r already folded into B by the caller):
  lora_shrink(x[T,H], A_slices: n x [S,R,H], slot_ids[T])            -> v fp32 [n,T,R]  (-1 rows: 0)
  lora_expand(v[n,T,R], B_slices: n x [S,O_i,R], slot_ids, y[T,sum O_i], slice_offsets)  y[:, off_i:+O_i] += v_i B_i^T
  lora_apply(x, y, A_slices, B_slices, slot_ids, ...)                 both, two launches, v never leaves fp32

Rows are visited slot by slot through the batch's token grouping and tile schedule
(runtime/kernels/lora_grouping.py); the -1 rows are never visited. The specs (bench samples, bytes / flops,
tolerances) are in runtime/kernels/lora_specs.py.

Shrink: each program multiplies a tile of rows by its slot's A over a range of H (split-K). With one split
it writes v directly; with more, each split writes an fp32 partial into a workspace [split, n, T, R] indexed
by sorted position (no atomics), and the partials are summed in a fixed order (k = 0, 1, ...): by
`lora_apply`'s expand as it loads v, or by a small reduce launch for the public `lora_shrink`. Results are
bitwise reproducible run to run.

Expand on tensor cores with near-fp32 accuracy: v (fp32) is split into v_hi = rne(v) and v_lo = rne(v - v_hi)
in the weights' 16-bit type, and y's delta is dot(v_hi, B) + dot(v_lo, B) with fp32 accumulation. Products
of two 16-bit values are exact in fp32, so the only new error is v's representation, |v - v_hi - v_lo| <=
2^-16 |v| for bf16 (8-bit significands twice). fp16 has a narrow exponent range, so fp16 rows are first
scaled by a power of two that brings their largest |v| into [1, 2) (exact; undone on the fp32 delta);
the split then keeps about 22 bits. fp32 weights use an IEEE fp32 dot (the fp32 path stays fp32-exact).
Under the Triton interpreter tl.dot on bf16 is wrong, so there the same rounded v_hi / v_lo and B are
upcast to fp32 and multiplied with IEEE dots: the same products, only the fp32 summation order differs.
Each program keeps its v tile (split into hi / lo once) in registers while it walks its share of the
slice's column tiles.

Launch configurations come per shape bucket from stored tables (runtime/kernels/lora_config.py).
One slice (the runtime's case) passes its pointer and strides as arguments; several slices (packed q/k/v,
unequal widths, one launch) read (pointer, width, offset, slot stride) from a small device table cached
per (pointers, shapes), built on the first call (capture CUDA graphs after a warm-up call).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from runtime.kernels import lora_config
from runtime.kernels._util import cast_rne, check_float, clamp_pow2, interpreted
from runtime.kernels.lora_config import ExpandConfig, ShrinkConfig
from runtime.kernels.lora_grouping import TokenGrouping, block_s, grouping_for, tile_grid, tile_rows

# expand's dot modes (constexpr MODE)
IEEE_FP32, HI_LO, HI_LO_EMULATED = 0, 1, 2


@triton.jit
def _sum_partials(ws_ptr, idx, sl, offs_r, mask, stride_k, stride_n, stride_t, SPLIT: tl.constexpr):
    """v at rows `idx` of slice `sl`: the SPLIT split-K partials added in a fixed order, k = 0, 1, ..."""
    ptrs = ws_ptr + sl * stride_n + idx.to(tl.int64)[:, None] * stride_t + offs_r[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for k in tl.static_range(1, SPLIT):
        acc += tl.load(ptrs + k * stride_k, mask=mask, other=0.0)
    return acc


# ----------------------------------------------------------------------------- shrink
# Addressing: the innermost dims are contiguous where the compiler can see it, so loads vectorise (16-byte
# accesses) instead of one element per instruction: A's H (and B's R) is made contiguous on the host, x's
# and y's are constexpr flags (X_UNIT / Y_UNIT); one slice (the runtime's case) takes its base pointer and
# strides as arguments (Triton specialises their alignment), several slices read them from the device table
# and, when the host has checked 16-byte alignment (ALIGNED), say so with tl.multiple_of.
@triton.jit
def _shrink_kernel(x_ptr, a_ptr, meta_ptr, out_ptr, order_ptr, start_ptr, count_ptr,
                   H, R, n_slots, k_span, stride_xt, stride_xh, stride_as, stride_ar, stride_ok, stride_on, stride_ot,
                   OUT_SORTED: tl.constexpr, FP32: tl.constexpr, X_UNIT: tl.constexpr, MULTI: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    pid_k = tl.program_id(1)
    sl = tl.program_id(2)
    slot, pos, m_mask, rows, valid = tile_rows(tl.program_id(0), order_ptr, start_ptr, count_ptr, n_slots,
                                                BLOCK_M, BLOCK_S)
    if not valid:
        return
    if MULTI:  # slice sl's A from the table (all slices share shape and strides)
        a_base = tl.load(meta_ptr + sl).to(tl.pointer_type(a_ptr.dtype.element_ty))
        if ALIGNED:
            a_base = tl.multiple_of(a_base, 16)
    else:
        a_base = a_ptr
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    a_rows = a_base + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar
    x_rows = x_ptr + rows[:, None] * stride_xt
    k_lo = pid_k * k_span
    k_hi = tl.minimum(k_lo + k_span, H)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        if X_UNIT:
            xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        else:
            xt = tl.load(x_rows + offs_k[None, :] * stride_xh, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_rows + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if FP32:  # fp32 operands use IEEE fp32 (no TF32 on CUDA): the fp32 path must stay fp32-exact
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(xt, at, acc)
    mask = m_mask[:, None] & r_mask[None, :]
    if OUT_SORTED:  # split-K partial (or lora_apply's v) at sorted positions: contiguous rows per tile
        tl.store(out_ptr + pid_k * stride_ok + sl * stride_on + pos.to(tl.int64)[:, None] * stride_ot
                 + offs_r[None, :], acc, mask=mask)
    else:
        tl.store(out_ptr + sl * stride_on + rows[:, None] * stride_ot + offs_r[None, :], acc, mask=mask)


@triton.jit
def _reduce_kernel(ws_ptr, out_ptr, order_ptr, start_ptr, count_ptr, R, n_slots, stride_wk, stride_wn,
                   stride_wt, stride_on, stride_ot, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    sl = tl.program_id(1)
    slot, pos, m_mask, rows, valid = tile_rows(tl.program_id(0), order_ptr, start_ptr, count_ptr, n_slots,
                                                BLOCK_M, BLOCK_S)
    if not valid:
        return
    offs_r = tl.arange(0, BLOCK_R)
    mask = m_mask[:, None] & (offs_r < R)[None, :]
    v = _sum_partials(ws_ptr, pos, sl, offs_r, mask, stride_wk, stride_wn, stride_wt, SPLIT)
    tl.store(out_ptr + sl * stride_on + rows[:, None] * stride_ot + offs_r[None, :], v, mask=mask)


# ----------------------------------------------------------------------------- expand
@triton.jit
def _expand_kernel(v_ptr, b_ptr, meta_ptr, y_ptr, order_ptr, start_ptr, count_ptr,
                   R, n_slots, width0, offset0, stride_bs, stride_bo, stride_vk, stride_vn, stride_vt,
                   stride_yt, stride_yo, SPLIT: tl.constexpr, V_SORTED: tl.constexpr, MODE: tl.constexpr,
                   SCALE_ROWS: tl.constexpr, Y_UNIT: tl.constexpr, MULTI: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_S: tl.constexpr, COL_SPLIT: tl.constexpr):
    pid_n = tl.program_id(1)
    sl = tl.program_id(2)
    slot, pos, m_mask, rows, valid = tile_rows(tl.program_id(0), order_ptr, start_ptr, count_ptr, n_slots,
                                                BLOCK_M, BLOCK_S)
    if not valid:
        return
    b_ty: tl.constexpr = b_ptr.dtype.element_ty
    if MULTI:  # slice sl's (pointer, width, offset into y, slot stride) from the table
        meta = meta_ptr + sl * 4
        width = tl.load(meta + 1)
        offset = tl.load(meta + 2)
        b_slot = tl.load(meta).to(tl.pointer_type(b_ty)) + slot.to(tl.int64) * tl.load(meta + 3)
        if ALIGNED:  # (the width too: a mask that may change inside 8 columns stops 16-byte accesses)
            b_slot = tl.multiple_of(b_slot, 16)
            offset = tl.multiple_of(offset, 8)
            width = tl.multiple_of(width, 8)
    else:
        width = width0
        offset = offset0
        b_slot = b_ptr + slot.to(tl.int64) * stride_bs
    n_tiles = (width + BLOCK_N - 1) // BLOCK_N  # (not tl.cdiv: the interpreter pays per nested jit call)
    per = (n_tiles + COL_SPLIT - 1) // COL_SPLIT
    c_lo = pid_n * per
    c_hi = tl.minimum(c_lo + per, n_tiles)
    if c_lo >= c_hi:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    v_mask = m_mask[:, None] & r_mask[None, :]
    # lora_apply's workspace holds split-K partials at sorted positions; lora_expand's v is one "partial" by row id
    v = _sum_partials(v_ptr, pos if V_SORTED else rows, sl, offs_r, v_mask, stride_vk, stride_vn, stride_vt, SPLIT)
    if SCALE_ROWS:  # fp16: bring each row's max |v| into [1, 2) by an exact power of two
        e = (tl.max(tl.abs(v), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF
        e = tl.minimum(tl.maximum(e, 1), 253)
        v = v * ((254 - e) << 23).to(tl.float32, bitcast=True)[:, None]
        unscale = (e << 23).to(tl.float32, bitcast=True)
    if MODE != 0:
        v_hi = cast_rne(v, b_ty)
        v_lo = cast_rne(v - v_hi.to(tl.float32), b_ty)
        if MODE == 2:  # interpreter: the same rounded values, IEEE fp32 dots
            v_hi = v_hi.to(tl.float32)
            v_lo = v_lo.to(tl.float32)
    b_cols = b_slot + offs_r[:, None]
    y_rows = y_ptr + rows[:, None] * stride_yt
    for c in range(c_lo, c_hi):
        offs_n = c * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < width
        bt = tl.load(b_cols + offs_n[None, :] * stride_bo, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if MODE == 0:
            delta = tl.dot(v, bt.to(tl.float32), input_precision="ieee")
        elif MODE == 1:
            delta = tl.dot(v_hi, bt)
            delta = tl.dot(v_lo, bt, delta)
        else:
            b32 = bt.to(tl.float32)
            delta = tl.dot(v_hi, b32, input_precision="ieee")
            delta = tl.dot(v_lo, b32, delta, input_precision="ieee")
        if SCALE_ROWS:
            delta = delta * unscale[:, None]
        mask = m_mask[:, None] & n_mask[None, :]
        if Y_UNIT:
            y_tile = y_rows + (offset + offs_n)[None, :]
        else:
            y_tile = y_rows + (offset + offs_n)[None, :] * stride_yo
        y = tl.load(y_tile, mask=mask, other=0.0)
        # the delta stays fp32 until the single rounding into y's type
        if y_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(y_tile, cast_rne(y.to(tl.float32) + delta, tl.bfloat16), mask=mask)
        else:
            tl.store(y_tile, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host side
@functools.lru_cache(maxsize=512)
def _meta_table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    # Keyed by the values it holds, so a reused address with the same shape maps to an identical table.
    # Built on the first call with these tensors: capture a CUDA graph after one warm-up call.
    return torch.tensor(rows, dtype=torch.int64, device=device)


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


def _aligned(ptrs: Sequence[int], ints: Sequence[int] = ()) -> bool:
    """Every pointer 16-byte aligned and every offset a multiple of 8 elements: what the kernels' multiple_of
    hints promise the compiler (a false promise would be wrong code, so it is checked, not assumed)."""
    return all(p % 16 == 0 for p in ptrs) and all(i % 8 == 0 for i in ints)


def _unit_last(ts: Sequence[torch.Tensor], shared: tuple[int, ...]) -> list[torch.Tensor]:
    """Slices with a contiguous last dim (the kernels index it without a stride) and equal strides along the
    `shared` dims (passed once for all slices); the slot tables already are, a strided view is copied."""
    out = [t if t.stride(-1) == 1 else t.contiguous() for t in ts]
    if len({tuple(t.stride(d) for d in shared) for t in out}) > 1:
        out = [t.contiguous() for t in out]
        if len({tuple(t.stride(d) for d in shared) for t in out}) > 1:
            raise ValueError(f"slices with shapes {[tuple(t.shape) for t in out]} cannot share strides {shared}")
    return out


def _shrink_launch(x, A_slices, grouping: TokenGrouping, sorted_out: bool) -> tuple[torch.Tensor, int]:
    """Launch shrink. sorted_out: v (or its split-K partials) at sorted positions in a workspace
    [split, n, T, R] (no zeroing: only active rows are ever read). Else v [n, T, R] by row id, -1 rows 0.
    Returns (tensor, split)."""
    T, H = x.shape
    A_slices = _unit_last(A_slices, (0, 1))  # stride_as, stride_ar: one pair for all slices
    n, (S, R, _) = len(A_slices), A_slices[0].shape
    a_dtype = A_slices[0].dtype
    fp32 = interpreted() or torch.float32 in (x.dtype, a_dtype) or x.dtype != a_dtype  # interp: bf16 dot is broken
    cfg: ShrinkConfig = lora_config.shrink_config(T, H, R, n, a_dtype, x.device)
    block_r = clamp_pow2(R, 16, 1 << 16)
    k_steps = triton.cdiv(H, cfg.block_k)
    k_span = triton.cdiv(k_steps, min(cfg.split_k, k_steps)) * cfg.block_k
    split = triton.cdiv(H, k_span)  # no empty split: every partial the readers sum is written
    if sorted_out:
        out = torch.empty((split, n, T, R), dtype=torch.float32, device=x.device)
    else:
        out = torch.zeros((n, T, R), dtype=torch.float32, device=x.device)
        if split > 1:
            ws = torch.empty((split, n, T, R), dtype=torch.float32, device=x.device)
    dst = out if (sorted_out or split == 1) else ws
    ptrs = tuple(a.data_ptr() for a in A_slices)
    meta = _meta_table((ptrs,), x.device) if n > 1 else A_slices[0]  # one slice: no table (unused argument)
    grid = (tile_grid(T, cfg.block_m, S, grouping), split, n)
    strides = (dst.stride(0), dst.stride(1), dst.stride(2)) if dst.dim() == 4 else (0, dst.stride(0), dst.stride(1))
    a0 = A_slices[0]
    _shrink_kernel[grid](x, a0, meta, dst, *grouping, H, R, S, k_span, x.stride(0), x.stride(1), a0.stride(0),
                         a0.stride(1), *strides, OUT_SORTED=dst.dim() == 4, FP32=fp32, X_UNIT=x.stride(1) == 1,
                         MULTI=n > 1, ALIGNED=_aligned(ptrs), BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
                         BLOCK_R=block_r, BLOCK_S=block_s(S), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not sorted_out and split > 1:
        _reduce_kernel[(tile_grid(T, cfg.block_m, S, grouping), n)](
            ws, out, *grouping, R, S, ws.stride(0), ws.stride(1), ws.stride(2), out.stride(0), out.stride(1),
            SPLIT=split, BLOCK_M=cfg.block_m, BLOCK_R=block_r, BLOCK_S=block_s(S))
    return out, split


def _check_shrink(x, A_slices) -> None:
    _check_slices("A_slices", A_slices)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
    H = x.shape[1]
    if any(a.shape != A_slices[0].shape for a in A_slices) or A_slices[0].shape[2] != H or \
            x.device != A_slices[0].device:
        raise ValueError(f"A slices must all be [S, R, H={H}] on {x.device}, got {[tuple(a.shape) for a in A_slices]}"
                         f" on {A_slices[0].device}")
    check_float("x", x)
    check_float("A_slices", A_slices[0])


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


def _expand_launch(v, split: int, sorted_v: bool, B_slices, y, slice_offsets, grouping: TokenGrouping
                   ) -> torch.Tensor:
    """v: [split, n, T, R] at sorted positions (sorted_v) or [n, T, R] by row id."""
    T = y.shape[0]
    B_slices = _unit_last(B_slices, (1,))  # stride_bo shared; each slot stride is in the table
    n, S, R = len(B_slices), B_slices[0].shape[0], B_slices[0].shape[2]
    if v.stride(-1) != 1:
        v = v.contiguous()
    b_dtype = B_slices[0].dtype
    max_w = max(b.shape[1] for b in B_slices)
    cfg: ExpandConfig = lora_config.expand_config(T, max_w, R, n, b_dtype, y.device)
    mode = IEEE_FP32 if b_dtype == torch.float32 else HI_LO_EMULATED if interpreted() else HI_LO
    rows = tuple((b.data_ptr(), b.shape[1], o, b.stride(0)) for b, o in zip(B_slices, slice_offsets))
    e = b_dtype.itemsize
    aligned = _aligned([b.data_ptr() for b in B_slices], [*slice_offsets, *(b.shape[1] for b in B_slices)]) and \
        all(b.stride(0) * e % 16 == 0 for b in B_slices)
    meta = _meta_table(rows, y.device) if n > 1 else B_slices[0]
    col_split = min(cfg.col_split, triton.cdiv(max_w, cfg.block_n))
    vs = v.stride()[:3] if sorted_v else (0, *v.stride()[:2])
    b0 = B_slices[0]
    grid = (tile_grid(T, cfg.block_m, S, grouping), col_split, n)
    _expand_kernel[grid](v, b0, meta, y, *grouping, R, S, b0.shape[1], slice_offsets[0], b0.stride(0), b0.stride(1),
                         *vs, y.stride(0), y.stride(1), SPLIT=split, V_SORTED=sorted_v, MODE=mode,
                         SCALE_ROWS=b_dtype == torch.float16, Y_UNIT=y.stride(1) == 1, MULTI=n > 1, ALIGNED=aligned,
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=clamp_pow2(R, 16, 1 << 16),
                         BLOCK_S=block_s(S), COL_SPLIT=col_split, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)
    return y


def _check_expand(v, B_slices, y):
    if v.dim() != 3 or v.dtype != torch.float32 or v.shape[0] != len(B_slices):
        raise ValueError(f"v must be fp32 [n_slices={len(B_slices)}, T, R], got {tuple(v.shape)} {v.dtype}")
    n, T, R = v.shape
    _check_slices("B_slices", B_slices, R)
    if y.dim() != 2 or y.shape[0] != T or y.device != B_slices[0].device:
        raise ValueError(f"y must be [T={T}, O] on {B_slices[0].device}, got {tuple(y.shape)} on {y.device}")
    check_float("B_slices", B_slices[0])
    check_float("y", y)


def lora_shrink(x: torch.Tensor, A_slices: Sequence[torch.Tensor], slot_ids: torch.Tensor,
                grouping: TokenGrouping | None = None) -> torch.Tensor:
    """v[i, t] = A_i[slot_t] @ x[t] in fp32 for each slice i; rows with slot -1 are 0. Returns [n, T, R].
    `grouping` (from `token_grouping(slot_ids, S)`) skips building it."""
    _check_shrink(x, A_slices)
    S = A_slices[0].shape[0]
    grouping = grouping_for(slot_ids, S, x.shape[0], grouping)
    if x.shape[0] == 0 or S == 0:
        return torch.zeros((len(A_slices), x.shape[0], A_slices[0].shape[1]), dtype=torch.float32, device=x.device)
    return _shrink_launch(x, A_slices, grouping, sorted_out=False)[0]


def lora_expand(v: torch.Tensor, B_slices: Sequence[torch.Tensor], slot_ids: torch.Tensor, y: torch.Tensor,
                slice_offsets: Sequence[int] | None = None, grouping: TokenGrouping | None = None) -> torch.Tensor:
    """In place: y[t, off_i:off_i+O_i] += B_i[slot_t] @ v[i, t] (fp32 sum, one cast). -1 rows untouched."""
    _check_expand(v, B_slices, y)
    offsets = _offsets(B_slices, y, slice_offsets)
    S = B_slices[0].shape[0]
    grouping = grouping_for(slot_ids, S, y.shape[0], grouping)
    if y.shape[0] == 0 or S == 0:
        return y
    return _expand_launch(v, 1, False, B_slices, y, offsets, grouping)


def lora_apply(x: torch.Tensor, y: torch.Tensor, A_slices: Sequence[torch.Tensor],
               B_slices: Sequence[torch.Tensor], slot_ids: torch.Tensor,
               slice_offsets: Sequence[int] | None = None, grouping: TokenGrouping | None = None) -> torch.Tensor:
    """Shrink then expand with one token grouping (two launches); adds the LoRA delta into y in place and
    returns y. `grouping` (from `token_grouping(slot_ids, S)`) skips recomputing it; it must be slot_ids'."""
    _check_shrink(x, A_slices)
    _check_slices("B_slices", B_slices, A_slices[0].shape[1])
    if y.dim() != 2 or x.shape[0] != y.shape[0] or y.device != x.device:
        raise ValueError(f"x [T, H] and y [T, O] must share T and device, got {tuple(x.shape)} and {tuple(y.shape)}")
    if B_slices[0].shape[0] != A_slices[0].shape[0] or len(B_slices) != len(A_slices):
        raise ValueError(f"A has {len(A_slices)} slices of {A_slices[0].shape[0]} slots, B {len(B_slices)} of "
                         f"{B_slices[0].shape[0]}")
    check_float("B_slices", B_slices[0])
    check_float("y", y)
    offsets = _offsets(B_slices, y, slice_offsets)  # validated before any work
    S = A_slices[0].shape[0]
    grouping = grouping_for(slot_ids, S, x.shape[0], grouping)
    if x.shape[0] == 0 or S == 0:
        return y
    ws, split = _shrink_launch(x, A_slices, grouping, sorted_out=True)
    return _expand_launch(ws, split, True, B_slices, y, offsets, grouping)


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
