"""Providers the LoRA kernel cases have beyond the runtime's op and its twin:
  peft  PEFT's own mixed-adapter LoRA Linear (`adapter_names`), one LoRA layer per slice, its base GEMM
        replaced by a no-op so only the LoRA delta is timed (lora_apply only: PEFT has no separate ops)
  vllm  vLLM's Triton LoRA kernels, only when `import vllm` works; otherwise one row marked unavailable
Each takes the inputs the kernel spec's `sample` built, so every provider runs on the same tensors."""

from __future__ import annotations

import warnings

import torch

from harness.bench.case import Unavailable, vllm_unavailable
from runtime.kernels.spec import DTYPES

PROVIDERS = ("peft", "vllm")


class _Const(torch.nn.Module):
    """Stands in for a LoRA layer's base Linear: returns a preallocated output, so only the delta is timed."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, *args, **kwargs):
        return self.out


def _peft_apply(p: dict, x, y, slots, device):
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


def _vllm(op: str, p: dict, args: tuple, device):
    reason = vllm_unavailable()
    if reason:
        raise Unavailable(reason)
    from vllm.lora.ops.triton_ops import lora_expand, lora_shrink
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    T, s, r, n = p["T"], p["slices"], p["rank"], p["n_adapters"]
    slots = args[2] if op != "apply" else args[4]
    meta = LoRAKernelMeta.make(max_loras=n + 1, max_num_tokens=T, device=device)
    meta.prepare_tensors(slots)
    margs = meta.meta_args(T)
    out = torch.zeros(s, T, r, dtype=torch.float32, device=device)
    if op == "shrink":
        x, A, _ = args
        return lambda: lora_shrink(x, A, out, *margs, 1.0)
    if op == "expand":
        v, B, _, y = args
        return lambda: lora_expand(v, B, y, *margs, offset_start=0, add_inputs=True)
    x, y, A, B, _ = args

    def apply():
        lora_shrink(x, A, out, *margs, 1.0)
        lora_expand(out, B, y, *margs, offset_start=0, add_inputs=True)
    return apply


def build(kernel: str, provider: str, p: dict, args: tuple, device: torch.device):
    op = kernel.removeprefix("lora_")
    if provider == "peft":
        if op != "apply":
            raise Unavailable(f"PEFT has no separate {op} op (only lora_apply has a peft provider)")
        x, y, _, _, slots = args
        return _peft_apply(p, x, y, slots, device)
    if provider == "vllm":
        return _vllm(op, p, args, device)
    raise ValueError(f"unknown provider {provider!r} for {kernel}")
