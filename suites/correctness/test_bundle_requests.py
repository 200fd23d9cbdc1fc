"""A reference bundle carries its requests (docs/bundles.md, "Request inputs"): every request's forward inputs as
the reference ran them, which replay the reference's logits exactly on the HF model loaded from the bundle's
own checkpoint and adapters; geometry in the `--geometry` text."""

from __future__ import annotations

import pytest
import torch

from harness.correctness.bundle import Bundle
from harness.correctness.engine import Options, record
from harness.geometry_flags import geometry_text, parse_geometry
from reference.adapters import load_adapters
from vlm.arch import REGISTRY, get_arch
from vlm.checkpoint import load_checkpoint, parse_dtype
from vlm.rows import LOGITS


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_arch_geometry_text_round_trips_through_the_geometry_parser(arch):
    spec = get_arch(arch)
    config = spec.tiny_config()
    geoms = spec.mixed_geometries(config)
    assert geoms
    for g in geoms:
        assert parse_geometry(geometry_text(g)) == g, geometry_text(g)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_recorded_inputs_replay_the_reference_logits_exactly(arch, tmp_path):
    """The independent check: the HF model (with the reference's fixes of HF code) and PEFT, loaded from the
    bundle's files alone, fed each request's recorded inputs alone, give the recorded @logits bit for bit."""
    ref = record(arch, Options(archs=[arch], n_adapters=1), tmp_path / "work", tmp_path / "ref")
    b = Bundle.open(ref)
    m = b.manifest
    assert m["version"] == 3
    spec, _, model = load_checkpoint(ref / m["checkpoint"]["path"], dtype=parse_dtype(m["dtype"]))
    spec.install_fixes(model)
    pm = load_adapters(model, {n: ref / e["path"] for n, e in m["adapters"].items()})
    assert any(r["adapter"] for r in m["requests"]) and any(r["images"] for r in m["requests"])
    for i, entry in enumerate(m["requests"]):
        fed = b.inputs(i)
        assert {"input_ids", "attention_mask"} <= fed.keys()
        assert ("pixel_values" in fed) == bool(entry["images"]), (i, sorted(fed))
        assert len([parse_geometry(g) for g in entry["geometry"]]) == entry["images"]  # the --geometry text
        if entry["adapter"] is None:
            ctx = pm.disable_adapter()
        else:
            pm.set_adapter(entry["adapter"])
            ctx = torch.no_grad()
        with ctx, torch.no_grad():
            logits = spec.forward_logits(pm, **fed)
        assert torch.equal(logits[0], b.get(i, LOGITS, "out")), (arch, i)
