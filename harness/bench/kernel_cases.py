"""Kernel cases, one per `KernelSpec` in runtime/kernels (same name in code, tests and CSV):
  triton  the runtime's op
  torch   its pure-torch twin
and for LoRA kernels the providers of `lora_providers` (peft, vllm, grouped_mm, matmul_floor). Inputs come
from the spec's `sample`, bytes and flops from its `work`; every provider of a point runs on the same tensors."""

from __future__ import annotations

import torch

from harness.bench import lora_providers
from harness.bench.case import Case, Work
from runtime.kernels import KERNELS, KernelSpec, interpreted


def _build(spec: KernelSpec):
    def build(p: dict, provider: str, device: torch.device):
        spec.check(p)
        args, kwargs = spec.sample(p, device)
        nbytes, flops = spec.work(p)
        work = Work(tokens=float(spec.tokens(p)), nbytes=nbytes, flops=flops)
        if provider in ("triton", "torch"):
            fn = spec.op if provider == "triton" else spec.twin
            call = lambda: fn(*args, **kwargs)  # noqa: E731
            if provider == "triton" and interpreted():
                call = lora_providers.noted(call, lora_providers.INTERPRETER_NOTE)
            return call, work
        if spec.family == "lora" and provider in lora_providers.PROVIDERS:
            return lora_providers.build(spec.name, provider, p, args, device), work
        raise ValueError(f"unknown provider {provider!r} for {spec.name}")
    return build


def _providers(spec: KernelSpec) -> tuple[str, ...]:
    extra = lora_providers.PROVIDERS if spec.family == "lora" else ()
    if spec.family == "lora" and spec.name != "lora_apply":
        extra = tuple(p for p in extra if p != "peft")  # PEFT has no separate shrink / expand
    return ("triton", "torch", *extra)


def _case(name: str, spec: KernelSpec) -> Case:
    extra = {}
    if spec.family == "lora":
        extra = dict(unavailable=lora_providers.unavailable, skip=lora_providers.skip)
    return Case(name, "kernel", _providers(spec), "T", _build(spec), has_flops=spec.has_flops, **extra)


KERNEL_CASES: dict[str, Case] = {name: _case(name, spec) for name, spec in KERNELS.items()}
