"""The fault hooks are applied on the exact path a healthy run takes: each hook changes the runtime's result
on the Triton path and on the torch path alike (the two faulted runs agree with each other, not with the
healthy one), and the Triton path honours whatever slot vector a module is handed."""

from __future__ import annotations

import pytest
import torch

from runtime.hooks import NO_FAULT, RuntimeHooks
from runtime.mapping import MappingError
from runtime.model import RuntimeModel
from vlm.arch import get_arch
from vlm.requests import make_request

TOWER_Q = "vision_model.model.layers.0.self_attn.q_proj"


class Shift(RuntimeHooks):
    def module_slots(self, module, group, slots):
        return torch.where(slots >= 0, (slots + 1) % 8, slots)


class SkipOne(RuntimeHooks):
    def kernel(self, kernel, fn, module=None):
        return (lambda batch: batch.y) if kernel == "lora" and module == TOWER_Q else fn


class SwapConnector(RuntimeHooks):
    def slot_mapping(self, slots, requests, lengths):
        return {**slots, "connector": slots["connector"].flip(0)}


class Transposed(RuntimeHooks):
    def kernel(self, kernel, fn, module=None):
        if kernel != "pixel_shuffle":
            return fn

        def t(x, ratio=0.5, variant="tokens"):
            n, rows, d = x.shape
            side = int(rows ** 0.5)
            return fn(x.view(n, side, side, d).transpose(1, 2).reshape(n, rows, d), ratio, variant)
        return t


class ConnectorAsTower(RuntimeHooks):
    def module_group(self, module, group):
        return "tower" if group == "connector" else group


class OneRowShort(RuntimeHooks):
    def row_count(self, group, image, counts):
        return super().row_count(group, image, counts) - (group == "tower")


@pytest.fixture(scope="module")
def runtimes(saved):
    root, folders = saved
    out = {}
    for kernel in ("triton", "torch"):
        rt = RuntimeModel.from_checkpoint(root / "ckpt", kernel=kernel)
        for name, folder in folders.items():
            rt.load_adapter(name, folder)
        out[kernel] = rt
    arch = get_arch("llama4")
    cfg = out["triton"].config
    geoms = arch.mixed_geometries(cfg)
    reqs = [make_request(arch, cfg, [geoms[0]], "all", seed=0), make_request(arch, cfg, [geoms[1]], "tower", seed=1),
            make_request(arch, cfg, [], "lm", seed=2)]
    return out, reqs, _logits(_run(out["triton"], reqs, NO_FAULT))


def _run(rt, reqs, hooks):
    rt.hooks = hooks
    try:
        return rt.run(reqs)
    finally:
        rt.hooks = NO_FAULT


def _logits(caps):
    return torch.cat([c["@logits"]["out"].flatten() for c in caps])


@pytest.mark.parametrize("hooks", [Shift(), SkipOne(), SwapConnector(), Transposed()], ids=lambda h: type(h).__name__)
def test_each_hook_changes_both_paths_alike(runtimes, hooks):
    rts, reqs, healthy = runtimes
    got = {k: _logits(_run(rt, reqs, hooks)) for k, rt in rts.items()}
    scale = healthy.abs().max()
    for k, t in got.items():
        assert (t - healthy).abs().max() > 1e-3 * scale, f"{type(hooks).__name__} left the {k} path unchanged"
    assert (got["triton"] - got["torch"]).abs().max() <= 1e-4 * scale  # both honour the hook identically


@pytest.mark.parametrize("hooks", [ConnectorAsTower(), OneRowShort()], ids=lambda h: type(h).__name__)
def test_mapping_hooks_raise_on_both_paths(runtimes, hooks):
    rts, reqs, _ = runtimes
    for rt in rts.values():
        with pytest.raises(MappingError):
            _run(rt, reqs, hooks)


def test_the_triton_path_honours_a_module_slot_vector(runtimes):
    """A module handed a slot vector other than its group's: the kernel runs on that vector (its grouping is
    built for it), not on the group's cached grouping."""
    rts, reqs, _ = runtimes
    rt = rts["triton"]
    rt.mapping = rt.make_mapping(reqs, max(len(r.prompt_ids) for r in reqs))
    try:
        group_slots = rt.mapping.slots["tower"]
        other = torch.full_like(group_slots, rt.tables.slot("tower"))
        assert rt.mapping.grouping(group_slots) is rt.mapping.grouping(group_slots)  # cached per group
        g_other = rt.mapping.grouping(other)
        assert torch.equal(g_other.counts[rt.tables.slot("tower") + 1].cpu(), torch.tensor(other.shape[0]))
    finally:
        rt.mapping = None
