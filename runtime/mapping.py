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

from runtime.hooks import NO_FAULT, RuntimeHooks
from vlm.arch import ArchSpec
from vlm.requests import Request


class MappingError(ValueError):
    """Rows reaching a LoRA module disagree with the mapping's length for its group."""


@dataclass
class SlotMapping:
    slots: dict[str, torch.Tensor]  # group -> int32 [rows] on the device
    # group -> does any row carry an adapter (known on the host at build time: no device sync per module)
    active: dict[str, bool]
    # builds what the LoRA provider needs from a slot vector (e.g. the kernels' TokenGrouping)
    make_grouping: Callable[[torch.Tensor], object] = lambda slots: None
    _groupings: dict = field(default_factory=dict, repr=False)

    def _group_holding(self, slots: torch.Tensor) -> str | None:
        return next((g for g, s in self.slots.items() if s is slots), None)

    def is_active(self, slots: torch.Tensor) -> bool:
        g = self._group_holding(slots)
        return self.active[g] if g is not None else bool((slots >= 0).any())

    def grouping(self, slots: torch.Tensor):
        """The provider's grouping of exactly this slot vector: computed once per group per batch for the
        group's own vector, and afresh for any other vector a module is handed."""
        g = self._group_holding(slots)
        if g is None:
            return self.make_grouping(slots)
        if g not in self._groupings:
            self._groupings[g] = self.make_grouping(slots)
        return self._groupings[g]

    def for_module(self, name: str, group: str, rows: int) -> torch.Tensor:
        s = self.slots[group]
        if s.shape[0] != rows:
            raise MappingError(f"module {name!r} ({group}) received {rows} rows but the mapping for this batch "
                               f"has {s.shape[0]}")
        return s


def build_mapping(arch: ArchSpec, config, requests: Sequence[Request], slots: Sequence[int], l_max: int,
                  device: torch.device | str = "cpu", hooks: RuntimeHooks = NO_FAULT,
                  make_grouping: Callable[[torch.Tensor], object] = lambda s: None,
                  n_slots: int | None = None) -> SlotMapping:
    """`n_slots`: the slot tables' size; the slot ids are then checked here, on the host, as python ints, so
    the provider may build its grouping on the device without reading anything back (no host sync)."""
    if n_slots is not None:
        bad = sorted({s for s in slots if not (isinstance(s, int) and -1 <= s < n_slots)}, key=repr)
        if bad:
            raise ValueError(f"slot ids must lie in [-1, {n_slots - 1}], got {bad}")
    out: dict[str, list[int]] = {"tower": [], "connector": [], "language_model": []}
    image = 0
    for req, slot in zip(requests, slots, strict=True):
        for g in req.images:
            counts = arch.counts(config, g)  # the registry's formulas; the hooks see them per image
            out["tower"] += [slot] * hooks.row_count("tower", image, counts)
            out["connector"] += [slot] * hooks.row_count("connector", image, counts)
            image += 1
        out["language_model"] += [slot] * l_max
    built = {k: torch.tensor(v, dtype=torch.int32, device=device) for k, v in out.items()}
    final = hooks.slot_mapping(dict(built), requests, [len(r.prompt_ids) for r in requests])
    active = {k: (any(s >= 0 for s in out[k]) if final[k] is built[k] else bool((final[k] >= 0).any()))
              for k in final}
    return SlotMapping(final, active, make_grouping)
