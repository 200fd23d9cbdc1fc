"""torch: the kernels' pure-torch twins (per-slot gather + matmul, fp32 accumulation), the oracles of the
kernels' tests. It groups by itself on every call; the bench times every kernel spec's twin with it, as called."""

from __future__ import annotations

from runtime.kernels import lora_apply_torch
from runtime.providers.provider import TWIN, BenchSpec, LoRAProvider, batched

PROVIDER = LoRAProvider(
    "torch", "the kernels' pure-torch twins", order=20, apply=batched(lora_apply_torch),
    bench=BenchSpec(times=TWIN, variant="eager", color="tab:orange"))
