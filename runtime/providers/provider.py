"""What a LoRA provider is: one way to compute y += B[slot] A[slot] x for a mixed batch (`LoRAProvider`),
the grouped batch it is handed (`GroupedBatch`), and what the bench needs to time it (`BenchSpec`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

# what a `BenchSpec.times` provider times for every kernel spec: the runtime's Triton op, or its torch twin
OP, TWIN = "op", "twin"
INTERPRETER_NOTE = "Triton interpreter on CPU (tiny shapes; not a GPU timing)"


class Unavailable(Exception):
    """The provider cannot run this point here (not installed, not implemented, a layout it refuses); the
    bench records the point with status unavailable and this message as its note."""


class GroupedBatch(NamedTuple):
    """One LoRA module's call on a mixed batch: y[t, slice i] += B_i[slot_t] A_i[slot_t] x[t], in place.
    x [T, H]; y [T, sum O_i] (slices side by side); A slices [S, r, H]; B slices [S, O_i, r]; slots [T]
    (-1: no adapter); grouping: the provider's grouping of `slots`, built once per batch (None: the call
    groups by itself)."""

    x: torch.Tensor
    y: torch.Tensor
    A: Sequence[torch.Tensor]
    B: Sequence[torch.Tensor]
    slots: torch.Tensor
    grouping: object = None


class ShrinkInputs(NamedTuple):
    """lora_shrink's inputs: v[i] = x A_i[slot]^T, into an fp32 [slices, T, r] buffer."""

    x: torch.Tensor
    A: Sequence[torch.Tensor]
    slots: torch.Tensor


class ExpandInputs(NamedTuple):
    """lora_expand's inputs: y[:, slice i] += v[i] B_i[slot]^T."""

    v: torch.Tensor
    B: Sequence[torch.Tensor]
    slots: torch.Tensor
    y: torch.Tensor


# a LoRA kernel spec's op -> its inputs, in the order the spec's `sample` builds them positionally
OP_INPUTS: dict[str, type] = {"shrink": ShrinkInputs, "expand": ExpandInputs, "apply": GroupedBatch}


def from_sample(op: str, args: tuple) -> NamedTuple:
    """The positional args a LoRA kernel spec's `sample` built for `op`, named."""
    return OP_INPUTS[op](*args)


def batched(fn: Callable) -> Callable[[GroupedBatch], torch.Tensor]:
    """An apply taking a `GroupedBatch`, from a kernel with lora_apply's signature."""
    return lambda b: fn(b.x, b.y, b.A, b.B, b.slots, grouping=b.grouping)


class noted:  # noqa: N801 - used like a function: noted(fn, note)
    """A callable carrying the note its bench rows get (e.g. that it ran in the Triton interpreter)."""

    def __init__(self, fn: Callable[[], object], note: str):
        self.fn, self.note = fn, note

    def __call__(self):
        return self.fn()


# (inputs of the op, the bench point's params, device) -> the zero-argument call the bench times; anything to
# prepare (a grouping, metadata, layers) is done here, outside the timed call
Build = Callable[[NamedTuple, dict, torch.device], Callable[[], object]]


@dataclass(frozen=True)
class BenchSpec:
    """What the bench needs to time a provider."""

    # for every kernel spec, the vision kernels too: time the spec's Triton op (OP, in the spec's variants)
    # or its torch twin (TWIN, called as is); None: LoRA cases only, through `ops` / `apply`
    times: str | None = None
    # LoRA op (shrink / expand / apply) -> its Build; without "apply" here, lora_apply times
    # `LoRAProvider.apply` with its grouping built beforehand (a provider without `apply` skips lora_apply)
    ops: Mapping[str, Build] = field(default_factory=dict)
    # the `variant` column of its LoRA rows: kernel (per-batch preparation outside the timed call) | eager
    # (the call as an application makes it)
    variant: str = "kernel"
    # listed in the end-to-end cases as one unavailable row saying why (e.g. it needs a whole engine)
    e2e_unavailable: str | None = None
    # its colour in the report's plots (None: the first colour no other provider claims)
    color: str | None = None
    # a comparator in the report's headline (False: a floor, not a multi-LoRA method)
    versus: bool = True


def _no_grouping(slots: torch.Tensor, n_slots: int) -> None:
    return None


def _anywhere(dtype: torch.dtype | None, device: torch.device | None) -> None:
    return None


@dataclass(frozen=True)
class LoRAProvider:
    """One way to compute y += B[slot] A[slot] x for a mixed batch (one file per provider in this package)."""

    name: str  # the --provider / --providers value and the bench CSV's provider column
    summary: str  # one line: what it computes with (help texts)
    # GroupedBatch -> y, the delta added in place; None: the bench builds it per op (`BenchSpec.ops`) only
    apply: Callable[[GroupedBatch], torch.Tensor] | None = None
    # (slots, n_slots) -> its grouping of these slots, built once per module group and batch
    grouping: Callable[[torch.Tensor, int], object] = _no_grouping
    # (dtype, device) -> why it cannot run here, one line, or None; None for an argument: whichever. The runtime
    # and the CLI refuse with it before any work; the bench writes one unavailable row (dtype None) or leaves
    # out the points of a dtype it refuses
    unavailable: Callable[[torch.dtype | None, torch.device | None], str | None] = _anywhere
    runtime: bool = True  # the correctness runtime can run it (--provider); False: a bench baseline only
    # HF + PEFT's own LoRA: end to end the bench runs the reference model for it, and the report's speed-ups
    # are over it
    reference: bool = False
    triton: bool = False  # its kernels are Triton programs: without a GPU they run in Triton's interpreter
    default: bool = False  # the runtime's provider unless told otherwise (exactly one)
    order: int = 100  # where it sorts among providers: plans, CSV rows, help texts, the headline's columns
    bench: BenchSpec = BenchSpec()

    def check(self, dtype: torch.dtype, device: torch.device, who: str = "LoRA provider") -> None:
        """Refuse, before any work, what it cannot run here: ValueError, one line, "<who> <name>: <why>"."""
        reason = self.unavailable(dtype, device)
        if reason:
            raise ValueError(f"{who} {self.name}: {reason}")
