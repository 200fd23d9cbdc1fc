"""GPU profiles: the peaks % of roofline is measured against, and `--gpu` resolution.

The bytes and flops of each kernel live in its spec (runtime/kernels, `KernelSpec.work`). % of roofline =
the time the profile's roofline allows (max of bytes / HBM and flops / dense bf16 peak) over the measured
time. The compute roof is the dense bf16 peak whatever the dtype: these kernels are memory-bound at every
realistic size, so the byte term decides. Peaks (vendor figures): H100 SXM 3.35 TB/s and 989 TFLOP/s,
H200 4.8 TB/s and 989 TFLOP/s, A100 80GB SXM 2.0 TB/s and 312 TFLOP/s. A profile matches only the board it
states: the PCIe / NVL boards (and the A100 40GB) have other bandwidths, so they get no profile.

A % of roofline is a claim about the GPU the timing ran on: `--gpu P` on a device that P does not match (a
CPU, another GPU) is refused, and a sweep given such a profile anyway writes no roofline figure (sweep.py).

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
    excludes: tuple[str, ...] = ()  # boards of the same name with other peaks

    def matches(self, device_name: str | None) -> bool:
        name = (device_name or "").lower()
        return self.match.lower() in name and not any(x.lower() in name for x in self.excludes)

    def roof_seconds(self, nbytes: float, flops: float) -> float:
        return max(nbytes / (self.hbm_tbps * 1e12), flops / (self.bf16_tflops * 1e12))


PROFILES: dict[str, GpuProfile] = {
    "h100": GpuProfile("h100", 3.35, 989.0, "H100", ("PCIe", "NVL")),
    "h200": GpuProfile("h200", 4.8, 989.0, "H200", ("NVL",)),
    "a100": GpuProfile("a100", 2.0, 312.0, "A100", ("PCIe", "40GB")),
}
GPU_CHOICES = (*PROFILES, "auto")


def profile_for_device(device_name: str | None) -> GpuProfile | None:
    return next((p for p in PROFILES.values() if p.matches(device_name)), None)


def resolve(gpu: str, device_name: str | None) -> tuple[GpuProfile | None, str | None]:
    """(profile, warning) for `--gpu`; device_name is None without CUDA. Unknown names, and a profile the
    device found does not match, are a ValueError (one line naming the device)."""
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
        where = f"the device found is {device_name!r}" if device_name else "no CUDA device was found (cpu)"
        raise ValueError(f"--gpu {gpu}: {where}, not an {chosen.match} ({chosen.name} profile); a % of its roofline "
                         f"would be computed from another device's timings: use --gpu auto (or no --gpu)")
    return chosen, None


def _main() -> None:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    p = profile_for_device(name)
    print(p.name if p else "unknown")


if __name__ == "__main__":
    _main()
