"""triton: the runtime's own Triton kernels (runtime/kernels/lora.py), one token grouping per module group and
batch. The bench times every kernel spec's Triton op with it, in the spec's variants."""

from __future__ import annotations

from runtime.kernels import lora_apply, token_grouping
from runtime.providers.provider import OP, BenchSpec, LoRAProvider, batched

PROVIDER = LoRAProvider(
    "triton", "the runtime's Triton kernels", order=10, default=True, triton=True,
    apply=batched(lora_apply),
    # slot ids are validated on the host where the mapping is built: the grouping never syncs
    grouping=lambda slots, n: token_grouping(slots, n, validate=False),
    bench=BenchSpec(times=OP, color="tab:blue"))
