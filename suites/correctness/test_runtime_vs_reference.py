"""Runtime (Triton slots, one mixed batch) vs reference (HF + PEFT, each request alone): final logits and
group boundaries per request, and a wrong row count is a loud mapping error, never output."""

from __future__ import annotations

import pytest
import torch

from reference.adapters import DEFAULT_SPECS, add_adapters, save_adapters
from reference.run import run_reference
from runtime.hooks import NO_FAULT, RuntimeHooks
from runtime.mapping import MappingError
from runtime.model import RuntimeModel
from vlm.arch import REGISTRY, get_arch
from vlm.checkpoint import build_tiny, load_checkpoint, save_checkpoint
from vlm.requests import make_request

ARCHS = sorted(REGISTRY)
# fp32 CPU: the runtime folds alpha/r into B and sums LoRA in another order than PEFT; differences are
# rounding, ~1e-6 relative per layer. 1e-4 absolute / 1e-4 relative stays far below a real fault (an
# adapter's effect is O(1e-1) of the activations by construction in reference.adapters.randomize).
ATOL, RTOL = 1e-4, 1e-4


class _RowCounts(RuntimeHooks):
    """Row counts per image from `wrong(group, counts)` where it answers, the registry's otherwise."""

    def __init__(self, wrong):
        self.wrong = wrong

    def row_count(self, group, image, counts):
        got = self.wrong(group, counts)
        return super().row_count(group, image, counts) if got is None else got


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    arch = get_arch(request.param)
    root = tmp_path_factory.mktemp(arch.model_type)
    _, model = build_tiny(arch)
    save_checkpoint(model, root / "ckpt")
    _, cfg, ref_model = load_checkpoint(root / "ckpt")
    pm = add_adapters(ref_model, arch, DEFAULT_SPECS)
    folders = save_adapters(pm, root / "adapters")
    g = arch.default_geometry(cfg)
    mix = [("all", [g]), ("lm", [g]), (None, [g]), ("tower", [g, g]), ("all", []), (None, [])]
    reqs = [make_request(arch, cfg, ims, a, seed=i) for i, (a, ims) in enumerate(mix)]
    ref = run_reference(pm, arch, cfg, reqs, "single")
    rt = RuntimeModel.from_checkpoint(root / "ckpt")
    for name, folder in folders.items():
        rt.load_adapter(name, folder)
    return arch, cfg, reqs, ref, rt


def test_mixed_batch_matches_reference(setup):
    arch, cfg, reqs, ref, rt = setup
    out = rt.run(reqs)
    for i, (o, r) in enumerate(zip(out, ref.captures)):
        assert set(o) == set(r), (i, set(o) ^ set(r))
        for name in r:  # every LoRA module and the boundaries: @tower_out, @lm_image_embeds, @logits
            torch.testing.assert_close(o[name]["out"], r[name]["out"], atol=ATOL, rtol=RTOL,
                                       msg=lambda m, i=i, name=name: f"request {i} {name}: {m}")


def test_wrong_connector_count_raises_mapping_error(setup):
    arch, cfg, reqs, ref, rt = setup
    # the classic engine bug: connector mapping built from the LM placeholder count
    if "connector" not in arch.targetable_groups():
        pytest.skip(f"{arch.model_type}'s connector has no Linear a LoRA can target")
    rt.hooks = _RowCounts(lambda group, c: c.lm_tokens + 1 if group == "connector" else None)
    try:
        with pytest.raises(MappingError, match=r"\(connector\) received \d+ rows but the mapping"):
            rt.run(reqs)
    finally:
        rt.hooks = NO_FAULT


def test_wrong_tower_count_raises_mapping_error(setup):
    arch, cfg, reqs, ref, rt = setup
    # the LM placeholder count where it differs from the tower's rows (paligemma: equal), else one row short
    rt.hooks = _RowCounts(lambda group, c: (c.lm_tokens if c.lm_tokens != c.encoder_rows else c.encoder_rows - 1)
                          if group == "tower" else None)
    try:
        with pytest.raises(MappingError, match=r"\(tower\) received \d+ rows"):
            rt.run(reqs)
    finally:
        rt.hooks = NO_FAULT
