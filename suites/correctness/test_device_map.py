"""Device maps: the model placed by accelerate with half of each layer stack offloaded to disk gives the same
verdict and the very same figures as the plain run (reference, truth and runtime all run under accelerate's
hooks; captures, the truth's upcast and the runtime's LoRA modules keep working)."""

from __future__ import annotations

import re

import torch

from harness.correctness.engine import Options, judge, prepare
from vlm.checkpoint import build_tiny, load_checkpoint, save_checkpoint


def half_on_disk(model: torch.nn.Module) -> dict[str, str]:
    """Every layer stack's second half on disk, everything else on the CPU, at the coarsest names."""
    stacks = sorted({m.group(1) for n, _ in model.named_modules() if (m := re.fullmatch(r"(.*\.layers)\.\d+", n))})
    dm = {f"{s}.{i}": "disk" if i >= len(model.get_submodule(s)) // 2 else "cpu"
          for s in stacks for i in range(len(model.get_submodule(s)))}

    def cover(prefix: str, mod: torch.nn.Module) -> None:
        for name, child in mod.named_children():
            full = prefix + name
            if full in dm:
                continue
            if any(k.startswith(full + ".") for k in dm):
                cover(full + ".", child)
            else:
                dm[full] = "cpu"
    cover("", model)
    return dm


def test_half_the_layers_on_disk_gives_the_plain_run(tmp_path):
    ckpt = save_checkpoint(build_tiny("llava")[1], tmp_path / "ckpt")
    dm = half_on_disk(load_checkpoint(ckpt)[2])
    assert sorted(v for v in dm.values() if v == "disk") == ["disk"] * 2  # one of two layers, tower and LM
    opts = Options(archs=["llava"], model=str(ckpt), n_adapters=1, kernel="torch")
    plain = judge(prepare("llava", opts, tmp_path / "plain"), opts)
    mapped_opts = Options(archs=["llava"], model=str(ckpt), n_adapters=1, kernel="torch", device_map=dm)
    p = prepare("llava", mapped_opts, tmp_path / "mapped")
    offloaded = [n for n, t in p.base.named_parameters() if t.is_meta]  # the runtime twin of the reference
    assert any(".layers.1." in n for n in offloaded), "nothing was offloaded: the test would prove nothing"
    mapped = judge(p, mapped_opts)
    assert plain.summary["ok"] and mapped.summary["ok"]
    assert mapped.summary["first_divergence"] == plain.summary["first_divergence"]
    a, b = [r.as_dict() for r in plain.rows], [r.as_dict() for r in mapped.rows]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        diff = {k: (x[k], y[k]) for k in x if x[k] != y[k] and not (x[k] != x[k] and y[k] != y[k])}  # NaN == NaN
        assert not diff, (x["module"], x["request"], diff)


def test_adapter_folders_load_onto_an_offloaded_model(tmp_path):
    """PEFT's own loader fails on a model offloaded to disk; reference.adapters loads them as it adds them."""
    from reference.adapters import DEFAULT_SPECS, add_adapters, load_adapters, save_adapters

    ckpt = save_checkpoint(build_tiny("llava")[1], tmp_path / "ckpt")
    arch, _, plain = load_checkpoint(ckpt)
    folders = save_adapters(add_adapters(plain, arch, DEFAULT_SPECS[:2]), tmp_path / "ad")
    want = load_adapters(load_checkpoint(ckpt)[2], folders)
    _, _, model = load_checkpoint(ckpt, device_map=half_on_disk(load_checkpoint(ckpt)[2]),
                                  offload_folder=tmp_path / "off")
    got = load_adapters(model, folders)
    ids = torch.tensor([[2, 5, 6, 7]])
    for name in folders:
        want.set_adapter(name)
        got.set_adapter(name)
        with torch.no_grad():
            a = want.base_model.model.model.language_model(input_ids=ids).last_hidden_state
            b = got.base_model.model.model.language_model(input_ids=ids).last_hidden_state
        assert torch.equal(a, b), name


def test_compare_of_a_bundle_with_half_the_layers_on_disk_gives_the_plain_compare(tmp_path, capsys):
    """`mmlora compare BUNDLE --device-map FILE`: the runtime loads the checkpoint itself under the map (the
    reference is not in memory) and gives the very layers.csv of the plain compare."""
    import json

    import pandas as pd

    from harness.cli import main
    from harness.correctness.engine import _runtime, load

    ckpt = save_checkpoint(build_tiny("llava")[1], tmp_path / "ckpt")
    dm_file = tmp_path / "map.json"
    dm_file.write_text(json.dumps(half_on_disk(load_checkpoint(ckpt)[2])))
    bundle = tmp_path / "bundle"
    assert main(["record", "--arch", "llava", "--model", str(ckpt), "--adapters", "1", "--out", str(bundle)]) == 0
    opts = Options(archs=["llava"], kernel="torch", device_map=json.loads(dm_file.read_text()))
    rt = _runtime(load(bundle), opts, tmp_path / "off")
    assert any(".layers.1." in n for n, t in rt.model.named_parameters() if t.is_meta), "nothing was offloaded"
    del rt
    common = ["compare", str(bundle), "--kernel", "torch", "--out"]
    assert main([*common, str(tmp_path / "plain")]) == 0
    assert main([*common, str(tmp_path / "mapped"), "--device-map", str(dm_file)]) == 0
    plain, mapped = (pd.read_csv(tmp_path / d / "layers.csv") for d in ("plain", "mapped"))
    assert len(plain) > 0
    pd.testing.assert_frame_equal(plain, mapped)
    summary = json.loads((tmp_path / "mapped" / "summary.json").read_text())
    assert summary["options"]["device_map"] == json.loads(dm_file.read_text())
    # an output bundle loads no model: a map there is refused as the user's error
    capsys.readouterr()
    assert main(["compare", str(bundle), str(bundle), "--device-map", str(dm_file), "--out",
                 str(tmp_path / "x")]) == 2
    assert "--device-map / --max-memory do not apply" in capsys.readouterr().err


def test_quantize_under_a_device_map_is_refused(tmp_path, capsys):
    """accelerate reloads an offloaded layer's original weight before each forward: a quantized run there would
    silently judge unquantized layers. Refused as the user's error (exit 2) before any work, for both commands."""
    from harness.cli import main

    for argv in (["correctness", "--arch", "llava"], ["compare", str(tmp_path / "no-bundle")]):
        capsys.readouterr()
        assert main([*argv, "--quantize", "lm-int8", "--device-map", "auto", "--out", str(tmp_path / "r")]) == 2
        assert "--quantize cannot be combined with --device-map" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_whole_model_on_disk_gives_the_plain_run(tmp_path):
    """`{"": "disk"}` offloads the tower's embedding too, whose dtype HF reads outside the module (CLIP casts the
    pixels to `patch_embedding.weight.dtype`): the truth failed there ("Input type (torch.FloatTensor) and
    weight type (torch.DoubleTensor)") until offloaded placeholders took the truth dtype. A truth run at the
    run dtype instead would change every figure: the plain run's (float64 truth) must come back exactly."""
    ckpt = save_checkpoint(build_tiny("llava")[1], tmp_path / "ckpt")
    opts = Options(archs=["llava"], model=str(ckpt), n_adapters=1, kernel="torch", modes=("e2e",))
    plain = judge(prepare("llava", opts, tmp_path / "plain"), opts)
    disk = Options(archs=["llava"], model=str(ckpt), n_adapters=1, kernel="torch", modes=("e2e",),
                   device_map={"": "disk"})
    p = prepare("llava", disk, tmp_path / "disk")
    meta = {n: t.dtype for n, t in p.base.named_parameters() if t.is_meta}
    assert any("patch_embedding" in n for n in meta), "the tower's embedding is not offloaded: nothing tested"
    mapped = judge(p, disk)
    assert plain.summary["ok"] and mapped.summary["ok"]
    a, b = [r.as_dict() for r in plain.rows], [r.as_dict() for r in mapped.rows]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        diff = {k: (x[k], y[k]) for k in x if x[k] != y[k] and not (x[k] != x[k] and y[k] != y[k])}  # NaN == NaN
        assert not diff, (x["module"], x["request"], diff)
    # and the offloaded placeholders are given back their run dtype
    assert {n: t.dtype for n, t in p.base.named_parameters() if t.is_meta} == meta
