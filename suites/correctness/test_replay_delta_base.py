"""Replay judges the runtime's LoRA delta against the runtime's own base output on the batch, not the reference's
per-request one. A batched base GEMM may round some elements one ulp apart from a per-request GEMM (CPUs with
AMX-FP16 do at fp16: 0.8% of a no-adapter Llama 4 request's connector elements), which the delta check read as
a LoRA error on a request that has no adapter (margin 1.07 on the delta's rms: a false alarm of every healthy
fp16 run there, vLLM's kernels and the torch twin alike). Measured against its own base, a runtime that leaves
a no-adapter row untouched has a delta of exactly 0, which any CPU reproduces; and a runtime that gives such
rows an adapter is still caught at the module the catalog names."""

from __future__ import annotations

import pytest

from harness.correctness import modes
from harness.correctness.engine import Options, _runtime, prepare
from harness.correctness.faults import get_fault

OPTS = Options(archs=["llama4"], dtype="fp16", kernel="torch", modes=("replay",))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare("llama4", OPTS, tmp_path_factory.mktemp("llama4"))


def test_healthy_fp16_replay_passes_and_no_adapter_rows_have_a_zero_delta(prepared):
    rows = modes.replay(prepared, _runtime(prepared, OPTS))
    worst = max(rows, key=lambda r: r.metrics.margin)
    assert all(r.metrics.ok for r in rows), (worst.module, worst.request, worst.metrics.margin)
    untouched = [r for r in rows if r.kind == "lora" and r.adapter == "-"]
    assert untouched, "the batch has no request without an adapter"
    for r in untouched:
        assert r.metrics.delta.err == 0.0, (r.module, r.request, r.metrics.delta)


def test_no_adapter_rows_given_slot_0_are_still_caught_and_named(prepared):
    fault = get_fault("none-gets-slot0")
    rt = _runtime(prepared, OPTS)
    fault.apply(rt)
    rows = modes.replay(prepared, rt)
    first = next(r for r in rows if not r.metrics.ok)
    assert first.module == fault.expected_first(rt, prepared.order), first.module
    assert first.adapter == "-" and first.metrics.margin > 10, (first.adapter, first.metrics.margin)
