"""A safetensors file is told from a pickle or a zip by its structure, never by its first bytes: its header
length (a little-endian u64) may begin with 0x80 (a pickle's marker) or `PK` (a zip's)."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from vlm.adapter_files import read_adapter
from vlm.files import check_safetensors, is_pickle, is_zip, read_json

_DT = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_with_header_length(tensors: dict[str, torch.Tensor], path: Path, n: int) -> None:
    """A safetensors file written by hand (the format's spec), its JSON header padded with spaces to exactly
    `n` bytes, so its first 8 bytes are `n` little-endian."""
    header, blobs, at = {}, [], 0
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        raw = t.view(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": _DT[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n, (len(text), n)
    path.write_bytes(n.to_bytes(8, "little") + text + b" " * (n - len(text)) + b"".join(blobs))


@pytest.mark.parametrize("n", [0x0F80, 0x8000, 0x4B50], ids=["0x0f80", "0x8000", "0x4b50-PK"])
def test_adapter_whose_header_length_looks_like_a_pickle_or_zip_reads(saved, tmp_path, n):
    from safetensors.torch import load_file

    ad = tmp_path / "ad"
    shutil.copytree(saved[1]["lm"], ad)
    f = ad / "adapter_model.safetensors"
    full = load_file(str(f))
    # the modules of the first two layers of one kind: a header short enough for the smallest length
    want = {k: v for k, v in full.items() if ".mlp." in k or "feed_forward" in k}
    want = {k: v.clone() for k, v in sorted(want.items())[:8]}  # a copy: the file is rewritten below
    (ad / "adapter_config.json").write_text(json.dumps({**json.loads((ad / "adapter_config.json").read_text()),
                                                        "rank_pattern": {}, "alpha_pattern": {}}))
    write_with_header_length(want, f, n)
    assert f.read_bytes()[:2] == n.to_bytes(8, "little")[:2]
    got = read_adapter(ad)
    # independent: the tensors safetensors' own loader reads from the hand-written file equal the originals
    assert {k: v for k, v in load_file(str(f)).items()}.keys() == want.keys()
    for key, t in want.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        w = got.modules[module]
        assert len(got.modules) == len(want) // 2
        assert torch.equal(w.A if ".lora_A." in key else w.B, t)


def test_generated_adapters_of_every_arch_read(tmp_path):
    """Every arch's generated adapters (the engine's recipe, 8 of them: header lengths vary with ranks and
    module names) read back; at least one of them has a header length starting 0x80 (InternVL's extra4 did),
    so this would catch a first-byte check."""
    from reference.adapters import add_adapters, default_specs, save_adapters
    from vlm.arch import all_archs
    from vlm.checkpoint import build_tiny

    first_bytes = set()
    for arch in all_archs():
        name = arch.model_type
        specs = [s for s in default_specs(8) if s.groups_for(arch)]
        folders = save_adapters(add_adapters(build_tiny(arch)[1], arch, specs), tmp_path / name)
        for folder in folders.values():
            first_bytes.add((folder / "adapter_model.safetensors").read_bytes()[0])
            assert read_adapter(folder).modules
    assert 0x80 in first_bytes


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_and_zip_are_named_by_their_structure(tmp_path):
    canary = tmp_path / "unpickled"
    p = tmp_path / "p.safetensors"
    p.write_bytes(pickle.dumps(_Boom(canary), protocol=4))
    assert is_pickle(p) and not is_zip(p)
    with pytest.raises(ValueError, match="is a pickle"):
        check_safetensors(p)
    assert not canary.exists()
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    z = tmp_path / "z.safetensors"
    z.write_bytes(buf.getvalue())
    assert zipfile.is_zipfile(z) and is_zip(z)
    with pytest.raises(ValueError, match="zip archive"):
        check_safetensors(z)
    # 0x80 followed by garbage is no pickle: reported as an invalid safetensors file
    g = tmp_path / "g.safetensors"
    g.write_bytes(b"\x80\x04\xff\xfe garbage")
    assert not is_pickle(g)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        check_safetensors(g)


@pytest.mark.parametrize("data", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"], ids=["empty", "cut-short"])
def test_empty_or_short_safetensors_is_named(tmp_path, data):
    f = tmp_path / "model.safetensors"
    f.write_bytes(data)
    with pytest.raises(ValueError, match="model.safetensors"):
        check_safetensors(f)


def test_read_json_names_nonfinite_key_and_depth(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"a": {"b": [1, Infinity]}}')
    with pytest.raises(ValueError, match=r"a\.b\[1\] is not a finite number"):
        read_json(f, "config")
    f.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json(f, "config")
