"""Vision kernels substituted into the runtime's HF model, per architecture.

Instance-level swaps (a bound forward / method on the runtime model's own modules) are installed once and
never touch the reference model. Gemma4's vision attention looks `apply_multidimensional_rope` up as a
module global, so that one is patched only while the runtime model runs (`active()`), and restored after.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from runtime.kernels import gemma4_pooler_forward, pixel_shuffle, rope_2d


@dataclass(frozen=True)
class Substitution:
    name: str  # the kernel's name, as in runtime/kernels and the bench
    install: Callable[[torch.nn.Module], int] = lambda model: 0  # returns how many modules were swapped
    globals_: dict[str, tuple[str, Callable]] = field(default_factory=dict)  # label -> (module path, attr)


def _modules_of(model, cls_name: str):
    return [m for m in model.modules() if type(m).__name__ == cls_name]


def _install_gemma4_pooler(model) -> int:
    pools = _modules_of(model, "Gemma4VisionPooler")
    for p in pools:
        p.forward = types.MethodType(gemma4_pooler_forward, p)
    return len(pools)


def _llama4_shuffle_forward(self, encoded_patches: torch.Tensor) -> torch.Tensor:
    # equal to HF's Llama4VisionPixelShuffleMLP.forward with the permutation done by our kernel
    return self.mlp(pixel_shuffle(encoded_patches, self.pixel_shuffle_ratio, variant="llama4"))


def _install_llama4_shuffle(model) -> int:
    mods = _modules_of(model, "Llama4VisionPixelShuffleMLP")
    for m in mods:
        m.forward = types.MethodType(_llama4_shuffle_forward, m)
    return len(mods)


def _internvl_shuffle(self, vision_features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    return pixel_shuffle(vision_features, scale_factor, variant="internvl")


def _install_internvl_shuffle(model) -> int:
    mods = _modules_of(model, "InternVLModel")
    for m in mods:
        m.pixel_shuffle = types.MethodType(_internvl_shuffle, m)
    return len(mods)


def _rope_2d_global(x, cos, sin, position_ids, unsqueeze_dim: int = 2):
    return rope_2d(x, cos, sin, position_ids, unsqueeze_dim=unsqueeze_dim)


SUBSTITUTIONS: dict[str, tuple[Substitution, ...]] = {
    "gemma4": (
        Substitution("position_pool", _install_gemma4_pooler),
        Substitution("rope_2d", globals_={
            "rope_2d": ("transformers.models.gemma4.modeling_gemma4.apply_multidimensional_rope", _rope_2d_global)}),
    ),
    "llama4": (Substitution("pixel_shuffle", _install_llama4_shuffle),),
    "internvl": (Substitution("pixel_shuffle", _install_internvl_shuffle),),
}


def install(model_type: str, model: torch.nn.Module, skip: frozenset[str] = frozenset()) -> list[str]:
    """Install the instance-level swaps; returns the substitution names in force."""
    names = []
    for sub in SUBSTITUTIONS.get(model_type, ()):
        if sub.name in skip:
            continue
        n = sub.install(model)
        if n == 0 and not sub.globals_:
            raise ValueError(f"{model_type}: substitution {sub.name!r} found no module to swap")
        names.append(sub.name)
    return names


@contextlib.contextmanager
def active(model_type: str, names: list[str], overrides: dict[str, Callable] | None = None) -> Iterator[None]:
    """Patch the module-global kernels of `names` for the duration of a runtime forward
    (`overrides` maps a global's label to a replacement: the seeded faults use it)."""
    import importlib

    saved = []
    try:
        for sub in SUBSTITUTIONS.get(model_type, ()):
            if sub.name not in names:
                continue
            for label, (path, fn) in sub.globals_.items():
                fn = (overrides or {}).get(label, fn)
                mod_name, attr = path.rsplit(".", 1)
                mod = importlib.import_module(mod_name)
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, fn)
        yield
    finally:
        for mod, attr, old in reversed(saved):
            setattr(mod, attr, old)
