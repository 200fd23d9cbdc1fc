"""The runtime under test: the same HF model with every LoRA-target Linear swapped for a multi-LoRA module
(slot tables + Triton kernels) that keeps the HF module name, so captures line up by name."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from harness.arch import ArchSpec, get_arch
from harness.capture import Captures, Recorder, split_records
from harness.requests import Request, build_batch
from runtime.adapters import SlotTables
from runtime.kernels import lora_apply, lora_apply_torch
from runtime.mapping import Mapping, build_mapping
from runtime.substitutions import active, install

KERNELS = {"triton": lora_apply, "torch": lora_apply_torch}


class LoRALinear(torch.nn.Module):
    """y = base(x) + B[slot_t] A[slot_t] x_t per row t; slot -1 leaves the row untouched."""

    def __init__(self, base: torch.nn.Linear, name: str, group: str, owner: RuntimeModel):
        super().__init__()
        self.base_layer = base
        self.name, self.group = name, group
        self.__dict__["_owner"] = owner  # plain attribute: not a submodule

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads .weight.dtype / .device of its Linear layers
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        owner: RuntimeModel = self.__dict__["_owner"]
        if owner.mapping is None:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        owner.apply_lora(self.name, self.group, x2, y2)
        return y2.view(y.shape)


class RuntimeModel:
    """Swap LoRA-target Linears of an HF model for `LoRALinear`; adapters live in `tables` slots."""

    def __init__(self, arch: ArchSpec, config, model: torch.nn.Module, *, max_slots: int = 8, r_max: int = 16,
                 extra_targets: Iterable[str] = (), kernel: str = "triton", substitute: bool = True):
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel provider {kernel!r}; expected one of {', '.join(KERNELS)}")
        self.arch, self.config, self.model = arch, config, model.eval()
        self.kernel = KERNELS[kernel]
        self.mapping: Mapping | None = None
        regex = re.compile(arch.target_regex(arch.lora_groups()))
        extra = set(extra_targets)
        names = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and (regex.fullmatch(n) or n in extra)]
        if not names:
            raise ValueError(f"{arch.model_type}: no Linear matches the LoRA recipes")
        p = next(model.parameters())
        self.tables = SlotTables({n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features)
                                  for n in names}, max_slots, r_max, p.dtype, p.device)
        self.lora_names = names
        for n in names:
            parent, _, child = n.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, child, LoRALinear(getattr(holder, child), n, arch.group_of(n), self))
        self.device, self.dtype = p.device, p.dtype
        # vision kernels (Gemma4 pooler / RoPE, Llama 4 / InternVL pixel shuffle) replace HF's code
        self.substitutions = install(arch.model_type, model) if substitute else []
        # seeded faults (harness/faults.py) hook in here; all None in a healthy runtime
        self.slot_transform = None   # (name, group, slots) -> slots
        self.group_transform = None  # (name, group) -> group the module's rows are looked up in
        self.counters: dict | None = None  # group -> row-count function replacing the registry's
        self.mapping_transform = None  # (Mapping, requests, lengths) -> Mapping
        self.global_overrides: dict = {}  # substitution label -> replacement kernel

    @classmethod
    def from_checkpoint(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu", **kw):
        from harness.checkpoint import load_checkpoint

        arch, config, model = load_checkpoint(folder, dtype=dtype, device=device)
        return cls(arch, config, model, **kw)

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, folder, slot: int | None = None) -> int:
        """`folder`: a PEFT adapter folder or an already read `harness.peft_io.AdapterFile`."""
        return self.tables.load(name, folder, slot)

    def unload_adapter(self, name: str) -> None:
        self.tables.unload(name)

    # ------------------------------------------------------------------ running
    def slots_for(self, name: str, group: str, rows: int) -> torch.Tensor:
        if self.group_transform is not None:
            group = self.group_transform(name, group)
        slots = self.mapping.for_module(name, group, rows)
        if self.slot_transform is not None:
            slots = self.slot_transform(name, group, slots)
        return slots

    def make_mapping(self, requests: Sequence[Request], lengths: Sequence[int], l_max: int,
                     counters: dict | None = None) -> Mapping:
        slots = [self.tables.slot(r.adapter) for r in requests]
        mapping = build_mapping(self.arch, self.config, requests, slots, l_max, self.device,
                                {**(self.counters or {}), **(counters or {})})
        if self.mapping_transform is not None:
            mapping = self.mapping_transform(mapping, requests, lengths)
        return mapping

    def apply_lora(self, name: str, group: str, x2: torch.Tensor, y2: torch.Tensor) -> None:
        slots = self.slots_for(name, group, x2.shape[0])
        A, B = [self.tables.A[name]], [self.tables.B[name]]
        healthy = self.slot_transform is None and self.group_transform is None
        if healthy and self.kernel is lora_apply:
            # the grouping and the "any adapter" test are shared by every module of the group: no host
            # sync and no argsort per module
            if self.mapping.is_active(group):
                lora_apply(x2, y2, A, B, slots, groups=self.mapping.groups(group, self.tables.max_slots))
        elif bool((slots >= 0).any()):
            self.kernel(x2, y2, A, B, slots)

    def run(self, requests: Sequence[Request], dtype: torch.dtype | None = None,
            counters: dict | None = None) -> Captures:
        """One batched forward of a mixed batch; per-request captures of every LoRA module + boundaries."""
        # pixels in the model's dtype, as a serving engine feeds them (Llama 4's patch embedding does not cast)
        batch = build_batch(self.arch, self.config, requests).to(self.device, dtype or self.dtype)
        self.mapping = self.make_mapping(requests, batch.lengths, batch.input_ids.shape[1], counters)
        rec = Recorder(self.model, self.lora_names, self.arch)
        rec.set_image_positions(batch.input_ids == self.arch.image_token_id(self.config))
        try:
            with torch.no_grad(), active(self.arch.model_type, self.substitutions, self.global_overrides):
                logits = self.arch.forward_logits(self.model, **batch.model_inputs())
        finally:
            rec.close()
            self.mapping = None
        return split_records(rec.records, self.arch, self.config, batch, logits)


def load_runtime(source: str | Path, arch: str | None = None, **kw) -> RuntimeModel:
    """`source` is a checkpoint folder; for a tiny model, save it first (the harness does)."""
    if arch is not None:
        get_arch(arch)
    return RuntimeModel.from_checkpoint(source, **kw)
