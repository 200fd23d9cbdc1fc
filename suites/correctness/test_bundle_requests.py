"""A reference bundle carries its requests (docs/bundles.md, "Request inputs"): every request's forward inputs as
the reference ran them, which replay the reference's logits exactly on the HF model loaded from the bundle's
own checkpoint and adapters; geometry in the `--geometry` text; an output bundle names the reference it answers
(a foreign one is refused) and a module the reference lacks is a warning, not an error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from harness.cli import main
from harness.correctness.bundle import Bundle
from harness.correctness.engine import Options, record
from harness.geometry_flags import geometry_text, parse_geometry
from reference.adapters import load_adapters
from vlm.arch import REGISTRY, get_arch
from vlm.checkpoint import load_checkpoint, parse_dtype
from vlm.rows import LOGITS

REF_ARGS = ["--arch", "llama4", "--adapters", "1", "--geometry", "tiles=1"]


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
    bundle's files alone, fed each request's recorded inputs alone, give the recorded @logits bit for bit.
    Called as any engine calls it (the model itself, not the arch's forward_logits and its workarounds): a
    change to HF's code the reference made without listing it in `fixes` crashes or differs here."""
    ref = record(arch, Options(archs=[arch], n_adapters=1), tmp_path / "work", tmp_path / "ref")
    b = Bundle.open(ref)
    m = b.manifest
    assert m["version"] == 3
    spec, _, model = load_checkpoint(ref / m["checkpoint"]["path"], dtype=parse_dtype(m["dtype"]))
    assert spec.install_fixes(model) == m["fixes"]
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
            logits = pm(**fed).logits
        assert torch.equal(logits[0], b.get(i, LOGITS, "out")), (arch, i)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A reference bundle, as `mmlora record` writes it."""
    root = tmp_path_factory.mktemp("named")
    assert main(["record", *REF_ARGS, "--out", str(root / "ref")]) == 0
    return root


def _runtime_outputs(ref, folder):
    """The project's own output bundle for `ref` (bundle.outputs.stream_outputs, as `compare REF` writes it)."""
    from harness.correctness.bundle import stream_outputs
    from harness.correctness.engine import load
    from runtime.model import RuntimeModel

    p = load(ref)
    rt = RuntimeModel.from_checkpoint(p.ckpt, extra_targets={m for a in p.adapters.values() for m in a.modules})
    for name, adapter in p.adapters.items():
        rt.load_adapter(name, adapter)
    stream_outputs(rt, p.reqs, folder, reference=p.bundle.sha256)
    return folder


@pytest.fixture(scope="module")
def got(pair):
    return _runtime_outputs(pair / "ref", pair / "got")


def test_the_runtime_output_bundle_names_its_reference_and_is_judged(pair, got, tmp_path):
    named = json.loads((got / "manifest.json").read_text())["reference"]
    assert named == Bundle.open(pair / "ref").sha256
    assert main(["compare", str(pair / "ref"), str(got), "--out", str(tmp_path / "o")]) == 0


def test_an_output_bundle_of_another_reference_is_refused_naming_both(pair, got, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(pair / "ref", other)
    m = json.loads((other / "manifest.json").read_text())
    m["notes"] = ["another recording"]
    (other / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["compare", str(other), str(got), "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert Bundle.open(other).sha256 in err[0] and Bundle.open(pair / "ref").sha256 in err[0]
    assert not (tmp_path / "o").exists()


def test_a_module_the_reference_lacks_is_a_warning_not_an_error(pair, got, tmp_path, capsys):
    extra = tmp_path / "got"
    shutil.copytree(got, extra)
    m = json.loads((extra / "manifest.json").read_text())
    m["modules"].append({**m["modules"][-1], "name": "engine.only.module"})
    (extra / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["compare", str(pair / "ref"), str(extra), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "'engine.only.module' is not in the reference bundle" in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert any("engine.only.module" in w for w in summary["warnings"])
    assert "engine.only.module" in (tmp_path / "o" / "index.html").read_text()


def _edit(entry: dict, what: str) -> None:
    if what == "unknown-adapter":
        entry["adapter"] = "nope"
    elif what == "float-seed":
        entry["seed"] = 1.5
    elif what == "geometry-not-text":
        entry["geometry"] = [5]
    elif what == "other-seed":  # another seed draws other pixels than the ones recorded
        entry["seed"] += 1
    elif what == "prompt-hash":
        entry["prompt_sha256"] = "0" * 64


@pytest.mark.parametrize("what,says", [("unknown-adapter", "adapter 'nope' is not one of the bundle's adapters"),
                                       ("float-seed", "seed 1.5 is not an integer"),
                                       ("geometry-not-text", "is not a list of --geometry items"),
                                       ("other-seed", "is not the one its seed"),
                                       ("prompt-hash", "input_ids are not the prompt")])
def test_a_request_the_manifest_misstates_is_a_bad_bundle_not_a_divergence(pair, tmp_path, capsys, what, says):
    """Each was a runtime DIVERGENCE (exit 1: the runtime's mapping failed on an adapter it never loaded) or a
    bare Python error (AttributeError, RuntimeError) before the manifest's request entries were checked."""
    bad = tmp_path / "bad"
    shutil.copytree(pair / "ref", bad)
    m = json.loads((bad / "manifest.json").read_text())
    _edit(m["requests"][0], what)
    (bad / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["compare", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and says in err[0] and "request 0" in err[0], err
    assert not (tmp_path / "o").exists()


def test_manifest_geometries_that_are_not_the_requests_are_a_bad_bundle(pair, tmp_path, capsys):
    """`geometries` (the --geometry items recorded, taken in turn by the requests' images) was required but never
    read: a manifest could say tiles=2 over requests of tiles=1 images."""
    m = json.loads((pair / "ref" / "manifest.json").read_text())
    assert m["geometries"] == [{"tiles": 1, "grid": None, "patches": None, "size": None, "split": None}]
    bad = tmp_path / "bad"
    shutil.copytree(pair / "ref", bad)
    m["geometries"][0]["tiles"] = 2
    (bad / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["compare", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "geometries" in err[0] and "(tiles=1, tiles=1, tiles=1" in err[0], err
    assert not (tmp_path / "o").exists()


def test_manifest_geometries_are_compared_as_geometries_not_as_dicts():
    """An ImageGeometry that gains a field must not make every older bundle bad: an item without a field reads
    as its default; a key no field has is a bad bundle, named."""
    from harness.correctness.bundle.format import BundleError
    from harness.correctness.bundle.requests import _check_geometries
    from vlm.arch import ImageGeometry
    from vlm.requests import Request

    reqs = [Request((ImageGeometry(tiles=1), ImageGeometry(grid=(1, 2, 2))), (1, 2), None, 0)]
    _check_geometries([{"tiles": 1}, {"grid": [1, 2, 2], "split": None}], reqs, "b")  # older: fewer fields
    for bad, says in (([{"tiles": 1}, {"grid": [1, 2, 4]}], "are not the ones"),
                      ([{"tiles": 1, "zoom": 2}], "'zoom'"), (["tiles=1"], "not an object")):
        with pytest.raises(BundleError, match=says):
            _check_geometries(bad, reqs, "b")
