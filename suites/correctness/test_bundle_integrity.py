"""A bundle is trusted only as written: every module file's sha256 is in the manifest and verified, a NaN / Inf
the recording did not produce is refused, the manifest's dtype must be its tensors', an engine's outputs must
be floating; each is one line, exit 2, never a verdict. The manifest says what wrote it (git commit, versions)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.cli import main

REPO = Path(__file__).resolve().parents[2]
REF_ARGS = ["--arch", "llama4", "--adapters", "1", "--geometry", "tiles=1"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    assert main(["record", *REF_ARGS, "--out", str(root / "ref")]) == 0
    return root / "ref"


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _lora_entry(m: dict) -> dict:
    return next(x for x in m["modules"] if not x["name"].startswith("@") and x["rows"][0])


def _refused(argv, tmp_path, capsys, needle: str) -> None:
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def _flip_exponent_bit(path: Path, key: str) -> None:
    """The top exponent bit of the first element of `key`, in place in the file (no rewrite)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    entry = json.loads(raw[8:8 + n])[key]
    assert entry["dtype"] in ("F32", "F64")
    size = 4 if entry["dtype"] == "F32" else 8
    at = 8 + n + entry["data_offsets"][0] + size - 1  # little-endian: the sign / exponent byte is the last
    data = bytearray(raw)
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_module_file_is_refused(ref, tmp_path, capsys):
    bad = tmp_path / "ref"
    shutil.copytree(ref, bad)
    entry = _lora_entry(_manifest(bad))
    before = load_file(str(bad / entry["file"]))["out.0"].clone()
    _flip_exponent_bit(bad / entry["file"], "out.0")
    after = load_file(str(bad / entry["file"]))["out.0"]
    assert torch.isfinite(after).all() and after.abs().max() > 1e30 * before.abs().max().clamp(min=1e-30)
    _refused(["compare", str(bad)], tmp_path, capsys, "sha256 differs")


def _rewrite(folder: Path, entry: dict, edit) -> None:
    """A module file rewritten through `edit(tensors)` with the manifest's sha256 updated to match: a writer's
    own mistake (or a hand edit that kept the checksum honest), which only the content checks catch."""
    import hashlib

    path = folder / entry["file"]
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    save_file(edit(tensors), str(path))
    m = _manifest(folder)
    for x in m["modules"]:
        if x["name"] == entry["name"]:
            x["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("key", ["out.0", "truth.out.0"])
def test_a_nonfinite_reference_or_truth_is_a_bad_bundle_not_a_verdict(ref, tmp_path, capsys, key):
    bad = tmp_path / "ref"
    shutil.copytree(ref, bad)
    entry = _lora_entry(_manifest(bad))

    def edit(t):
        t[key][0, 0] = float("inf")
        return t
    _rewrite(bad, entry, edit)
    _refused(["compare", str(bad)], tmp_path, capsys, f"{key} holds NaN or Inf")


def test_an_edited_manifest_dtype_is_refused_naming_it(ref, tmp_path, capsys):
    bad = tmp_path / "ref"
    shutil.copytree(ref, bad)
    m = _manifest(bad)
    _lora_entry(m)["dtype"] = "float16"
    (bad / "manifest.json").write_text(json.dumps(m))
    _refused(["compare", str(bad)], tmp_path, capsys, "the manifest's dtype 'float16'")


def _outputs_bundle(ref: Path, folder: Path, edit=None) -> Path:
    """An engine's output bundle (README spec, version 1, no checksums): the reference's own out.<i>."""
    m = _manifest(ref)
    folder.mkdir()
    modules = []
    for k, x in enumerate(m["modules"]):
        t = {key: v.clone() for key, v in load_file(str(ref / x["file"])).items() if key.startswith("out.")}
        if edit is not None and x["name"] == _lora_entry(m)["name"]:
            t = edit(t)
        save_file(t, str(folder / f"m{k}.safetensors"))
        modules.append({"name": x["name"], "file": f"m{k}.safetensors", "rows": x["rows"], "features": x["features"]})
    (folder / "manifest.json").write_text(json.dumps({"format": "mmlora-bundle", "version": 1,
                                                      "requests": m["requests"], "modules": modules}))
    return folder


def test_an_engine_bundle_with_integer_outputs_is_refused(ref, tmp_path, capsys):
    good = _outputs_bundle(ref, tmp_path / "good")
    assert main(["compare", str(ref), str(good), "--out", str(tmp_path / "ok")]) == 0  # the spec alone passes
    bad = _outputs_bundle(ref, tmp_path / "bad", lambda t: {**t, "out.0": (t["out.0"] * 100).to(torch.int32)})
    _refused(["compare", str(ref), str(bad)], tmp_path, capsys, "out.0 has dtype I32")


def test_a_version_1_reference_bundle_asks_to_be_recorded_again(ref, tmp_path, capsys):
    old = tmp_path / "ref"
    shutil.copytree(ref, old)
    m = _manifest(old)
    m["version"] = 1
    for x in m["modules"]:
        del x["sha256"]
    (old / "manifest.json").write_text(json.dumps(m))
    _refused(["compare", str(old)], tmp_path, capsys, "re-record it")


def test_the_manifest_records_what_wrote_it(ref):
    import peft
    import transformers

    p = _manifest(ref)["provenance"]
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    assert head and p["git_commit"].removesuffix("-dirty") == head
    assert p["versions"]["torch"] == torch.__version__
    assert p["versions"]["transformers"] == transformers.__version__ and p["versions"]["peft"] == peft.__version__
    # and each module's checksum is the file's
    import hashlib

    for x in _manifest(ref)["modules"]:
        assert x["sha256"] == hashlib.sha256((ref / x["file"]).read_bytes()).hexdigest()
