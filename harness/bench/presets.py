"""What each preset sweeps: case -> list of points (params). Kernel points come from each kernel's spec;
sweeps go one parameter at a time around a base point (so each plot line varies one thing); `full` adds
cartesian grids.

  smoke    CPU-sized (tiny shapes, the registry's tiny models); also runs on a GPU
  nightly  GPU: real-size kernel shapes (T 1 .. 16384, n 1 .. 32, rank 8 .. 128, 1 / 3 slices, bf16 / fp16)
           and real-size towers (Llama 4 Scout, SigLIP-so400m) with 1 .. 64 images
  full     GPU: nightly's axes as grids, plus prefill
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.kernels import KERNELS
from runtime.kernels.spec import Sweep


@dataclass(frozen=True)
class Preset:
    name: str
    needs_cuda: bool
    rep_ms: float        # do_bench's rep / the CPU loop's budget per point
    warmup_ms: float
    min_reps: int        # CPU loop only
    points: dict[str, list[dict]] = field(default_factory=dict)


def _kernel_points(preset: str) -> dict[str, list[dict]]:
    """The copy yardstick, then each kernel's own sweep for this preset (its spec, beside the kernel)."""
    from harness.bench.kernel_cases import COPY_SWEEPS

    return {"copy": COPY_SWEEPS[preset].points(),
            **{name: spec.sweeps[preset].points() for name, spec in KERNELS.items() if preset in spec.sweeps}}


def _e2e(models, base: dict, axes: dict | None = None, grid: dict | None = None) -> list[dict]:
    out: list[dict] = []
    for m in models:
        out += Sweep({**base, "model": m}, axes or {}, grid or {}).points()
    return out


def _smoke() -> dict[str, list[dict]]:
    pts = _kernel_points("smoke")
    pts["tower_connector"] = _e2e(("llama4/tiny", "gemma3/tiny"),
                                  dict(dtype="fp32", n_adapters=2, rank=8, images=2), dict(images=[1], n_adapters=[0]))
    pts["prefill"] = _e2e(("llama4/tiny",), dict(dtype="fp32", n_adapters=2, rank=8, images=1), dict(n_adapters=[0]))
    return pts


REAL_SIZE = ("llama4/scout", "gemma3/so400m")


def _nightly() -> dict[str, list[dict]]:
    pts = _kernel_points("nightly")
    pts["tower_connector"] = _e2e(REAL_SIZE, dict(dtype="bf16", n_adapters=4, rank=16, images=16),
                                  dict(images=[1, 4, 64], n_adapters=[0, 1]))
    return pts


def _full() -> dict[str, list[dict]]:
    pts = _kernel_points("full")
    pts["tower_connector"] = _e2e(REAL_SIZE, dict(dtype="bf16", rank=16, images=16, n_adapters=4),
                                  grid=dict(images=[1, 2, 4, 8, 16, 32, 64], n_adapters=[0, 1, 4, 16]))
    pts["prefill"] = _e2e(REAL_SIZE, dict(dtype="bf16", rank=16, images=16, n_adapters=4),
                          grid=dict(images=[1, 16], n_adapters=[0, 4]))
    return pts


PRESETS: dict[str, Preset] = {
    "smoke": Preset("smoke", False, rep_ms=10.0, warmup_ms=0.0, min_reps=3, points=_smoke()),
    "nightly": Preset("nightly", True, rep_ms=100.0, warmup_ms=25.0, min_reps=5, points=_nightly()),
    "full": Preset("full", True, rep_ms=100.0, warmup_ms=25.0, min_reps=5, points=_full()),
}
