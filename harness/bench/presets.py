"""What each preset sweeps: case -> list of points (params). Sweeps go one parameter at a time around a
base point (so each plot line varies one thing); `full` adds cartesian grids.

  smoke    CPU-sized (tiny shapes, the registry's tiny models); also runs on a GPU
  nightly  GPU: real-size kernel shapes (T 1 .. 16384, n 1 .. 32, rank 8 .. 128, 1 / 3 slices, bf16 / fp16)
           and real-size towers (Llama 4 Scout, SigLIP-so400m) with 1 .. 64 images
  full     GPU: nightly's axes as grids, plus prefill
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


def one_at_a_time(base: dict, **axes: list) -> list[dict]:
    out = [dict(base)]
    for k, values in axes.items():
        for v in values:
            p = {**base, k: v}
            if p not in out:
                out.append(p)
    return out


def grid(base: dict, **axes: list) -> list[dict]:
    keys = list(axes)
    return [{**base, **dict(zip(keys, vals))} for vals in itertools.product(*(axes[k] for k in keys))]


def _dedupe(points: list[dict]) -> list[dict]:
    out: list[dict] = []
    for p in points:
        if p not in out:
            out.append(p)
    return out


@dataclass(frozen=True)
class Preset:
    name: str
    needs_cuda: bool
    rep_ms: float        # do_bench's rep / the CPU loop's budget per point
    warmup_ms: float
    min_reps: int        # CPU loop only
    points: dict[str, list[dict]] = field(default_factory=dict)


LORA_CASES = ("lora_shrink", "lora_expand", "lora_apply")


def _smoke() -> dict[str, list[dict]]:
    lora = one_at_a_time(dict(dtype="fp32", T=64, H=64, O=64, n_adapters=2, rank=8, slices=1),
                         T=[16, 256], n_adapters=[4], rank=[16], slices=[3])
    pts: dict[str, list[dict]] = {c: lora for c in LORA_CASES}
    pts["position_pool"] = one_at_a_time(dict(dtype="fp32", T=64, H=32, batch=2, pool_k=2), T=[16, 256])
    pts["pixel_shuffle"] = one_at_a_time(dict(dtype="fp32", T=64, H=32, batch=2), T=[16, 256])
    pts["rope_2d"] = one_at_a_time(dict(dtype="fp32", T=64, batch=2, heads=2, head_dim=16), T=[16, 256])
    tc = []
    for m in ("llama4/tiny", "gemma3/tiny"):
        tc += one_at_a_time(dict(model=m, dtype="fp32", n_adapters=2, rank=8, images=2), images=[1], n_adapters=[0])
    pf = one_at_a_time(dict(model="llama4/tiny", dtype="fp32", n_adapters=2, rank=8, images=1), n_adapters=[0])
    pts["tower_connector"], pts["prefill"] = tc, pf
    return pts


def _gpu_kernels(full: bool) -> dict[str, list[dict]]:
    base = dict(dtype="bf16", T=4096, H=4096, O=4096, n_adapters=4, rank=16, slices=1)
    lora = one_at_a_time(base, T=[1, 16, 128, 1024, 16384], n_adapters=[1, 8, 16, 32], rank=[8, 32, 64, 128],
                         slices=[3], dtype=["fp16"])
    if full:
        lora = _dedupe(lora + grid(base, T=[1, 16, 128, 1024, 4096, 16384], n_adapters=[1, 4, 8, 16, 32],
                                   rank=[8, 16, 64, 128]))
    pts: dict[str, list[dict]] = {c: lora for c in LORA_CASES}
    pool = dict(dtype="bf16", T=2304, H=1152, batch=8, pool_k=3)
    shuffle = dict(dtype="bf16", T=576, H=1408, batch=8)
    rope = dict(dtype="bf16", T=4096, batch=8, heads=16, head_dim=72)
    if full:
        pts["position_pool"] = grid(pool, T=[576, 2304, 9216], batch=[1, 8, 32])
        pts["pixel_shuffle"] = grid(shuffle, T=[576, 2304], batch=[1, 8, 64])
        pts["rope_2d"] = grid(rope, T=[1024, 4096, 16384], batch=[1, 8, 32])
    else:
        pts["position_pool"] = one_at_a_time(pool, T=[576, 9216], batch=[1, 32])
        pts["pixel_shuffle"] = one_at_a_time(shuffle, T=[2304], batch=[1, 64])
        pts["rope_2d"] = one_at_a_time(rope, T=[1024, 16384], batch=[1, 32])
    return pts


def _nightly() -> dict[str, list[dict]]:
    pts = _gpu_kernels(full=False)
    tc = []
    for m in ("llama4/scout", "gemma3/so400m"):
        tc += one_at_a_time(dict(model=m, dtype="bf16", n_adapters=4, rank=16, images=16), images=[1, 4, 64],
                            n_adapters=[0, 1])
    pts["tower_connector"] = tc
    return pts


def _full() -> dict[str, list[dict]]:
    pts = _gpu_kernels(full=True)
    tc, pf = [], []
    for m in ("llama4/scout", "gemma3/so400m"):
        tc += grid(dict(model=m, dtype="bf16", rank=16), images=[1, 2, 4, 8, 16, 32, 64], n_adapters=[0, 1, 4, 16])
        pf += grid(dict(model=m, dtype="bf16", rank=16), images=[1, 16], n_adapters=[0, 4])
    pts["tower_connector"], pts["prefill"] = tc, pf
    return pts


PRESETS: dict[str, Preset] = {
    "smoke": Preset("smoke", False, rep_ms=10.0, warmup_ms=0.0, min_reps=3, points=_smoke()),
    "nightly": Preset("nightly", True, rep_ms=100.0, warmup_ms=25.0, min_reps=5, points=_nightly()),
    "full": Preset("full", True, rep_ms=100.0, warmup_ms=25.0, min_reps=5, points=_full()),
}
