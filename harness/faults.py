"""Seeded faults: plausible engine bugs injected into the runtime. The harness must catch each one and
name, in replay mode, the module the fault states as the first divergence."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime.mapping import Mapping
from runtime.model import RuntimeModel


@dataclass(frozen=True)
class Fault:
    name: str
    breaks: str
    # rule naming the first divergent module: the first LoRA module (execution order) of `group`
    # whose name matches `name_regex`
    group: str
    apply: Callable[[RuntimeModel], None]
    name_regex: str = ".*"

    def expected_first(self, rt: RuntimeModel, order: list[str]) -> str | None:
        rx = re.compile(self.name_regex)
        for n in order:
            if n in rt.tables.shapes and rt.arch.group_of(n) == self.group and rx.fullmatch(n):
                return n
        return None

    @property
    def must_name(self) -> str:
        return f"first {self.group} LoRA module" + ("" if self.name_regex == ".*" else f" matching {self.name_regex}")


def _tower_from_lm(rt):
    rt.counters = {"tower": lambda a, c, g: a.lm_tokens(c, g)}


def _cls_dropped(rt):
    rt.counters = {"tower": lambda a, c, g: a.encoder_rows(c, g) - 1}


def _connector_as_tower(rt):
    rt.group_transform = lambda name, group: "tower" if group == "connector" else group


def _slot_shift(rt):
    n = rt.tables.max_slots
    rt.slot_transform = lambda name, group, s: torch.where(s >= 0, (s + 1) % n, s)


def _none_gets_slot0(rt):
    rt.slot_transform = lambda name, group, s: s.clamp_min(0)


def _scale_tables(rt, factor_of: Callable[[dict], float]):
    for adapter, slot in rt.tables.slot_of.items():
        f = factor_of(rt.tables.configs[adapter])
        for B in rt.tables.B.values():
            B[slot] *= f


def _alpha_twice(rt):
    _scale_tables(rt, lambda c: (c["lora_alpha"] / math.sqrt(c["r"])) if c.get("use_rslora")
                  else c["lora_alpha"] / c["r"])


def _rslora_ignored(rt):
    # alpha/r used where rsLoRA means alpha/sqrt(r): off by a factor 1/sqrt(r)
    _scale_tables(rt, lambda c: 1 / math.sqrt(c["r"]) if c.get("use_rslora") else 1.0)


_V = r".*(v_proj|qkv)(\.linear)?"


def _v_slice_offset(rt):
    target = next((n for n in rt.lora_names if re.fullmatch(_V, n) and rt.arch.group_of(n) == "tower"), None)
    kernel = rt.kernel

    def shifted(x, y, A, B, slots, *args):
        if args or A[0] is not rt.tables.A.get(target):
            return kernel(x, y, A, B, slots, *args)
        delta = torch.zeros_like(y)
        kernel(x, delta, A, B, slots)
        y += torch.roll(delta, 1, dims=-1)  # the slice lands one column off
        return y

    rt.kernel = shifted


def _connector_order_reversed(rt):
    def rev(m: Mapping, requests, lengths) -> Mapping:
        slots = dict(m.slots)
        per_req = [sum(rt.arch.connector_rows(rt.config, g) for g in r.images) for r in requests]
        pieces = list(torch.split(slots["connector"], per_req))
        fixed = [torch.full_like(p, int(q[0]) if q.numel() else -1) for p, q in zip(pieces, reversed(pieces))]
        slots["connector"] = torch.cat(fixed) if fixed else slots["connector"]
        return Mapping(slots)
    rt.mapping_transform = rev


def _lm_packed_lengths(rt):
    # LM mapping laid out for packed (unpadded) tokens although the batch is right-padded
    def packed(m: Mapping, requests, lengths) -> Mapping:
        slots = dict(m.slots)
        lm = slots["language_model"]
        l_max = lm.shape[0] // max(len(requests), 1)
        ids = torch.cat([lm[i * l_max: i * l_max + n] for i, n in enumerate(lengths)])
        slots["language_model"] = torch.cat([ids, torch.full((lm.shape[0] - ids.shape[0],), -1,
                                                              dtype=lm.dtype, device=lm.device)])
        return Mapping(slots)
    rt.mapping_transform = packed


def _rank_truncated(rt):
    for adapter, slot in rt.tables.slot_of.items():
        r = rt.tables.configs[adapter]["r"]
        for A in rt.tables.A.values():
            A[slot, r - 1:] = 0


FAULTS: dict[str, Fault] = {f.name: f for f in [
    Fault("tower-map-from-lm-counts", "tower mapping sized with the LM placeholder count", "tower", _tower_from_lm),
    Fault("cls-dropped", "one row (the CLS) per image missing from the tower mapping", "tower", _cls_dropped),
    Fault("connector-resolved-to-tower", "connector modules look their rows up in the tower mapping",
          "connector", _connector_as_tower),
    Fault("slot-shift", "every adapter slot id shifted by one", "tower", _slot_shift),
    Fault("none-gets-slot0", "rows with no adapter (-1) receive slot 0", "tower", _none_gets_slot0),
    Fault("alpha-twice", "alpha/r (or alpha/sqrt r) applied twice", "tower", _alpha_twice),
    Fault("rslora-ignored", "rsLoRA adapters scaled by alpha/r instead of alpha/sqrt(r)", "tower", _rslora_ignored),
    Fault("v-slice-offset", "the v (or packed qkv) LoRA output written one column off", "tower", _v_slice_offset,
          name_regex=_V),
    Fault("connector-order-reversed", "connector slot segments assigned in reversed request order", "connector",
          _connector_order_reversed),
    Fault("lm-packed-lengths", "LM mapping laid out for packed tokens on a right-padded batch",
          "language_model", _lm_packed_lengths),
    Fault("rank-truncated", "the last rank of every adapter dropped (r_max padding off by one)", "tower",
          _rank_truncated),
]}


def get_fault(name: str) -> Fault:
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; `mmlora faults` lists: {', '.join(FAULTS)}")
    return FAULTS[name]
