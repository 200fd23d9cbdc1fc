"""Seeded faults: plausible engine bugs injected into the runtime. The harness must catch each one and
name, in the fault's mode, the module the fault states as the first divergence.

A fault changes the runtime only through `RuntimeModel.hooks` (a `RuntimeHooks` subclass; the runtime
calls the same hooks on a healthy run) or through the adapter weights in its slot tables, so a faulted
run takes exactly the code path a healthy run takes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime.hooks import RuntimeHooks
from runtime.model import RuntimeModel
from vlm.arch import get_arch


@dataclass(frozen=True)
class Fault:
    name: str
    breaks: str
    # rule naming the first divergent module: the first LoRA module (execution order) of `group`
    # whose name matches `name_regex`; a name starting with "@" is a group boundary capture
    group: str
    apply: Callable[[RuntimeModel], None]
    name_regex: str = ".*"
    # replay localises LoRA-module faults; a substituted vision kernel sits between LoRA modules, so its
    # faults are localised end to end (the first capture downstream of the kernel)
    mode: str = "replay"
    kernel: str | None = None  # a vision-kernel fault applies to the archs that substitute this kernel

    def applies_to(self, model_type: str) -> bool:
        return self.kernel is None or any(s.kernel == self.kernel for s in get_arch(model_type).kernel_sites())

    def archs(self) -> list[str]:
        """The registered archs this fault applies to."""
        from vlm.arch import REGISTRY

        return [a for a in sorted(REGISTRY) if self.applies_to(a)]

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
        only = f", archs substituting {self.kernel}" if self.kernel else ""
        return f"{where} ({self.mode}{only})"


def _hooks(rt: RuntimeModel, **overrides: Callable) -> None:
    """Install a RuntimeHooks whose named methods are replaced by the given functions."""
    rt.hooks = type("FaultHooks", (RuntimeHooks,), {k: staticmethod(f) for k, f in overrides.items()})()


# ---------------------------------------------------------------- mapping faults
def _tower_from_lm(rt):
    _hooks(rt, row_count=lambda group, image, c: c.lm_tokens if group == "tower" else c.connector_rows)


def _cls_dropped(rt):
    _hooks(rt, row_count=lambda group, image, c: c.encoder_rows - 1 if group == "tower" else c.connector_rows)


def _connector_as_tower(rt):
    _hooks(rt, module_group=lambda name, group: "tower" if group == "connector" else group)


def _slot_shift(rt):
    n = rt.tables.max_slots
    _hooks(rt, module_slots=lambda name, group, s: torch.where(s >= 0, (s + 1) % n, s))


def _none_gets_slot0(rt):
    _hooks(rt, module_slots=lambda name, group, s: s.clamp_min(0))


def _connector_order_reversed(rt):
    def slot_mapping(slots, requests, lengths):
        per_req = [sum(rt.arch.connector_rows(rt.config, g) for g in r.images) for r in requests]
        pieces = list(torch.split(slots["connector"], per_req))
        fixed = [torch.full_like(p, int(q[0]) if q.numel() else -1) for p, q in zip(pieces, reversed(pieces))]
        return {**slots, "connector": torch.cat(fixed) if fixed else slots["connector"]}
    _hooks(rt, slot_mapping=slot_mapping)


def _lm_packed_lengths(rt):
    # LM mapping laid out for packed (unpadded) tokens although the batch is right-padded
    def slot_mapping(slots, requests, lengths):
        lm = slots["language_model"]
        l_max = lm.shape[0] // max(len(requests), 1)
        ids = torch.cat([lm[i * l_max: i * l_max + n] for i, n in enumerate(lengths)])
        pad = torch.full((lm.shape[0] - ids.shape[0],), -1, dtype=lm.dtype, device=lm.device)
        return {**slots, "language_model": torch.cat([ids, pad])}
    _hooks(rt, slot_mapping=slot_mapping)


# ---------------------------------------------------------------- adapter-weight faults
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


def _rank_truncated(rt):
    for adapter, slot in rt.tables.slot_of.items():
        r = rt.tables.configs[adapter]["r"]
        for A in rt.tables.A.values():
            A[slot, r - 1:] = 0


# ---------------------------------------------------------------- kernel faults
_V = r".*(v_proj|qkv)(\.linear)?"


def _v_slice_offset(rt):
    target = next((n for n in rt.lora_names if re.fullmatch(_V, n) and rt.arch.group_of(n) == "tower"), None)

    def kernel(name, fn, module=None):
        if name != "lora" or module != target:
            return fn

        def shifted(x, y, A, B, slots, grouping=None):
            delta = torch.zeros_like(y)
            fn(x, delta, A, B, slots, grouping=grouping)
            y += torch.roll(delta, 1, dims=-1)  # the slice lands one column off
            return y
        return shifted
    _hooks(rt, kernel=kernel)


def _kernel_fault(kernel_name: str, wrap: Callable[[Callable], Callable]) -> Callable[[RuntimeModel], None]:
    def apply(rt):
        _hooks(rt, kernel=lambda name, fn, module=None: wrap(fn) if name == kernel_name else fn)
    return apply


def _rope_axes_swapped(fn):
    def swapped(x, cos, sin, position_ids, unsqueeze_dim=2):
        # cos/sin hold one channel part per axis (positions are baked in): exchange the parts
        def flip(t):
            a, b = t.chunk(2, dim=-1)
            return torch.cat([b, a], dim=-1)
        return fn(x, flip(cos), flip(sin), position_ids, unsqueeze_dim=unsqueeze_dim)
    return swapped


def _pool_xy_swapped(fn):
    # pixel positions hold (x, y); reading them as (row, col) transposes every pooled bin
    def swapped(hidden, positions, k, output_length):
        return fn(hidden, positions.flip(-1), k, output_length)
    return swapped


def _shuffle_transposed(fn):
    # the patch grid read with rows and columns exchanged before the shuffle
    def transposed(x, ratio=0.5, variant="tokens"):
        if variant == "tokens":
            n, rows, d = x.shape
            side = math.isqrt(rows)
            x = x.view(n, side, side, d).transpose(1, 2).reshape(n, rows, d)
        else:
            x = x.transpose(1, 2)
        return fn(x, ratio, variant)
    return transposed


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
          _kernel_fault("rope_2d", _rope_axes_swapped), name_regex=_O, mode="e2e", kernel="rope_2d"),
    Fault("pool-xy-swapped", "position pooler reads patch positions as (row, col) instead of (x, y)", "connector",
          _kernel_fault("position_pool", _pool_xy_swapped), name_regex="@tower_out", mode="e2e",
          kernel="position_pool"),
    Fault("pixel-shuffle-transposed", "patch grid transposed before the pixel shuffle", "connector",
          _kernel_fault("pixel_shuffle", _shuffle_transposed), name_regex="@tower_out", mode="e2e",
          kernel="pixel_shuffle"),
    Fault("rank-truncated", "the last rank of every adapter dropped (r_max padding off by one)", "tower",
          _rank_truncated),
]}


def get_fault(name: str) -> Fault:
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; `mmlora faults` lists: {', '.join(FAULTS)}")
    return FAULTS[name]
