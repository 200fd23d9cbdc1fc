"""The runtime under test: the same HF model with every LoRA-target Linear swapped for a multi-LoRA module
(slot tables + a LoRA provider's kernels) that keeps the HF module name, so captures line up by name."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from runtime.hooks import NO_FAULT, RuntimeHooks
from runtime.mapping import SlotMapping, build_mapping
from runtime.providers import DEFAULT, GroupedBatch, runtime_provider
from runtime.slot_tables import SlotTables
from runtime.substitutions import active, install
from vlm.adapter_files import AdapterFile, read_adapter
from vlm.arch import ArchSpec
from vlm.capture import Captures, Recorder, Sink
from vlm.requests import Request, build_batch


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
                 extra_targets: Iterable[str] = (), kernel: str = DEFAULT, substitute: bool = True):
        """`kernel`: the LoRA provider's name (runtime/providers)."""
        self.provider = runtime_provider(kernel)
        self.arch, self.config, self.model = arch, config, model.eval()
        p = next(model.parameters())
        # under an accelerate device map offloaded weights sit on the meta device: the runtime's device (slot
        # tables, mappings, inputs) is the first one holding weights
        device = next((t.device for t in model.parameters() if t.device.type != "meta"), torch.device("cpu"))
        self.provider.check(p.dtype, device)
        self.mapping: SlotMapping | None = None
        # a seeded fault replaces this (harness/correctness/faults.py); the healthy path calls every hook anyway
        self.hooks: RuntimeHooks = NO_FAULT
        regex = re.compile(arch.target_regex(arch.targetable_groups()))
        extra = set(extra_targets)
        names = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and (regex.fullmatch(n) or n in extra)]
        if not names:
            raise ValueError(f"{arch.model_type}: no Linear matches the LoRA recipes")
        self.tables = SlotTables({n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features)
                                  for n in names}, max_slots, r_max, p.dtype, device)
        self.lora_names = names
        for n in names:
            parent, _, child = n.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, child, LoRALinear(getattr(holder, child), n, arch.group_of(n), self))
        self.device, self.dtype = device, p.dtype
        # vision kernels (the sites the arch file declares) replace HF's code, and the HF glue around them
        # that is wrong on valid inputs is corrected as the arch file states
        self.kernel_sites = install(arch, model, lambda: self.hooks) if substitute else []
        self.fixes = arch.install_fixes(model, runtime=True)

    @classmethod
    def from_checkpoint(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu", *,
                        device_map=None, max_memory=None, offload_folder=None, **kw):
        """`device_map` / `max_memory` / `offload_folder`: accelerate's placement (vlm.checkpoint.load_checkpoint)."""
        from vlm.checkpoint import load_checkpoint

        arch, config, model = load_checkpoint(folder, dtype=dtype, device=device, device_map=device_map,
                                              max_memory=max_memory, offload_folder=offload_folder)
        return cls(arch, config, model, **kw)

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, folder, slot: int | None = None) -> int:
        """`folder`: a PEFT adapter folder (module names the model lacks converted by the model's own key
        conversion) or an already read `vlm.adapter_files.AdapterFile`."""
        if not isinstance(folder, AdapterFile):
            folder = read_adapter(folder, self.model)
        return self.tables.load(name, folder, slot)

    def unload_adapter(self, name: str) -> None:
        self.tables.unload(name)

    # ------------------------------------------------------------------ running
    def make_mapping(self, requests: Sequence[Request], l_max: int) -> SlotMapping:
        slots = [self.tables.slot(r.adapter) for r in requests]
        n_slots = self.tables.max_slots
        return build_mapping(self.arch, self.config, requests, slots, l_max, self.device, self.hooks,
                             lambda s: self.provider.grouping(s, n_slots), n_slots=n_slots)

    def apply_lora(self, name: str, group: str, x2: torch.Tensor, y2: torch.Tensor) -> None:
        """One path for every run: the hooks pick the slot vector and the kernel (identity when healthy);
        the provider runs on exactly the slot vector the module was handed, with its grouping."""
        hooks, mapping = self.hooks, self.mapping
        slots = mapping.for_module(name, hooks.module_group(name, group), x2.shape[0])
        slots = hooks.module_slots(name, group, slots)
        if not mapping.is_active(slots):
            return
        apply = hooks.kernel("lora", self.provider.apply, module=name)
        # a module a device map put on another GPU: LoRA on the tables' device (`.to` is a no-op otherwise)
        x, y = x2.to(self.device), y2.to(self.device)
        apply(GroupedBatch(x, y, [self.tables.A[name]], [self.tables.B[name]], slots, mapping.grouping(slots)))
        if y is not y2:
            y2.copy_(y)

    def run(self, requests: Sequence[Request], dtype: torch.dtype | None = None, sink: Sink | None = None) -> Captures:
        """One batched forward of a mixed batch; per-request captures of every LoRA module + boundaries.
        With `sink`, every tensor (batched rows, unsplit; the logits last) goes there as it is made and the
        captures returned are empty."""
        # pixels in the model's dtype, as a serving engine feeds them (Llama 4's patch embedding does not cast)
        batch = build_batch(self.arch, self.config, requests).to(self.device, dtype or self.dtype)
        self.mapping = self.make_mapping(requests, batch.input_ids.shape[1])
        rec = Recorder(self.model, self.lora_names, self.arch, sink=sink)
        rec.set_image_positions(batch.input_ids == self.arch.image_token_id(self.config))
        try:
            with torch.no_grad(), active(self.kernel_sites, lambda: self.hooks):
                logits = self.arch.forward_logits(self.model, **batch.model_inputs())
        finally:
            rec.close()
            self.mapping = None
        return rec.captures(self.config, batch, logits)
