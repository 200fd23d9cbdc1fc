"""Reference side: live non-zero adapters in every group, mixed batch == one request at a time,
save/load round trip bit for bit, clear errors on bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from reference.adapters import DEFAULT_SPECS, AdapterSpec, add_adapters, load_adapters, save_adapters
from reference.run import run_reference
from vlm.arch import REGISTRY, ImageGeometry, get_arch
from vlm.checkpoint import build_tiny, load_checkpoint, save_checkpoint
from vlm.requests import Request, build_batch, make_request

ACCEPTANCE_ARCHS = [a for a in ("llama4", "gemma4", "llava", "qwen2_vl", "internvl") if a in REGISTRY]
# fp32 on CPU: batching changes only the summation order of matmuls / attention over padded rows,
# ~1e-6 relative; 1e-4 absolute on O(1) activations leaves room for a few layers of that, and a wrong
# adapter (O(1e-1) change) cannot hide under it.
FP32_ATOL = 1e-4


def _requests(arch, cfg):
    g = arch.default_geometry(cfg)
    mix = [("all", [g]), ("lm", [g]), (None, [g]), ("tower", [g, g]), (None, [])]
    return [make_request(arch, cfg, ims, a, seed=i) for i, (a, ims) in enumerate(mix)]


@pytest.fixture(scope="module", params=ACCEPTANCE_ARCHS)
def built(request):
    arch = get_arch(request.param)
    cfg, model = build_tiny(arch)
    base_caps = run_reference_base(arch, cfg)
    return arch, cfg, add_adapters(model, arch, DEFAULT_SPECS), base_caps


def run_reference_base(arch, cfg):
    _, base = build_tiny(arch)
    pm = add_adapters(base, arch, [AdapterSpec("all", ("tower", "connector", "language_model"))])
    return run_reference(pm, arch, cfg, [_requests(arch, cfg)[2]], "single").captures[0]


def test_adapter_changes_each_group(built):
    arch, cfg, pm, base = built
    req = _requests(arch, cfg)[0]  # adapter "all"
    caps = run_reference(pm, arch, cfg, [Request(req.images, req.prompt_ids, "all", req.seed)], "single").captures[0]
    base_req = run_reference(pm, arch, cfg, [Request(req.images, req.prompt_ids, None, req.seed)], "single").captures[0]
    changed = set()
    for name, io in caps.items():
        if name.startswith("@"):
            continue
        if not torch.allclose(io["out"], base_req[name]["out"], atol=1e-5):
            changed.add(arch.group_of(name))
    assert changed == set(arch.targetable_groups()), changed


def test_grouped_batch_equals_one_by_one(built):
    arch, cfg, pm, _ = built
    reqs = _requests(arch, cfg)
    single = run_reference(pm, arch, cfg, reqs, "single").captures
    grouped = run_reference(pm, arch, cfg, reqs, "grouped").captures
    for i, (s, g) in enumerate(zip(single, grouped)):
        assert set(s) == set(g), i
        for name in s:
            for k in s[name]:
                torch.testing.assert_close(g[name][k], s[name][k], atol=FP32_ATOL, rtol=1e-4,
                                           msg=lambda m, i=i, name=name, k=k: f"request {i} {name}/{k}: {m}")


def test_peft_mixed_path_refuses_tower_lora_with_clear_error(built):
    arch, cfg, pm, _ = built
    if "tower" not in arch.targetable_groups():
        pytest.skip("no tower LoRA")
    _, fresh = build_tiny(arch)
    pm2 = add_adapters(fresh, arch, DEFAULT_SPECS)
    with pytest.raises(ValueError, match="adapter_names"):
        run_reference(pm2, arch, cfg, _requests(arch, cfg)[:4], "peft_mixed")


@pytest.mark.parametrize("model_type", [a for a in ("llava", "qwen2_vl") if a in REGISTRY][:1])
def test_peft_mixed_path_equals_single_for_lm_only_adapters(model_type):
    # not llama4: its MoE shared expert sees flattened B*L rows, which PEFT's adapter_names refuses too
    arch = get_arch(model_type)
    cfg, model = build_tiny(arch)
    pm = add_adapters(model, arch, [AdapterSpec("a", ("language_model",), 4, 8, seed=5),
                                    AdapterSpec("b", ("language_model",), 2, 4, seed=6)])
    g = arch.default_geometry(cfg)
    reqs = [make_request(arch, cfg, [g], a, seed=i) for i, a in enumerate(["a", None, "b"])]
    single = run_reference(pm, arch, cfg, reqs, "single")
    mixed = run_reference(pm, arch, cfg, reqs, "peft_mixed")
    for i in range(len(reqs)):
        torch.testing.assert_close(mixed.logits(i), single.logits(i), atol=FP32_ATOL, rtol=1e-4)


@pytest.mark.parametrize("model_type", ACCEPTANCE_ARCHS[:1] + [a for a in ("gemma4",) if a in REGISTRY])
def test_checkpoint_and_adapter_roundtrip_bit_for_bit(model_type, tmp_path):
    arch = get_arch(model_type)
    cfg, model = build_tiny(arch)
    pm = add_adapters(model, arch, DEFAULT_SPECS)
    reqs = _requests(arch, cfg)
    before = run_reference(pm, arch, cfg, reqs, "single").captures
    save_checkpoint(pm.get_base_model() if False else pm.base_model.model, tmp_path / "ckpt")
    # the base weights saved must not include LoRA: save a fresh tiny model with the same seed instead
    _, clean = build_tiny(arch)
    save_checkpoint(clean, tmp_path / "ckpt")
    folders = save_adapters(pm, tmp_path / "adapters")
    arch2, cfg2, loaded = load_checkpoint(tmp_path / "ckpt")
    pm2 = load_adapters(loaded, folders)
    after = run_reference(pm2, arch2, cfg2, reqs, "single").captures
    for b, a in zip(before, after):
        assert set(a) == set(b)
        for name in b:
            for k in b[name]:
                assert torch.equal(a[name][k], b[name][k]), name


# ----------------------------------------------------------------------------- bad input
def _one_line(err):
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path / "nope")
    assert "nope" in _one_line(e)


def test_config_without_vision_part(saved, tmp_path):
    root, _ = saved
    shutil.copytree(root / "ckpt", tmp_path / "ck")
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    del raw["vision_config"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path / "ck")
    assert "vision_config" in _one_line(e)


def test_adapter_targeting_absent_modules(saved, tmp_path):
    root, folders = saved
    from safetensors.torch import load_file, save_file

    shutil.copytree(folders["lm"], tmp_path / "ad")
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    sd = {k.replace("language_model.", "language_mdl."): v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_adapters(build_tiny("llama4")[1], {"x": tmp_path / "ad"})
    assert "language_mdl" in _one_line(e)


def test_adapter_rank_shape_mismatch(saved, tmp_path):
    root, folders = saved
    shutil.copytree(folders["lm"], tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["r"] = 7
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_adapters(build_tiny("llama4")[1], {"x": tmp_path / "ad"})
    assert "r=7" in _one_line(e)


def test_image_count_differs_from_placeholders():
    arch = get_arch("llama4")
    cfg, _ = build_tiny(arch)
    req = make_request(arch, cfg, [ImageGeometry(tiles=1)], None)
    bad = Request(req.images + (ImageGeometry(tiles=1),), req.prompt_ids, None)
    with pytest.raises(ValueError) as e:
        build_batch(arch, cfg, [bad])
    msg = _one_line(e)
    assert "2 image(s)" in msg and str(2 * arch.lm_tokens(cfg, ImageGeometry(tiles=1))) in msg
