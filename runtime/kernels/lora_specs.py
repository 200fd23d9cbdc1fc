"""The LoRA ops' KernelSpecs: bench / test samples, the bytes and flops model, tolerances, sweeps and the
timed variants (the bench case, the CSV rows and the tests use these names)."""

from __future__ import annotations

import math

import torch

from runtime.kernels.lora import (
    lora_apply,
    lora_apply_torch,
    lora_expand,
    lora_expand_torch,
    lora_shrink,
    lora_shrink_torch,
)
from runtime.kernels.lora_grouping import token_grouping
from runtime.kernels.spec import DTYPES, ELEM, KernelSpec, Sweep, Variant, seeded


def _lora_sample(op: str):
    def sample(p: dict, device: torch.device):
        T, H, Ow, n, r, s = p["T"], p["H"], p["O"], p["n_adapters"], p["rank"], p["slices"]
        dt = DTYPES[p["dtype"]]
        g = seeded()
        S = n + 1  # the last slot is never used: a kernel must not read past the active ones
        x = torch.randn(T, H, generator=g).to(device, dt)
        A = [(torch.randn(S, r, H, generator=g) / math.sqrt(H)).to(device, dt) for _ in range(s)]
        B = [(torch.randn(S, Ow, r, generator=g) / (4 * math.sqrt(r))).to(device, dt) for _ in range(s)]
        # every token carries an adapter; adapters interleave as in a mixed batch
        slots = (torch.arange(T) % n)[torch.randperm(T, generator=g)].to(torch.int32).to(device)
        y = torch.zeros(T, s * Ow, dtype=dt, device=device)
        if op == "shrink":
            return (x, A, slots), {}
        if op == "expand":
            v = torch.randn(s, T, r, generator=seeded(1)).to(device)
            return (v, B, slots, y), {}
        return (x, y, A, B, slots), {}
    return sample


def lora_shrink_work(p: dict) -> tuple[float, float]:
    """x[T,H] . A[H,r] per slice: 2THr flops; bytes e·T·H (x read once across slices) + per slice e·n·H·r
    (the n adapters' A) + 4·T·r (the fp32 intermediate written)."""
    T, H, n, r, s, e = p["T"], p["H"], p["n_adapters"], p["rank"], p["slices"], ELEM[p["dtype"]]
    return e * T * H + s * (e * n * H * r + 4.0 * T * r), 2.0 * T * H * r * s


def lora_expand_work(p: dict) -> tuple[float, float]:
    """y[T,O] += v[T,r] . B[r,O] per slice: 2TrO flops; bytes 4·T·r (v read) + e·n·r·O (B) + 2·e·T·O (y read
    and written)."""
    T, Ow, n, r, s, e = p["T"], p["O"], p["n_adapters"], p["rank"], p["slices"], ELEM[p["dtype"]]
    return s * (4.0 * T * r + e * n * r * Ow + 2.0 * e * T * Ow), 2.0 * T * r * Ow * s


def lora_apply_work(p: dict) -> tuple[float, float]:
    """Shrink + expand as two launches: the fp32 intermediate is written and read back."""
    b1, f1 = lora_shrink_work(p)
    b2, f2 = lora_expand_work(p)
    return b1 + b2, f1 + f2


# Kernel vs twin, max |err| <= rel * max |twin|. fp32: only fp32 summation order differs (over H for shrink,
# over R for expand): ~1e-6 relative observed, 1e-5 leaves headroom without hiding a wrong index (errors
# ~O(1)). fp16 / bf16: both sides round one fp32 value once; an order difference can flip that rounding by
# one ulp at the largest element: 2^-10 ~ 9.8e-4 -> 2e-3 (fp16), 2^-7 ~ 7.8e-3 -> 1e-2 (bf16).
LORA_REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
_LORA_PARAMS = ("dtype", "T", "H", "O", "n_adapters", "rank", "slices")
_LORA_GPU = dict(dtype="bf16", T=4096, H=4096, O=4096, n_adapters=4, rank=16, slices=1)
_LORA_GPU_AXES = dict(T=[1, 16, 128, 1024, 16384], n_adapters=[1, 8, 16, 32], rank=[8, 32, 64, 128], slices=[3],
                      dtype=["fp16"])
LORA_SWEEPS = {
    # CPU: the interpreter runs each variant (kernel / eager / grouping): T and packed slices only (the
    # unit suites cover adapters and ranks), and fp16: the one dtype vLLM's kernels run at on CPU (fp32 is
    # refused by vLLM, bf16 by the interpreter)
    "smoke": Sweep(dict(dtype="fp32", T=64, H=64, O=64, n_adapters=2, rank=8, slices=1),
                   dict(T=[16, 256], slices=[3], dtype=["fp16"])),
    "nightly": Sweep(_LORA_GPU, _LORA_GPU_AXES),
    "full": Sweep(_LORA_GPU, _LORA_GPU_AXES, dict(T=[1, 16, 128, 1024, 4096, 16384], n_adapters=[1, 4, 8, 16, 32],
                                                 rank=[8, 16, 64, 128])),
}


_SLOTS_ARG = {"shrink": 2, "expand": 2, "apply": 4}  # where slot_ids sit in each op's positional args


def _lora_variants(op: str, fn) -> dict[str, Variant]:
    """kernel: the op with the batch's grouping built beforehand (as the runtime calls it: once per batch
    and group of modules), timed as a CUDA graph replay on GPU (no host work left in the timing);
    eager: the public call, which builds and validates its own grouping (one host read);
    grouping (lora_apply only): the device-built grouping alone, the part `eager` adds per call."""
    k = _SLOTS_ARG[op]

    def kernel(args, kwargs):
        slots, n_slots = args[k], (args[1] if op != "apply" else args[2])[0].shape[0]
        g = token_grouping(slots, n_slots)
        return lambda: fn(*args, **kwargs, grouping=g)

    def grouping(args, kwargs):
        slots, n_slots = args[k], args[2][0].shape[0]
        return lambda: token_grouping(slots, n_slots, validate=False)

    out = {"kernel": Variant(kernel, graph=True, doc="grouping precomputed; CUDA graph replay on GPU"),
           "eager": Variant(lambda args, kwargs: (lambda: fn(*args, **kwargs)), doc="the public call")}
    if op == "apply":
        out["grouping"] = Variant(grouping, graph=True, roofline=False, doc="the token grouping alone")
    return out


def _lora_spec(op: str, fn, twin, work) -> KernelSpec:
    return KernelSpec(f"lora_{op}", fn, twin, _lora_sample(op), work, lambda p: p["T"], LORA_REL_TOL,
                      LORA_SWEEPS, family="lora", params=_LORA_PARAMS, variants=_lora_variants(op, fn))


SPECS = (
    _lora_spec("shrink", lora_shrink, lora_shrink_torch, lora_shrink_work),
    _lora_spec("expand", lora_expand, lora_expand_torch, lora_expand_work),
    _lora_spec("apply", lora_apply, lora_apply_torch, lora_apply_work),
)
