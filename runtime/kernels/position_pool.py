"""Gemma4 vision position-based average pooling (the soft-token pooler), Triton op + torch twin + loop oracle.

Semantics (fixed here, equal to HF `Gemma4VisionPooler._avg_pool_by_positions` whenever HF is right):
  pixel_position_ids[b, n] = (col, row) of patch n, as HF stores it (x first); a patch with a negative
  coordinate is padding and never contributes. For batch row b, Wp = max real col + 1 and
      bin = (row // k) * ceil(Wp / k) + (col // k)
  each real patch lands in exactly one bin, bin value = sum / k^2 (partial bins too, as in HF), and a bin is
  valid iff it holds at least one real patch. HF uses floor(Wp / k) as row stride (transformers 5.23 and
  5.24): when Wp % k != 0 patches from two block rows share a bin or `one_hot` crashes; HF also marks bin 0
  valid for an all-padding row (padding is clamped to (0, 0)). Ours differs from HF exactly there.

Kernel: bins are computed in torch, patches are stable-sorted by (batch, bin) with per-bin counts and
starts, and each program sums the rows of a tile of bins (gather loop, fp32 accumulate, no atomics).

The Gemma4 arch file (`vlm/arch/gemma4.py`) binds this kernel into HF's `Gemma4VisionPooler.forward`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from runtime.kernels._util import cast_rne, clamp_pow2, interpreted
from runtime.kernels.spec import DTYPES, ELEM, KernelSpec, Sweep, seeded


@triton.jit
def _pool_kernel(h_ptr, out_ptr, order_ptr, start_ptr, count_ptr, n_bins, N, D, max_count, scale,
                 stride_hb, stride_hn, stride_hd, stride_ob, stride_od,
                 BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)  # flat (batch, bin) index
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    l_mask = offs_l < n_bins
    d_mask = offs_d < D
    count = tl.load(count_ptr + offs_l, mask=l_mask, other=0)
    start = tl.load(start_ptr + offs_l, mask=l_mask, other=0)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for j in range(0, max_count):
        take = j < count
        idx = tl.load(order_ptr + start + j, mask=take, other=0).to(tl.int64)  # flat (batch, patch) index
        rows = h_ptr + (idx // N) * stride_hb + (idx % N) * stride_hn
        acc += tl.load(rows[:, None] + offs_d[None, :] * stride_hd,
                       mask=take[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_l[:, None].to(tl.int64) * stride_ob + offs_d[None, :] * stride_od,
             cast_rne(acc * scale, out_ptr.dtype.element_ty), mask=l_mask[:, None] & d_mask[None, :])


def _bins(pixel_position_ids: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N] bin per patch with the ceil(Wp / k) row stride; -1 for padding."""
    col, row = pixel_position_ids[..., 0].long(), pixel_position_ids[..., 1].long()
    real = (col >= 0) & (row >= 0)
    wp = torch.where(real, col, -1).amax(dim=1, keepdim=True) + 1  # 0 for an all-padding row
    stride = (wp + k - 1) // k
    return torch.where(real, (row // k) * stride + col // k, -1)


def _check(hidden, pixel_position_ids, k, output_length):
    if hidden.dim() != 3 or pixel_position_ids.shape != (*hidden.shape[:2], 2):
        raise ValueError(f"expected hidden [B, N, D] and positions [B, N, 2], got {tuple(hidden.shape)} and "
                         f"{tuple(pixel_position_ids.shape)}")
    if k < 1 or output_length < 0:
        raise ValueError(f"k must be >= 1 and output_length >= 0, got k={k} output_length={output_length}")


def position_pool(hidden: torch.Tensor, pixel_position_ids: torch.Tensor, k: int,
                  output_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average k x k patch blocks by position: (pooled [B, L, D] in hidden's dtype, valid [B, L] bool)."""
    _check(hidden, pixel_position_ids, k, output_length)
    B, N, D = hidden.shape
    L = output_length
    out = torch.zeros((B, L, D), dtype=hidden.dtype, device=hidden.device)
    if B * N == 0 or L == 0:
        return out, torch.zeros((B, L), dtype=torch.bool, device=hidden.device)
    bins = _bins(pixel_position_ids, k)
    key = torch.where(bins >= 0, torch.arange(B, device=bins.device)[:, None] * L + bins, B * L).flatten()
    counts = torch.bincount(key.clamp(max=B * L), minlength=B * L + 1)[: B * L]
    top_bin, max_count = torch.stack([bins.max(), counts.max()]).tolist()  # one host sync
    if top_bin >= L:
        raise ValueError(f"patch grid needs bin {top_bin} but output_length={L}: the positions do not fit "
                         f"{L} pooled tokens with k={k}")
    order = torch.argsort(key, stable=True).to(torch.int32)
    starts = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    n_bins = B * L
    # interpreter: one program over everything (cost = programs x loop trips); CUDA: 16 bins x 128 channels
    block_l, block_d = (clamp_pow2(n_bins, 1, 1024), clamp_pow2(D, 16, 4096)) if interpreted() else (16, 128)
    grid = (triton.cdiv(n_bins, block_l), triton.cdiv(D, block_d))
    _pool_kernel[grid](hidden, out, order, starts, counts.to(torch.int32), n_bins, N, D, max_count, 1.0 / (k * k),
                       hidden.stride(0), hidden.stride(1), hidden.stride(2), out.stride(1), out.stride(2),
                       BLOCK_L=block_l, BLOCK_D=block_d)
    return out, (counts > 0).view(B, L)


def position_pool_torch(hidden: torch.Tensor, pixel_position_ids: torch.Tensor, k: int,
                        output_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin: scatter-add into bins (fp32), divide by k^2, cast to hidden's dtype."""
    _check(hidden, pixel_position_ids, k, output_length)
    B, N, D = hidden.shape
    bins = _bins(pixel_position_ids, k) if N else torch.zeros((B, 0), dtype=torch.long)
    if bins.numel() and int(bins.max()) >= output_length:
        raise ValueError(f"patch grid needs bin {int(bins.max())} but output_length={output_length}")
    sums = torch.zeros((B, output_length + 1, D), dtype=torch.float32, device=hidden.device)
    idx = torch.where(bins >= 0, bins, output_length)  # padding goes to a spill bin that is dropped
    sums.scatter_add_(1, idx[..., None].expand(B, N, D), hidden.float())
    hits = torch.zeros((B, output_length + 1), dtype=torch.long, device=hidden.device)
    hits.scatter_add_(1, idx, torch.ones_like(idx))
    return (sums[:, :output_length] / (k * k)).to(hidden.dtype), hits[:, :output_length] > 0


def position_pool_bruteforce(hidden: torch.Tensor, pixel_position_ids: torch.Tensor, k: int,
                             output_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent oracle: plain python loops over batch rows and patches, float64 sums."""
    B, N, D = hidden.shape
    sums = [[[0.0] * D for _ in range(output_length)] for _ in range(B)]
    valid = [[False] * output_length for _ in range(B)]
    pos, h = pixel_position_ids.tolist(), hidden.double().tolist()
    for b in range(B):
        real = [(c, r) for c, r in pos[b] if c >= 0 and r >= 0]
        width = max((c for c, _ in real), default=-1) + 1
        per_row = -(-width // k)
        for n in range(N):
            c, r = pos[b][n]
            if c < 0 or r < 0:
                continue
            t = (r // k) * per_row + c // k
            valid[b][t] = True
            for d in range(D):
                sums[b][t][d] += h[b][n][d]
    pooled = torch.tensor(sums, dtype=torch.float64).reshape(B, output_length, D) / (k * k)
    return pooled.to(hidden.dtype), torch.tensor(valid, dtype=torch.bool).reshape(B, output_length)



# ---- spec ----

def _sample(p: dict, device: torch.device):
    B, N, D, k = p["batch"], p["T"], p["H"], p["pool_k"]
    side = math.isqrt(N)
    if side * side != N or side % k:
        raise ValueError(f"position_pool: T={N} patches must be a square grid with a side divisible by k={k}")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([cols.flatten(), rows.flatten()], -1).expand(B, N, 2).contiguous().to(device)
    hidden = torch.randn(B, N, D, generator=seeded()).to(device, DTYPES[p["dtype"]])
    return (hidden, pos, k, N // (k * k)), {}


def position_pool_work(p: dict) -> tuple[float, float]:
    """Reads the patches and their int64 (x, y) positions, writes the pooled tokens; one add per element."""
    B, N, D, k, e = p["batch"], p["T"], p["H"], p["pool_k"], ELEM[p["dtype"]]
    return e * B * N * D + 16.0 * B * N + e * B * (N // (k * k)) * D, float(B * N * D)


# Kernel vs twin, max |err| <= rel * max |twin|: both sum <= k^2 terms in fp32 and scale by 1/k^2, in another
# order: ~1e-7 observed, 1e-6 bound (fp32); one final rounding each can flip by an ulp: 2^-10 -> 2e-3
# (fp16), 2^-7 -> 1e-2 (bf16).
_GPU = dict(dtype="bf16", T=2304, H=1152, batch=8, pool_k=3)
SPECS = (KernelSpec(
    "position_pool", position_pool, position_pool_torch, _sample, position_pool_work,
    lambda p: p["batch"] * p["T"], {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2},
    {"smoke": Sweep(dict(dtype="fp32", T=64, H=32, batch=2, pool_k=2), dict(T=[16, 256])),
     "nightly": Sweep(_GPU, dict(T=[576, 9216], batch=[1, 32])),
     "full": Sweep(_GPU, grid=dict(T=[576, 2304, 9216], batch=[1, 8, 32]))},
    params=("dtype", "T", "H", "batch", "pool_k")),)
