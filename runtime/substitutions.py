"""Vision kernels substituted into the runtime's HF model, at the sites each arch file declares
(`ArchSpec.kernel_sites()`: which HF class or module global, and how the kernel binds there).

Instance-level sites (a method of the runtime model's own modules) are installed once and never touch the
reference model. A module-global site (Gemma4's RoPE) is patched only while the runtime model runs
(`active()`), and restored after. Each installed function looks its kernel up through the runtime's hooks
at call time, so a fault on a kernel runs the healthy path with only the hook changed.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Callable, Iterator

import torch

from runtime.kernels import KERNELS
from vlm.arch import ArchSpec
from vlm.arch.base import KernelSite


def _kernel_at_call_time(name: str, hooks_of: Callable[[], object]) -> Callable:
    op = KERNELS[name].op

    def call(*args, **kwargs):
        return hooks_of().kernel(name, op)(*args, **kwargs)
    return call


def install(arch: ArchSpec, model: torch.nn.Module, hooks_of: Callable[[], object]) -> list[KernelSite]:
    """Bind every instance-level site of `arch` into `model`; returns all sites in force (globals too)."""
    sites = list(arch.kernel_sites())
    for site in sites:
        if site.kernel not in KERNELS:
            raise ValueError(f"{arch.model_type}: kernel site names {site.kernel!r}, which runtime/kernels lacks")
        if site.hf_class is None:
            continue
        mods = [m for m in model.modules() if type(m).__name__ == site.hf_class]
        if not mods:
            raise ValueError(f"{arch.model_type}: substitution {site.kernel!r} found no {site.hf_class} to swap")
        fn = site.bind(_kernel_at_call_time(site.kernel, hooks_of))
        for m in mods:
            setattr(m, site.attr, types.MethodType(fn, m))
    return sites


@contextlib.contextmanager
def active(sites: list[KernelSite], hooks_of: Callable[[], object]) -> Iterator[None]:
    """Patch the module-global sites for the duration of a runtime forward."""
    saved = []
    try:
        for site in sites:
            if site.hf_class is not None:
                continue
            mod_name, attr = site.attr.rsplit(".", 1)
            mod = importlib.import_module(mod_name)
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, site.bind(_kernel_at_call_time(site.kernel, hooks_of)))
        yield
    finally:
        for mod, attr, old in reversed(saved):
            setattr(mod, attr, old)
