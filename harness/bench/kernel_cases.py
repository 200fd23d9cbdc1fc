"""Kernel cases, one per `KernelSpec` in runtime/kernels (same name in code, tests and CSV), timed with the LoRA
providers of runtime/providers that apply to it:
  the provider whose bench spec `times` the op: the runtime's op, in each of the spec's variants (LoRA:
    kernel / eager / grouping); the one that `times` the twin: its pure-torch twin, as called
  for LoRA kernels, every other provider that can run the op: its own call for it (`BenchSpec.ops`), or for
    lora_apply its `apply` with the grouping built beforehand; each in its one variant (`BenchSpec.variant`)
Inputs come from the spec's `sample`, bytes and flops from its `work`; every provider of a point runs on the
same tensors.

Plus `copy`: a device-to-device copy of a T x H tensor (torch's `copy_`), the yardstick of the memory
roofline a run can actually reach: its best GB/s gives every kernel row's copy_us and pct_copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.bench.case import Case, Timed, Work
from runtime.kernels import KERNELS, KernelSpec
from runtime.kernels.spec import DTYPES, ELEM, Sweep
from runtime.providers import OP, PROVIDERS, TWIN_PROVIDER, LoRAProvider, Unavailable, from_sample


def _op(spec: KernelSpec) -> str | None:
    """The LoRA op a LoRA spec times (shrink / expand / apply), None for any other kernel."""
    return spec.name.removeprefix("lora_") if spec.family == "lora" else None


def _runs(p: LoRAProvider, spec: KernelSpec) -> bool:
    op = _op(spec)
    return bool(p.bench.times) or (op is not None and (op in p.bench.ops or (op == "apply" and p.apply is not None)))


def provider_call(p: LoRAProvider, op: str, args: tuple, params: dict, device: torch.device) -> Callable[[], object]:
    """A provider's zero-argument call of a LoRA op on a spec's sample `args`, prepared outside the call."""
    inputs = from_sample(op, args)
    if op in p.bench.ops:
        return p.bench.ops[op](inputs, params, device)
    if op == "apply" and p.apply is not None:
        batch = inputs._replace(grouping=p.grouping(inputs.slots, inputs.A[0].shape[0]))
        return lambda: p.apply(batch)
    raise ValueError(f"LoRA provider {p.name!r} has no lora_{op}")


def _build(spec: KernelSpec):
    def build(params: dict, provider: str, device: torch.device):
        spec.check(params)
        p = PROVIDERS.get(provider)
        if p is None or not _runs(p, spec):
            raise ValueError(f"unknown provider {provider!r} for {spec.name}")
        reason = p.unavailable(DTYPES[params["dtype"]], device)
        if reason:
            raise Unavailable(reason)
        args, kwargs = spec.sample(params, device)
        nbytes, flops = spec.work(params)
        work = Work(tokens=float(spec.tokens(params)), nbytes=nbytes, flops=flops)
        variant = params.get("variant")
        if p.bench.times == OP and spec.variants:
            if variant not in spec.variants:
                raise ValueError(f"{spec.name}: unknown variant {variant!r}; expected one of {', '.join(spec.variants)}")
            v = spec.variants[variant]
            if not v.roofline:
                work = Work(tokens=work.tokens)
            return Timed(v.prepare(args, kwargs), work, graph=v.graph)
        if p.bench.times:
            fn = spec.op if p.bench.times == OP else spec.twin
            return (lambda: fn(*args, **kwargs)), work
        return Timed(provider_call(p, _op(spec), args, params, device), work, graph=variant == "kernel")
    return build


def _providers(spec: KernelSpec) -> tuple[str, ...]:
    return tuple(name for name, p in PROVIDERS.items() if _runs(p, spec))


def _variants(spec: KernelSpec) -> dict:
    if not spec.variants:
        return {}
    return {name: tuple(spec.variants) if PROVIDERS[name].bench.times == OP else (PROVIDERS[name].bench.variant,)
            for name in _providers(spec)}


def unavailable(provider: str) -> str | None:
    """Why a provider cannot run on this machine at all (one unavailable row per case), or None."""
    return PROVIDERS[provider].unavailable(None, None)


def skip(provider: str, params: dict) -> str | None:
    """Why a provider leaves out this point (a log line, no row): a dtype it refuses here, or None."""
    dtype = DTYPES.get(params.get("dtype"))
    reason = PROVIDERS[provider].unavailable(dtype, None) if dtype is not None else None
    return f"{provider}: {params['dtype']} points left out ({reason})" if reason else None


# ---------------------------------------------------------------------------------------------- copy
COPY_SWEEPS = {
    "smoke": Sweep(dict(dtype="fp32", T=256, H=256)),
    # 64 MiB and 256 MiB sources: several times the 50 MB L2 of an H100 / H200, so HBM is what is timed
    "nightly": Sweep(dict(dtype="bf16", T=16384, H=8192), dict(T=[4096])),
    "full": Sweep(dict(dtype="bf16", T=16384, H=8192), dict(T=[4096, 65536])),
}


def _copy(p: dict, provider: str, device: torch.device):
    if provider != TWIN_PROVIDER:
        raise ValueError(f"unknown provider {provider!r} for copy")
    if not (isinstance(p.get("T"), int) and isinstance(p.get("H"), int) and p["T"] >= 1 and p["H"] >= 1):
        raise ValueError(f"copy needs T >= 1 and H >= 1, got {p}")
    dt = DTYPES[p["dtype"]]
    src = torch.randn(p["T"], p["H"], device=device).to(dt)
    dst = torch.empty_like(src)
    nbytes = 2.0 * ELEM[p["dtype"]] * p["T"] * p["H"]  # read once, written once
    return (lambda: dst.copy_(src)), Work(tokens=float(p["T"]), nbytes=nbytes)


# torch's own copy_: the provider that runs the kernels' pure-torch twins times it
COPY_CASE = Case("copy", "kernel", (TWIN_PROVIDER,), "T", _copy, has_flops=False, vs_copy=False)

KERNEL_CASES: dict[str, Case] = {
    "copy": COPY_CASE,
    **{name: Case(name, "kernel", _providers(spec), "T", _build(spec), has_flops=spec.has_flops,
                  variants=_variants(spec), latency_only=tuple(k for k, v in spec.variants.items() if not v.roofline),
                  unavailable=unavailable, skip=skip)
       for name, spec in KERNELS.items()},
}
