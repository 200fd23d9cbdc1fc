"""Per-group token -> slot vectors for a batch, with lengths from the registry's formulas only.

Each image contributes [slot] x encoder_rows to the tower mapping and [slot] x connector_rows to the
connector mapping; each request contributes [slot] x L_max to the language-model mapping (B x L_max
positions, padding included). Before a LoRA module runs, the rows reaching it must equal its group's
mapping length: anything else is a loud error naming the module, the group and both numbers, and, from
the per-image counts the mapping was built with, the request(s) and image(s) whose rows differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from runtime.hooks import NO_FAULT, RuntimeHooks
from vlm.arch import ArchSpec
from vlm.requests import Request


@dataclass(frozen=True)
class ImageRows:
    """One image's rows in a group's mapping: what the registry's formulas give, and what the mapping holds."""

    request: int  # the request's index in the batch
    image: int    # the image's index within its request
    expected: int
    mapped: int


class MappingError(ValueError):
    """Rows reaching a LoRA module disagree with the mapping's length for its group. `images`: the group's
    per-image counts as the mapping was built (empty when they cannot be told: a token-indexed group, or a
    mapping rewritten after it was laid out)."""

    def __init__(self, message: str, module: str = "", group: str = "", rows: int = 0, mapped: int = 0,
                 images: Sequence[ImageRows] = ()):
        super().__init__(message)
        self.module, self.group, self.rows, self.mapped, self.images = module, group, rows, mapped, tuple(images)

    @property
    def miscounted(self) -> list[ImageRows]:
        """The images whose mapping rows disagree with the registry's formulas."""
        return [im for im in self.images if im.mapped != im.expected]


def rows_phrase(im: ImageRows, where: str) -> str:
    """The one wording of a per-image row-count mismatch (verdict line, report)."""
    return f"rows: expected {im.expected} got {im.mapped} for image {im.image} of request {im.request} at {where}"


@dataclass
class SlotMapping:
    slots: dict[str, torch.Tensor]  # group -> int32 [rows] on the device
    # group -> does any row carry an adapter (known on the host at build time: no device sync per module)
    active: dict[str, bool]
    # builds what the LoRA provider needs from a slot vector (e.g. the kernels' TokenGrouping)
    make_grouping: Callable[[torch.Tensor], object] = lambda slots: None
    # group -> each image's rows as laid out (tower / connector; absent where a hook rewrote the vector)
    images: dict[str, list[ImageRows]] = field(default_factory=dict)
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
            images = self.images.get(group, [])
            bad = [im for im in images if im.mapped != im.expected]
            why = (f"; the mapping's own {group} counts disagree with the registry's: "
                   + ", ".join(rows_phrase(im, f"{group} mapping") for im in bad) if bad else
                   f"; the mapping holds the registry's {group} counts, so the model delivered the wrong rows"
                   if images else "; the per-image counts cannot be told (the mapping was rewritten after it was "
                   "laid out, or the group is token-indexed)")
            raise MappingError(f"module {name!r} ({group}) received {rows} rows but the mapping for this batch "
                               f"has {s.shape[0]}" + why, name, group, rows, int(s.shape[0]), images)
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
    images: dict[str, list[ImageRows]] = {"tower": [], "connector": []}
    image = 0
    for r, (req, slot) in enumerate(zip(requests, slots, strict=True)):
        for j, g in enumerate(req.images):
            counts = arch.counts(config, g)  # the registry's formulas; the hooks see them per image
            for group in ("tower", "connector"):
                expected, n = counts.rows(group), hooks.row_count(group, image, counts)
                out[group] += [slot] * n
                images[group].append(ImageRows(r, j, expected, n))
            image += 1
        out["language_model"] += [slot] * l_max
    built = {k: torch.tensor(v, dtype=torch.int32, device=device) for k, v in out.items()}
    final = hooks.slot_mapping(dict(built), requests, [len(r.prompt_ids) for r in requests])
    active = {k: (any(s >= 0 for s in out[k]) if final[k] is built[k] else bool((final[k] >= 0).any()))
              for k in final}
    # per-image counts hold only for a vector kept as laid out (a rewritten one may have moved its rows)
    kept = {g: v for g, v in images.items() if final[g] is built[g] or final[g].shape[0] == len(out[g])}
    return SlotMapping(final, active, make_grouping, kept)
