"""Per-group token -> slot vectors for a batch, with lengths from the registry's formulas only.

Each image contributes [slot] x encoder_rows to the tower mapping and [slot] x connector_rows to the
connector mapping; each request contributes [slot] x L_max to the language-model mapping (B x L_max
positions, padding included). Before a LoRA module runs, the rows reaching it must equal its group's
mapping length: anything else is a loud error naming the module, the group and both numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from harness.arch import ArchSpec
from harness.requests import Request


class MappingError(ValueError):
    """Rows reaching a LoRA module disagree with the mapping's length for its group."""


# Count functions per group; a seeded fault may swap one (e.g. tower rows counted with LM formulas).
RowCounter = Callable[[ArchSpec, object, object], int]
COUNTERS: dict[str, RowCounter] = {
    "tower": lambda arch, cfg, g: arch.encoder_rows(cfg, g),
    "connector": lambda arch, cfg, g: arch.connector_rows(cfg, g),
}


@dataclass
class Mapping:
    slots: dict[str, torch.Tensor]  # group -> int32 [rows]
    # group -> does any row carry an adapter (known on the host at build time: no device sync per module)
    active: dict[str, bool] | None = None
    _groups: dict = field(default_factory=dict, repr=False)

    def is_active(self, group: str) -> bool:
        if self.active is None:  # a mapping rebuilt by a fault transform: ask the device
            return bool((self.slots[group] >= 0).any())
        return self.active[group]

    def groups(self, group: str, n_slots: int):
        """Token grouping by slot for the kernel, computed once per group per batch."""
        from runtime.kernels import lora_groups

        if group not in self._groups:
            self._groups[group] = lora_groups(self.slots[group], n_slots)
        return self._groups[group]

    def for_module(self, name: str, group: str, rows: int) -> torch.Tensor:
        s = self.slots[group]
        if s.shape[0] != rows:
            raise MappingError(f"module {name!r} ({group}) received {rows} rows but the mapping for this batch "
                               f"has {s.shape[0]}")
        return s


def build_mapping(arch: ArchSpec, config, requests: Sequence[Request], slots: Sequence[int], l_max: int,
                  device: torch.device | str = "cpu", counters: dict[str, RowCounter] | None = None) -> Mapping:
    counters = {**COUNTERS, **(counters or {})}
    out: dict[str, list[int]] = {"tower": [], "connector": [], "language_model": []}
    for req, slot in zip(requests, slots, strict=True):
        for g in req.images:
            out["tower"] += [slot] * counters["tower"](arch, config, g)
            out["connector"] += [slot] * counters["connector"](arch, config, g)
        out["language_model"] += [slot] * l_max
    return Mapping({k: torch.tensor(v, dtype=torch.int32, device=device) for k, v in out.items()},
                   {k: any(s >= 0 for s in v) for k, v in out.items()})
