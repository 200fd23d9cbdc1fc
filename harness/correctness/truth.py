"""The high-precision truth both sides are judged against, and what the adapters measurably do.

The truth is the reference itself (HF + PEFT, the same adapter folders) with every floating tensor upcast:
float64 on CPU, fp32 with IEEE matmuls (no TF32) on CUDA. Its weights are the run-dtype weights upcast
(so the truth and both sides share the same weights; only the arithmetic differs), its adapter weights
those of the adapter files, and its pixel inputs the run-dtype pixels upcast.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from reference.adapters import add_adapters, default_specs, load_adapters
from reference.run import run_reference
from vlm.checkpoint import load_checkpoint


def truth_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


@contextlib.contextmanager
def ieee_matmuls():
    """fp32 matmuls without TF32 for the truth on CUDA (a no-op on CPU)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _upcast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    # floating tensors only: Module.to(dtype) would also cast complex buffers (Llama 4's RoPE table) to real
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(dtype)


def truth_model(ckpt: Path, run_dtype: torch.dtype, device: torch.device, folders: dict[str, Path]):
    """The reference PeftModel at high precision: checkpoint loaded at the run dtype, adapters from the very
    folders the reference loads, then every floating tensor upcast."""
    arch, config, model = load_checkpoint(ckpt, dtype=run_dtype, device=device)
    arch.install_fixes(model)
    pm = load_adapters(model, folders) if folders else add_adapters(model, arch, default_specs(1))
    _upcast(pm, truth_dtype(device))
    return pm


def run_truth(pm, arch, config, reqs, device: torch.device, run_dtype: torch.dtype, sink=None):
    with ieee_matmuls():
        return run_reference(pm, arch, config, reqs, "single", device, run_dtype,
                             compute_dtype=truth_dtype(device), sink=sink).captures


def trivial_warnings(ratios: dict[str, dict[str, float]], targets: dict[str, set[str]], arch,
                     negligible: float) -> list[str]:
    """One warning per (adapter, group) the adapter targets but leaves (almost) unchanged."""
    out = []
    for adapter, modules in targets.items():
        for group in sorted({arch.group_of(m) for m in modules}):
            r = ratios.get(adapter, {}).get(group)
            if r is not None and r < negligible:
                out.append(f"adapter {adapter!r} changes nothing on the {group} (delta / base = {r:.2g} < "
                           f"{negligible:g}): comparison is trivial")
    return out
