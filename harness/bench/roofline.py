"""GPU profiles: the peaks % of roofline is measured against, and `--gpu` resolution.

The bytes and flops of each kernel live in its spec (runtime/kernels, `KernelSpec.work`). % of roofline =
the time the profile's roofline allows (max of bytes / HBM and flops / dense bf16 peak) over the measured
time. The compute roof is the dense bf16 peak whatever the dtype: these kernels are memory-bound at every
realistic size, so the byte term decides. Peaks (vendor figures): H100 SXM 3.35 TB/s and 989 TFLOP/s,
H200 4.8 TB/s and 989 TFLOP/s, A100 80GB 2.0 TB/s and 312 TFLOP/s.

`python -m harness.bench.roofline` prints the profile `--gpu auto` picks here (or "unknown").
"""

from __future__ import annotations

from dataclasses import dataclass


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


def _main() -> None:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    p = profile_for_device(name)
    print(p.name if p else "unknown")


if __name__ == "__main__":
    _main()
