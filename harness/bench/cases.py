"""Benchmark cases: each name runs through code, test and CSV unchanged.

A case builds, for one point (its params) and one provider, a zero-argument callable to time and the
`Work` it does (rows, images, bytes, flops: the inputs of the derived metrics). Inputs are built outside
the timed call. Providers:
  triton  the runtime's Triton kernels (runtime/kernels)
  torch   their pure-torch twins (per-slot gather + matmul)
  peft    HF + PEFT: `lora_apply` runs PEFT's own mixed-adapter LoRA Linear (`adapter_names`, one LoRA
          layer per slice, its base GEMM replaced by a no-op so only the LoRA delta is timed)
  vllm    vLLM's Punica kernels, only when `import vllm` works; otherwise one row marked unavailable
Every LoRA token carries an adapter (slots drawn round-robin over n adapters, then shuffled, so adapters
interleave as in a mixed batch); the slot table holds n + 1 slots, the last one never used.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.bench import roofline
from harness.checkpoint import DTYPES


class Unavailable(Exception):
    """The provider cannot run here (not installed, not implemented); recorded as status unavailable."""


@dataclass(frozen=True)
class Work:
    tokens: float
    images: float = 0.0
    nbytes: float = 0.0
    flops: float = 0.0


Build = Callable[[dict, str, torch.device], tuple[Callable[[], object], Work]]


@dataclass(frozen=True)
class Case:
    name: str
    kind: str                      # "kernel" | "e2e"
    providers: tuple[str, ...]
    x: str                         # the parameter plots put on the x axis
    build: Build
    has_flops: bool = True

    def metrics(self, cuda: bool, profile: bool) -> tuple[str, ...]:
        """Metric rows an ok point writes; `sweep.derive` computes each."""
        if self.kind == "e2e":
            out = ["latency_ms", "images_per_s", "tokens_per_s"]
        else:
            out = ["latency_ms", "tokens_per_s", "gbps"] + (["tflops"] if self.has_flops else [])
            if profile:
                out.append("pct_roofline")
        if cuda:
            out.append("peak_mem_mib")
        return tuple(out)


def vllm_unavailable() -> str | None:
    """Why vLLM cannot be used here, or None when `import vllm` works."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (import vllm fails)"
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to import means unavailable
        return f"import vllm failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return None


# ---------------------------------------------------------------------- LoRA kernels
def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lora_inputs(p: dict, device: torch.device):
    T, H, Ow, n, r, s = p["T"], p["H"], p["O"], p["n_adapters"], p["rank"], p["slices"]
    if min(T, H, Ow, n, r, s) < 1:
        raise ValueError(f"LoRA case needs T, H, O, n_adapters, rank, slices >= 1, got {p}")
    dt = DTYPES[p["dtype"]]
    g = _gen()
    S = n + 1
    x = torch.randn(T, H, generator=g).to(device, dt)
    A = [(torch.randn(S, r, H, generator=g) / math.sqrt(H)).to(device, dt) for _ in range(s)]
    B = [(torch.randn(S, Ow, r, generator=g) / (4 * math.sqrt(r))).to(device, dt) for _ in range(s)]
    slots = (torch.arange(T) % n)[torch.randperm(T, generator=g)].to(torch.int32).to(device)
    y = torch.zeros(T, s * Ow, dtype=dt, device=device)
    return x, A, B, slots, y


def _vllm_ops():
    reason = vllm_unavailable()
    if reason:
        raise Unavailable(reason)
    from vllm.lora.ops.triton_ops import lora_expand, lora_shrink
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    return lora_shrink, lora_expand, LoRAKernelMeta


def _vllm_meta(LoRAKernelMeta, slots, n_slots, device):
    meta = LoRAKernelMeta.make(max_loras=n_slots, max_num_tokens=slots.shape[0], device=device)
    meta.prepare_tensors(slots)
    return meta.meta_args(slots.shape[0])


class _Const(torch.nn.Module):
    """Stands in for a LoRA layer's base Linear: returns a preallocated output, so only the delta is timed."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, *args, **kwargs):
        return self.out


def _peft_apply(x, y, slots, p, device):
    import warnings

    from peft import LoraConfig, get_peft_model

    n, r, Ow, s = p["n_adapters"], p["rank"], p["O"], p["slices"]
    dt = DTYPES[p["dtype"]]
    layers = []
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(s):
            holder = torch.nn.Module()
            holder.proj = torch.nn.Linear(x.shape[1], Ow, bias=False, device=device, dtype=dt)
            pm = get_peft_model(holder, cfg, adapter_name="a0")
            for a in range(1, n):
                pm.add_adapter(f"a{a}", cfg)
            layer = pm.base_model.model.proj
            layer.base_layer = _Const(y[:, i * Ow:(i + 1) * Ow])
            layers.append(layer)
    names = [f"a{int(t)}" for t in slots.tolist()]

    def fn():
        with torch.no_grad():
            for layer in layers:
                layer(x, adapter_names=names)
    return fn


def _lora_case(op: str) -> Build:
    def build(p: dict, provider: str, device: torch.device):
        x, A, B, slots, y = _lora_inputs(p, device)
        T, H, Ow, n, r, s = p["T"], p["H"], p["O"], p["n_adapters"], p["rank"], p["slices"]
        e = roofline.ELEM[p["dtype"]]
        v = torch.randn(s, T, r, generator=_gen(1)).to(device)
        if op == "shrink":
            nbytes, flops = roofline.lora_shrink_work(T, H, n, r, s, e)
        elif op == "expand":
            nbytes, flops = roofline.lora_expand_work(T, Ow, n, r, s, e)
        else:
            nbytes, flops = roofline.lora_apply_work(T, H, Ow, n, r, s, e)
        work = Work(tokens=T, nbytes=nbytes, flops=flops)
        if provider in ("triton", "torch"):
            from runtime import kernels as K

            suffix = "" if provider == "triton" else "_torch"
            shrink, expand, apply = (getattr(K, f"lora_{o}{suffix}") for o in ("shrink", "expand", "apply"))
            fn = {"shrink": lambda: shrink(x, A, slots), "expand": lambda: expand(v, B, slots, y),
                  "apply": lambda: apply(x, y, A, B, slots)}[op]
            return fn, work
        if provider == "peft":
            if op != "apply":
                raise Unavailable(f"PEFT has no separate {op} op (only lora_apply has a peft provider)")
            return _peft_apply(x, y, slots, p, device), work
        if provider == "vllm":
            vs, ve, Meta = _vllm_ops()
            meta = _vllm_meta(Meta, slots, n + 1, device)
            out = torch.zeros(s, T, r, dtype=torch.float32, device=device)

            def v_shrink():
                vs(x, A, out, *meta, 1.0)

            def v_expand(src=v):
                ve(src, B, y, *meta, offset_start=0, add_inputs=True)

            def v_apply():
                v_shrink()
                v_expand(out)
            return {"shrink": v_shrink, "expand": v_expand, "apply": v_apply}[op], work
        raise ValueError(f"unknown provider {provider!r} for lora_{op}")
    return build


# ---------------------------------------------------------------------- vision kernels
def _square_side(N: int, multiple: int, case: str) -> int:
    side = math.isqrt(N)
    if side * side != N or side % multiple:
        raise ValueError(f"{case}: T={N} patches must be a square grid with a side divisible by {multiple}")
    return side


def _twins(provider: str, name: str):
    from runtime import kernels as K

    if provider == "triton":
        return getattr(K, name)
    if provider == "torch":
        return getattr(K, f"{name}_torch")
    raise ValueError(f"provider {provider!r} has no {name}")


def _position_pool(p: dict, provider: str, device: torch.device):
    B, N, D, k, dt = p["batch"], p["T"], p["H"], p["pool_k"], DTYPES[p["dtype"]]
    side = _square_side(N, k, "position_pool")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([cols.flatten(), rows.flatten()], -1).expand(B, N, 2).contiguous().to(device)
    hidden = torch.randn(B, N, D, generator=_gen()).to(device, dt)
    L = N // (k * k)
    f = _twins(provider, "position_pool")
    nbytes, flops = roofline.position_pool_work(B, N, D, k, roofline.ELEM[p["dtype"]])
    return (lambda: f(hidden, pos, k, L)), Work(tokens=B * N, nbytes=nbytes, flops=flops)


def _pixel_shuffle(p: dict, provider: str, device: torch.device):
    B, N, C, dt = p["batch"], p["T"], p["H"], DTYPES[p["dtype"]]
    _square_side(N, 2, "pixel_shuffle")
    x = torch.randn(B, N, C, generator=_gen()).to(device, dt)
    f = _twins(provider, "pixel_shuffle")
    nbytes, _ = roofline.pixel_shuffle_work(B, N, C, roofline.ELEM[p["dtype"]])
    return (lambda: f(x, 0.5, "llama4")), Work(tokens=B * N, nbytes=nbytes)


def _rope_2d(p: dict, provider: str, device: torch.device):
    B, L, heads, hd, dt = p["batch"], p["T"], p["heads"], p["head_dim"], DTYPES[p["dtype"]]
    g = _gen()
    x = torch.randn(B, L, heads, hd, generator=g).to(device, dt)
    ang = torch.rand(B, L, hd, generator=g) * 6.28
    cos, sin = ang.cos().to(device, dt), ang.sin().to(device, dt)
    pos = torch.randint(0, 64, (B, L, 2), generator=g).to(device)
    f = _twins(provider, "rope_2d")
    nbytes, flops = roofline.rope_2d_work(B, L, heads, hd, roofline.ELEM[p["dtype"]])
    return (lambda: f(x, cos, sin, pos, unsqueeze_dim=2)), Work(tokens=B * L, nbytes=nbytes, flops=flops)


KERNEL_CASES: dict[str, Case] = {
    "lora_shrink": Case("lora_shrink", "kernel", ("triton", "torch", "vllm"), "T", _lora_case("shrink")),
    "lora_expand": Case("lora_expand", "kernel", ("triton", "torch", "vllm"), "T", _lora_case("expand")),
    "lora_apply": Case("lora_apply", "kernel", ("triton", "torch", "peft", "vllm"), "T", _lora_case("apply")),
    "position_pool": Case("position_pool", "kernel", ("triton", "torch"), "T", _position_pool),
    "pixel_shuffle": Case("pixel_shuffle", "kernel", ("triton", "torch"), "T", _pixel_shuffle, has_flops=False),
    "rope_2d": Case("rope_2d", "kernel", ("triton", "torch"), "T", _rope_2d),
}


def all_cases() -> dict[str, Case]:
    from harness.bench.e2e import E2E_CASES

    return {**KERNEL_CASES, **E2E_CASES}
