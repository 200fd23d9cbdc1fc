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
    # replay localises LoRA-module faults; a substituted vision kernel sits between LoRA modules, so its
    # faults are localised end to end (the first capture downstream of the kernel)
    mode: str = "replay"
    archs: tuple[str, ...] = ()  # empty: every arch

    def applies_to(self, model_type: str) -> bool:
        return not self.archs or model_type in self.archs

    def expected_first(self, rt: RuntimeModel, order: list[str]) -> str | None:
        if self.name_regex.startswith("@"):
            return self.name_regex if self.name_regex in order else None
        rx = re.compile(self.name_regex)
        for n in order:
            if n in rt.tables.shapes and rt.arch.group_of(n) == self.group and rx.fullmatch(n):
                return n
        return None

    @property
    def must_name(self) -> str:
        where = (self.name_regex if self.name_regex.startswith("@") else f"first {self.group} LoRA module"
                 + ("" if self.name_regex == ".*" else f" matching {self.name_regex}"))
        only = f", {'/'.join(self.archs)} only" if self.archs else ""
        return f"{where} ({self.mode}{only})"


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
        return Mapping(slots)  # active=None: recomputed from the device tensors
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


def _rope_axes_swapped(rt):
    from runtime.kernels import rope_2d

    def swapped(x, cos, sin, position_ids, unsqueeze_dim=2):
        # cos/sin hold one channel part per axis (positions are baked in): exchange the parts
        def flip(t):
            a, b = t.chunk(2, dim=-1)
            return torch.cat([b, a], dim=-1)
        return rope_2d(x, flip(cos), flip(sin), position_ids, unsqueeze_dim=unsqueeze_dim)
    rt.global_overrides["rope_2d"] = swapped


def _shuffle_transposed(rt):
    # the shuffled grid read with rows and columns exchanged before the adapter MLP
    for m in rt.model.modules():
        if type(m).__name__ == "Llama4VisionPixelShuffleMLP":
            inner = m.forward

            def fwd(x, inner=inner):
                n, rows, d = x.shape
                side = int(rows ** 0.5)
                return inner(x.view(n, side, side, d).transpose(1, 2).reshape(n, rows, d))
            m.forward = fwd


def _pool_xy_swapped(rt):
    # pixel_position_ids hold (x, y); reading them as (row, col) transposes every pooled bin
    for m in rt.model.modules():
        if type(m).__name__ == "Gemma4VisionPooler":
            inner = m.forward

            def fwd(*args, inner=inner, **kw):
                kw["pixel_position_ids"] = kw["pixel_position_ids"].flip(-1)
                return inner(*args, **kw)
            m.forward = fwd


_O = r".*(o_proj|out_proj)(\.linear)?"

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
    Fault("rope-axes-swapped", "2-D vision RoPE applied with the (x, y) position axes exchanged", "tower",
          _rope_axes_swapped, name_regex=_O, mode="e2e", archs=("gemma4",)),
    Fault("pool-xy-swapped", "Gemma4 pooler reads patch positions as (row, col) instead of (x, y)", "connector",
          _pool_xy_swapped, name_regex="@tower_out", mode="e2e", archs=("gemma4",)),
    Fault("pixel-shuffle-transposed", "patch grid transposed before the pixel shuffle", "connector",
          _shuffle_transposed, name_regex="@tower_out", mode="e2e", archs=("llama4",)),
    Fault("rank-truncated", "the last rank of every adapter dropped (r_max padding off by one)", "tower",
          _rank_truncated),
]}


def get_fault(name: str) -> Fault:
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; `mmlora faults` lists: {', '.join(FAULTS)}")
    return FAULTS[name]
