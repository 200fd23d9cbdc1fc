"""Triton kernels of the runtime, one per file, each with its pure-torch twin (`<name>_torch`, the oracle)."""

from runtime.kernels._util import interpreted
from runtime.kernels.lora import (
    lora_apply,
    lora_apply_torch,
    lora_block_sizes,
    lora_expand,
    lora_expand_torch,
    lora_groups,
    lora_shrink,
    lora_shrink_torch,
)
from runtime.kernels.pixel_shuffle import pixel_shuffle, pixel_shuffle_torch
from runtime.kernels.position_pool import (
    gemma4_pooler_forward,
    position_pool,
    position_pool_bruteforce,
    position_pool_torch,
)
from runtime.kernels.rope_2d import rope_2d, rope_2d_torch

__all__ = [
    "gemma4_pooler_forward", "interpreted", "lora_apply", "lora_apply_torch", "lora_block_sizes",
    "lora_expand", "lora_expand_torch", "lora_groups", "lora_shrink", "lora_shrink_torch", "pixel_shuffle",
    "pixel_shuffle_torch", "position_pool", "position_pool_bruteforce", "position_pool_torch", "rope_2d",
    "rope_2d_torch",
]
