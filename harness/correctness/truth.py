"""The high-precision truth both sides are judged against, and what the adapters measurably do.

The truth is the reference itself (HF + PEFT, the same adapter folders) with every floating tensor upcast:
float64 on CPU, fp32 with IEEE matmuls (no TF32) on CUDA. Its weights are the run-dtype weights upcast
(so the truth and both sides share the same weights; only the arithmetic differs), its adapter weights
those of the adapter files, and its pixel inputs the run-dtype pixels upcast.

No second copy of the model is made: `high_precision` runs the reference's own PeftModel with its tensors
upcast in place for the length of a `with` block, and the large ones (a Linear or Embedding weight above
`BIG` bytes at the truth dtype: the LM's projections, the vocabulary) never whole: a large Linear computes
its output in column chunks from its weight upcast a chunk at a time, a large Embedding looks up the rows
it is asked for and upcasts only those. Every value the truth computes is the one a fully upcast copy
computes (the same products and sums at the same precision; a chunked Linear may sum in another blocking,
a difference at float64 rounding), and memory stays one model plus a chunk.
"""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path

import torch

from reference.adapters import add_adapters, default_specs, load_adapters
from reference.run import base_output, run_reference
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


BIG = 64 << 20  # bytes at the truth dtype: a Linear / Embedding weight above this is upcast piecewise
CHUNK = 16 << 20  # bytes at the truth dtype of one upcast piece of a large Linear weight


def _linear_in_chunks(mod: torch.nn.Linear, dtype: torch.dtype, chunk: int):
    """`mod`'s forward at `dtype` from its weight upcast `chunk` bytes at a time (output columns)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = mod.weight, mod.bias
        n = max(1, chunk // (w.shape[1] * torch.empty((), dtype=dtype).element_size()))
        if n >= w.shape[0]:
            return torch.nn.functional.linear(x, w.to(dtype), None if b is None else b.to(dtype))
        return torch.cat([torch.nn.functional.linear(x, w[i:i + n].to(dtype), None if b is None else b[i:i + n].to(dtype))
                          for i in range(0, w.shape[0], n)], dim=-1)
    return forward


def _embedding_rows(mod: torch.nn.Embedding, dtype: torch.dtype):
    """Pre / post forward hooks that make `mod` look up its rows in a table of only the rows asked for,
    upcast (a lookup is exact: the same values as looking up in the whole table upcast)."""
    state: list = []

    def pre(_mod, args, kwargs):
        key = None if args else next(iter(kwargs))
        ids = args[0] if args else kwargs[key]
        rows, where = torch.unique(ids, return_inverse=True)
        state.append((mod.weight.data, mod.padding_idx))
        mod.weight.data = mod.weight.data[rows].to(dtype)
        mod.padding_idx = None  # only gradients and a range check read it; the table is renumbered
        where = where.reshape(ids.shape)
        return ((where, *args[1:]), kwargs) if key is None else (args, {**kwargs, key: where})

    def post(_mod, _args, _kwargs, out):
        mod.weight.data, mod.padding_idx = state.pop()
        return out
    return pre, post


def _set_forward(mod: torch.nn.Module, forward) -> tuple:
    """Replace the forward `mod` runs (under accelerate's hooks: the one they wrap); returns how to undo it."""
    attr = "_old_forward" if hasattr(mod, "_hf_hook") else "forward"
    had = mod.__dict__.get(attr)
    object.__setattr__(mod, attr, forward)
    return mod, attr, had


@contextlib.contextmanager
def high_precision(model: torch.nn.Module, dtype: torch.dtype, big: int = BIG, chunk: int = CHUNK):
    """Run `model` (the reference PeftModel) as the truth inside the block: every floating parameter and buffer
    at `dtype` (float64 on CPU), IEEE fp32 matmuls on CUDA. Tensors are upcast in place and given back
    their very storage afterwards; Linear / Embedding weights above `big` bytes are never upcast whole (see
    the module docstring), so no second copy of the model exists. `big=0` puts every Linear and Embedding on
    the piecewise path (tests hold it to a fully upcast copy)."""
    size = torch.empty((), dtype=dtype).element_size()
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    forwards: list[tuple] = []
    handles: list = []
    seen: set[int] = set()
    # adapter Linears are small (rank r) and PEFT casts their input to their weight's dtype: always upcast whole
    adapter = {id(m) for m in model.modules() if type(m).__module__.startswith("peft.")
               for d in (getattr(m, "lora_A", None), getattr(m, "lora_B", None)) if isinstance(d, torch.nn.ModuleDict)
               for m in d.values()}
    try:
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            piecewise = (isinstance(mod, torch.nn.Linear | torch.nn.Embedding) and id(mod) not in adapter
                         and isinstance(w, torch.Tensor)
                         and w.is_floating_point() and w.dtype != dtype and w.numel() * size > big)
            if piecewise:
                seen.add(id(w))
                if isinstance(mod, torch.nn.Linear):
                    forwards.append(_set_forward(mod, _linear_in_chunks(mod, dtype, chunk)))
                else:
                    pre, post = _embedding_rows(mod, dtype)
                    handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
                    handles.append(mod.register_forward_hook(post, with_kwargs=True))
            for t in list(mod._parameters.values()) + list(mod._buffers.values()):
                if t is None or id(t) in seen or not t.is_floating_point():
                    continue
                seen.add(id(t))
                saved.append((t, t.data))
                t.data = t.data.to(dtype)
        with ieee_matmuls():
            yield model
    finally:
        for h in handles:
            h.remove()
        for mod, attr, had in forwards:
            if had is None:
                del mod.__dict__[attr]
            else:
                object.__setattr__(mod, attr, had)
        for t, data in saved:
            t.data = data


def _upcast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    # floating tensors only: Module.to(dtype) would also cast complex buffers (Llama 4's RoPE table) to real
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(dtype)


def truth_model(ckpt: Path, run_dtype: torch.dtype, device: torch.device, folders: dict[str, Path]):
    """A separate reference PeftModel at high precision (checkpoint loaded at the run dtype, adapters from the
    very folders the reference loads, then every floating tensor upcast): the truth as it was computed before
    `high_precision`, which tests hold the in-place truth to. Costs a second, upcast copy of the model."""
    arch, config, model = load_checkpoint(ckpt, dtype=run_dtype, device=device)
    arch.install_fixes(model)
    pm = load_adapters(model, folders) if folders else add_adapters(model, arch, default_specs(1))
    _upcast(pm, truth_dtype(device))
    return pm


def run_truth(pm, arch, config, reqs, device: torch.device, run_dtype: torch.dtype):
    """The truth's captures per request: the reference PeftModel `pm` run inside `high_precision`."""
    with high_precision(pm, truth_dtype(device)):
        return run_reference(pm, arch, config, reqs, "single", device, run_dtype,
                             compute_dtype=truth_dtype(device)).captures


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def adapter_ratios(truth_pm, arch, reqs, truth, targets: dict[str, set[str]],
                   dtype: torch.dtype = torch.float64) -> dict[str, dict[str, float]]:
    """rms(delta) / rms(base output), median over the modules each adapter targets, per adapter and group,
    measured on the truth run (the requests that use the adapter)."""
    per: dict[str, dict[str, list[float]]] = {}
    with high_precision(truth_pm, dtype):
        for req, caps in zip(reqs, truth):
            if req.adapter is None:
                continue
            for name, io in caps.items():
                if name.startswith("@") or name not in targets.get(req.adapter, ()) or "in" not in io:
                    continue
                base = base_output(truth_pm, name, io["in"])
                r = _rms(io["out"] - base) / max(_rms(base), 1e-300)
                per.setdefault(req.adapter, {}).setdefault(arch.group_of(name), []).append(r)
    return {a: {g: statistics.median(v) for g, v in groups.items()} for a, groups in per.items()}


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
