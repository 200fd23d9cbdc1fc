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
from runtime.providers import GroupedBatch
from vlm.arch import ArchSpec, ImageGeometry, get_arch
from vlm.rows import group_row_counts


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
    # the module a fault breaks, when it is one module picked from the runtime (apply and expected agree)
    pick: Callable[[RuntimeModel], str | None] | None = None
    # a negative control: a legitimate implementation choice that must pass (exit 0), not a fault
    control: bool = False
    # beyond `kernel`: the archs whose default batch can show the fault at all
    shows_on: Callable[[ArchSpec], bool] | None = None

    def applies_to(self, model_type: str) -> bool:
        arch = get_arch(model_type)
        if self.kernel is not None and not any(s.kernel == self.kernel for s in arch.kernel_sites()):
            return False
        return self.shows_on is None or self.shows_on(arch)

    def archs(self) -> list[str]:
        """The registered archs this fault applies to."""
        from vlm.arch import REGISTRY

        return [a for a in sorted(REGISTRY) if self.applies_to(a)]

    def expected_first(self, rt: RuntimeModel, order: list[str]) -> str | None:
        if self.control:
            return None
        if self.pick is not None:
            return self.pick(rt)
        if self.name_regex.startswith("@"):
            return self.name_regex if self.name_regex in order else None
        rx = re.compile(self.name_regex)
        for n in order:
            if n in rt.tables.shapes and rt.arch.group_of(n) == self.group and rx.fullmatch(n):
                return n
        return None

    @property
    def must_name(self) -> str:
        if self.control:
            return "nothing: a legitimate variation, must pass"
        if self.pick is not None:
            where = f"the {self.group} module it breaks"
        else:
            where = (self.name_regex if self.name_regex.startswith("@") else f"first {self.group} LoRA module"
                     + ("" if self.name_regex == ".*" else f" matching {self.name_regex}"))
        only = f", archs substituting {self.kernel}" if self.kernel else ""
        return f"{where} ({self.mode}{only})"

    def verdict(self, rt: RuntimeModel, order: list[str], summary: dict, rows) -> dict:
        """What the run made of this fault: caught (the run failed) and named (its first divergence in the
        fault's mode is the module the fault states); for a control, passed."""
        first = summary["first_divergence"].get(self.mode) or {}
        expected = self.expected_first(rt, order)
        out = {"name": self.name, "breaks": self.breaks, "control": self.control, "mode": self.mode,
               "expected_first": expected, "first": first.get("module"), "request": first.get("request"),
               "row": first.get("row"), "image": first.get("image"), "adapter": first.get("adapter")}
        if self.control:
            out["passed"] = bool(summary["ok"])
            out["margin"] = max((r.metrics.margin for r in rows), default=float("nan"))
            return out
        out["caught"] = not summary["ok"]
        out["named"] = expected is not None and first.get("module") == expected
        # how far the named module went past its bound (> 1 caught); for a fault that passed, how close
        at = [r for r in rows if r.mode == self.mode and r.module == expected]
        out["margin"] = max((r.metrics.margin for r in at), default=float("nan"))
        return out


def _hooks(rt: RuntimeModel, **overrides: Callable) -> None:
    """Install a RuntimeHooks whose named methods are replaced by the given functions."""
    rt.hooks = type("FaultHooks", (RuntimeHooks,), {k: staticmethod(f) for k, f in overrides.items()})()


# ---------------------------------------------------------------- mapping faults
def _tower_from_lm(rt):
    _hooks(rt, row_count=lambda group, image, c: c.lm_tokens if group == "tower" else c.rows(group))


def _first_image_counts(group: str):
    """Every image's rows in `group` counted as the batch's first image's (the classic per-image bookkeeping
    bug: invisible while every image has the same geometry)."""
    def apply(rt):
        first = {}

        def row_count(g, image, counts):
            if image == 0:
                first[g] = counts
            return (first[g] if g == group else counts).rows(g)
        _hooks(rt, row_count=row_count)
    return apply


def _counts_differ(group: str) -> Callable[[ArchSpec], bool]:
    def differ(arch) -> bool:
        cfg = arch.tiny_config()
        rows = {arch.image_rows(cfg, g, group) for g in arch.mixed_geometries(cfg)}
        return len(rows) > 1
    return differ


def _cls_dropped(rt):
    _hooks(rt, row_count=lambda group, image, c: c.encoder_rows - 1 if group == "tower" else c.rows(group))


def _cls_once_per_image(rt):
    # a tiled image's tower rows counted with one CLS for the whole image instead of one per tile: right
    # for a one-tile image, short by (tiles - 1) rows for every tiled one
    one_tile = rt.arch.encoder_rows(rt.config, ImageGeometry(tiles=1))

    def row_count(group, image, c):
        if group != "tower":
            return c.rows(group)
        return c.encoder_rows - (c.encoder_rows // one_tile - 1)
    _hooks(rt, row_count=row_count)


def _tiled(arch: ArchSpec) -> bool:
    cfg = arch.tiny_config()
    return "tiles" in arch.geometry_fields and any((g.tiles or 1) > 1 for g in arch.mixed_geometries(cfg))


def _pool_floor_stride(fn):
    # HF's Gemma4VisionPooler bin row stride floor(Wp / k) (the pooler's semantics: ceil): with Wp % k != 0
    # the last bin of one bin row and the first of the next share a token, and an image loses bins
    def pooled(hidden, positions, k, output_length):
        col, row = positions[..., 0].long(), positions[..., 1].long()
        real = (col >= 0) & (row >= 0)
        stride = (torch.where(real, col, -1).amax(dim=1, keepdim=True) + 1) // k
        bins = torch.where(real, (row // k) * stride + col // k, output_length)
        b, _, d = hidden.shape
        sums = torch.zeros(b, output_length + 1, d, dtype=torch.float32, device=hidden.device)
        sums.scatter_add_(1, bins[..., None].expand(-1, -1, d), hidden.float())
        hits = torch.zeros(b, output_length + 1, dtype=torch.long, device=hidden.device)
        hits.scatter_add_(1, bins, torch.ones_like(bins))
        return (sums[:, :output_length] / (k * k)).to(hidden.dtype), hits[:, :output_length] > 0
    return pooled


def _connector_as_tower(rt):
    _hooks(rt, module_group=lambda name, group: "tower" if group == "connector" else group)


def _slot_shift(rt):
    n = rt.tables.max_slots
    _hooks(rt, module_slots=lambda name, group, s: torch.where(s >= 0, (s + 1) % n, s))


def _none_gets_slot0(rt):
    _hooks(rt, module_slots=lambda name, group, s: s.clamp_min(0))


def _connector_order_reversed(rt):
    def slot_mapping(slots, requests, lengths):
        per_req = group_row_counts(rt.arch, rt.config, requests, "connector")
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

        def shifted(batch: GroupedBatch):
            delta = torch.zeros_like(batch.y)
            fn(batch._replace(y=delta))
            batch.y.add_(torch.roll(delta, 1, dims=-1))  # the slice lands one column off
            return batch.y
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


def _pool_partial_by_count(fn):
    # partial bins averaged over the real patches they hold instead of k^2 (the pooler's stated semantics)
    def pooled(hidden, positions, k, output_length):
        out, valid = fn(hidden, positions, k, output_length)
        col, row = positions[..., 0].long(), positions[..., 1].long()
        real = (col >= 0) & (row >= 0)
        stride = (torch.where(real, col, -1).amax(dim=1, keepdim=True) + 1 + k - 1) // k
        bins = torch.where(real, (row // k) * stride + col // k, output_length)
        hits = torch.zeros(out.shape[0], output_length + 1, device=out.device)
        hits.scatter_add_(1, bins, torch.ones_like(bins, dtype=hits.dtype))
        scale = (k * k) / hits[:, :output_length].clamp_min(1)
        return (out.float() * scale[..., None]).to(out.dtype), valid
    return pooled


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


# ---------------------------------------------------------------- subtle faults (realistic adapters)
def _scale_group(group: str, factor: float):
    def apply(rt):
        for name, B in rt.tables.B.items():
            if rt.arch.group_of(name) == group:
                B.copy_((B.float() * factor).to(B.dtype))
    return apply


def _middle_tower_module(rt) -> str | None:
    tower = [n for n in rt.lora_names if rt.arch.group_of(n) == "tower"]
    return tower[len(tower) // 2] if tower else None


def _lora_missing_on_one(rt):
    target = _middle_tower_module(rt)

    def skip(batch: GroupedBatch):
        return batch.y
    _hooks(rt, kernel=lambda name, fn, module=None: skip if name == "lora" and module == target else fn)


def _other_slot(rt, slot: int) -> int:
    used = sorted(rt.tables.slot_of.values())
    return used[(used.index(slot) + 1) % len(used)] if slot in used else used[0]


def _token_wrong_adapter(rt):
    # token 1 of the first request that carries an adapter runs with the next loaded adapter
    def slot_mapping(slots, requests, lengths):
        i = next(k for k, r in enumerate(requests) if r.adapter is not None)
        lm = slots["language_model"].clone()
        pos = i * (lm.shape[0] // len(requests)) + 1
        lm[pos] = _other_slot(rt, int(lm[pos]))
        return {**slots, "language_model": lm}
    _hooks(rt, slot_mapping=slot_mapping)


def _image_wrong_adapter(rt):
    # the second image of the first several-image request runs with the next loaded adapter (tower and
    # connector rows both: the engine's per-image bookkeeping is what breaks)
    def slot_mapping(slots, requests, lengths):
        out = dict(slots)
        for group in ("tower", "connector"):
            start = 0
            for r in requests:
                counts = [rt.arch.image_rows(rt.config, g, group) for g in r.images]
                if len(counts) >= 2 and r.adapter is not None:
                    s = out[group].clone()
                    lo = start + counts[0]
                    s[lo: lo + counts[1]] = _other_slot(rt, int(s[lo]))
                    out[group] = s
                    break
                start += sum(counts)
        return out
    _hooks(rt, slot_mapping=slot_mapping)


# ---------------------------------------------------------------- negative controls (must pass)
def _per_slot(delta: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
    """A LoRA provider computing each slot's rows in torch with `delta(x, A, B)` (x in the activation dtype,
    A and B in fp32; an fp32 result), one rounding into y."""
    def lora(batch: GroupedBatch):
        x, y, A, B, slots = batch.x, batch.y, batch.A, batch.B, batch.slots
        for s in slots[slots >= 0].unique().tolist():
            rows = (slots == s).nonzero().squeeze(1)
            d = delta(x[rows], A[0][s].float(), B[0][s].float())
            y[rows] = (y[rows].float() + d).to(y.dtype)
        return y
    return lora


def _control(delta):
    def apply(rt):
        lora = _per_slot(delta)
        _hooks(rt, kernel=lambda name, fn, module=None: lora if name == "lora" else fn)
    return apply


def _reversed_order(x, A, B):
    x, h = x.float(), x.shape[1] // 2  # the input dimension summed as two halves, the second first
    return (x[:, h:] @ A[:, h:].T + x[:, :h] @ A[:, :h].T) @ B.T


def _intermediate_rounded(x, A, B):
    return (x.float() @ A.T).to(x.dtype).float() @ B.T


def _merged(x, A, B):
    return x.float() @ (B @ A).T  # shrink and expand fused into one merged [O, H] weight


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
    Fault("tower-first-image-counts", "every image's tower rows counted as the batch's first image's", "tower",
          _first_image_counts("tower"), shows_on=_counts_differ("tower")),
    Fault("connector-first-image-counts", "every image's connector rows counted as the batch's first image's",
          "connector", _first_image_counts("connector"), shows_on=_counts_differ("connector")),
    Fault("pool-partial-by-count", "partial pooling bins averaged over their real patches instead of k^2",
          "connector", _kernel_fault("position_pool", _pool_partial_by_count), name_regex="@tower_out",
          mode="e2e", kernel="position_pool"),
    Fault("cls-once-per-image", "a tiled image's tower rows counted with one CLS per image, not one per tile",
          "tower", _cls_once_per_image, shows_on=_tiled),
    Fault("pool-floor-stride", "position pooler bins with row stride floor(Wp/k) instead of ceil (drops a bin "
          "of every image whose width is not a multiple of k)", "connector",
          _kernel_fault("position_pool", _pool_floor_stride), name_regex="@tower_out", mode="e2e",
          kernel="position_pool"),
    Fault("lora-scale-2pct", "the tower's LoRA scale 2% too large", "tower", _scale_group("tower", 1.02)),
    Fault("lora-scale-10pct", "the tower's LoRA scale 10% too large", "tower", _scale_group("tower", 1.10)),
    Fault("lora-missing-one-module", "LoRA skipped on one tower module (its middle one)", "tower",
          _lora_missing_on_one, pick=_middle_tower_module),
    Fault("token-wrong-adapter", "one token of one request given another adapter", "language_model",
          _token_wrong_adapter),
    Fault("image-wrong-adapter", "the second image of a two-image request mapped to another adapter", "tower",
          _image_wrong_adapter),
    Fault("control-accumulation-order", "LoRA summed in another order (input dim as two halves, reversed)",
          "tower", _control(_reversed_order), mode="e2e", control=True),
    Fault("control-intermediate-rounded", "the shrink's fp32 result rounded once to the activation dtype "
          "before expand (as vLLM's expand does)", "tower", _control(_intermediate_rounded),
          mode="e2e", control=True),
    Fault("control-fused-merged", "shrink and expand fused into one merged B.A weight", "tower",
          _control(_merged), mode="e2e", control=True),
]}


def get_fault(name: str) -> Fault:
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; `mmlora faults` lists: {', '.join(FAULTS)}")
    return FAULTS[name]
