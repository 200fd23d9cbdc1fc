"""Bundles (README, "Bundles"): `record` + `compare` gives the layers.csv of one `correctness` run; an engine's
own output bundle, written here from the runtime's module outputs through the README spec alone, is compared
(and a perturbed module is named); a bad bundle is one line, exit 2; compare holds one module at a time."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from harness.cli import main

ARCH = "llama4"
REF_ARGS = ["--arch", ARCH, "--adapters", "1", "--geometry", "tiles=1"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One reference bundle and one `correctness` report of the same options."""
    root = tmp_path_factory.mktemp("bundles")
    assert main(["record", *REF_ARGS, "--out", str(root / "ref")]) == 0
    assert main(["correctness", *REF_ARGS, "--out", str(root / "direct")]) == 0
    return root


def _csv(path):
    return (path / "layers.csv").read_text().splitlines()


def test_record_then_compare_gives_the_layers_csv_of_correctness(recorded, tmp_path):
    assert main(["compare", str(recorded / "ref"), "--out", str(tmp_path / "cmp")]) == 0
    direct, via = _csv(recorded / "direct"), _csv(tmp_path / "cmp")
    assert len(via) == len(direct) > 50
    assert via == direct  # every column, bit for bit: both runs judge the very same numbers


@pytest.fixture(scope="module")
def engine_outputs(recorded):
    """What an engine has: its own batch run, each module's rows per request (the project's runtime here)."""
    from harness.correctness.engine import load
    from runtime.model import RuntimeModel

    p = load(recorded / "ref")  # only to rebuild the very requests (the engine's own job) and its adapters
    rt = RuntimeModel.from_checkpoint(p.ckpt, extra_targets={m for a in p.adapters.values() for m in a.modules})
    for name, adapter in p.adapters.items():
        rt.load_adapter(name, adapter)
    return rt.run(p.reqs)


def _engine_bundle(ref, caps, folder, perturb: str | None = None):
    """Written through the README spec alone: per module a file of `out.<i>` (and `in.<i>`, for the delta)
    per request, listed in manifest.json with the reference manifest's requests."""
    manifest = json.loads((ref / "manifest.json").read_text())
    folder.mkdir()
    modules = []
    for k, name in enumerate(m["name"] for m in manifest["modules"]):
        tensors, rows, features = {}, [], 0
        for i, c in enumerate(caps):
            io = c.get(name)
            rows.append(0 if io is None else io["out"].shape[0])
            if io is None:
                continue
            out = io["out"] * 1.01 if name == perturb and i == 0 else io["out"]
            tensors[f"out.{i}"] = out.contiguous()
            features = out.shape[-1]
            if "in" in io:
                tensors[f"in.{i}"] = io["in"].contiguous()
        save_file(tensors, str(folder / f"m{k}.safetensors"))
        modules.append({"name": name, "file": f"m{k}.safetensors", "rows": rows, "features": features})
    (folder / "manifest.json").write_text(json.dumps({
        "format": "mmlora-bundle", "version": 1, "requests": manifest["requests"], "modules": modules}))
    return folder


@pytest.fixture(scope="module")
def engine(recorded, engine_outputs):
    return _engine_bundle(recorded / "ref", engine_outputs, recorded / "engine")


def test_an_engine_bundle_written_through_the_spec_is_compared(recorded, engine, tmp_path):
    assert main(["compare", str(recorded / "ref"), str(engine), "--out", str(tmp_path / "o")]) == 0
    rows = _csv(tmp_path / "o")
    assert len(rows) > 20 and all(",e2e," in r for r in rows[1:])


def test_a_perturbed_module_of_an_engine_bundle_fails_naming_it(recorded, engine_outputs, tmp_path):
    name = "language_model.model.layers.1.self_attn.o_proj"
    manifest = json.loads((recorded / "ref" / "manifest.json").read_text())
    assert name in [m["name"] for m in manifest["modules"]]
    bad = _engine_bundle(recorded / "ref", engine_outputs, tmp_path / "bad", perturb=name)
    out = tmp_path / "o"
    assert main(["compare", str(recorded / "ref"), str(bad), "--out", str(out)]) == 1
    first = json.loads((out / "summary.json").read_text())["archs"][ARCH]["first_divergence"]["e2e"]
    assert first["module"] == name and first["request"] == 0


def _edit(folder, fn):
    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def _first_lora_file(folder):
    m = json.loads((folder / "manifest.json").read_text())
    return folder / next(x["file"] for x in m["modules"] if not x["name"].startswith("@"))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-64])


CORRUPT = {
    "missing-module": (lambda g: _edit(g, lambda m: m["modules"].pop(3)), "lacks module"),
    "missing-file": (lambda g: _first_lora_file(g).unlink(), "is missing"),
    "other-row-count": (lambda g: _edit(g, lambda m: m["modules"][0]["rows"].__setitem__(0, 7)), "out.0 has shape"),
    "other-geometry": (lambda g: _edit(g, lambda m: m["requests"][0].__setitem__("geometry", ["tiles=3"])),
                       "request 0 geometry"),
    "truncated-file": (lambda g: _truncate(_first_lora_file(g)), "not a readable safetensors file"),
    "bad-manifest-json": (lambda g: (g / "manifest.json").write_text("{\"format\": "), "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_bad_engine_bundle_is_one_line_exit_2(case, recorded, engine, tmp_path, capsys):
    got = tmp_path / "got"
    shutil.copytree(engine, got)
    spoil, needle = CORRUPT[case]
    spoil(got)
    capsys.readouterr()
    assert main(["compare", str(recorded / "ref"), str(got), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_a_reference_bundle_with_another_adapter_file_is_refused(recorded, tmp_path, capsys):
    ref = tmp_path / "ref"
    shutil.copytree(recorded / "ref", ref)
    st = next(ref.glob("adapters/*/adapter_model.safetensors"))
    data = bytearray(st.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    st.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["compare", str(ref), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adapter" in err and "another file" in err, err


def test_an_interrupted_record_leaves_no_bundle(tmp_path, monkeypatch):
    from harness.correctness import engine

    def interrupted(*args, sink, **kw):
        sink(0)("some.module", "out", torch.ones(3, 4))  # a first capture is on disk ...
        raise RuntimeError("interrupted")  # ... when the reference stops
    monkeypatch.setattr(engine, "run_reference", interrupted)
    assert main(["record", *REF_ARGS, "--adapters", "0", "--out", str(tmp_path / "b")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_compare_holds_one_module_at_a_time(tmp_path):
    """Peak bytes of captures held while comparing (tensors read from bundles and stage files, the runtime's
    e2e captures included): the same with 2 and with 8 language-model layers."""
    from harness.correctness.bundle import HELD
    from vlm.checkpoint import build_tiny, save_checkpoint

    peaks, sizes = {}, {}
    for layers in (2, 8):
        _, model = build_tiny("llava", {"text_config.num_hidden_layers": layers})
        ckpt = save_checkpoint(model, tmp_path / f"ckpt{layers}")
        ref = tmp_path / f"ref{layers}"
        assert main(["record", "--model", str(ckpt), "--adapters", "0", "--out", str(ref)]) == 0
        HELD.reset()
        assert main(["compare", str(ref), "--mode", "e2e", "--out", str(tmp_path / f"o{layers}")]) == 0
        peaks[layers] = HELD.peak
        sizes[layers] = sum(f.stat().st_size for f in (ref / "modules").iterdir())
    print(f"bundle bytes {sizes}, peak bytes held by compare {peaks}")
    assert sizes[8] > 2 * sizes[2]  # the bundle grows with the layers ...
    assert peaks[8] <= 1.1 * peaks[2], peaks  # ... what compare holds does not


def test_tensors_read_back_as_safetensors_wrote_them(tmp_path):
    """bundle.format.read_tensor (plain file reads, no memory map) against safetensors' own loader, on the dtypes and
    shapes a bundle may hold; a dtype a bundle never holds is a one-line BundleError naming it."""
    from safetensors.torch import load_file

    from harness.correctness.bundle.format import BundleError, read_tensor

    gen = torch.Generator().manual_seed(3)
    tensors = {"bf16": torch.randn(3, 5, generator=gen).bfloat16(), "f64": torch.randn(4, generator=gen).double(),
               "bool": torch.rand(2, 3, generator=gen) > 0.5, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 7),
               "i64": torch.arange(6).reshape(2, 3)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    want = load_file(str(path))
    for key, t in want.items():
        got = read_tensor(path, key)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), key
    save_file({"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, str(tmp_path / "f8.safetensors"))
    with pytest.raises(BundleError, match="dtype F8_E4M3"):
        read_tensor(tmp_path / "f8.safetensors", "f8")
