"""One mixed batch of images through vLLM's tower/connector LoRA path, as vLLM's model runner runs it.

`mm_lora_mappings` is the one piece of vLLM's runner reproduced here (it is inline there, not callable);
everything it calls and everything after it is vLLM's: the model class's `get_mm_lora_token_counts`,
`LoRAMapping`, the worker manager's `set_active_adapters` (adapter loading through `LoRAModel.from_local_checkpoint`
with the model's `hf_to_vllm_mapper`, slot activation, the punica wrapper metadata for the TOWER / CONNECTOR
wrapper), `group_and_batch_mm_kwargs`, and the model's `embed_multimodal`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Image:
    """One image of the batch as the runner sees it: its request's LoRA id (0: none), vLLM's per-image kwargs
    item, and `num_mm_embeds` (the placeholder embeddings of the image in its prompt, `pos_info.get_num_embeds()`)."""

    request: int
    lora_id: int
    item: object  # vllm.multimodal.inputs.MultiModalKwargsItem
    num_mm_embeds: int


def mm_lora_mappings(model, images: list[Image]):
    """The tower and connector LoRAMappings for a batch of images: a reproduction of the LoRA block of
    `GPUModelRunner._execute_mm_encoder` in vllm/v1/worker/gpu_model_runner.py (vLLM 0.32.0), which is inline
    there. Per image: `tower, connector = model.get_mm_lora_token_counts(modality=, mm_kwargs=, num_mm_embeds=)`,
    `[lora_id] * tower` appended to the tower mapping, the image's id repeated `connector` times
    (`np.repeat`) in the connector mapping, which is only built when `model.get_mm_mapping().connector` is set
    and every count is not None. Returns (tower mapping, connector mapping or None, [(tower, connector)] per
    image)."""
    from vllm.lora.layers import LoRAMapping, LoRAMappingType

    prompt_lora_mapping, token_lora_mapping, counts = [], [], []
    for im in images:
        tower_tokens, connector_tokens = model.get_mm_lora_token_counts(
            modality="image", mm_kwargs=im.item, num_mm_embeds=im.num_mm_embeds)
        prompt_lora_mapping.append(im.lora_id)
        token_lora_mapping.extend([im.lora_id] * tower_tokens)
        counts.append((tower_tokens, connector_tokens))
    tower = LoRAMapping(tuple(token_lora_mapping), tuple(prompt_lora_mapping), is_prefill=True,
                        type=LoRAMappingType.TOWER)
    mm_mapping = model.get_mm_mapping() if hasattr(model, "get_mm_mapping") else None
    connector = None
    if mm_mapping is not None and mm_mapping.connector and all(c is not None for _, c in counts):
        index = np.repeat(np.array(prompt_lora_mapping, dtype=np.int32),
                          np.array([c for _, c in counts], dtype=np.int32))
        connector = LoRAMapping(index_mapping=tuple(index.tolist()), prompt_mapping=tuple(prompt_lora_mapping),
                                is_prefill=True, type=LoRAMappingType.CONNECTOR)
    return tower, connector, counts


class VllmCannotRun(RuntimeError):
    """vLLM's own path cannot run this reference (a failure of the system under test, named before vLLM's own
    shape error or out-of-bounds access): `mmlora vllm-engine` exits 1 with one line, writing nothing."""


class WrapperTooSmall(VllmCannotRun):
    """The batch's tower / connector mapping is longer than the punica wrapper vLLM's manager sized for it."""


def capacity(wm, group: str) -> int | None:
    """Tokens the manager's punica wrapper for `group` holds (its `_token_lora_indices` buffer), None if none."""
    mgr = wm._adapter_manager
    prefixes = mgr.mm_mapping.tower_model if group == "tower" else mgr.mm_mapping.connector
    w = mgr.punica_wrapper_mapping.get(prefixes[0]) if prefixes else None
    return None if w is None else int(w._token_lora_indices.shape[0])


def run_images(model, wm, images: list[Image], lora_requests: dict[int, object],
               per_image: bool = False, on_counts=lambda images, counts: None) -> tuple[list[torch.Tensor], list]:
    """Set the mappings (vLLM's `set_active_adapters`, tower then connector, as the runner does) and run the
    images through vLLM's `group_and_batch_mm_kwargs` + `embed_multimodal`, as the runner does: the mappings are
    set once for all images, before the groups run. Returns each image's embeddings (what vLLM scatters into its
    placeholders) and the counts the helper gave. `per_image`: one encoder step per image (the runner's block
    and the encoder for each image alone, as when the encoder budget admits one image per step).
    Raises WrapperTooSmall (before vLLM's own shape error) when a mapping outgrows its wrapper. `on_counts(images,
    counts)` once the helper has given a step's counts, before it runs."""
    if per_image:
        out, counts = [], []
        for im in images:
            e, c = run_images(model, wm, [im], lora_requests, on_counts=on_counts)
            out += e
            counts += c
        return out, counts
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    tower, connector, counts = mm_lora_mappings(model, images)
    on_counts(images, counts)
    for group, mp in (("tower", tower), ("connector", connector)):
        cap = capacity(wm, group)
        if mp is not None and cap is not None and len(mp.index_mapping) > cap:
            raise WrapperTooSmall(
                f"vLLM's {group} mapping for this batch of {len(images)} images has {len(mp.index_mapping)} entries "
                f"(get_mm_lora_token_counts per image: {[c[0 if group == 'tower' else 1] for c in counts]}), but the "
                f"{group} punica wrapper LoRAModelManager sized holds {cap} (the helper's count at the encoder budget, "
                f"mm_kwargs=None): vLLM fails in update_metadata; --per-image runs one image per encoder step")
    active = {lora_requests[im.lora_id] for im in images if im.lora_id > 0}
    wm.set_active_adapters(active, tower)
    if connector is not None:
        if not connector.index_mapping:
            # only a step of images without a connector row (a Gemma 4 image of no real patch, HF's patches=0x0,
            # which vLLM's processor never yields) alone: vLLM's compute_meta takes max() of an empty tensor
            raise WrapperTooSmall(f"this encoder step's connector mapping is empty ({len(images)} images, connector "
                                  f"counts {[c for _, c in counts]}): vLLM's compute_meta cannot take it (latent: an "
                                  f"image of no real patch, which vLLM's processor never yields)")
        wm.set_active_adapters(active, connector)
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for _modality, n, kwargs in group_and_batch_mm_kwargs([("image", im.item) for im in images], device="cpu"):
            embeds = model.embed_multimodal(**kwargs)
            if len(embeds) != n:
                raise VllmCannotRun(f"vLLM's embed_multimodal gave {len(embeds)} embeddings for {n} images")
            out.extend(e.detach().clone() for e in embeds)
    return out, counts
