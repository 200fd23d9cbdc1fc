"""Per-module comparison of runtime captures against reference captures, and the tolerance policy.

Tolerances live here, beside their dtype, once. An element mismatches when |got - ref| > atol + rtol*|ref|
(torch.testing's rule); a module is within tolerance when no element mismatches and both are finite.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    why: str


# replay: one module fed the reference's own input, so only that module's rounding shows.
# e2e: each side feeds itself, so rounding compounds over the layers of a tiny model (2-4 layers per group).
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("fp32", "replay"): Tolerance(1e-5, 1e-4, "fp32 matmul order differences are ~1e-7 relative on O(1) "
                                  "activations; the folded alpha/r scale adds one rounding"),
    ("fp32", "e2e"): Tolerance(1e-4, 1e-4, "fp32 rounding compounded over a few layers stays ~1e-6; a real "
                               "fault moves outputs by >= 1e-2 (adapters change activations by ~10%)"),
    ("fp16", "replay"): Tolerance(1e-2, 1e-2, "fp16 has 11-bit mantissa (~5e-4 relative); a GEMM of depth "
                                  "H sums H roundings; vLLM uses 6e-2 on U[0,1) data, we stay tighter"),
    ("fp16", "e2e"): Tolerance(3e-2, 3e-2, "fp16 rounding compounds over layers"),
    ("bf16", "replay"): Tolerance(6e-2, 6e-2, "bf16 has 8-bit mantissa (~4e-3 relative); vLLM's LoRA kernel "
                                  "tests use rtol = atol = 6e-2 for bf16"),
    ("bf16", "e2e"): Tolerance(1e-1, 1e-1, "bf16 rounding compounds over layers; still below a 10% LoRA effect "
                               "only for shallow models, so the verdict leans on replay"),
}


def tolerance(dtype: str, mode: str) -> Tolerance:
    try:
        return TOLERANCES[(dtype, mode)]
    except KeyError:
        raise ValueError(f"no tolerance for dtype={dtype!r} mode={mode!r}") from None


@dataclass
class Metrics:
    max_abs: float
    max_rel: float
    mismatch_frac: float
    cosine: float
    ref_norm: float
    nonfinite_ref: int
    nonfinite_got: int
    shape_ok: bool
    ok: bool
    status: str  # ok | mismatch | nonfinite | shape | error


def compare_tensors(ref: torch.Tensor, got: torch.Tensor, tol: Tolerance) -> Metrics:
    if ref.shape != got.shape:
        return Metrics(float("nan"), float("nan"), 1.0, float("nan"), float(ref.float().norm()), 0, 0,
                       False, False, "shape")
    r, g = ref.double(), got.double()
    nf_r = int((~torch.isfinite(r)).sum())
    nf_g = int((~torch.isfinite(g)).sum())
    if nf_r or nf_g:
        # NaN/Inf is reported as such, never as a tolerance failure with a NaN error figure
        return Metrics(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), nf_r, nf_g,
                       True, False, "nonfinite")
    diff = (g - r).abs()
    bound = tol.atol + tol.rtol * r.abs()
    mism = float((diff > bound).double().mean()) if diff.numel() else 0.0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / r.abs().clamp_min(1e-12)).max()) if diff.numel() else 0.0
    rn, gn = r.norm(), g.norm()
    cos = float((r.flatten() @ g.flatten()) / (rn * gn)) if rn > 0 and gn > 0 else float(rn == gn)
    ok = mism == 0.0
    return Metrics(max_abs, max_rel, mism, cos, float(rn), 0, 0, True, ok, "ok" if ok else "mismatch")


def error_metrics() -> Metrics:
    """A module that could not be compared (mapping error, missing capture): the row's detail says why."""
    return Metrics(float("nan"), float("nan"), 1.0, float("nan"), float("nan"), 0, 0, True, False, "error")


@dataclass
class Row:
    arch: str
    request: int
    adapter: str
    mode: str
    order: int
    module: str
    group: str
    kind: str  # lora | boundary
    dtype: str
    atol: float
    rtol: float
    metrics: Metrics
    detail: str = ""

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "metrics"}
        d.update(asdict(self.metrics))
        return d


CSV_COLUMNS = ["arch", "mode", "request", "adapter", "order", "module", "group", "kind", "dtype", "status",
               "ok", "max_abs", "max_rel", "mismatch_frac", "cosine", "ref_norm", "nonfinite_ref",
               "nonfinite_got", "shape_ok", "atol", "rtol", "detail"]


def first_divergence(rows: list[Row]) -> Row | None:
    """The earliest module (reference execution order) that fails in any request."""
    bad = [r for r in rows if not r.metrics.ok]
    return min(bad, key=lambda r: (r.order, r.request)) if bad else None
