"""One spec per kernel, beside the kernel: its op, its torch twin, sample inputs, the bytes and flops one
call moves, the tolerance the op must hold against the twin, and the bench's sweep around it. The kernel
list, the bench cases, the roofline and the smoke test all derive from these specs: adding a kernel is
one file (kernel + spec) plus its tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ELEM = {"fp32": 4, "fp16": 2, "bf16": 2}  # bytes per element of x / weights / outputs


@dataclass(frozen=True)
class Sweep:
    """Bench points around `base`: each `axes` parameter varied alone, plus the cartesian `grid`."""

    base: Mapping[str, object]
    axes: Mapping[str, list] = field(default_factory=dict)
    grid: Mapping[str, list] = field(default_factory=dict)

    def points(self) -> list[dict]:
        out: list[dict] = [dict(self.base)]
        for k, values in self.axes.items():
            for v in values:
                out.append({**self.base, k: v})
        keys = list(self.grid)
        for vals in itertools.product(*(self.grid[k] for k in keys)):
            out.append({**self.base, **dict(zip(keys, vals))})
        unique: list[dict] = []
        for p in out:
            if p not in unique:
                unique.append(p)
        return unique


@dataclass(frozen=True)
class Variant:
    """One way the bench times a kernel's op (the CSV's `variant` column), e.g. the op with its per-batch
    preparation done outside the timed call (`kernel`), or the public call as an application makes it
    (`eager`)."""

    # (args, kwargs) from `sample` -> the zero-argument call to time; any preparation happens here, untimed
    prepare: Callable[[tuple, dict], Callable[[], object]]
    graph: bool = False      # on CUDA, timed as the replay of a CUDA graph captured from the call
    roofline: bool = True    # the op's bytes / flops apply (False: latency rows only, e.g. a preparation step)
    doc: str = ""


@dataclass(frozen=True)
class KernelSpec:
    name: str  # the same name in runtime/kernels, the tests, the bench case and its CSV rows
    op: Callable  # the Triton op
    twin: Callable  # its pure-torch twin, the oracle of the op's tests
    # params (a bench point) -> (args, kwargs) on a device; built outside any timed call
    sample: Callable[[dict, torch.device], tuple[tuple, dict]]
    # params -> (bytes one call must move, flops it must do): the roofline's inputs
    work: Callable[[dict], tuple[float, float]]
    # params -> rows the call processes (tokens_per_s)
    tokens: Callable[[dict], float]
    # max |op - twin| <= rel_tol[dtype] * max |twin| (justified beside each spec)
    rel_tol: Mapping[torch.dtype, float]
    # bench sweeps by preset: "smoke" (CPU-sized), "nightly", "full" (GPU)
    sweeps: Mapping[str, Sweep]
    family: str = "vision"  # "lora": the bench adds the LoRA-only providers (peft, vllm, ...)
    has_flops: bool = True
    # the parameters a point of this kernel must give (checked before building inputs)
    params: tuple[str, ...] = ()
    # the op's timed variants (name -> Variant); empty: the op is timed as called, with no variant column
    variants: Mapping[str, Variant] = field(default_factory=dict)

    def check(self, p: dict) -> None:
        missing = [k for k in self.params if p.get(k) is None]
        if missing:
            raise ValueError(f"{self.name} needs parameters {missing}, got {p}")
        bad = [k for k in self.params if k != "dtype" and not (isinstance(p[k], int) and p[k] >= 1)]
        if bad:
            raise ValueError(f"{self.name} needs {', '.join(bad)} >= 1, got {p}")
        if p.get("dtype") not in DTYPES:
            raise ValueError(f"{self.name}: unknown dtype {p.get('dtype')!r}; expected one of {', '.join(DTYPES)}")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
