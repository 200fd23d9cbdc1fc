"""grouped_mm: the baseline a user would write instead of kernels, a bench baseline: torch's grouped GEMM
(`torch.nn.functional.grouped_mm`, or `torch._grouped_mm` in older torch). Tokens sorted by slot once (outside
the timed call, like every provider's grouping), group offsets on the device, one grouped GEMM for shrink and
one for expand per slice, then a scatter-add back into y. Computes in the activation dtype, as PEFT does (on
CPU the grouped GEMM's output dtype must equal its input's)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from runtime.providers.provider import (
    BenchSpec,
    ExpandInputs,
    GroupedBatch,
    LoRAProvider,
    ShrinkInputs,
    Unavailable,
    batched,
)


def _grouped_mm_fn():
    import torch.nn.functional as F

    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _unavailable(dtype: torch.dtype | None, device: torch.device | None) -> str | None:
    if _grouped_mm_fn() is None:
        return f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    return None


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


# ---------------------------------------------------------------------------- the bench's calls
def _check_strides(*tensors) -> None:
    for t in tensors:
        bad = [st for st in t.stride() if st != 1 and (st * t.element_size()) % 16]
        if bad:
            raise Unavailable(f"grouped_mm needs strides that are multiples of 16 bytes; a {t.dtype} tensor of "
                              f"shape {tuple(t.shape)} has stride {t.stride()}")


def _tried(fn):
    """Run once before timing: a device / dtype the grouped GEMM does not support becomes `unavailable`."""
    try:
        fn()
    except RuntimeError as e:
        raise Unavailable(f"grouped_mm: {' '.join(str(e).split())[:200]}") from None
    return fn


def _shrink(i: ShrinkInputs, p: dict, device: torch.device):
    g = slot_groups(i.slots, i.A[0].shape[0])
    _check_strides(i.x, *(a.transpose(1, 2) for a in i.A))
    out = torch.zeros(len(i.A), i.x.shape[0], i.A[0].shape[1], dtype=torch.float32, device=device)
    rows = g.order[:g.active]
    gmm = _grouped_mm_fn()

    def shrink():  # scattered back into the [n, T, R] fp32 layout the other providers produce
        out[:, rows] = grouped_mm_shrink(i.x, i.A, g, gmm).float()
        return out
    return _tried(shrink)


def _expand(i: ExpandInputs, p: dict, device: torch.device):
    g = slot_groups(i.slots, i.B[0].shape[0])
    vs = i.v[:, g.order[:g.active]].to(i.B[0].dtype).contiguous()  # the intermediate in slot order (as apply)
    _check_strides(vs[0], *(b.transpose(1, 2) for b in i.B))
    gmm = _grouped_mm_fn()
    return _tried(lambda: grouped_mm_expand(vs, i.B, i.y, g, gmm=gmm))


def _apply(b: GroupedBatch, p: dict, device: torch.device):
    g = slot_groups(b.slots, b.A[0].shape[0])
    _check_strides(b.x, *(a.transpose(1, 2) for a in b.A), *(w.transpose(1, 2) for w in b.B))
    return _tried(lambda: lora_apply_grouped_mm(b.x, b.y, b.A, b.B, b.slots, grouping=g))


PROVIDER = LoRAProvider(
    "grouped_mm", "torch's grouped GEMM, tokens sorted by slot", order=50, runtime=False,
    unavailable=_unavailable, apply=batched(lora_apply_grouped_mm), grouping=slot_groups,
    bench=BenchSpec(ops={"shrink": _shrink, "expand": _expand, "apply": _apply}, color="tab:purple"))
