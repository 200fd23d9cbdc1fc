"""Triton kernels of the runtime, one file per kernel, each with its pure-torch twin (`<name>_torch`, the
oracle) and its `KernelSpec` (`SPECS` in the file). The LoRA ops are larger and split: the ops and twins
(`lora.py`), the per-batch token grouping and tile schedule (`lora_grouping.py`), the specs (`lora_specs.py`)
and the launch configs (`lora_config.py`). `KERNELS` (name -> spec) is discovered from the files here: the
bench, the roofline and the suites read it, so adding a kernel is one file plus its tests."""

from __future__ import annotations

import importlib
import pkgutil

from runtime.kernels._util import interpreted
from runtime.kernels.lora import (
    lora_apply,
    lora_apply_torch,
    lora_expand,
    lora_expand_torch,
    lora_shrink,
    lora_shrink_torch,
)
from runtime.kernels.lora_grouping import TokenGrouping, token_grouping, token_grouping_torch
from runtime.kernels.pixel_shuffle import pixel_shuffle, pixel_shuffle_torch
from runtime.kernels.position_pool import position_pool, position_pool_bruteforce, position_pool_torch
from runtime.kernels.rope_2d import rope_2d, rope_2d_torch
from runtime.kernels.spec import KernelSpec


def _discover() -> dict[str, KernelSpec]:
    found: dict[str, KernelSpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "spec":
            continue
        for spec in getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPECS", ()):
            if spec.name in found:
                raise ValueError(f"kernel {spec.name!r} specified twice")
            found[spec.name] = spec
    return found


KERNELS: dict[str, KernelSpec] = _discover()

__all__ = [
    "KERNELS", "KernelSpec", "TokenGrouping", "interpreted", "lora_apply", "lora_apply_torch",
    "lora_expand", "lora_expand_torch", "lora_shrink", "lora_shrink_torch", "pixel_shuffle", "pixel_shuffle_torch",
    "position_pool", "position_pool_bruteforce", "position_pool_torch", "rope_2d", "rope_2d_torch", "token_grouping",
    "token_grouping_torch",
]
