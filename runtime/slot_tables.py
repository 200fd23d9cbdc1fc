"""PEFT adapter folders -> stacked slot tensors, the layout serving engines use.

Per LoRA module: A[slots, r_max, in] and B[slots, out, r_max]; ranks zero-padded to r_max and the
scale (alpha/r, or alpha/sqrt(r) with rsLoRA) folded into B at load, so the kernel is one shrink + expand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm.adapter_files import AdapterFile, read_adapter


@dataclass
class SlotTables:
    shapes: Mapping[str, tuple[int, int]]  # module -> (in_features, out_features)
    max_slots: int
    r_max: int
    dtype: torch.dtype
    device: torch.device
    A: dict[str, torch.Tensor] = field(default_factory=dict)
    B: dict[str, torch.Tensor] = field(default_factory=dict)
    slot_of: dict[str, int] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)  # adapter name -> its adapter_config.json

    def __post_init__(self):
        if self.max_slots < 1:
            raise ValueError(f"max_slots={self.max_slots} must be >= 1")
        if self.r_max < 1:
            raise ValueError(f"r_max={self.r_max} must be >= 1")
        for name, (i, o) in self.shapes.items():
            self.A[name] = torch.zeros(self.max_slots, self.r_max, i, dtype=self.dtype, device=self.device)
            self.B[name] = torch.zeros(self.max_slots, o, self.r_max, dtype=self.dtype, device=self.device)

    def load(self, name: str, source: str | Path | AdapterFile, slot: int | None = None) -> int:
        """Validate and place an adapter; returns its slot. A name already loaded is replaced in place."""
        adapter = source if isinstance(source, AdapterFile) else read_adapter(source)
        for module, w in adapter.modules.items():
            if module not in self.shapes:
                raise ValueError(f"adapter {name!r} targets module {module!r}, which is not a LoRA module of "
                                 f"this runtime model")
            i, o = self.shapes[module]
            if w.A.shape[1] != i or w.B.shape[0] != o:
                raise ValueError(f"adapter {name!r}: module {module!r} is Linear({i}->{o}) but lora_A is "
                                 f"{tuple(w.A.shape)} and lora_B {tuple(w.B.shape)}")
            if w.rank > self.r_max:
                raise ValueError(f"adapter {name!r}: module {module!r} has rank {w.rank} > r_max={self.r_max}")
        if slot is None:
            slot = self.slot_of.get(name)
        if slot is None:
            used = set(self.slot_of.values())
            free = [s for s in range(self.max_slots) if s not in used]
            if not free:
                raise ValueError(f"no free slot for adapter {name!r}: all {self.max_slots} slots hold "
                                 f"{', '.join(self.slot_of)}")
            slot = free[0]
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is outside [0, {self.max_slots})")
        self._clear(slot)
        for module, w in adapter.modules.items():
            r = w.rank
            self.A[module][slot, :r] = w.A.to(self.device, self.dtype)
            # fold the scale in fp32, then cast once
            self.B[module][slot, :, :r] = (w.B.to(self.device, torch.float32) * w.scale).to(self.dtype)
        self.slot_of[name] = slot
        self.configs[name] = dict(adapter.config)
        return slot

    def unload(self, name: str) -> None:
        if name not in self.slot_of:
            raise ValueError(f"adapter {name!r} is not loaded")
        self._clear(self.slot_of.pop(name))
        self.configs.pop(name, None)

    def _clear(self, slot: int) -> None:
        for module in self.shapes:
            self.A[module][slot].zero_()
            self.B[module][slot].zero_()

    def slot(self, adapter: str | None) -> int:
        if adapter is None:
            return -1
        if adapter not in self.slot_of:
            raise ValueError(f"request asks for adapter {adapter!r}, which is not loaded "
                             f"(loaded: {', '.join(self.slot_of) or 'none'})")
        return self.slot_of[adapter]
