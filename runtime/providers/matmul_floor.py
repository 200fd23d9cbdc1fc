"""matmul_floor: the floor, a bench baseline. Every token on one adapter, two plain matmuls per slice in the
activation dtype: not a multi-LoRA method, the time any multi-LoRA kernel would need with no mixing at all."""

from __future__ import annotations

import torch

from runtime.providers.provider import BenchSpec, ExpandInputs, GroupedBatch, LoRAProvider, ShrinkInputs


def _shrink(i: ShrinkInputs, p: dict, device: torch.device):
    a0 = [a[0].T for a in i.A]
    return lambda: [i.x @ a for a in a0]


def _expand(i: ExpandInputs, p: dict, device: torch.device):
    b0 = [b[0].T for b in i.B]
    vs = i.v.to(i.B[0].dtype)
    w = i.B[0].shape[1]
    return lambda: [i.y[:, k * w:(k + 1) * w].add_(vs[k] @ b) for k, b in enumerate(b0)]


def _apply(b: GroupedBatch, p: dict, device: torch.device):
    pairs = [(a[0].T, bb[0].T) for a, bb in zip(b.A, b.B)]
    w = b.B[0].shape[1]
    return lambda: [b.y[:, k * w:(k + 1) * w].add_((b.x @ a) @ bb) for k, (a, bb) in enumerate(pairs)]


PROVIDER = LoRAProvider(
    "matmul_floor", "every token on one adapter, two plain matmuls per slice", order=60, runtime=False,
    bench=BenchSpec(ops={"shrink": _shrink, "expand": _expand, "apply": _apply}, color="tab:gray", versus=False))
