"""Pixel shuffle (space-to-depth) of a vision connector, Triton op + torch twin; a pure permutation.

Both HF versions compute the same permutation; they differ in tensor layout and in what they reject:
  variant="tokens" (as Llama 4):   `modeling_llama4.pixel_shuffle(x[B, N, C], ratio)` -> [B, N*ratio^2, C/ratio^2];
                      needs N = P^2 and P divisible by n = 1/ratio (else HF fails inside `.view`).
  variant="grid" (as InternVL): `InternVLModel.pixel_shuffle(x[B, W, H, C], scale_factor)` -> [B, W/n, H/n, C*n^2];
                      W and H may differ but each must be divisible by n (HF's own divisibility check is
                      `H % 0.5`, always 0, so it too fails inside `.view`).
With n = round(1/ratio):  out[b, w2, h2, (dw*n + dh)*C + c] = x[b, n*w2 + dw, n*h2 + dh, c].
Invalid grids raise ValueError naming the value. The arch files bind it where HF calls its own function.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels._util import clamp_pow2, interpreted
from runtime.kernels.spec import DTYPES, ELEM, KernelSpec, Sweep, seeded


@triton.jit
def _shuffle_kernel(x_ptr, out_ptr, n_chunks, C, W2, H2, stride_xb, stride_xw, stride_xh, stride_xc,
                    N_RATIO: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    # One "chunk" = the C contiguous output channels that come from a single input patch.
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    q = offs_q.to(tl.int64)
    dh = q % N_RATIO
    dw = (q // N_RATIO) % N_RATIO
    cell = q // (N_RATIO * N_RATIO)  # flat (b, w2, h2)
    h2 = cell % H2
    w2 = (cell // H2) % W2
    b = cell // (H2 * W2)
    src = x_ptr + b * stride_xb + (w2 * N_RATIO + dw) * stride_xw + (h2 * N_RATIO + dh) * stride_xh
    mask = (offs_q < n_chunks)[:, None] & (offs_c < C)[None, :]
    vals = tl.load(src[:, None] + offs_c[None, :] * stride_xc, mask=mask)
    tl.store(out_ptr + q[:, None] * C + offs_c[None, :], vals, mask=mask)


def _ratio_n(ratio: float) -> int:
    n = round(1.0 / ratio) if ratio > 0 else 0
    if n < 1 or abs(n * ratio - 1.0) > 1e-9:
        raise ValueError(f"pixel shuffle ratio must be 1/n for an integer n >= 1, got ratio={ratio}")
    return n


def _grid(x: torch.Tensor, ratio: float, variant: str) -> tuple[torch.Tensor, int]:
    """Validate and return (x viewed as [B, W, H, C], n)."""
    n = _ratio_n(ratio)
    if variant == "tokens":
        if x.dim() != 3:
            raise ValueError(f"pixel shuffle (tokens) takes [B, N, C], got shape {tuple(x.shape)}")
        B, N, C = x.shape
        p = int(N**0.5)
        p = p + 1 if (p + 1) ** 2 <= N else p  # guard float sqrt
        if p * p != N:
            raise ValueError(f"pixel shuffle (tokens) needs a square patch grid, got N={N} patches")
        if p % n:
            raise ValueError(f"pixel shuffle (tokens) needs grid side P={p} divisible by 1/ratio={n}")
        return x.view(B, p, p, C) if x.is_contiguous() else x.reshape(B, p, p, C), n
    if variant == "grid":
        if x.dim() != 4:
            raise ValueError(f"pixel shuffle (grid) takes [B, W, H, C], got shape {tuple(x.shape)}")
        for name, side in (("width", x.shape[1]), ("height", x.shape[2])):
            if side % n:
                raise ValueError(f"pixel shuffle (grid) needs {name}={side} divisible by 1/scale_factor={n}")
        return x, n
    raise ValueError(f"unknown pixel shuffle variant={variant!r}; expected 'tokens' or 'grid'")


def _out_shape(x: torch.Tensor, grid: torch.Tensor, n: int, variant: str) -> tuple[int, ...]:
    B, W, H, C = grid.shape
    if variant == "tokens":
        return (B, (W // n) * (H // n), C * n * n)
    return (B, W // n, H // n, C * n * n)


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5, variant: str = "tokens") -> torch.Tensor:
    """Space-to-depth by 1/ratio with HF's layout for `variant`; bit-identical to HF (no arithmetic)."""
    g, n = _grid(x, ratio, variant)
    B, W, H, C = g.shape
    out = torch.empty(_out_shape(x, g, n, variant), dtype=x.dtype, device=x.device)
    n_chunks = B * W * H
    if n_chunks * C == 0:
        return out
    # interpreter: few big programs; CUDA: 32 chunks x up to 256 contiguous channels (coalesced copies)
    if interpreted():
        block_q, block_c = clamp_pow2(n_chunks, 1, max(1, 65536 // clamp_pow2(C, 1, 65536))), clamp_pow2(C, 1, 65536)
    else:
        block_q, block_c = 32, clamp_pow2(C, 16, 256)
    grid = (triton.cdiv(n_chunks, block_q), triton.cdiv(C, block_c))
    _shuffle_kernel[grid](g, out, n_chunks, C, W // n, H // n, *g.stride(), N_RATIO=n,
                          BLOCK_Q=block_q, BLOCK_C=block_c)
    return out


def pixel_shuffle_torch(x: torch.Tensor, ratio: float = 0.5, variant: str = "tokens") -> torch.Tensor:
    """Twin: the same permutation as one reshape/permute (written from the index formula, not from HF)."""
    g, n = _grid(x, ratio, variant)
    B, W, H, C = g.shape
    out = g.reshape(B, W // n, n, H // n, n, C).permute(0, 1, 3, 2, 4, 5)  # [b, w2, h2, dw, dh, c]
    return out.reshape(_out_shape(x, g, n, variant))


# ---- spec ----

def _sample(p: dict, device: torch.device):
    x = torch.randn(p["batch"], p["T"], p["H"], generator=seeded()).to(device, DTYPES[p["dtype"]])
    return (x, 0.5, "tokens"), {}


def pixel_shuffle_work(p: dict) -> tuple[float, float]:
    """A permutation: every element read once and written once, no arithmetic."""
    return 2.0 * ELEM[p["dtype"]] * p["batch"] * p["T"] * p["H"], 0.0


_GPU = dict(dtype="bf16", T=576, H=1408, batch=8)
# a permutation: kernel and twin must agree bit for bit (tolerance 0)
SPECS = (KernelSpec(
    "pixel_shuffle", pixel_shuffle, pixel_shuffle_torch, _sample, pixel_shuffle_work,
    lambda p: p["batch"] * p["T"], {torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: 0.0},
    {"smoke": Sweep(dict(dtype="fp32", T=64, H=32, batch=2), dict(T=[16, 256])),
     "nightly": Sweep(_GPU, dict(T=[2304], batch=[1, 64])),
     "full": Sweep(_GPU, grid=dict(T=[576, 2304], batch=[1, 8, 64]))},
    has_flops=False, params=("dtype", "T", "H", "batch")),)
