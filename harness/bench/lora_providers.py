"""Providers the LoRA kernel cases have beyond the runtime's op and its twin:
  peft          PEFT's own mixed-adapter LoRA Linear (`adapter_names`), one LoRA layer per slice, its base
                GEMM replaced by a no-op so only the LoRA delta is timed (lora_apply only: PEFT has no
                separate ops)
  vllm          vLLM's own Triton kernels (runtime/vllm_lora.py: the calls vLLM's engine makes, its
                LoRAKernelMeta prepared outside the timed call); fp16 / bf16 points only (its shrink
                asserts them), fp16 only in the Triton interpreter (bf16 tl.dot is wrong there)
  grouped_mm    the baseline a user would write instead of kernels: torch's grouped GEMM
                (`torch.nn.functional.grouped_mm`, or `torch._grouped_mm` in older torch). Tokens sorted by
                slot once (outside the timed call, like every provider's grouping), group offsets on the
                device, one grouped GEMM for shrink and one for expand per slice, then a scatter-add back
                into y. Computes in the activation dtype, as PEFT does (on CPU the grouped GEMM's output
                dtype must equal its input's)
  matmul_floor  the floor: every token on one adapter, two plain matmuls per slice. Not a multi-LoRA method:
                the time any multi-LoRA kernel would need with no mixing at all
Each takes the inputs the kernel spec's `sample` built, so every provider runs on the same tensors. A provider
that cannot run here at all gets one row marked unavailable per case (`unavailable`); a point a provider
cannot run (e.g. vLLM at fp32) is left out of the plan with a log line (`skip`)."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from harness.bench.case import Unavailable, vllm_unavailable
from runtime.kernels import interpreted
from runtime.kernels.spec import DTYPES

PROVIDERS = ("peft", "vllm", "grouped_mm", "matmul_floor")
INTERPRETER_NOTE = "Triton interpreter on CPU (tiny shapes; not a GPU timing)"


def _grouped_mm_fn():
    import torch.nn.functional as F

    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def unavailable(provider: str) -> str | None:
    """Why a LoRA-only provider cannot run on this machine at all, or None."""
    if provider == "vllm":
        return vllm_unavailable()
    if provider == "grouped_mm" and _grouped_mm_fn() is None:
        return f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    return None


def skip(provider: str, p: dict) -> str | None:
    """Why a provider leaves out this point (the plan logs it once per case), or None."""
    if provider == "vllm":
        if p.get("dtype") == "fp32":
            return "vllm: fp32 points left out (vLLM's lora_shrink accepts only fp16 / bf16)"
        if p.get("dtype") == "bf16" and interpreted():
            return "vllm: bf16 points left out in the Triton interpreter (its bf16 tl.dot returns garbage)"
    return None


class _Const(torch.nn.Module):
    """Stands in for a LoRA layer's base Linear: returns a preallocated output, so only the delta is timed."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, *args, **kwargs):
        return self.out


def _peft_apply(p: dict, x, y, slots, device):
    from peft import LoraConfig, get_peft_model

    n, r, Ow, s = p["n_adapters"], p["rank"], p["O"], p["slices"]
    dt = DTYPES[p["dtype"]]
    layers = []
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(s):
            holder = torch.nn.Module()
            holder.proj = torch.nn.Linear(x.shape[1], Ow, bias=False, device=device, dtype=dt)
            pm = get_peft_model(holder, cfg, adapter_name="a0")
            for a in range(1, n):
                pm.add_adapter(f"a{a}", cfg)
            layer = pm.base_model.model.proj
            layer.base_layer = _Const(y[:, i * Ow:(i + 1) * Ow])
            layers.append(layer)
    names = [f"a{int(t)}" for t in slots.tolist()]

    def fn():
        with torch.no_grad():
            for layer in layers:
                layer(x, adapter_names=names)
    return fn


def _vllm(op: str, args: tuple, device):
    from runtime import vllm_lora

    ops = vllm_lora.load()
    # vLLM caches each weight list's pointer table keyed by data_ptr() alone, assuming weights allocated once per
    # engine; a sweep allocates per point, so a freed address reused with other strides would hit a stale entry
    # (and single-slice entries keep every tensor alive). Dropping the cache costs one table build per point.
    from vllm.lora.ops.triton_ops import utils as vllm_utils

    vllm_utils._LORA_A_PTR_DICT.clear()
    vllm_utils._LORA_B_PTR_DICT.clear()
    if op == "shrink":
        x, A, slots = args
    elif op == "expand":
        v, B, slots, y = args
    else:
        x, y, A, B, slots = args
    S = (A if op != "expand" else B)[0].shape[0]
    g = vllm_lora.vllm_grouping(slots, S)  # vLLM's LoRAKernelMeta, prepared once per batch as its engine does
    margs = g.meta.meta_args(g.rows, False)
    if op == "shrink":
        out = torch.zeros(len(A), x.shape[0], A[0].shape[1], dtype=torch.float32, device=device)
        return lambda: (ops.lora_shrink(x, list(A), out, *margs, 1.0), out)[1]
    if op == "expand":
        return lambda: ops.lora_expand(v, list(B), y, *margs, offset_start=0, add_inputs=True)
    return lambda: vllm_lora.lora_apply_vllm(x, y, A, B, slots, grouping=g)


# ------------------------------------------------------------------------------------------ grouped_mm
class SlotGroups(NamedTuple):
    """Tokens in slot order for grouped GEMMs: order[T] (row ids, stable-sorted by slot with -1 rows last),
    offs[S] (int32 end of each slot's rows, on the device) and `active`, the rows carrying an adapter."""

    order: torch.Tensor
    offs: torch.Tensor
    active: int


def slot_groups(slot_ids: torch.Tensor, n_slots: int) -> SlotGroups:
    """One stable sort by slot per batch; -1 rows go last so that grouped_mm's groups start at row 0 and the
    rows past offs[-1] (which it leaves unwritten) are exactly the rows without an adapter."""
    s = slot_ids.long()
    key = torch.where(s < 0, n_slots, s)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_slots + 1)[:n_slots]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    active = int(offs[-1]) if n_slots else 0  # one host sync per batch: the rows to scatter back
    return SlotGroups(order, offs, active)


def _check_strides(*tensors) -> None:
    for t in tensors:
        bad = [st for st in t.stride() if st != 1 and (st * t.element_size()) % 16]
        if bad:
            raise Unavailable(f"grouped_mm needs strides that are multiples of 16 bytes; a {t.dtype} tensor of "
                              f"shape {tuple(t.shape)} has stride {t.stride()}")


def grouped_mm_shrink(x, A_slices, g: SlotGroups, gmm=None) -> torch.Tensor:
    """v[i] in slot order: [n, active, R] in x's dtype (grouped GEMM of the sorted rows by A_i[slot]^T)."""
    gmm = gmm or _grouped_mm_fn()
    xs = x[g.order[:g.active]]
    return torch.stack([gmm(xs, a.transpose(1, 2), offs=g.offs) for a in A_slices])


def grouped_mm_expand(vs, B_slices, y, g: SlotGroups, slice_offsets=None, gmm=None) -> torch.Tensor:
    """y[rows, off_i:+O_i] += v_i B_i[slot]^T, v in slot order; one scatter-add per slice; -1 rows untouched."""
    gmm = gmm or _grouped_mm_fn()
    rows = g.order[:g.active]
    off = 0
    for i, b in enumerate(B_slices):
        o = slice_offsets[i] if slice_offsets is not None else off
        delta = gmm(vs[i].to(b.dtype), b.transpose(1, 2), offs=g.offs)
        y[:, o:o + b.shape[1]].index_add_(0, rows, delta.to(y.dtype))
        off += b.shape[1]
    return y


def lora_apply_grouped_mm(x, y, A_slices, B_slices, slot_ids, slice_offsets=None, grouping: SlotGroups | None = None):
    """Shrink + expand with torch's grouped GEMM: sort once, two grouped GEMMs per slice, scatter back."""
    g = grouping or slot_groups(slot_ids, A_slices[0].shape[0])
    if g.active == 0:
        return y
    return grouped_mm_expand(grouped_mm_shrink(x, A_slices, g), B_slices, y, g, slice_offsets)


def _grouped_mm(op: str, args: tuple, device):
    gmm = _grouped_mm_fn()
    if op == "shrink":
        x, A, slots = args
        g = slot_groups(slots, A[0].shape[0])
        _check_strides(x, *(a.transpose(1, 2) for a in A))
        out = torch.zeros(len(A), x.shape[0], A[0].shape[1], dtype=torch.float32, device=device)
        rows = g.order[:g.active]

        def shrink():  # scattered back into the [n, T, R] fp32 layout the other providers produce
            out[:, rows] = grouped_mm_shrink(x, A, g, gmm).float()
            return out
        return _tried(shrink)
    if op == "expand":
        v, B, slots, y = args
        g = slot_groups(slots, B[0].shape[0])
        vs = v[:, g.order[:g.active]].to(B[0].dtype).contiguous()  # the intermediate in slot order (as apply)
        _check_strides(vs[0], *(b.transpose(1, 2) for b in B))
        return _tried(lambda: grouped_mm_expand(vs, B, y, g, gmm=gmm))
    x, y, A, B, slots = args
    g = slot_groups(slots, A[0].shape[0])
    _check_strides(x, *(a.transpose(1, 2) for a in A), *(b.transpose(1, 2) for b in B))
    return _tried(lambda: lora_apply_grouped_mm(x, y, A, B, slots, grouping=g))


def _tried(fn):
    """Run once before timing: a device / dtype the grouped GEMM does not support becomes `unavailable`."""
    try:
        fn()
    except RuntimeError as e:
        raise Unavailable(f"grouped_mm: {' '.join(str(e).split())[:200]}") from None
    return fn


# ------------------------------------------------------------------------------------------ the floor
def _matmul_floor(op: str, args: tuple):
    """Every token on slot 0: x A^T then v B^T per slice, plain matmuls in the activation dtype."""
    if op == "shrink":
        x, A, _ = args
        a0 = [a[0].T for a in A]
        return lambda: [x @ a for a in a0]
    if op == "expand":
        v, B, _, y = args
        b0 = [b[0].T for b in B]
        vs = v.to(B[0].dtype)
        w = B[0].shape[1]
        return lambda: [y[:, i * w:(i + 1) * w].add_(vs[i] @ b) for i, b in enumerate(b0)]
    x, y, A, B, _ = args
    pairs = [(a[0].T, b[0].T) for a, b in zip(A, B)]
    w = B[0].shape[1]
    return lambda: [y[:, i * w:(i + 1) * w].add_((x @ a) @ b) for i, (a, b) in enumerate(pairs)]


def build(kernel: str, provider: str, p: dict, args: tuple, device: torch.device):
    op = kernel.removeprefix("lora_")
    if provider == "peft":
        if op != "apply":
            raise Unavailable(f"PEFT has no separate {op} op (only lora_apply has a peft provider)")
        x, y, _, _, slots = args
        return _peft_apply(p, x, y, slots, device)
    if provider == "vllm":
        reason = vllm_unavailable()
        if reason:
            raise Unavailable(reason)
        fn = _vllm(op, args, device)
        if interpreted():
            fn = noted(fn, f"{INTERPRETER_NOTE}; vLLM {p['dtype']} with interpreter configs (no split-K)")
        return fn
    if provider == "grouped_mm":
        reason = unavailable("grouped_mm")
        if reason:
            raise Unavailable(reason)
        return _grouped_mm(op, args, device)
    if provider == "matmul_floor":
        return _matmul_floor(op, args)
    raise ValueError(f"unknown provider {provider!r} for {kernel}")


class noted:  # noqa: N801 - used like a function: noted(fn, note)
    """A callable carrying the note its ok rows get (e.g. that it ran in the Triton interpreter)."""

    def __init__(self, fn, note: str):
        self.fn, self.note = fn, note

    def __call__(self):
        return self.fn()
