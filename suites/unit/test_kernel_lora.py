"""lora_shrink / lora_expand / lora_apply: Triton kernel vs torch twin vs a per-token float64 loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.kernels import (
    interpreted,
    lora_apply,
    lora_apply_torch,
    lora_expand,
    lora_expand_torch,
    lora_shrink,
    lora_shrink_torch,
    token_grouping,
    token_grouping_torch,
)
from suites.helpers import DEV, assert_close_scaled, rel_tol

# Examples follow the profile (default 50): tiny shapes keep an interpreted file well under 60 s.
N_EX = settings.default.max_examples

REL = rel_tol("lora_apply")  # justified beside the LoRA specs in runtime/kernels/lora_specs.py



def make_adapters(gen, S, R, H, widths, ranks, dtype):
    """A [S,R,H] / B [S,O,R] per slice with slot s's rank ranks[s] <= R, the rest zero-padded (as stored)."""
    A, B = [], []
    for o in widths:
        a = torch.randn(S, R, H, generator=gen) / H**0.5
        b = torch.randn(S, o, R, generator=gen)
        for s, r in enumerate(ranks):
            a[s, r:] = 0
            b[s, :, r:] = 0
        A.append(a.to(DEV, dtype))
        B.append(b.to(DEV, dtype))
    return A, B


def bruteforce(x, y, A, B, slots, offsets):
    """Independent oracle: per token, per slice, float64 matvecs; -1 tokens skipped."""
    out = y.double().clone()
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        for a, b, o in zip(A, B, offsets):
            v = a[s].double() @ x[t].double()
            out[t, o:o + b.shape[1]] += b[s].double() @ v
    return out


@st.composite
def lora_cases(draw):
    S = draw(st.integers(1, 4))
    R = draw(st.integers(1, 16))
    T = draw(st.integers(1, 64))
    return dict(
        S=S, R=R, T=T, H=draw(st.integers(1, 64)),
        widths=draw(st.lists(st.integers(1, 32), min_size=1, max_size=3)),  # unequal slices (packed q/k/v)
        ranks=draw(st.lists(st.integers(1, R), min_size=S, max_size=S)),     # rank 1 .. r_max per slot
        slots=draw(st.lists(st.integers(-1, S - 1), min_size=T, max_size=T)),  # -1 rows, unused / last slot
        gap=draw(st.integers(0, 3)),  # untouched columns between slices
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, T = case["dtype"], case["T"]
    A, B = make_adapters(gen, case["S"], case["R"], case["H"], case["widths"], case["ranks"], dtype)
    offsets, o = [], 0
    for w in case["widths"]:
        offsets.append(o)
        o += w + case["gap"]
    x = torch.randn(T, case["H"], generator=gen).to(DEV, dtype)
    y = torch.randn(T, o, generator=gen).to(DEV, dtype)
    slots = torch.tensor(case["slots"], dtype=torch.int32, device=DEV)
    return x, y, A, B, slots, offsets


@settings(max_examples=N_EX)
@given(lora_cases())
def test_lora_kernel_matches_twin_and_bruteforce(case):
    x, y, A, B, slots, offsets = build(case)
    dtype, rel = case["dtype"], REL[case["dtype"]]
    none = slots < 0

    # the grouping kernels against their torch twin (integers: exactly), then built once for the ops below
    grouping = token_grouping(slots, case["S"])
    assert all(torch.equal(a, b) for a, b in zip(grouping, token_grouping_torch(slots, case["S"])))
    v = lora_shrink(x, A, slots, grouping=grouping)
    v_ref = lora_shrink_torch(x, A, slots)
    assert v.dtype == torch.float32 and v.shape == (len(A), case["T"], case["R"])
    assert_close_scaled(v, v_ref, REL[torch.float32], "shrink vs twin")  # fp32 out for every input dtype
    assert torch.count_nonzero(v[:, none]) == 0, "rows with slot -1 must shrink to exactly 0"

    # expand alone, fed the same fp32 v on both sides
    assert_close_scaled(lora_expand(v_ref, B, slots, y.clone(), offsets, grouping=grouping),
                        lora_expand_torch(v_ref, B, slots, y.clone(), offsets), rel, f"expand {dtype} vs twin")

    got = lora_apply(x, y.clone(), A, B, slots, offsets)  # the eager call: groups (and validates) itself
    ref = lora_apply_torch(x, y.clone(), A, B, slots, offsets)
    assert_close_scaled(got, ref, rel, f"apply {dtype} vs twin")
    # -1 rows and gap columns: bit-for-bit the original y (never rewritten, not even as y + 0).
    assert torch.equal(got[none], y[none])
    covered = torch.zeros(y.shape[1], dtype=torch.bool)
    for o, b in zip(offsets, B):
        covered[o:o + b.shape[1]] = True
    assert torch.equal(got[:, ~covered.to(DEV)], y[:, ~covered.to(DEV)])

    # The twin itself against the float64 loop; rel covers the twin's single rounding into y's dtype.
    brute = bruteforce(x, y, A, B, slots, offsets)
    assert_close_scaled(ref, brute, rel, "twin vs float64 loop")


def test_lora_all_rows_unmapped_leave_y_untouched():
    gen = torch.Generator().manual_seed(1)
    A, B = make_adapters(gen, 3, 4, 16, [8, 4], [4, 2, 1], torch.float16)
    x, y = torch.randn(5, 16).to(DEV, torch.float16), torch.randn(5, 12).to(DEV, torch.float16)
    slots = torch.full((5,), -1, device=DEV)
    assert torch.count_nonzero(lora_shrink(x, A, slots)) == 0
    assert torch.equal(lora_apply(x, y.clone(), A, B, slots), y)


def test_lora_empty_batch():
    gen = torch.Generator().manual_seed(2)
    A, B = make_adapters(gen, 2, 4, 8, [8], [4, 4], torch.float32)
    x, y = torch.empty(0, 8, device=DEV), torch.empty(0, 8, device=DEV)
    slots = torch.empty(0, dtype=torch.long, device=DEV)
    assert lora_shrink(x, A, slots).shape == (1, 0, 4)
    assert lora_apply(x, y, A, B, slots).shape == (0, 8)


def test_lora_single_token_last_slot_rank1_packed_qkv():
    gen = torch.Generator().manual_seed(3)
    S = 4
    A, B = make_adapters(gen, S, 1, 24, [16, 4, 4], [1] * S, torch.float32)
    x, y = torch.randn(1, 24, device=DEV), torch.randn(1, 24, device=DEV)
    slots = torch.tensor([S - 1], device=DEV)
    got = lora_apply(x, y.clone(), A, B, slots)
    assert_close_scaled(got, bruteforce(x, y, A, B, slots, [0, 16, 20]), REL[torch.float32], "T=1")


def test_lora_strided_views_and_determinism():
    """y as a column window of a wider buffer and x transposed: strides are honoured; reruns are bitwise equal."""
    gen = torch.Generator().manual_seed(4)
    A, B = make_adapters(gen, 3, 8, 32, [12, 6], [8, 3, 5], torch.bfloat16)
    x = torch.randn(32, 40, generator=gen).to(DEV, torch.bfloat16).t()  # [40, 32], non-contiguous
    slots = torch.randint(-1, 3, (40,), generator=gen).to(DEV)
    wide = torch.randn(40, 30, generator=gen).to(DEV, torch.bfloat16)
    first = lora_apply(x, wide.clone()[:, 5:23], A, B, slots)
    again = lora_apply(x, wide.clone()[:, 5:23], A, B, slots)
    assert torch.equal(first, again)
    ref = lora_apply_torch(x, wide.clone()[:, 5:23], A, B, slots)
    assert_close_scaled(first, ref, REL[torch.bfloat16], "strided bf16")
    # adapters as rank views of wider tables (the rank dim strided) and one slice transposed in memory
    A6, B6 = [a[:, :6, :] for a in A], [B[0][:, :, :6], B[1].transpose(1, 2).contiguous().transpose(1, 2)[:, :, :6]]
    got = lora_apply(x, wide.clone()[:, 5:23], A6, B6, slots)
    assert_close_scaled(got, lora_apply_torch(x, wide.clone()[:, 5:23], A6, B6, slots), REL[torch.bfloat16],
                        "strided adapters")
    # y column-major (its column stride is not 1: the kernel's general y path)
    y_cm = wide.clone()[:, 5:23].t().contiguous().t()
    assert y_cm.stride(1) != 1
    assert_close_scaled(lora_apply(x, y_cm, A, B, slots), ref, REL[torch.bfloat16], "column-major y")


def test_lora_rejects_bad_slot_ids():
    gen = torch.Generator().manual_seed(5)
    A, _ = make_adapters(gen, 2, 4, 8, [8], [4, 4], torch.float32)
    x = torch.randn(3, 8, device=DEV)
    for bad in ([0, 2, 1], [-2, 0, 0]):
        with pytest.raises(ValueError, match="slot_ids"):
            lora_shrink(x, A, torch.tensor(bad, device=DEV))


def test_lora_block_sizes_follow_device():
    from runtime.kernels import lora_config

    dev = torch.device(DEV)
    cfg = lora_config.shrink_config(100, 64, 8, 1, torch.bfloat16, dev)
    bm, bw, br = cfg.block_m, cfg.block_k, 16  # rank 8 padded to the kernels' smallest rank block
    if interpreted():  # one block spans rows and H: few programs is what the interpreter needs
        assert (bm, bw, br) == (128, 64, 16)
    else:
        assert bm in (16, 32, 64) and bw in (32, 64, 128) and br == 16


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("T,R,dtype", [(1, 16, torch.bfloat16), (577, 16, torch.bfloat16), (2000, 16, torch.float16),
                                       (4096, 128, torch.bfloat16), (333, 64, torch.float16)])
def test_lora_cuda_realistic(T, R, dtype):
    """Llama-4 tower-sized q/k/v on tensor cores vs the fp32 twin. Shrink: 16-bit products are exact in fp32,
    only the summation order differs (~1e-6 rel in v); expand: v split into hi + lo keeps v to 2^-16 (bf16)
    / 2^-21 (fp16) rel; the single rounding of y into its 16-bit type can then flip by one ulp (2^-7 rel
    bf16): tolerance 1e-2 of max|ref| (the spec's), and the -1 rows bit-for-bit untouched."""
    gen = torch.Generator().manual_seed(T)
    S, H = 4, 1408
    A, B = make_adapters(gen, S, R, H, [1408, 1408, 1408], [R, R // 2, 1, R], dtype)
    x = torch.randn(T, H, generator=gen).to(DEV, dtype)
    y = torch.randn(T, 3 * 1408, generator=gen).to(DEV, dtype)
    slots = torch.randint(-1, S, (T,), generator=gen).to(DEV)
    got = lora_apply(x, y.clone(), A, B, slots)
    assert_close_scaled(got, lora_apply_torch(x, y.clone(), A, B, slots), REL[dtype], f"cuda {dtype}")
    assert torch.equal(got[slots < 0], y[slots < 0])


@pytest.mark.cuda
@CUDA
def test_lora_cuda_no_host_sync_and_graph_capture():
    """With the grouping built without validation, grouping + shrink + expand never synchronise with the
    host (torch's sync debug mode raises on any synchronising call), so the whole batch's LoRA work can be
    captured in one CUDA graph; replaying it on new inputs matches the eager call bit for bit."""
    gen = torch.Generator().manual_seed(7)
    S, R, H, T = 5, 16, 1024, 700
    A, B = make_adapters(gen, S, R, H, [512, 256], [16, 8, 16, 4, 16], torch.bfloat16)
    x = torch.randn(T, H, generator=gen).to(DEV, torch.bfloat16)
    y0 = torch.randn(T, 768, generator=gen).to(DEV, torch.bfloat16)
    slots = torch.randint(-1, S - 1, (T,), generator=gen).to(DEV)  # the last slot stays unused
    y = y0.clone()
    lora_apply(x, y, A, B, slots, grouping=token_grouping(slots, S, validate=False))  # warm-up: compile, tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grouping = token_grouping(slots, S, validate=False)
        lora_apply(x, y0.clone(), A, B, slots, grouping=grouping)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph_y = y0.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        lora_apply(x, graph_y, A, B, slots, grouping=token_grouping(slots, S, validate=False))
    x.copy_(torch.randn(T, H, generator=gen).to(DEV, torch.bfloat16))
    slots.copy_(torch.randint(-1, S, (T,), generator=gen).to(DEV))
    graph_y.copy_(y0)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_y, lora_apply(x, y0.clone(), A, B, slots))
