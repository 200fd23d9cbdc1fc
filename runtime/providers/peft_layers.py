"""peft: PEFT's own mixed-adapter LoRA Linear (`adapter_names`), a bench baseline: one LoRA layer per slice,
its base GEMM replaced by a no-op so only the LoRA delta is timed (lora_apply only: PEFT has no separate
shrink / expand). PEFT is the reference's library: end to end the bench runs the HF + PEFT reference model
for it, and the report's speed-ups are over it."""

from __future__ import annotations

import warnings

import torch

from runtime.kernels.spec import DTYPES
from runtime.providers.provider import BenchSpec, GroupedBatch, LoRAProvider


class _Const(torch.nn.Module):
    """Stands in for a LoRA layer's base Linear: returns a preallocated output, so only the delta is timed."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, *args, **kwargs):
        return self.out


def _apply(b: GroupedBatch, p: dict, device: torch.device):
    from peft import LoraConfig, get_peft_model

    n, r, Ow, s = p["n_adapters"], p["rank"], p["O"], p["slices"]
    dt = DTYPES[p["dtype"]]
    layers = []
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(s):
            holder = torch.nn.Module()
            holder.proj = torch.nn.Linear(b.x.shape[1], Ow, bias=False, device=device, dtype=dt)
            pm = get_peft_model(holder, cfg, adapter_name="a0")
            for a in range(1, n):
                pm.add_adapter(f"a{a}", cfg)
            layer = pm.base_model.model.proj
            layer.base_layer = _Const(b.y[:, i * Ow:(i + 1) * Ow])
            layers.append(layer)
    names = [f"a{int(t)}" for t in b.slots.tolist()]

    def fn():
        with torch.no_grad():
            for layer in layers:
                layer(b.x, adapter_names=names)
    return fn


PROVIDER = LoRAProvider(
    "peft", "HF + PEFT's mixed-adapter LoRA Linear", order=30, runtime=False, reference=True,
    bench=BenchSpec(ops={"apply": _apply}, variant="eager", color="tab:green"))
