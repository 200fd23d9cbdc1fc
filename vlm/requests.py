"""Requests and batches shared by the reference and the runtime.

A request is (images, prompt token ids holding the placeholders, adapter name or None). Pixels are drawn
from a per-request seed so both sides see the very same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlm.arch import ArchSpec, ImageGeometry


@dataclass(frozen=True)
class Request:
    images: tuple[ImageGeometry, ...]
    prompt_ids: tuple[int, ...]
    adapter: str | None = None
    seed: int = 0


@dataclass
class Batch:
    """Model inputs for a list of requests, right-padded; `lengths[i]` real tokens of request i."""

    requests: list[Request]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_inputs: dict
    lengths: list[int]

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.pixel_inputs}

    def to(self, device, dtype=None) -> Batch:
        def mv(t):
            if not isinstance(t, torch.Tensor):
                return t
            t = t.to(device)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return Batch(self.requests, mv(self.input_ids), mv(self.attention_mask),
                     {k: mv(v) for k, v in self.pixel_inputs.items()}, self.lengths)


def make_request(arch: ArchSpec, config, images: Sequence[ImageGeometry], adapter: str | None,
                 seed: int = 0, n_text: int = 3) -> Request:
    """A prompt of a few text tokens around each image's placeholder block."""
    lo, hi = arch.text_vocab_safe_ids(config)
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = torch.randint(lo, hi, (n_text,), generator=g).tolist()
    for im in images:
        ids += arch.prompt_image_ids(config, im)
        ids += torch.randint(lo, hi, (n_text,), generator=g).tolist()
    return Request(tuple(images), tuple(ids), adapter, seed)


def check_request(arch: ArchSpec, config, req: Request) -> None:
    """Images must match placeholders: the registry says how many each image needs."""
    for im in req.images:
        arch.validate_geometry(config, im)
    want = sum(arch.lm_tokens(config, im) for im in req.images)
    have = sum(1 for t in req.prompt_ids if t == arch.image_token_id(config))
    if want != have:
        raise ValueError(
            f"request has {len(req.images)} image(s) needing {want} placeholder tokens but its prompt "
            f"holds {have}"
        )
    vocab = config.get_text_config().vocab_size
    bad = [t for t in req.prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")


def build_batch(arch: ArchSpec, config, requests: Sequence[Request]) -> Batch:
    if not requests:
        raise ValueError("empty batch: at least one request is needed")
    for r in requests:
        check_request(arch, config, r)
    lengths = [len(r.prompt_ids) for r in requests]
    pad_id = arch.text_vocab_safe_ids(config)[0]
    ids = torch.full((len(requests), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(requests):
        ids[i, : lengths[i]] = torch.tensor(r.prompt_ids)
        mask[i, : lengths[i]] = 1
    per_request = []
    for r in requests:
        if r.images:
            per_request.append(arch.build_pixel_inputs(config, r.images, torch.Generator().manual_seed(r.seed)))
        else:
            per_request.append({})
    with_images = [p for p in per_request if p]
    pixels = arch.collate_pixel_inputs(config, with_images) if with_images else {}
    return Batch(list(requests), ids, mask, pixels, lengths)
