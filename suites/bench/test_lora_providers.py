"""The LoRA providers the bench times compute what they claim: each bench callable (built exactly as the sweep
builds it, from the kernel spec's sample) against the spec's torch twin; grouped_mm with -1 rows and the last
slot; the floor; the plan's handling of points and machines a provider cannot serve; and the registry itself
(every name, help text and report colour comes from it)."""

from __future__ import annotations

import pytest
import torch

from harness.bench import sweep
from harness.bench.kernel_cases import provider_call
from harness.bench.presets import PRESETS
from runtime import vllm_lora
from runtime.kernels import KERNELS, lora_apply_torch
from runtime.providers import PROVIDERS, Unavailable, grouped_mm
from suites.helpers import DEV, assert_close_scaled, need_vllm

# fp32: the grouped GEMM and the twin differ only in fp32 summation order (the spec's 1e-5). fp16: grouped_mm
# rounds the intermediate v to fp16 (the twin keeps it fp32) and the delta once more before the add: three
# half-ulp roundings of 2^-11 each on values up to the output's size -> 4e-3 of max |twin|.
REL = {"fp32": 1e-5, "fp16": 4e-3}
POINT = dict(T=37, H=64, O=48, n_adapters=3, rank=8, slices=3)


def _run(op: str, provider: str, dtype: str):
    """(what the provider's bench callable produced, what the twin produces on the same inputs)."""
    spec = KERNELS[f"lora_{op}"]
    p = {**POINT, "dtype": dtype}
    args, _ = spec.sample(p, torch.device(DEV))
    fresh, _ = spec.sample(p, torch.device(DEV))  # the same seeded inputs, untouched, for the twin
    fn = provider_call(PROVIDERS[provider], op, args, p, torch.device(DEV))
    if op == "shrink":
        return fn(), spec.twin(*fresh)
    y, y0 = (args[3], fresh[3]) if op == "expand" else (args[1], fresh[1])
    y.copy_(y0)  # building may run the callable once (grouped_mm checks its device / dtype that way)
    fn()
    return y, spec.twin(*fresh)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("op", ["shrink", "expand", "apply"])
def test_grouped_mm_bench_callable_matches_twin(op, dtype):
    got, want = _run(op, "grouped_mm", dtype)
    assert_close_scaled(got, want, REL[dtype], f"grouped_mm {op} {dtype}")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_grouped_mm_apply_leaves_no_adapter_rows_and_uses_the_last_slot(dtype):
    g = torch.Generator().manual_seed(5)
    dt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    S, T, H, R = 4, 41, 32, 8
    A = [(torch.randn(S, R, H, generator=g) / H**0.5).to(DEV, dt)]
    B = [torch.randn(S, 24, R, generator=g).to(DEV, dt)]
    x = torch.randn(T, H, generator=g).to(DEV, dt)
    y = torch.randn(T, 24, generator=g).to(DEV, dt)
    slots = torch.tensor([(-1, 3, 0, -1, 2, 3)[t % 6] for t in range(T)], dtype=torch.int32, device=DEV)
    want = lora_apply_torch(x, y.clone(), A, B, slots)
    got = grouped_mm.lora_apply_grouped_mm(x, y.clone(), A, B, slots)
    none = slots < 0
    assert torch.equal(got[none], y[none])
    assert_close_scaled(got, want, REL[dtype], f"grouped_mm apply {dtype}")
    assert torch.equal(grouped_mm.lora_apply_grouped_mm(x, y.clone(), A, B, torch.full_like(slots, -1)), y)


def test_matmul_floor_is_the_twin_with_every_token_on_one_adapter():
    spec = KERNELS["lora_apply"]
    p = {**POINT, "dtype": "fp32"}
    (x, y, A, B, slots), _ = spec.sample(p, torch.device(DEV))
    zeros = torch.zeros_like(slots)
    want = lora_apply_torch(x, y.clone(), A, B, zeros)
    provider_call(PROVIDERS["matmul_floor"], "apply", (x, y, A, B, zeros), p, torch.device(DEV))()
    assert_close_scaled(y, want, REL["fp32"], "matmul_floor")


def test_grouped_mm_misaligned_stride_is_unavailable_not_an_error():
    spec = KERNELS["lora_apply"]
    p = {**POINT, "H": 30, "dtype": "fp16"}  # 30 x 2 bytes: not a multiple of 16
    args, _ = spec.sample(p, torch.device(DEV))
    with pytest.raises(Unavailable, match="16 bytes"):
        provider_call(PROVIDERS["grouped_mm"], "apply", args, p, torch.device(DEV))


def test_torch_without_grouped_gemm_gives_one_unavailable_row_per_case(monkeypatch):
    monkeypatch.setattr(grouped_mm, "_grouped_mm_fn", lambda: None)
    plan = sweep.plan(PRESETS["smoke"], None, ["grouped_mm"], {}, cuda=False)
    assert {pt.case for pt in plan.points} == {"lora_shrink", "lora_expand", "lora_apply"}
    assert all(pt.params == {} and "grouped_mm" in pt.unavailable for pt in plan.points)


def test_vllm_points_it_cannot_run_are_left_out_with_a_log_line(monkeypatch):
    monkeypatch.setattr(vllm_lora, "unavailable_reason", lambda: None)  # as where vLLM is installed
    plan = sweep.plan(PRESETS["smoke"], ["lora_apply"], ["vllm"], {}, cuda=False)
    assert plan.points and all(pt.params["dtype"] == "fp16" for pt in plan.points)
    assert any("fp32 points left out" in n for n in plan.notes)


@pytest.mark.vllm
@pytest.mark.parametrize("op", ["shrink", "expand", "apply"])
def test_vllm_bench_callable_matches_twin(op):
    need_vllm()
    got, want = _run(op, "vllm", "fp16")
    # vLLM casts the fp32 intermediate to fp16 before expand and rounds the delta before the add (see
    # runtime/vllm_lora.py): the same three half-ulp roundings as grouped_mm at fp16
    assert_close_scaled(got, want, REL["fp16"], f"vllm {op}")


@pytest.mark.vllm
def test_vllm_smoke_rows_hold_numbers(tmp_path):
    """`mmlora bench --preset smoke --providers vllm` where vLLM is installed: ok rows with numbers for every LoRA
    case (fp16, the interpreter noted on CPU), and the end-to-end cases one unavailable row each."""
    need_vllm()
    from harness.bench import schema
    from harness.cli import main
    from runtime.kernels import interpreted
    from suites.bench.helpers import expected_keys, keys, read_rows

    out = tmp_path / "vllm"
    assert main(["bench", "--preset", "smoke", "--providers", "vllm", "--out", str(out)]) == 0
    rows = read_rows(out / "results.csv")
    assert sorted(keys(rows)) == sorted(expected_keys(providers=["vllm"]))
    kernel = [r for r in rows if r["case"].startswith("lora_")]
    assert {r["case"] for r in kernel} == {"lora_shrink", "lora_expand", "lora_apply"}
    for r in kernel:
        assert r["status"] == "ok" and r["dtype"] == "fp16" and float(r["p50"]) > 0, r
        assert not interpreted() or "interpreter" in r["note"], r
    assert all(r["status"] == "unavailable" for r in rows if not r["case"].startswith("lora_"))
    assert set(schema.COLUMNS) <= set(rows[0])
