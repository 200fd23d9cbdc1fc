"""CUDA only (skipped on CPU): a whole vision-tower forward with LoRA captured in one CUDA graph.

The runtime validates slot ids on the host when it builds the mapping, so the token grouping, every
shrink and every expand of the batch run without a host sync: the tower forward (HF's SigLIP tower of the
tiny PaliGemma, LoRA on its attention and MLP Linears, 3 adapters and no-adapter rows mixed) is captured
once, the groupings included, and replayed on new pixels; the replay must equal an eager forward on those
pixels, and differ from the no-LoRA forward (the adapters are live inside the graph). Towers: SigLIP
(PaliGemma's tiny config; Gemma 3's tiny projector outputs zeros, so it would prove nothing) and CLIP
(LLaVA's), tower + connector as `vision_features` runs them."""

from __future__ import annotations

import pytest
import torch

from suites.helpers import assert_close_scaled

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _runtime(arch_name: str):
    from runtime.model import RuntimeModel
    from vlm.arch import get_arch

    arch = get_arch(arch_name)
    cfg = arch.tiny_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = arch.model_class()._from_config(cfg, dtype=torch.bfloat16)
    rt = RuntimeModel(arch, cfg, model.eval(), max_slots=5, r_max=8)
    with torch.no_grad():
        for name in rt.lora_names:
            rt.tables.A[name][:3].normal_(0.0, rt.tables.A[name].shape[2] ** -0.5)
            rt.tables.B[name][:3].normal_(0.0, 0.05)
    for s in range(3):
        rt.tables.slot_of[f"a{s}"] = s
    return rt


@pytest.mark.parametrize("arch_name", ["paligemma", "llava"])
def test_tower_forward_with_lora_replays_from_one_cuda_graph(arch_name):
    from vlm.requests import build_batch, make_request

    rt = _runtime(arch_name)
    arch, cfg = rt.arch, rt.config
    geom = arch.default_geometry(cfg)
    reqs = [make_request(arch, cfg, [geom], a, seed=i) for i, a in enumerate(["a0", None, "a1", "a2", "a0"])]
    batch = build_batch(arch, cfg, reqs).to("cuda", torch.bfloat16)
    pixels = batch.pixel_inputs
    l_max = batch.input_ids.shape[1]

    def tower():
        return arch.vision_features(rt.model, pixels)

    with torch.no_grad():
        rt.mapping = None
        base = tower().clone()  # no LoRA
        rt.mapping = rt.make_mapping(reqs, l_max)
        tower()  # warm-up: compiles the kernels, builds the slice tables
        torch.cuda.synchronize()
        rt.mapping = rt.make_mapping(reqs, l_max)  # fresh: its groupings are built inside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = tower()
        gen = torch.Generator().manual_seed(5)
        for v in pixels.values():
            if torch.is_tensor(v) and v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=gen).to(v.device, v.dtype))
        g.replay()
        torch.cuda.synchronize()
        rt.mapping = rt.make_mapping(reqs, l_max)
        eager = tower()
        rt.mapping = None
        base_new = tower()
    # the same kernels with the same configs on the same inputs; the bound only allows for a library GEMM
    # picking another algorithm inside the graph (bf16: one rounding, 1e-2 of max|ref| as the kernel specs)
    assert_close_scaled(out, eager, 1e-2, f"{arch_name}: graph replay vs eager")
    assert not torch.equal(base, base_new), "the new pixels must change the tower output"
    assert (out - base_new).abs().max() > 0.1 * base_new.abs().max(), "LoRA must be live inside the graph"
