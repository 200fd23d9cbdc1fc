"""One mixed batch of images through vLLM's tower/connector LoRA path, as vLLM's model runner runs it.

`mm_lora_mappings` is the one piece of vLLM's runner reproduced here (it is inline there, not callable);
everything it calls and everything after it is vLLM's: the model class's `get_mm_lora_token_counts`,
`LoRAMapping`, the worker manager's `set_active_adapters` (adapter loading through `LoRAModel.from_local_checkpoint`
with the model's `hf_to_vllm_mapper`, slot activation, the punica wrapper metadata for the TOWER / CONNECTOR
wrapper), `group_and_batch_mm_kwargs`, and the model's `embed_multimodal`."""

from __future__ import annotations

from collections.abc import Callable
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


def run_images(model, wm, images: list[Image], lora_requests: dict[int, object],
               on_batch: Callable[[int, int], None] = lambda start, n: None) -> tuple[list[torch.Tensor], list]:
    """Set the mappings (vLLM's `set_active_adapters`, tower then connector, as the runner does) and run the
    images through vLLM's `group_and_batch_mm_kwargs` + `embed_multimodal`, as the runner does: the mappings are
    set once for all images, before the groups run. Returns each image's embeddings (what vLLM scatters into its
    placeholders) and the counts the helper gave. `on_batch(first image, images)` before each group runs."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    tower, connector, counts = mm_lora_mappings(model, images)
    active = {lora_requests[im.lora_id] for im in images if im.lora_id > 0}
    wm.set_active_adapters(active, tower)
    if connector is not None:
        wm.set_active_adapters(active, connector)
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for _modality, n, kwargs in group_and_batch_mm_kwargs([("image", im.item) for im in images], device="cpu"):
            on_batch(len(out), n)
            embeds = model.embed_multimodal(**kwargs)
            assert len(embeds) == n, f"embed_multimodal gave {len(embeds)} embeddings for {n} images"
            out.extend(e.detach().clone() for e in embeds)
    return out, counts
