"""Weight-only int8 of the language model's Linear layers (the LLaVA practice), honouring the registry's
`quant_skip_modules()`: tower and connector stay in full precision, norms fp32, the output head too.

Per-output-channel symmetric int8, stored dequantized (fake quant): the numbers equal what an int8
weight-only GEMM computes up to its accumulation order, which is what the drift report needs.
"""

from __future__ import annotations

import hashlib
import re

import torch

from vlm.arch import ArchSpec

SCHEMES = ("lm-int8",)


def _base_linears(model: torch.nn.Module):
    """(HF module name, the nn.Linear holding its base weight): runtime LoRA modules are looked through."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith(".base_layer"):
            yield name, mod
        elif hasattr(mod, "base_layer") and isinstance(mod.base_layer, torch.nn.Linear):
            yield name, mod.base_layer


def should_quantize(arch: ArchSpec, name: str, include_projector: bool) -> bool:
    group = arch.group_or_none(name)
    if group == "connector" and include_projector:
        return not any(re.fullmatch(rx, name) for rx in arch.quant_skip_extra)
    return group == "language_model" and not arch.is_quant_skipped(name)


@torch.no_grad()
def int8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return (torch.round(w.float() / scale).clamp(-127, 127) * scale).to(w.dtype)


@torch.no_grad()
def quantize_model(model: torch.nn.Module, arch: ArchSpec, scheme: str = "lm-int8",
                   include_projector: bool = False) -> list[str]:
    """Quantize `model`'s Linears; returns the HF names of the quantized layers. Each quantized Linear gets a
    new weight tensor: the one it held may be shared with the reference (vlm.checkpoint.shared_twin), which
    must keep the checkpoint's weights."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; expected one of {', '.join(SCHEMES)}")
    done = []
    for name, lin in _base_linears(model):
        if should_quantize(arch, name, include_projector):
            lin.weight = torch.nn.Parameter(int8_roundtrip(lin.weight), requires_grad=False)
            done.append(name)
    return done


def _protected(arch: ArchSpec, name: str, include_projector: bool) -> bool:
    """A module the skip list keeps at full precision (the connector is released by --quantize-projector)."""
    return arch.is_quant_skipped(name) and not (include_projector and arch.group_or_none(name) == "connector")


def _digest(w: torch.Tensor) -> bytes:
    # one weight's bytes hashed where it lies (a GPU weight comes over one at a time): a fingerprint, so the
    # check holds no second copy of the protected weights (the tower alone is ~0.6 GB at LLaVA-7B widths)
    t = w.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").digest()


def snapshot(model: torch.nn.Module, arch: ArchSpec, include_projector: bool) -> dict[str, bytes]:
    """Fingerprints of the weights the skip list protects, taken before quantizing."""
    return {name: _digest(lin.weight) for name, lin in _base_linears(model)
            if _protected(arch, name, include_projector)}


def skip_violations(before: dict[str, bytes], model: torch.nn.Module) -> list[str]:
    """Modules the skip list protects whose weights changed anyway (the run fails on any)."""
    return [name for name, lin in _base_linears(model) if name in before and before[name] != _digest(lin.weight)]
