"""Per arch: a reference request's forward inputs (HF's keywords, docs/bundles.md "Request inputs") as the
per-image items vLLM's multimodal processor would hand its runner, and vLLM's module names as the HF ones.

The items are built by vLLM's own code from the fields its processor returns: the processor class's
`_get_mm_fields_config` and `MultiModalKwargsItems.from_hf_inputs`. What is this project's: which HF input
becomes which vLLM field (the processor's own outputs, e.g. Llama 4's `patches_per_image`, are derived from the
request's geometry), and `units`: what each image contributes along the leading dimension of the tower /
connector tensors (tiles, patches), used to split a captured batch into images (rows are proportional to it);
it is read from the inputs, never from vLLM's count helper (which it judges)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass
class Spec:
    model_type: str
    vllm_module: str  # vllm.model_executor.models.<module>
    processor: str  # its multimodal processor class (whose _get_mm_fields_config is used)
    # (config, inputs of one request, its geometries, each image's num_mm_embeds) -> (hf_inputs for vLLM, units
    # per image: an int for both groups, or {"tower": n, "connector": n})
    items: object
    hf_prefix: tuple[tuple[str, str], ...] = ()  # (vLLM prefix, HF prefix) pairs, first match wins
    hf_overrides: object = None  # config -> vLLM's --hf-overrides (fields vLLM reads that the config lacks)
    processor_kwargs: object = None  # config -> vLLM's --mm-processor-kwargs
    # (model, embed_multimodal's per-image outputs) -> what vLLM's LM scatters into the placeholders, where that is
    # not the whole output (None: the whole output)
    lm_embeds: object = None


def _tiles(geom: str) -> int:
    from harness.geometry_flags import parse_geometry

    t = parse_geometry(geom).tiles
    return t + 1 if t > 1 else 1  # the processor adds a global tile when it splits (rows.md, Llama 4)


def _llama4_items(config, inputs: dict, geoms: list[str], embeds: list[int]):
    tiles = [_tiles(g) for g in geoms]
    px = inputs["pixel_values"]
    assert px.shape[0] == sum(tiles), (px.shape, tiles)
    # aspect_ratios (the tile grid) is parsed by vLLM's model but unused by its forward and its count helper;
    # the geometry gives the count only, so it is (1, tiles)
    return {"pixel_values": px, "patches_per_image": torch.tensor(tiles),
            "aspect_ratios": torch.tensor([[1, t] for t in tiles])}, tiles


def _gemma4_items(config, inputs: dict, geoms: list[str], embeds: list[int]):
    # HF's image_position_ids is vLLM's pixel_position_ids (the same (x, y) per patch, -1 for padding). vLLM pads
    # every image to the budget's patches for the tower (one tower row per patch, padding included) and pools
    # each to its real soft tokens: the connector's rows are the image's placeholders
    return ({"pixel_values": inputs["pixel_values"], "pixel_position_ids": inputs["image_position_ids"]},
            [{"tower": 1, "connector": e} for e in embeds])


def _gemma4_budget(config) -> int:
    from vlm.arch import get_arch

    return get_arch("gemma4").max_soft_tokens(config)


def _registry_counts(model_type: str, config, geoms: list[str]):
    from harness.geometry_flags import parse_geometry
    from vlm.arch import get_arch

    arch = get_arch(model_type)
    return [arch.counts(config, parse_geometry(g)) for g in geoms]


def _llava_next_items(config, inputs: dict, geoms: list[str], embeds: list[int]):
    # HF's forward takes every tile of the request flat; vLLM's item is one image's tiles [tiles, 3, S, S]
    # (its processor's `pixel_values`, batched per image) with its `image_sizes`. Tiles per image: the registry's
    # tower rows over (CLS + patches) per tile, held to the request's tile count
    side = config.vision_config.image_size // config.vision_config.patch_size
    tiles = [c.encoder_rows // (side * side + 1) for c in _registry_counts("llava_next", config, geoms)]
    px = inputs["pixel_values"]
    assert px.shape[0] == sum(tiles), (px.shape, tiles)
    return {"pixel_values": list(px.split(tiles)), "image_sizes": inputs["image_sizes"]}, tiles


def _llava_items(config, inputs: dict, geoms: list[str], embeds: list[int]):
    # one image, one [3, S, S] tensor (vLLM's processor's `pixel_values`, batched per image): every image's tower
    # rows (CLS + patches) and connector rows (patches) are the same number, so one unit each
    px = inputs["pixel_values"]
    assert px.shape[0] == len(geoms), (px.shape, geoms)
    return {"pixel_values": px}, [1] * len(geoms)


def _qwen2_vl_items(config, inputs: dict, geoms: list[str], embeds: list[int]):
    # the same keys as HF's (vLLM's processor keeps them): patches flat, split by each image's grid
    grid = inputs["image_grid_thw"]
    return ({"pixel_values": inputs["pixel_values"], "image_grid_thw": grid},
            [int(t * h * w) for t, h, w in grid.tolist()])


def _idefics3_items(config, inputs: dict, geoms: list[str], embeds: list[int]):
    # HF's pixel_values / pixel_attention_mask are [1, sub-images, ...] for the request (its sub-images back to
    # back, no padding within one request); vLLM's processor gives them flat with `num_patches` (sub-images per
    # image), the one processor output derived here: from each geometry's split (rows * cols + 1, the registry's)
    from harness.geometry_flags import parse_geometry
    from vlm.arch import get_arch

    n = [get_arch("idefics3").sub_images(parse_geometry(g)) for g in geoms]
    px, mask = inputs["pixel_values"], inputs["pixel_attention_mask"]
    assert px.shape[:2] == (1, sum(n)), (px.shape, n)
    return {"pixel_values": px[0], "pixel_attention_mask": mask[0], "num_patches": torch.tensor(n)}, n


def _gemma3_items(config, inputs: dict, geoms: list[str], embeds: list[int]):
    # HF's pixel_values are every tower image of the request flat ([tiles, 3, S, S], pan-and-scan crops counted in
    # the geometry's `tiles`); vLLM's processor gives them with `num_patches` (tower images per image), derived here
    # from each geometry
    from harness.geometry_flags import parse_geometry

    n = [parse_geometry(g).tiles for g in geoms]
    px = inputs["pixel_values"]
    assert px.shape[0] == sum(n), (px.shape, n)
    return {"pixel_values": px, "num_patches": torch.tensor(n)}, n


def _qwen3_vl_lm_embeds(model, embeds: list[torch.Tensor]) -> list[torch.Tensor]:
    # vLLM's Qwen3-VL embed_multimodal returns each image's merger output with the DeepStack mergers' outputs as
    # extra columns ([n, out_hidden * (1 + levels)]); its LM splits them off before the scatter, in
    # `_compute_deepstack_embeds` (called by embed_input_ids): that method of vLLM's, run here on a zero text
    # embedding whose every position is an image's, gives the main embeddings @lm_image_embeds is judged on (the
    # DeepStack columns are the deepstack_merger_list modules' outputs, judged as connector modules)
    n = sum(e.shape[0] for e in embeds)
    zeros = embeds[0].new_zeros(n, model.visual_dim)
    _, main = model._compute_deepstack_embeds(zeros, list(embeds), torch.ones(n, dtype=torch.bool))
    return [m.clone() for m in main]


# (vLLM prefix, HF prefix) of a CLIP / SigLIP tower under vLLM's `vision_model.` level (layout.py renames the
# checkpoint to it) and its projector: LLaVA, LLaVA-NeXT, PaliGemma, Gemma 3
_CLIP_TOWER = (("vision_tower.vision_model.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector."))
# the Qwen-VL family's tower and merger(s), all under visual.
_QWEN_VISUAL = (("visual.", "model.visual."),)

SPECS = {
    "llama4": Spec("llama4", "mllama4", "Mllama4MultiModalProcessor", _llama4_items),
    # vLLM reads vision_config.default_output_length (real checkpoints' config.json carry it; transformers 5.25's
    # config class does not define it): set to the tiny config's budget through --hf-overrides, as
    # harness/audit_vllm.py does; max_soft_tokens is passed too (vLLM ignores values outside 70..1120)
    "gemma4": Spec("gemma4", "gemma4_mm", "Gemma4MultiModalProcessor", _gemma4_items,
                   hf_prefix=(("vision_tower.", "model.vision_tower."), ("embed_vision.", "model.embed_vision.")),
                   hf_overrides=lambda c: {"vision_config": {"default_output_length": _gemma4_budget(c)}},
                   processor_kwargs=lambda c: {"max_soft_tokens": _gemma4_budget(c)}),
    "llava_next": Spec("llava_next", "llava_next", "LlavaNextMultiModalProcessor", _llava_next_items,
                       hf_prefix=_CLIP_TOWER),
    # the same CLIP tower as LLaVA-NeXT's under vLLM's names (vision_model. level: layout.py renames the checkpoint)
    "llava": Spec("llava", "llava", "LlavaMultiModalProcessor", _llava_items, hf_prefix=_CLIP_TOWER),
    "qwen2_vl": Spec("qwen2_vl", "qwen2_vl", "Qwen2VLMultiModalProcessor", _qwen2_vl_items,
                     hf_prefix=_QWEN_VISUAL),
    # Qwen2.5-VL: Qwen2-VL's inputs (pixel_values flat, image_grid_thw) and its merger under visual.merger
    "qwen2_5_vl": Spec("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLMultiModalProcessor", _qwen2_vl_items,
                       hf_prefix=_QWEN_VISUAL),
    # Qwen3-VL: Qwen2-VL's inputs; DeepStack mergers (visual.deepstack_merger_list.*) are connector modules
    "qwen3_vl": Spec("qwen3_vl", "qwen3_vl", "Qwen3VLMultiModalProcessor", _qwen2_vl_items,
                     hf_prefix=_QWEN_VISUAL, lm_embeds=_qwen3_vl_lm_embeds),
    "idefics3": Spec("idefics3", "idefics3", "Idefics3MultiModalProcessor", _idefics3_items),
    # PaliGemma: one [3, S, S] image each, SigLIP rows (patches, no CLS) = connector rows: LLaVA's items; its SigLIP
    # tower under vLLM's vision_model. level (layout.py renames the checkpoint)
    "paligemma": Spec("paligemma", "paligemma", "PaliGemmaMultiModalProcessor", _llava_items,
                      hf_prefix=_CLIP_TOWER),
    # Gemma 3: PaliGemma's SigLIP tower (the same rename); its projector holds no Linear (a weight matmul)
    "gemma3": Spec("gemma3", "gemma3_mm", "Gemma3MultiModalProcessor", _gemma3_items, hf_prefix=_CLIP_TOWER),
}


def spec(model_type: str) -> Spec:
    if model_type not in SPECS:
        raise ValueError(f"the vLLM engine does not handle arch {model_type!r} (it handles {', '.join(SPECS)})")
    return SPECS[model_type]


def request_items(s: Spec, config, inputs: dict, geoms: list[str], embeds: list[int]) -> list[tuple[object, dict]]:
    """(vLLM's MultiModalKwargsItem, {group: units}) per image of one request, built by vLLM's own field config."""
    import importlib

    from transformers import BatchFeature
    from vllm.multimodal.inputs import MultiModalKwargsItems

    hf_inputs, units = s.items(config, inputs, geoms, embeds)
    units = [u if isinstance(u, dict) else {"tower": u, "connector": u} for u in units]
    proc = getattr(importlib.import_module(f"vllm.model_executor.models.{s.vllm_module}"), s.processor)
    # the processor's fields method reads at most self.info.get_hf_config(); the processor itself needs a tokenizer,
    # so an instance without __init__ (Qwen2.5-VL's method calls super(), which needs a real instance)
    me = object.__new__(proc)
    me.info = SimpleNamespace(get_hf_config=lambda: config)
    fields = proc._get_mm_fields_config(me, BatchFeature(hf_inputs), {})
    items = MultiModalKwargsItems.from_hf_inputs(BatchFeature(hf_inputs), fields)["image"]
    assert len(items) == len(geoms) == len(units), (len(items), geoms, units)
    return list(zip(items, units))


def hf_name(s: Spec, vllm_name: str) -> str:
    for a, b in s.hf_prefix:
        if vllm_name.startswith(a):
            return b + vllm_name[len(a):]
    return vllm_name


def vllm_name(s: Spec, hf: str) -> str:
    for a, b in s.hf_prefix:
        if hf == b.rstrip("."):
            return a.rstrip(".")
        if hf.startswith(b):
            return a + hf[len(b):]
    return hf
