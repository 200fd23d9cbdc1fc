"""GPU profiles and the byte / flop counts behind GB/s, TFLOP/s and % of roofline (FACTS.md).

LoRA (T tokens, n distinct adapters, e = element size of x / weights / y, fp32 intermediate v, per slice):
  shrink  x[T,H] . A[H,r]        flops 2 T H r           bytes e T H + e n H r + 4 T r
  expand  y[T,O] += v[T,r] B[r,O] flops 2 T r O           bytes 4 T r + e n r O + 2 e T O (y read + written)
  apply   shrink + expand (our two launches write v and read it back)
With s slices x is read once (the ideal), the other terms count s times. FACTS.md writes the bf16 case
(e = 2). Vision kernels move data: pixel_shuffle reads and writes every element, position_pool reads the
patches (+ int64 positions) and writes the pooled tokens, rope_2d reads x, cos, sin and writes the output.

% of roofline = time the profile's roofline allows (max of bytes / HBM and flops / peak) / measured time.
The compute roof is the dense bf16 peak whatever the dtype: these kernels are memory-bound at every size
FACTS.md considers, so the byte term decides.

`python -m harness.bench.roofline` prints the profile `--gpu auto` picks here (or "unknown").
"""

from __future__ import annotations

from dataclasses import dataclass

ELEM = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class GpuProfile:
    name: str
    hbm_tbps: float       # TB/s
    bf16_tflops: float    # dense TFLOP/s
    match: str            # substring of torch.cuda.get_device_name()

    def roof_seconds(self, nbytes: float, flops: float) -> float:
        return max(nbytes / (self.hbm_tbps * 1e12), flops / (self.bf16_tflops * 1e12))


PROFILES: dict[str, GpuProfile] = {
    "h100": GpuProfile("h100", 3.35, 989.0, "H100"),
    "h200": GpuProfile("h200", 4.8, 989.0, "H200"),
    "a100": GpuProfile("a100", 2.0, 312.0, "A100"),
}
GPU_CHOICES = (*PROFILES, "auto")


def profile_for_device(device_name: str | None) -> GpuProfile | None:
    if not device_name:
        return None
    for p in PROFILES.values():
        if p.match.lower() in device_name.lower():
            return p
    return None


def resolve(gpu: str, device_name: str | None) -> tuple[GpuProfile | None, str | None]:
    """(profile, warning) for `--gpu`; device_name is None without CUDA. Unknown names are a ValueError."""
    if gpu not in GPU_CHOICES:
        raise ValueError(f"unknown --gpu {gpu!r}; expected one of {', '.join(GPU_CHOICES)}")
    detected = profile_for_device(device_name)
    if gpu == "auto":
        if detected is not None:
            return detected, None
        where = device_name or "no CUDA device (cpu)"
        return None, f"--gpu auto: no GPU profile for {where}; % of roofline is not reported"
    chosen = PROFILES[gpu]
    if detected is not chosen:
        where = device_name or "no CUDA device (cpu)"
        return chosen, f"--gpu {gpu}: profile {chosen.name} does not match the detected device ({where}); " \
                       f"% of roofline uses {chosen.name}'s {chosen.hbm_tbps} TB/s and {chosen.bf16_tflops} TFLOP/s"
    return chosen, None


# ---------------------------------------------------------------------- byte / flop formulas
def lora_shrink_work(T: int, H: int, n: int, r: int, slices: int, e: int) -> tuple[float, float]:
    flops = 2.0 * T * H * r * slices
    nbytes = e * T * H + slices * (e * n * H * r + 4.0 * T * r)
    return nbytes, flops


def lora_expand_work(T: int, out: int, n: int, r: int, slices: int, e: int) -> tuple[float, float]:
    flops = 2.0 * T * r * out * slices
    nbytes = slices * (4.0 * T * r + e * n * r * out + 2.0 * e * T * out)
    return nbytes, flops


def lora_apply_work(T: int, H: int, out: int, n: int, r: int, slices: int, e: int) -> tuple[float, float]:
    b1, f1 = lora_shrink_work(T, H, n, r, slices, e)
    b2, f2 = lora_expand_work(T, out, n, r, slices, e)
    return b1 + b2, f1 + f2


def pixel_shuffle_work(B: int, N: int, C: int, e: int) -> tuple[float, float]:
    return 2.0 * e * B * N * C, 0.0


def position_pool_work(B: int, N: int, D: int, k: int, e: int) -> tuple[float, float]:
    L = N // (k * k)
    return e * B * N * D + 16.0 * B * N + e * B * L * D, float(B * N * D)


def rope_2d_work(B: int, L: int, heads: int, hd: int, e: int) -> tuple[float, float]:
    elems = B * L * heads * hd
    return 2.0 * e * elems + 2.0 * e * B * L * hd, 3.0 * elems


def _main() -> None:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    p = profile_for_device(name)
    print(p.name if p else "unknown")


if __name__ == "__main__":
    _main()
