"""LoRA providers: the ways y += B[slot] A[slot] x is computed for a mixed batch, one file each here, each
holding `PROVIDER = LoRAProvider(...)` (runtime/providers/provider.py says what it declares). `PROVIDERS` is
discovered from the files: the runtime, the `--provider` choices, the bench (its cases, schema and report)
and every help text read it, so adding a provider is one file."""

from __future__ import annotations

import importlib
import pkgutil

from runtime.providers.provider import (
    INTERPRETER_NOTE,
    OP,
    TWIN,
    BenchSpec,
    GroupedBatch,
    LoRAProvider,
    Unavailable,
    batched,
    from_sample,
    noted,
)


def _discover() -> dict[str, LoRAProvider]:
    found: list[LoRAProvider] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "provider":
            continue
        p = getattr(importlib.import_module(f"{__name__}.{info.name}"), "PROVIDER", None)
        if not isinstance(p, LoRAProvider):
            raise ValueError(f"runtime/providers/{info.name}.py holds no PROVIDER = LoRAProvider(...)")
        found.append(p)
    out: dict[str, LoRAProvider] = {}
    for p in sorted(found, key=lambda p: (p.order, p.name)):
        if p.name in out:
            raise ValueError(f"LoRA provider {p.name!r} declared twice")
        if p.runtime and p.apply is None:
            raise ValueError(f"LoRA provider {p.name!r}: the runtime runs `apply`, and it has none")
        out[p.name] = p
    for what, n in (("default=True", sum(p.default for p in found)),
                    (f"times={OP!r}", sum(p.bench.times == OP for p in found)),
                    (f"times={TWIN!r}", sum(p.bench.times == TWIN for p in found))):
        if n != 1:
            raise ValueError(f"exactly one LoRA provider declares {what}, {n} do")
    return out


PROVIDERS: dict[str, LoRAProvider] = _discover()
# the runtime's provider unless told otherwise
DEFAULT: str = next(n for n, p in PROVIDERS.items() if p.default)
# the provider that runs each kernel's pure-torch twin (a kernel's other provider runs its Triton op)
TWIN_PROVIDER: str = next(n for n, p in PROVIDERS.items() if p.bench.times == TWIN)
# what the correctness runtime can run (--provider); the others are bench baselines
RUNTIME: tuple[str, ...] = tuple(n for n, p in PROVIDERS.items() if p.runtime)
# HF + PEFT's own LoRA, if a provider is it: the bench report's speed-ups are over it
REFERENCE: str | None = next((n for n, p in PROVIDERS.items() if p.reference), None)


def runtime_provider(name: str) -> LoRAProvider:
    """The provider the runtime runs for `name` (ValueError, one line, for an unknown one or a bench baseline)."""
    if name not in RUNTIME:
        what = "a bench baseline the runtime cannot run" if name in PROVIDERS else "no LoRA provider"
        raise ValueError(f"{name!r} is {what}; expected one of {', '.join(RUNTIME)}")
    return PROVIDERS[name]


def describe(names) -> str:
    """'name (summary), ...' for help texts."""
    return ", ".join(f"{n} ({PROVIDERS[n].summary})" for n in names)


__all__ = ["DEFAULT", "INTERPRETER_NOTE", "OP", "PROVIDERS", "REFERENCE", "RUNTIME", "TWIN", "TWIN_PROVIDER", "BenchSpec",
           "GroupedBatch", "LoRAProvider", "Unavailable", "batched", "describe", "from_sample", "noted",
           "runtime_provider"]
