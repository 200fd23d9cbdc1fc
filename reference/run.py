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
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlm.arch import ArchSpec
from vlm.capture import Captures, Recorder, captures_per_request
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


def _forward(peft_model, arch: ArchSpec, config, batch: Batch, names: list[str], extra: dict) -> Captures:
    rec = Recorder(peft_model, names, arch, prefix=BASE_PREFIX)
    rec.set_image_positions(batch.input_ids == arch.image_token_id(config))
    try:
        with torch.no_grad():
            logits = arch.forward_logits(peft_model, **batch.model_inputs(), **extra)
    finally:
        rec.close()
    return captures_per_request(rec.records, arch, config, batch, logits)


def run_reference(peft_model, arch: ArchSpec, config, requests: Sequence[Request], mode: str = "single",
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ReferenceRun:
    if mode not in MODES:
        raise ValueError(f"unknown reference mode {mode!r}; expected one of {MODES}")
    if not requests:
        raise ValueError("empty batch: at least one request is needed")
    names = lora_module_names(peft_model)
    if mode == "single":
        caps: Captures = []
        for r in requests:
            with _adapter_ctx(peft_model, r.adapter):
                caps += _forward(peft_model, arch, config, build_batch(arch, config, [r]).to(device, dtype), names, {})
        return ReferenceRun(caps, names)
    if mode == "grouped":
        caps = [None] * len(requests)
        order: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            order.setdefault(r.adapter, []).append(i)
        for adapter, idx in order.items():
            batch = build_batch(arch, config, [requests[i] for i in idx]).to(device, dtype)
            with _adapter_ctx(peft_model, adapter):
                for i, c in zip(idx, _forward(peft_model, arch, config, batch, names, {})):
                    caps[i] = c
        return ReferenceRun(caps, names)
    batch = build_batch(arch, config, requests).to(device, dtype)
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
