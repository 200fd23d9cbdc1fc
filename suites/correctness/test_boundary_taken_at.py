"""The reference manifest names where each boundary is taken (docs/bundles.md, `taken_at`): for every arch the
named module exists in the model transformers loads from the bundle's own checkpoint, and a hook placed there
as the docs define `what` reproduces request 0's recorded boundary tensor. The hooks below are written from the
docs, not taken from vlm.capture, so a drift between the manifest's words and the capture shows here."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from harness.correctness.bundle import Bundle
from harness.correctness.engine import Options, record
from reference.adapters import load_adapters
from vlm.arch import REGISTRY, get_arch
from vlm.rows import LM_IMAGE_EMBEDS, LOGITS, TOWER_OUT

BOUNDARIES = (TOWER_OUT, LM_IMAGE_EMBEDS, LOGITS)


def _main_input(args, kwargs) -> torch.Tensor:
    # docs/bundles.md's "input": keyword hidden_states / input / x, else the first positional tensor, else the
    # first tensor keyword
    named = [kwargs[k] for k in ("hidden_states", "input", "x") if isinstance(kwargs.get(k), torch.Tensor)]
    return (named + [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)])[0]


def _hook(got: dict, name: str, module: torch.nn.Module, what: str, image_positions: torch.Tensor):
    def keep(t):
        got.setdefault(name, []).append(t.detach().reshape(-1, t.shape[-1]).clone())

    if what == "input":
        return module.register_forward_pre_hook(lambda _m, a, k: keep(_main_input(a, k)), with_kwargs=True)
    if what == "inputs_embeds at image placeholders":
        return module.register_forward_pre_hook(
            lambda _m, a, k: keep(k["inputs_embeds"][0][image_positions]), with_kwargs=True)
    assert what == "output logits", what
    return module.register_forward_hook(lambda _m, a, out: keep(out.logits[0]))


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_each_boundary_is_taken_where_the_manifest_says(arch, tmp_path):
    ref = record(arch, Options(archs=[arch], n_adapters=1), tmp_path / "work", tmp_path / "ref")
    b = Bundle.open(ref)
    m = b.manifest
    at = {e["name"]: e["taken_at"] for e in m["modules"] if e["name"].startswith("@")}
    assert set(at) <= set(BOUNDARIES) and {LM_IMAGE_EMBEDS, LOGITS} <= set(at), sorted(at)
    # loaded with transformers itself, as an outside engine would, with the attention the reference ran
    model = AutoModelForImageTextToText.from_pretrained(
        ref / m["checkpoint"]["path"], dtype=torch.float32, attn_implementation=m["attn_implementation"])
    assert m["dtype"] == "fp32" and model.config._attn_implementation == m["attn_implementation"]
    names = dict(model.named_modules())
    for boundary, place in at.items():
        assert place["module"] in names, (arch, boundary, place)
    # the reference's own HF fixes and adapter (request 0 runs with one), the hooks placed on the HF names
    get_arch(m["arch"]).install_fixes(model)
    pm = load_adapters(model, {n: ref / e["path"] for n, e in m["adapters"].items()})
    req = m["requests"][0]
    assert req["adapter"] is not None and req["images"], req
    pm.set_adapter(req["adapter"])
    fed = b.inputs(0)
    image_positions = fed["input_ids"][0] == m["image_token_id"]
    got: dict[str, list[torch.Tensor]] = {}
    names = dict(pm.get_base_model().named_modules())
    handles = [_hook(got, boundary, names[place["module"]], place["what"], image_positions)
               for boundary, place in at.items()]
    try:
        with torch.no_grad():
            pm(**fed, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for boundary in at:
        recorded = b.get(0, boundary, "out")
        assert torch.equal(torch.cat(got[boundary]), recorded), (arch, boundary)
