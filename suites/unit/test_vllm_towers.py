"""vLLM's own vision-tower modules vs HF's, layer by layer, on the registry's tiny models (same weights, same
pixels, fp32, world size 1; runtime/vllm_towers.py builds them). Needs vLLM's model modules importable
(`nox -s vllm_towers`); skipped otherwise, with the reason (on a CPU torch: no matching torchvision)."""

from __future__ import annotations

import pytest
import torch

from suites.helpers import assert_close_scaled, need_vllm_models

pytestmark = pytest.mark.vllm_towers

# fp32, both sides run the same math (vLLM's CPU GEMM is torch's linear); only summation order may differ
REL = 1e-5


def _vllm_models_or_skip():
    from runtime import vllm_towers

    # setup first, as before vLLM's first import: on a CUDA host it hides the GPU for these CPU comparisons
    need_vllm_models("gemma4_mm", "mllama4", before=vllm_towers.setup)
    return vllm_towers


def _outputs(module: torch.nn.Module, names: list[str], run) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    hooks = [module.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: got.__setitem__(n, (out[0] if isinstance(out, tuple) else out).detach().clone()))
        for n in names]
    try:
        with torch.no_grad():
            got["@out"] = run()
    finally:
        for h in hooks:
            h.remove()
    return got


def _compare(ref: dict, got: dict) -> None:
    assert set(ref) == set(got) and len(ref) > 2, (sorted(ref), sorted(got))
    for name in ref:  # in execution order: the first failing layer is the one named
        assert ref[name].abs().max() > 0, f"{name}: the reference output is all zeros"
        assert_close_scaled(got[name], ref[name], REL, name)


def _tiny(arch_name: str):
    from vlm.arch import get_arch
    from vlm.checkpoint import build_tiny
    from vlm.requests import build_batch, make_request

    arch = get_arch(arch_name)
    cfg, hf = build_tiny(arch)
    batch = build_batch(arch, cfg, [make_request(arch, cfg, [arch.default_geometry(cfg)], None, seed=0)])
    return arch, cfg, hf.eval(), batch


def test_llama4_vision_model_layer_by_layer():
    vllm_towers = _vllm_models_or_skip()
    arch, cfg, hf, batch = _tiny("llama4")
    px = batch.pixel_inputs["pixel_values"]
    ours = vllm_towers.llama4_tower(hf.vision_model, cfg.vision_config)
    layers = [f"model.layers.{i}" for i in range(cfg.vision_config.num_hidden_layers)] + ["vision_adapter"]
    ref = _outputs(hf.vision_model, layers, lambda: hf.vision_model(px).last_hidden_state)
    _compare(ref, _outputs(ours, layers, lambda: ours(px)))


def test_gemma4_tower_and_embedder_layer_by_layer():
    vllm_towers = _vllm_models_or_skip()
    arch, cfg, hf, batch = _tiny("gemma4")
    tower = vllm_towers.gemma4_tower(hf.model.vision_tower)
    emb = vllm_towers.gemma4_embedder(hf.model.embed_vision, cfg.vision_config, cfg.text_config)
    assert any(type(m).__name__ == "ReplicatedLinear" for m in tower.modules())
    layers = [n for n, _ in hf.model.vision_tower.named_modules() if n.endswith(tuple(
        f"layers.{i}" for i in range(cfg.vision_config.num_hidden_layers)))]
    ref = _outputs(hf.model.vision_tower, layers, lambda: arch.vision_features(hf, batch.pixel_inputs))

    class _Embedder(torch.nn.Module):  # HF calls embed_vision(inputs_embeds=...); vLLM's takes it positionally
        def forward(self, inputs_embeds=None, **kw):
            return emb(inputs_embeds)

    held = hf.model.vision_tower, hf.model.embed_vision
    hf.model.vision_tower, hf.model.embed_vision = tower, _Embedder()
    try:
        got = _outputs(tower, layers, lambda: arch.vision_features(hf, batch.pixel_inputs))
    finally:
        hf.model.vision_tower, hf.model.embed_vision = held
    _compare(ref, got)
