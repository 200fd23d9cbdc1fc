"""Architecture registry: HF `model_type` -> ArchSpec instance.

Adding an architecture is one file in this folder plus one line in `_ARCH_MODULES`.
"""

from __future__ import annotations

import importlib

from harness.arch.base import GROUPS, ArchSpec, ImageGeometry, TokenCounts, apply_overrides, parse_set

_ARCH_MODULES = (
    "llama4",
    "gemma4",
    "llava",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "gemma3",
    "paligemma",
    "llava_next",
    "idefics3",
    "mistral3",
)

REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    if spec.model_type in REGISTRY:
        raise ValueError(f"architecture {spec.model_type!r} registered twice")
    REGISTRY[spec.model_type] = spec
    return spec


def _load() -> None:
    for name in _ARCH_MODULES:
        importlib.import_module(f"harness.arch.{name}")


def get_arch(model_type: str) -> ArchSpec:
    if model_type not in REGISTRY:
        raise ValueError(f"unknown arch {model_type!r}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[model_type]


def all_archs() -> list[ArchSpec]:
    return [REGISTRY[k] for k in sorted(REGISTRY)]


_load()

__all__ = [
    "GROUPS", "REGISTRY", "ArchSpec", "ImageGeometry", "TokenCounts", "all_archs", "apply_overrides",
    "get_arch", "parse_set", "register",
]
