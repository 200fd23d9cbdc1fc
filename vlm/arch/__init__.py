"""Architecture registry: HF `model_type` -> ArchSpec instance.

Adding an architecture is one file in this folder: every module here except `base` is imported on first
use, and each calls `register(...)` on its spec. Nothing else in the project branches on model type.
"""

from __future__ import annotations

import importlib
import pkgutil

from vlm.arch.base import GROUPS, ArchSpec, ImageGeometry, TokenCounts, apply_overrides, parse_set

REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    if spec.model_type in REGISTRY:
        raise ValueError(f"architecture {spec.model_type!r} registered twice")
    REGISTRY[spec.model_type] = spec
    return spec


def _load() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


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
