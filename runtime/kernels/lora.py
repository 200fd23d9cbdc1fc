"""Multi-LoRA shrink / expand (Punica-style segmented GEMM) as Triton ops, with pure-torch twins.

Shapes (S = adapter slots, R = r_max, ranks zero-padded; alpha/r already folded into B by the caller):
  lora_shrink(x[T,H], A_slices: n x [S,R,H], slot_ids[T])            -> v fp32 [n,T,R]  (-1 rows: 0)
  lora_expand(v[n,T,R], B_slices: n x [S,O_i,R], slot_ids, y[T,sum O_i], slice_offsets)  y[:, off_i:+O_i] += v_i B_i^T
  lora_apply(x, y, A_slices, B_slices, slot_ids, ...)                 both, two launches, v never leaves fp32

Token grouping (`token_grouping`, built once per batch and group of modules, on the device, no host sync):
a stable counting sort of the rows by slot, in two launches of a Triton kernel. Group 0 holds the -1 rows
(no adapter), group s + 1 slot s, and group S + 1 every row whose id lies outside [-1, S-1]: those rows are
never scheduled, so a bad id can never make a kernel read or write out of bounds. The public eager calls
validate (one host read of that last count); the runtime validates the ids on the host where it builds the
mapping (python ints) and skips the read, so every LoRA call of a batch can be captured in a CUDA graph.

Tile schedule: the programs along grid axis 0 walk the (slot, row tile) pairs of the active slots in slot
order; program p finds its pair from the per-slot counts (tiles_s = ceil(count_s / BLOCK_M), a cumulative
sum over the S counts in registers, `_tile_rows`), so the schedule costs no launch and each kernel keeps
its own BLOCK_M. The grid is min(T, ceil(T / BLOCK_M) + S - 1) programs along that axis, the most tiles any
grouping can have; programs past the last tile exit at once (under the interpreter, where they are costly and
the counts are on the host, the grid is the exact tile count). The -1 rows are never visited.

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

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from runtime.kernels import lora_config
from runtime.kernels._util import SUM, cast_rne, check_float, clamp_pow2, interpreted, next_pow2
from runtime.kernels.lora_config import ExpandConfig, ShrinkConfig
from runtime.kernels.spec import DTYPES, ELEM, KernelSpec, Sweep, Variant, seeded

# expand's dot modes (constexpr MODE)
IEEE_FP32, HI_LO, HI_LO_EMULATED = 0, 1, 2


# ----------------------------------------------------------------------------- token grouping kernels
@triton.jit
def _group_count_kernel(slot_ptr, hist_ptr, T, n_slots, span, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    # program p counts the rows of each group in its span [p * span, (p + 1) * span)
    pid = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    acc = tl.zeros((BLOCK_G,), dtype=tl.int32)
    for i in range(0, span, BLOCK_T):
        offs = pid * span + i + tl.arange(0, BLOCK_T)
        mask = offs < T
        s = tl.load(slot_ptr + offs, mask=mask, other=-1).to(tl.int64)
        g = tl.where((s >= -1) & (s < n_slots), s + 1, n_slots + 1)  # group; S + 1: a bad id
        acc += tl.reduce(((g[:, None] == offs_g[None, :]) & mask[:, None]).to(tl.int32), 0, SUM)  # tl.sum
    tl.store(hist_ptr + pid * BLOCK_G + offs_g, acc)


@triton.jit
def _group_order_kernel(slot_ptr, hist_ptr, order_ptr, start_ptr, count_ptr, T, n_slots, n_prog, span,
                        BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr):
    # Stable placement: a row's position = start of its group + rows of the group in earlier spans + rows of
    # the group earlier in this span. Every program reads all the counts ([n_prog, BLOCK_G] <= 4K).
    pid = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.arange(0, BLOCK_P)
    hist = tl.load(hist_ptr + offs_p[:, None] * BLOCK_G + offs_g[None, :], mask=(offs_p < n_prog)[:, None], other=0)
    total = tl.reduce(hist, 0, SUM)  # tl.sum / tl.cumsum without a nested jit call (see _util.SUM)
    starts = tl.associative_scan(total, 0, SUM) - total
    if pid == 0:
        g_mask = offs_g < n_slots + 2
        tl.store(count_ptr + offs_g, total, mask=g_mask)
        tl.store(start_ptr + offs_g, starts, mask=g_mask)
    base = starts + tl.reduce(tl.where((offs_p < pid)[:, None], hist, 0), 0, SUM)
    for i in range(0, span, BLOCK_T):
        offs = pid * span + i + tl.arange(0, BLOCK_T)
        mask = offs < T
        s = tl.load(slot_ptr + offs, mask=mask, other=-1).to(tl.int64)
        g = tl.where((s >= -1) & (s < n_slots), s + 1, n_slots + 1)  # group; S + 1: a bad id
        onehot = ((g[:, None] == offs_g[None, :]) & mask[:, None]).to(tl.int32)
        earlier = tl.reduce((tl.associative_scan(onehot, 0, SUM) - onehot) * onehot, 1, SUM)
        pos = tl.reduce(onehot * base[None, :], 1, SUM) + earlier
        tl.store(order_ptr + pos, offs.to(tl.int32), mask=mask)
        base += tl.reduce(onehot, 0, SUM)


# ----------------------------------------------------------------------------- the tile schedule
@triton.jit
def _tile_rows(pid, order_ptr, start_ptr, count_ptr, n_slots, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program `pid`'s tile: its slot, the rows' sorted positions, their mask, the row ids (int64) and
    whether the program has a tile at all. Tiles run through the slots in order, ceil(count_s / BLOCK_M)
    each (one helper, not two: the interpreter pays per nested call)."""
    offs = tl.arange(0, BLOCK_S)
    counts = tl.load(count_ptr + 1 + offs, mask=offs < n_slots, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    end = tl.associative_scan(tiles, 0, SUM)  # cumulative tiles (tl.cumsum; see _util.SUM)
    slot = tl.reduce((end <= pid).to(tl.int32), 0, SUM)
    row0 = (pid - tl.reduce(tl.where(offs == slot, end - tiles, 0), 0, SUM)) * BLOCK_M
    valid = slot < n_slots
    slot = tl.minimum(slot, n_slots - 1)  # keeps the loads below in bounds for programs that exit
    count = tl.where(valid, tl.load(count_ptr + 1 + slot), 0)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    pos = tl.load(start_ptr + 1 + slot) + offs_m
    rows = tl.load(order_ptr + pos, mask=m_mask, other=0).to(tl.int64)
    return slot, pos, m_mask, rows, valid


@triton.jit
def _sum_partials(ws_ptr, pos, sl, offs_r, mask, stride_k, stride_n, stride_t, SPLIT: tl.constexpr):
    """v at sorted positions `pos`: the split-K partials added in a fixed order, k = 0, 1, ..."""
    ptrs = ws_ptr + sl * stride_n + pos.to(tl.int64)[:, None] * stride_t + offs_r[None, :]
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
    slot, pos, m_mask, rows, valid = _tile_rows(tl.program_id(0), order_ptr, start_ptr, count_ptr, n_slots,
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
    slot, pos, m_mask, rows, valid = _tile_rows(tl.program_id(0), order_ptr, start_ptr, count_ptr, n_slots,
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
                   LO: tl.constexpr, SCALE_ROWS: tl.constexpr, Y_UNIT: tl.constexpr, MULTI: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_S: tl.constexpr, COL_SPLIT: tl.constexpr):
    pid_n = tl.program_id(1)
    sl = tl.program_id(2)
    slot, pos, m_mask, rows, valid = _tile_rows(tl.program_id(0), order_ptr, start_ptr, count_ptr, n_slots,
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
    if V_SORTED:  # lora_apply's workspace: split-K partials at sorted positions, added k = 0, 1, ... (as
        # _sum_partials, inlined: the interpreter pays per nested jit call)
        v_ptrs = v_ptr + sl * stride_vn + pos.to(tl.int64)[:, None] * stride_vt + offs_r[None, :]
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        for k in tl.static_range(1, SPLIT):
            v += tl.load(v_ptrs + k * stride_vk, mask=v_mask, other=0.0)
    else:
        v = tl.load(v_ptr + sl * stride_vn + rows[:, None] * stride_vt + offs_r[None, :], mask=v_mask, other=0.0)
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
            if LO:
                delta = tl.dot(v_lo, bt, delta)
        else:
            b32 = bt.to(tl.float32)
            delta = tl.dot(v_hi, b32, input_precision="ieee")
            if LO:
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


class TokenGrouping(NamedTuple):
    """Tokens in slot order, as the kernels read them: order[T] (int32 row ids, stable-sorted by group) and
    per-group starts[S+2] / counts[S+2] into it; group 0 is slot -1 (no adapter), group s + 1 slot s, and
    group S + 1 the rows whose slot id lies outside [-1, S-1] (never scheduled; 0 for valid ids)."""

    order: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor


def _check_slot_ids(slot_ids: torch.Tensor, n_rows: int | None = None) -> None:
    n = slot_ids.shape[0] if n_rows is None else n_rows
    if slot_ids.dim() != 1 or slot_ids.shape[0] != n:
        raise ValueError(f"slot_ids must have shape [{n}], got {tuple(slot_ids.shape)}")
    if slot_ids.dtype.is_floating_point or slot_ids.dtype.is_complex or slot_ids.dtype == torch.bool:
        raise ValueError(f"slot_ids must be an integer tensor, got {slot_ids.dtype}")


def _group_blocks(T: int, n_slots: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_G, programs, span): each program a span of whole BLOCK_T chunks; the one-hot chunk
    [BLOCK_T, BLOCK_G] and the per-program counts [programs, BLOCK_G] stay at 4K elements (32 per thread
    of 4 warps: no spills at 256 groups, checked for sm_90 in suites/unit/test_kernel_lora_aot.py)."""
    block_g = next_pow2(n_slots + 2)
    block_t = max(16, min(256, 4096 // block_g))
    n_prog = min(64, 4096 // block_g, triton.cdiv(T, block_t))
    span = triton.cdiv(triton.cdiv(T, n_prog), block_t) * block_t
    return block_t, block_g, n_prog, span


MAX_KERNEL_GROUPS = 256  # above this many slots the one-hot would not fit: the torch path sorts instead


def _group_tokens(slot_ids: torch.Tensor, n_slots: int) -> TokenGrouping:
    """Stable counting sort on the device (two launches, no host sync; see TokenGrouping)."""
    T, dev = slot_ids.shape[0], slot_ids.device
    if T == 0 or n_slots + 2 > MAX_KERNEL_GROUPS:
        return token_grouping_torch(slot_ids, n_slots)
    if not slot_ids.is_contiguous():
        slot_ids = slot_ids.contiguous()
    block_t, block_g, n_prog, span = _group_blocks(T, n_slots)
    hist = torch.empty((n_prog, block_g), dtype=torch.int32, device=dev)
    order = torch.empty(T, dtype=torch.int32, device=dev)
    starts = torch.empty(n_slots + 2, dtype=torch.int32, device=dev)
    counts = torch.empty(n_slots + 2, dtype=torch.int32, device=dev)
    _group_count_kernel[(n_prog,)](slot_ids, hist, T, n_slots, span, BLOCK_T=block_t, BLOCK_G=block_g)
    _group_order_kernel[(n_prog,)](slot_ids, hist, order, starts, counts, T, n_slots, n_prog, span,
                                   BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_P=max(2, next_pow2(n_prog)))
    return TokenGrouping(order, starts, counts)


def token_grouping_torch(slot_ids: torch.Tensor, n_slots: int) -> TokenGrouping:
    """Twin of the grouping kernels in torch ops (stable argsort, integer scatter-add: no host sync either)."""
    s = slot_ids.long()
    g = torch.where((s >= -1) & (s < n_slots), s + 1, torch.full_like(s, n_slots + 1))
    order = torch.argsort(g, stable=True).to(torch.int32)
    counts = torch.zeros(n_slots + 2, dtype=torch.int64, device=s.device).scatter_add_(0, g, torch.ones_like(g))
    starts = torch.cumsum(counts, 0) - counts
    return TokenGrouping(order, starts.to(torch.int32), counts.to(torch.int32))


def token_grouping(slot_ids: torch.Tensor, n_slots: int, *, validate: bool = True) -> TokenGrouping:
    """The grouping `lora_apply(..., grouping=)` accepts: a runtime computes it once per batch and group of
    modules instead of once per module. `validate=True` reads back one count (a host sync) and raises on ids
    outside [-1, n_slots-1]; `validate=False` (ids already checked on the host) never syncs, and rows with
    bad ids are then left untouched by every kernel."""
    _check_slot_ids(slot_ids)
    if n_slots < 0:
        raise ValueError(f"n_slots must be >= 0, got {n_slots}")
    grouping = _group_tokens(slot_ids, n_slots)
    if validate and slot_ids.shape[0] and int(grouping.counts[n_slots + 1]) != 0:
        lo, hi = torch.stack(torch.aminmax(slot_ids.long())).tolist()
        raise ValueError(f"slot_ids must lie in [-1, {n_slots - 1}], got min {lo} max {hi}")
    return grouping


def _grouping_for(slot_ids: torch.Tensor, n_slots: int, n_rows: int, grouping: TokenGrouping | None
                  ) -> TokenGrouping:
    if grouping is None:
        _check_slot_ids(slot_ids, n_rows)
        return token_grouping(slot_ids, n_slots)
    if grouping.order.shape[0] != n_rows:
        raise ValueError(f"grouping was computed for {grouping.order.shape[0]} rows, the call has {n_rows}")
    if grouping.counts.shape[0] != n_slots + 2:
        raise ValueError(f"grouping was computed for {grouping.counts.shape[0] - 2} slots, the adapters have "
                         f"{n_slots}")
    return grouping


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


_AS_ON_GPU: list[bool] = []


@contextlib.contextmanager
def launch_as_on_gpu():
    """Inside, the interpreter launches the GPU's grid too (the tile bound, no count read back): for tests of
    the schedule's exits and of the runtime path's freedom from host syncs."""
    _AS_ON_GPU.append(True)
    try:
        yield
    finally:
        _AS_ON_GPU.pop()


def _tile_bound(T: int, block_m: int, n_slots: int) -> int:
    """The most tiles a grouping can have: sum_s ceil(c_s / BLOCK_M) over at most S slots with sum_s c_s <= T
    is at most ceil(T / BLOCK_M) + S - 1, and never more than T (each tile holds a row)."""
    return max(1, min(T, triton.cdiv(T, block_m) + n_slots - 1))


def _tile_grid(T: int, block_m: int, n_slots: int, grouping: TokenGrouping) -> int:
    """Programs along the tile axis: the bound (no host sync on a GPU; programs past the last tile exit).

    Under the interpreter the grid is the exact tile count instead: the counts already sit in host memory
    (reading them is no device sync), and each program past the last tile costs as much as a small real one
    there (~30 ms of `_tile_rows`; with 8 slots and one active they were most of a correctness run's time).
    A forced config (the tests of the kernel's paths) and `launch_as_on_gpu` keep the bound, so programs that
    exit still run and nothing is read back."""
    if interpreted() and not lora_config.is_forced() and not _AS_ON_GPU:
        tiles = (grouping.counts[1:n_slots + 1].long() + block_m - 1) // block_m
        return max(1, int(tiles.sum()))
    return _tile_bound(T, block_m, n_slots)


def _block_s(n_slots: int) -> int:
    return max(2, next_pow2(n_slots))


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
    grid = (_tile_grid(T, cfg.block_m, S, grouping), split, n)
    strides = (dst.stride(0), dst.stride(1), dst.stride(2)) if dst.dim() == 4 else (0, dst.stride(0), dst.stride(1))
    a0 = A_slices[0]
    _shrink_kernel[grid](x, a0, meta, dst, *grouping, H, R, S, k_span, x.stride(0), x.stride(1), a0.stride(0),
                         a0.stride(1), *strides, OUT_SORTED=dst.dim() == 4, FP32=fp32, X_UNIT=x.stride(1) == 1,
                         MULTI=n > 1, ALIGNED=_aligned(ptrs), BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
                         BLOCK_R=block_r, BLOCK_S=_block_s(S), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not sorted_out and split > 1:
        _reduce_kernel[(_tile_grid(T, cfg.block_m, S, grouping), n)](
            ws, out, *grouping, R, S, ws.stride(0), ws.stride(1), ws.stride(2), out.stride(0), out.stride(1),
            SPLIT=split, BLOCK_M=cfg.block_m, BLOCK_R=block_r, BLOCK_S=_block_s(S))
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


def _expand_launch(v, split: int, sorted_v: bool, B_slices, y, slice_offsets, grouping: TokenGrouping,
                   lo: bool = True) -> torch.Tensor:
    """v: [split, n, T, R] at sorted positions (sorted_v) or [n, T, R] by row id. `lo=False` drops v_lo (the
    numerics test's seeded fault: the bound must catch it)."""
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
    grid = (_tile_grid(T, cfg.block_m, S, grouping), col_split, n)
    _expand_kernel[grid](v, b0, meta, y, *grouping, R, S, b0.shape[1], slice_offsets[0], b0.stride(0), b0.stride(1),
                         *vs, y.stride(0), y.stride(1), SPLIT=split, V_SORTED=sorted_v, MODE=mode, LO=lo,
                         SCALE_ROWS=b_dtype == torch.float16, Y_UNIT=y.stride(1) == 1, MULTI=n > 1, ALIGNED=aligned,
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=clamp_pow2(R, 16, 1 << 16),
                         BLOCK_S=_block_s(S), COL_SPLIT=col_split, num_warps=cfg.num_warps,
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
    grouping = _grouping_for(slot_ids, S, x.shape[0], grouping)
    if x.shape[0] == 0 or S == 0:
        return torch.zeros((len(A_slices), x.shape[0], A_slices[0].shape[1]), dtype=torch.float32, device=x.device)
    return _shrink_launch(x, A_slices, grouping, sorted_out=False)[0]


def lora_expand(v: torch.Tensor, B_slices: Sequence[torch.Tensor], slot_ids: torch.Tensor, y: torch.Tensor,
                slice_offsets: Sequence[int] | None = None, grouping: TokenGrouping | None = None) -> torch.Tensor:
    """In place: y[t, off_i:off_i+O_i] += B_i[slot_t] @ v[i, t] (fp32 sum, one cast). -1 rows untouched."""
    _check_expand(v, B_slices, y)
    offsets = _offsets(B_slices, y, slice_offsets)
    S = B_slices[0].shape[0]
    grouping = _grouping_for(slot_ids, S, y.shape[0], grouping)
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
    grouping = _grouping_for(slot_ids, S, x.shape[0], grouping)
    if x.shape[0] == 0 or S == 0:
        return y
    ws, split = _shrink_launch(x, A_slices, grouping, sorted_out=True)
    return _expand_launch(ws, split, True, B_slices, y, offsets, grouping)


def lora_block_sizes(op: str, n_rows: int, width: int, rank: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_W, BLOCK_R) of the config a call on this device gets, W tiling H (shrink) or the slice
    width (expand), at bf16 and one slice (see lora_config for the whole config)."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if op == "shrink":
        cfg = lora_config.shrink_config(n_rows, width, rank, 1, torch.bfloat16, dev)
        return cfg.block_m, cfg.block_k, clamp_pow2(rank, 16, 1 << 16)
    cfg = lora_config.expand_config(n_rows, width, rank, 1, torch.bfloat16, dev)
    return cfg.block_m, cfg.block_n, clamp_pow2(rank, 16, 1 << 16)


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
    # CPU: the interpreter runs each variant (kernel / eager / grouping): T and packed slices only (the
    # unit suites cover adapters and ranks), and fp16: the one dtype vLLM's kernels run at on CPU (fp32 is
    # refused by vLLM, bf16 by the interpreter)
    "smoke": Sweep(dict(dtype="fp32", T=64, H=64, O=64, n_adapters=2, rank=8, slices=1),
                   dict(T=[16, 256], slices=[3], dtype=["fp16"])),
    "nightly": Sweep(_LORA_GPU, _LORA_GPU_AXES),
    "full": Sweep(_LORA_GPU, _LORA_GPU_AXES, dict(T=[1, 16, 128, 1024, 4096, 16384], n_adapters=[1, 4, 8, 16, 32],
                                                 rank=[8, 16, 64, 128])),
}


_SLOTS_ARG = {"shrink": 2, "expand": 2, "apply": 4}  # where slot_ids sit in each op's positional args


def _lora_variants(op: str, fn) -> dict[str, Variant]:
    """kernel: the op with the batch's grouping built beforehand (as the runtime calls it: once per batch
    and group of modules), timed as a CUDA graph replay on GPU (no host work left in the timing);
    eager: the public call, which builds and validates its own grouping (one host read);
    grouping (lora_apply only): the device-built grouping alone, the part `eager` adds per call."""
    k = _SLOTS_ARG[op]

    def kernel(args, kwargs):
        slots, n_slots = args[k], (args[1] if op != "apply" else args[2])[0].shape[0]
        g = token_grouping(slots, n_slots)
        return lambda: fn(*args, **kwargs, grouping=g)

    def grouping(args, kwargs):
        slots, n_slots = args[k], args[2][0].shape[0]
        return lambda: token_grouping(slots, n_slots, validate=False)

    out = {"kernel": Variant(kernel, graph=True, doc="grouping precomputed; CUDA graph replay on GPU"),
           "eager": Variant(lambda args, kwargs: (lambda: fn(*args, **kwargs)), doc="the public call")}
    if op == "apply":
        out["grouping"] = Variant(grouping, graph=True, roofline=False, doc="the token grouping alone")
    return out


def _lora_spec(op: str, fn, twin, work) -> KernelSpec:
    return KernelSpec(f"lora_{op}", fn, twin, _lora_sample(op), work, lambda p: p["T"], LORA_REL_TOL,
                      LORA_SWEEPS, family="lora", params=_LORA_PARAMS, variants=_lora_variants(op, fn))


SPECS = (
    _lora_spec("shrink", lora_shrink, lora_shrink_torch, lora_shrink_work),
    _lora_spec("expand", lora_expand, lora_expand_torch, lora_expand_work),
    _lora_spec("apply", lora_apply, lora_apply_torch, lora_apply_work),
)
