"""Kernel cases, one per `KernelSpec` in runtime/kernels (same name in code, tests and CSV):
  triton  the runtime's op, in each of the spec's variants (LoRA: kernel / eager / grouping)
  torch   its pure-torch twin (LoRA: `eager`, it groups by itself on every call)
and for LoRA kernels the providers of `lora_providers` (peft: `eager`; vllm, grouped_mm and matmul_floor:
`kernel`, their grouping or metadata prepared outside the timed call). Inputs come from the spec's `sample`, bytes and flops from its `work`;
every provider of a point runs on the same tensors.

Plus `copy`: a device-to-device copy of a T x H tensor (torch's `copy_`), the yardstick of the memory
roofline a run can actually reach: its best GB/s gives every kernel row's copy_us and pct_copy.
"""

from __future__ import annotations

import torch

from harness.bench import lora_providers
from harness.bench.case import Case, Timed, Work
from runtime.kernels import KERNELS, KernelSpec, interpreted
from runtime.kernels.spec import DTYPES, ELEM, Sweep

# what the other providers' LoRA rows time (see the module docstring)
OTHER_VARIANTS = {"torch": ("eager",), "peft": ("eager",), "vllm": ("kernel",), "grouped_mm": ("kernel",),
                  "matmul_floor": ("kernel",)}


def _build(spec: KernelSpec):
    def build(p: dict, provider: str, device: torch.device):
        spec.check(p)
        args, kwargs = spec.sample(p, device)
        nbytes, flops = spec.work(p)
        work = Work(tokens=float(spec.tokens(p)), nbytes=nbytes, flops=flops)
        variant = p.get("variant")
        if provider == "triton" and spec.variants:
            if variant not in spec.variants:
                raise ValueError(f"{spec.name}: unknown variant {variant!r}; expected one of {', '.join(spec.variants)}")
            v = spec.variants[variant]
            if not v.roofline:
                work = Work(tokens=work.tokens)
            return Timed(v.prepare(args, kwargs), work, graph=v.graph)
        if provider in ("triton", "torch"):
            fn = spec.op if provider == "triton" else spec.twin
            call = lambda: fn(*args, **kwargs)  # noqa: E731
            if provider == "triton" and interpreted():
                call = lora_providers.noted(call, lora_providers.INTERPRETER_NOTE)
            return call, work
        if spec.family == "lora" and provider in lora_providers.PROVIDERS:
            fn = lora_providers.build(spec.name, provider, p, args, device)
            return Timed(fn, work, graph=variant == "kernel")
        raise ValueError(f"unknown provider {provider!r} for {spec.name}")
    return build


def _providers(spec: KernelSpec) -> tuple[str, ...]:
    extra = lora_providers.PROVIDERS if spec.family == "lora" else ()
    if spec.family == "lora" and spec.name != "lora_apply":
        extra = tuple(p for p in extra if p != "peft")  # PEFT has no separate shrink / expand
    return ("triton", "torch", *extra)


def _variants(spec: KernelSpec) -> dict:
    if not spec.variants:
        return {}
    return {"triton": tuple(spec.variants), **{p: v for p, v in OTHER_VARIANTS.items() if p in _providers(spec)}}


# ---------------------------------------------------------------------------------------------- copy
COPY_SWEEPS = {
    "smoke": Sweep(dict(dtype="fp32", T=256, H=256)),
    # 64 MiB and 256 MiB sources: several times the 50 MB L2 of an H100 / H200, so HBM is what is timed
    "nightly": Sweep(dict(dtype="bf16", T=16384, H=8192), dict(T=[4096])),
    "full": Sweep(dict(dtype="bf16", T=16384, H=8192), dict(T=[4096, 65536])),
}


def _copy(p: dict, provider: str, device: torch.device):
    if provider != "torch":
        raise ValueError(f"unknown provider {provider!r} for copy")
    if not (isinstance(p.get("T"), int) and isinstance(p.get("H"), int) and p["T"] >= 1 and p["H"] >= 1):
        raise ValueError(f"copy needs T >= 1 and H >= 1, got {p}")
    dt = DTYPES[p["dtype"]]
    src = torch.randn(p["T"], p["H"], device=device).to(dt)
    dst = torch.empty_like(src)
    nbytes = 2.0 * ELEM[p["dtype"]] * p["T"] * p["H"]  # read once, written once
    return (lambda: dst.copy_(src)), Work(tokens=float(p["T"]), nbytes=nbytes)


COPY_CASE = Case("copy", "kernel", ("torch",), "T", _copy, has_flops=False, vs_copy=False)

KERNEL_CASES: dict[str, Case] = {
    "copy": COPY_CASE,
    **{name: Case(name, "kernel", _providers(spec), "T", _build(spec), has_flops=spec.has_flops,
                  variants=_variants(spec), latency_only=tuple(k for k, v in spec.variants.items() if not v.roofline),
                  **(dict(unavailable=lora_providers.unavailable, skip=lora_providers.skip)
                     if spec.family == "lora" else {}))
       for name, spec in KERNELS.items()},
}
