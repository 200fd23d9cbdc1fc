"""vllm: vLLM's own Triton LoRA kernels (runtime/vllm_lora.py: the calls vLLM's engine makes), imported, never
copied. fp16 / bf16 only (its shrink asserts them), fp16 only in the Triton interpreter (bf16 tl.dot is wrong
there). The bench times its shrink, expand and apply with its LoRAKernelMeta prepared outside the timed call,
as its engine prepares it once per batch; end to end it would need vLLM's whole engine."""

from __future__ import annotations

import torch

from runtime import vllm_lora
from runtime.kernels import interpreted
from runtime.providers.provider import (
    INTERPRETER_NOTE,
    BenchSpec,
    ExpandInputs,
    GroupedBatch,
    LoRAProvider,
    ShrinkInputs,
    noted,
)


def _unavailable(dtype: torch.dtype | None, device: torch.device | None) -> str | None:
    return (vllm_lora.refusal(dtype) if dtype is not None else None) or vllm_lora.unavailable_reason()


def _meta(slots: torch.Tensor, n_slots: int) -> tuple:
    """vLLM's LoRAKernelMeta for these slots and its launch arguments, prepared once per batch as its engine does."""
    # vLLM caches each weight list's pointer table keyed by data_ptr() alone, assuming weights allocated once per
    # engine; a sweep allocates per point, so a freed address reused with other strides would hit a stale entry
    # (and single-slice entries keep every tensor alive). Dropping the cache costs one table build per point.
    from vllm.lora.ops.triton_ops import utils as vllm_utils

    vllm_utils._LORA_A_PTR_DICT.clear()
    vllm_utils._LORA_B_PTR_DICT.clear()
    g = vllm_lora.vllm_grouping(slots, n_slots)
    return g, g.meta.meta_args(g.rows, False)


def _noted(fn, p: dict):
    return noted(fn, f"{INTERPRETER_NOTE}; vLLM {p['dtype']} with interpreter configs (no split-K)") \
        if interpreted() else fn


def _shrink(i: ShrinkInputs, p: dict, device: torch.device):
    ops = vllm_lora.load()
    _, margs = _meta(i.slots, i.A[0].shape[0])
    out = torch.zeros(len(i.A), i.x.shape[0], i.A[0].shape[1], dtype=torch.float32, device=device)
    return _noted(lambda: (ops.lora_shrink(i.x, list(i.A), out, *margs, 1.0), out)[1], p)


def _expand(i: ExpandInputs, p: dict, device: torch.device):
    ops = vllm_lora.load()
    _, margs = _meta(i.slots, i.B[0].shape[0])
    return _noted(lambda: ops.lora_expand(i.v, list(i.B), i.y, *margs, offset_start=0, add_inputs=True), p)


def _apply(b: GroupedBatch, p: dict, device: torch.device):
    g, _ = _meta(b.slots, b.A[0].shape[0])
    return _noted(lambda: vllm_lora.lora_apply_vllm(b.x, b.y, b.A, b.B, b.slots, grouping=g), p)


PROVIDER = LoRAProvider(
    "vllm", "vLLM's own Triton LoRA kernels, fp16 / bf16", order=40, triton=True, unavailable=_unavailable,
    # vllm_lora's functions looked up on each call, not bound here (the tests swap them)
    apply=lambda b: vllm_lora.lora_apply_vllm(b.x, b.y, b.A, b.B, b.slots, grouping=b.grouping),
    grouping=lambda slots, n: vllm_lora.vllm_grouping(slots, n),
    bench=BenchSpec(ops={"shrink": _shrink, "expand": _expand, "apply": _apply}, color="tab:red",
                    e2e_unavailable="vllm end to end is not implemented (it needs the vLLM engine)"))
