"""Split a batched module tensor into per-request pieces using the registry's row counts.

Tower and connector tensors hold the images' rows in request order (any leading shape, flattened);
language-model tensors hold B x L_max token rows (right padding dropped per request). A tensor whose row
count disagrees with the formulas is an error naming the module and both numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm.arch import ArchSpec
from vlm.requests import Request

# Boundary captures recorded besides every LoRA-carrying module. "@tower_out" is the tower's output as
# the connector's first Linear receives it; "@lm_image_embeds" the connector output scattered into the
# LM's input embeddings at the image placeholders; "@logits" the final logits.
TOWER_OUT, LM_IMAGE_EMBEDS, LOGITS = "@tower_out", "@lm_image_embeds", "@logits"
BOUNDARY_GROUP = {TOWER_OUT: "connector", LM_IMAGE_EMBEDS: "connector", LOGITS: "language_model"}


def group_row_counts(arch: ArchSpec, config, requests: Sequence[Request], group: str) -> list[int]:
    """Rows of `group` (tower / connector) per request: its images' rows summed."""
    return [sum(arch.image_rows(config, g, group) for g in r.images) for r in requests]


def rows_per_request(x: torch.Tensor, group: str, counts: Sequence[int] | None, lengths: Sequence[int],
               l_max: int, name: str) -> list[torch.Tensor]:
    flat = x.reshape(-1, x.shape[-1])
    if group == "language_model":
        b = len(lengths)
        if flat.shape[0] != b * l_max:
            raise ValueError(f"module {name!r} (language_model) received {flat.shape[0]} rows; the batch has "
                             f"{b} x {l_max} = {b * l_max} token positions")
        return [flat[i * l_max: i * l_max + n] for i, n in enumerate(lengths)]
    assert counts is not None
    if flat.shape[0] != sum(counts):
        raise ValueError(f"module {name!r} ({group}) received {flat.shape[0]} rows; the registry's formulas "
                         f"give {sum(counts)} for this batch")
    return list(torch.split(flat, list(counts)))


def module_rows_per_request(arch: ArchSpec, config, requests: Sequence[Request], lengths: Sequence[int], l_max: int,
                  name: str, pieces: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-request 2-D [rows, features] tensors for one captured module (several calls concatenated)."""
    flat = torch.cat([p.reshape(-1, p.shape[-1]) for p in pieces]) if len(pieces) > 1 else pieces[0]
    if name == LM_IMAGE_EMBEDS:
        counts = [sum(arch.lm_tokens(config, g) for g in r.images) for r in requests]
        return rows_per_request(flat, "connector", counts, lengths, l_max, name)
    group = BOUNDARY_GROUP.get(name) or arch.group_of(name)
    counts = None if group == "language_model" else group_row_counts(arch, config, requests, group)
    return rows_per_request(flat, group, counts, lengths, l_max, name)
