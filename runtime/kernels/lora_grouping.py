"""Token grouping: the per-batch object the LoRA kernels read, built once per batch and group of modules,
and the tile schedule the kernels derive from it.

Grouping (`token_grouping`, on the device, no host sync): a stable counting sort of the rows by slot, in two
launches of a Triton kernel. Group 0 holds the -1 rows (no adapter), group s + 1 slot s, and group S + 1
every row whose id lies outside [-1, S-1]: those rows are never scheduled, so a bad id can never make a
kernel read or write out of bounds. The public eager calls validate (one host read of that last count); the
runtime validates the ids on the host where it builds the mapping (python ints) and skips the read, so every
LoRA call of a batch can be captured in a CUDA graph.

Tile schedule: the programs along grid axis 0 walk the (slot, row tile) pairs of the active slots in slot
order; program p finds its pair from the per-slot counts (tiles_s = ceil(count_s / BLOCK_M), a cumulative
sum over the S counts in registers, `tile_rows`), so the schedule costs no launch and each kernel keeps
its own BLOCK_M. The grid is min(T, ceil(T / BLOCK_M) + S - 1) programs along that axis, the most tiles any
grouping can have; programs past the last tile exit at once (under the interpreter, where they are costly and
the counts are on the host, the grid is the exact tile count). The -1 rows are never visited.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from runtime.kernels import lora_config
from runtime.kernels._util import SUM, interpreted, next_pow2


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


# ----------------------------------------------------------------------------- host side
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


def grouping_for(slot_ids: torch.Tensor, n_slots: int, n_rows: int, grouping: TokenGrouping | None
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


# ----------------------------------------------------------------------------- the tile schedule
@triton.jit
def tile_rows(pid, order_ptr, start_ptr, count_ptr, n_slots, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
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


def _tile_bound(T: int, block_m: int, n_slots: int) -> int:
    """The most tiles a grouping can have: sum_s ceil(c_s / BLOCK_M) over at most S slots with sum_s c_s <= T
    is at most ceil(T / BLOCK_M) + S - 1, and never more than T (each tile holds a row)."""
    return max(1, min(T, triton.cdiv(T, block_m) + n_slots - 1))


def tile_grid(T: int, block_m: int, n_slots: int, grouping: TokenGrouping) -> int:
    """Programs along the tile axis: the bound (no host sync on a GPU; programs past the last tile exit).

    Under the interpreter the grid is the exact tile count instead: the counts already sit in host memory
    (reading them is no device sync), and each program past the last tile costs as much as a small real one
    there (~30 ms of `tile_rows`; with 8 slots and one active they were most of a correctness run's time).
    A forced config (the tuner, the tests of the kernel's paths) keeps the bound, so programs that exit still
    run and nothing is read back."""
    if interpreted() and not lora_config.is_forced():
        tiles = (grouping.counts[1:n_slots + 1].long() + block_m - 1) // block_m
        return max(1, int(tiles.sum()))
    return _tile_bound(T, block_m, n_slots)


def block_s(n_slots: int) -> int:
    return max(2, next_pow2(n_slots))
