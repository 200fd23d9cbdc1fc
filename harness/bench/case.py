"""What a bench case is: for one point (its params) and one provider, a zero-argument callable to time and
the `Work` it does (rows, images, bytes, flops: the inputs of the derived metrics). Inputs are built
outside the timed call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Work:
    tokens: float
    images: float = 0.0
    nbytes: float = 0.0
    flops: float = 0.0


@dataclass(frozen=True)
class Timed:
    """What a case's build returns when the call needs more than a plain timing loop."""

    fn: Callable[[], object]
    work: Work
    graph: bool = False   # on CUDA: time the replay of a CUDA graph captured from fn


Build = Callable[[dict, str, torch.device], "tuple[Callable[[], object], Work] | Timed"]


@dataclass(frozen=True)
class Case:
    name: str
    kind: str                      # "kernel" | "e2e"
    providers: tuple[str, ...]
    x: str                         # the parameter plots put on the x axis
    build: Build
    has_flops: bool = True
    # provider -> the variants it is timed in (the `variant` column); a provider not listed has none
    variants: dict = field(default_factory=dict)
    # variants whose rows are latency only (no bytes / flops: e.g. the token grouping alone)
    latency_only: tuple[str, ...] = ()
    # False for the copy case itself: its bandwidth is the yardstick, not measured against it
    vs_copy: bool = True
    # provider -> why it cannot run here at all (one unavailable row per case), or None
    unavailable: Callable[[str], str | None] = lambda provider: None
    # (provider, params) -> why this provider leaves the point out (a log line, no row), or None
    skip: Callable[[str, dict], str | None] = lambda provider, params: None

    def variants_of(self, provider: str) -> tuple:
        return tuple(self.variants.get(provider, ())) or (None,)

    def metrics(self, cuda: bool, profile: bool, copy: bool = False, variant: str | None = None) -> tuple[str, ...]:
        """Metric rows an ok point writes; `sweep.derive` computes each. `copy`: the run measures the copy
        bandwidth (the `copy` case is planned), so kernel rows also carry copy_us and pct_copy."""
        if self.kind == "e2e":
            out = ["latency_ms", "images_per_s", "tokens_per_s"]
        elif variant in self.latency_only:
            out = ["latency_ms", "tokens_per_s"]
        else:
            out = ["latency_ms", "tokens_per_s", "gbps"] + (["tflops"] if self.has_flops else []) + ["bytes_mb"]
            if profile:
                out += ["pct_roofline", "roof_us"]
            if copy and self.vs_copy:
                out += ["pct_copy", "copy_us"]
        if cuda:
            out.append("peak_mem_mib")
        return tuple(out)

