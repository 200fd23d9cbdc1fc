"""Run requests through HF + PEFT and capture every LoRA module and the group boundaries per request.

Modes:
  single      each request alone, its adapter made active with `set_adapter` (or none, inside
              `disable_adapter()`): the truth (PEFT 0.21's mixed-adapter path cannot reach a tower)
  grouped     requests grouped by adapter, each group batched: a mixed batch PEFT can run for any group
  peft_mixed  one call with PEFT's `adapter_names`; works only where every adapted module sees one row per
              request. PEFT 0.21 raises for tower/connector LoRA and keeps stale hooks afterwards, so this
              mode raises a clear ValueError and the caller must rebuild the PeftModel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlm.arch import ArchSpec
from vlm.capture import Captures, Recorder, Sink
from vlm.requests import Batch, Request, build_batch
from vlm.rows import LOGITS

BASE_PREFIX = "base_model.model."
MODES = ("single", "grouped", "peft_mixed")


@dataclass
class ReferenceRun:
    captures: Captures
    names: list[str]

    def logits(self, i: int) -> torch.Tensor:
        return self.captures[i][LOGITS]["out"]


def lora_module_names(peft_model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n.removeprefix(BASE_PREFIX) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


def _adapter_ctx(peft_model, adapter: str | None):
    if adapter is None:
        return peft_model.disable_adapter()
    if adapter not in peft_model.peft_config:
        raise ValueError(f"request asks for adapter {adapter!r}, which is not loaded "
                         f"(loaded: {', '.join(peft_model.peft_config)})")
    peft_model.set_adapter(adapter)
    return contextlib.nullcontext()


@torch.no_grad()
def module_outputs(peft_model, name: str, x: torch.Tensor, adapter: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA-carrying module of the PEFT model on input `x` with `adapter` active (None: no adapter):
    (its output, its base Linear's output). Replay's truth and every LoRA delta come from here."""
    module = peft_model.get_submodule(BASE_PREFIX + name)
    with _adapter_ctx(peft_model, adapter):
        return module(x), module.get_base_layer()(x)


@torch.no_grad()
def base_output(peft_model, name: str, x: torch.Tensor) -> torch.Tensor:
    """The base Linear of a LoRA-carrying module on input `x` (no adapter)."""
    return peft_model.get_submodule(BASE_PREFIX + name).get_base_layer()(x)


def _forward(peft_model, arch: ArchSpec, config, batch: Batch, names: list[str], extra: dict,
             sink: Sink | None = None, fed: Callable[[dict], None] | None = None) -> Captures:
    rec = Recorder(peft_model, names, arch, prefix=BASE_PREFIX, sink=sink)
    rec.set_image_positions(batch.input_ids == arch.image_token_id(config))
    # what the HF model's own forward is called with, after the arch's forward_logits has added what it derives
    hook = None if fed is None else peft_model.get_base_model().register_forward_pre_hook(
        lambda _m, args, kwargs: fed(_forward_kwargs(args, kwargs)), with_kwargs=True)
    try:
        with torch.no_grad():
            logits = arch.forward_logits(peft_model, **batch.model_inputs(), **extra)
    finally:
        rec.close()
        if hook is not None:
            hook.remove()
    return rec.captures(config, batch, logits)


def _forward_kwargs(args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The tensors a forward was called with, by keyword (None left out); anything else could not be fed
    again from tensors alone and is refused."""
    other = [k for k, v in kwargs.items() if v is not None and not isinstance(v, torch.Tensor)]
    if args or other:
        raise ValueError(f"the model's forward got {len(args)} positional argument(s) and non-tensor keyword(s) "
                         f"{other}: its inputs cannot be recorded as tensors")
    return {k: v for k, v in kwargs.items() if v is not None}


def run_reference(peft_model, arch: ArchSpec, config, requests: Sequence[Request], mode: str = "single",
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  compute_dtype: torch.dtype | None = None,
                  sink: Callable[[int], Sink] | None = None,
                  fed: Callable[[int, dict], None] | None = None) -> ReferenceRun:
    """Captures of every LoRA module and boundary per request. Pixel inputs are rounded to `dtype` (the run
    dtype, as a serving engine feeds them); with `compute_dtype` (the high-precision truth) they are then
    upcast, so the truth sees exactly the inputs the run sees. `sink(i)` (mode single only): request i's
    tensors go there as the hooks see them (batched rows, unsplit) and the captures returned are empty.
    `fed(i, inputs)` (mode single only): the tensors the HF model's forward was called with for request i,
    by keyword, as they ran (on the device, pixels at the run dtype)."""
    if compute_dtype is not None:
        def to(batch: Batch, device, dtype=dtype) -> Batch:
            return batch.to(device, dtype).to(device, compute_dtype)
    else:
        def to(batch: Batch, device, dtype=dtype) -> Batch:
            return batch.to(device, dtype)
    if mode not in MODES:
        raise ValueError(f"unknown reference mode {mode!r}; expected one of {MODES}")
    if (sink is not None or fed is not None) and mode != "single":
        raise ValueError("a capture sink or input record is per request: reference mode 'single' only")
    if not requests:
        raise ValueError("empty batch: at least one request is needed")
    names = lora_module_names(peft_model)
    if mode == "single":
        caps: Captures = []
        for r in requests:
            with _adapter_ctx(peft_model, r.adapter):
                i = len(caps)
                caps += _forward(peft_model, arch, config, to(build_batch(arch, config, [r]), device), names, {},
                                 sink(i) if sink is not None else None,
                                 None if fed is None else lambda kw, i=i: fed(i, kw))
        return ReferenceRun(caps, names)
    if mode == "grouped":
        caps = [None] * len(requests)
        order: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            order.setdefault(r.adapter, []).append(i)
        for adapter, idx in order.items():
            batch = to(build_batch(arch, config, [requests[i] for i in idx]), device)
            with _adapter_ctx(peft_model, adapter):
                for i, c in zip(idx, _forward(peft_model, arch, config, batch, names, {})):
                    caps[i] = c
        return ReferenceRun(caps, names)
    batch = to(build_batch(arch, config, requests), device)
    for r in requests:
        if r.adapter is not None and r.adapter not in peft_model.peft_config:
            raise ValueError(f"request asks for adapter {r.adapter!r}, which is not loaded")
    adapter_names = [r.adapter or "__base__" for r in requests]
    try:
        return ReferenceRun(_forward(peft_model, arch, config, batch, names, {"adapter_names": adapter_names}), names)
    except ValueError as e:
        if "adapter_names" in str(e):
            raise ValueError(
                "PEFT's mixed-adapter path (adapter_names) cannot run this batch: "
                + " ".join(str(e).split()) + " (known PEFT limitation: tower rows are not requests; "
                "rebuild the PeftModel before reuse)") from None
        raise
