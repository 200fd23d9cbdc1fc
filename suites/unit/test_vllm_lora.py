"""The `vllm` LoRA provider (vLLM's own lora_shrink / lora_expand, runtime/vllm_lora.py) against a per-token
float64 loop: -1 rows mixed in, the last slot used, a slot left unused, ranks zero-padded, packed unequal
slices; and its refusals (dtype, bad slots, vLLM missing) as one line.

Tolerance (fp16): vLLM rounds three times per output element, each at most half an ulp (2^-11 relative): the
fp32 intermediate v cast to fp16 before expand's dot, the delta cast to fp16, and y + delta stored in fp16.
Bound per element: 2^-11 * (sum_r |v_r||B_r| + |delta| + |y_out|) plus fp32 summation noise; the test
asserts 1.5x that bound element-wise (an index or slot error is O(|delta|), orders of magnitude above)."""

from __future__ import annotations

import pytest
import torch

from runtime.kernels import interpreted
from suites.helpers import DEV, need_vllm

pytestmark = pytest.mark.vllm

# fp16 everywhere; bf16 too on CUDA (the interpreter's bf16 tl.dot is wrong, so the provider refuses it there)
DTYPES = [torch.float16] + ([] if interpreted() else [torch.bfloat16])
ULP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(autouse=True)
def _vllm():
    need_vllm()


def make_case(seed, T, H, widths, S, R, ranks, slots, dtype):
    g = torch.Generator().manual_seed(seed)
    A, B = [], []
    for o in widths:
        a = torch.randn(S, R, H, generator=g) / H**0.5
        b = torch.randn(S, o, R, generator=g) / R**0.5
        for s, r in enumerate(ranks):  # slot s holds a rank-r adapter, zero-padded to R (as the slot tables store)
            a[s, r:] = 0
            b[s, :, r:] = 0
        A.append(a.to(DEV, dtype))
        B.append(b.to(DEV, dtype))
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    y = torch.randn(T, sum(widths), generator=g).to(DEV, dtype)
    return x, y, A, B, torch.tensor(slots, dtype=torch.int32, device=DEV)


def loop_reference(x, y, A, B, slots):
    """Per token, per slice, float64 matvecs; -1 tokens skipped. Returns (expected y, rounding bound)."""
    out = y.double().clone()
    mag = y.double().abs().clone()
    off = 0
    for a, b in zip(A, B):
        w = b.shape[1]
        for t, s in enumerate(slots.tolist()):
            if s < 0:
                continue
            v = a[s].double() @ x[t].double()
            d = b[s].double() @ v
            out[t, off:off + w] += d
            mag[t, off:off + w] += b[s].double().abs() @ v.abs() + d.abs()
        off += w
    return out, mag + out.abs()


def check(got, y0, x, A, B, slots):
    ref, mag = loop_reference(x, y0, A, B, slots)
    none = slots.cpu() < 0
    assert torch.equal(got.cpu()[none], y0.cpu()[none]), "a row with slot -1 was written"
    err = (got.double().cpu() - ref.cpu()).abs()
    bound = 1.5 * ULP[got.dtype] * mag.cpu() + 1e-6
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds the rounding bound (worst ratio {worst:.2f})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_slice_mixed_rows_last_slot_used(dtype):
    from runtime.vllm_lora import lora_apply_vllm

    S, T = 4, 50
    # -1 rows interleaved; slot 3 (the last) used, slot 1 unused; ranks 8, 16, 3, 5 padded to R=16
    slots = [(-1, 0, 3, 2, 3, -1, 0)[t % 7] for t in range(T)]
    x, y, A, B, s = make_case(0, T, 48, [40], S, 16, [8, 16, 3, 5], slots, dtype)
    y0 = y.clone()
    assert lora_apply_vllm(x, y, A, B, s) is y
    check(y, y0, x, A, B, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_unequal_slices(dtype):
    """q/k/v packed in one output (24 + 8 + 8 columns), as vLLM lays a GQA qkv projection."""
    from runtime.vllm_lora import lora_apply_vllm

    S, T = 3, 33
    slots = [(2, -1, 0, 2, 1)[t % 5] for t in range(T)]
    x, y, A, B, s = make_case(1, T, 32, [24, 8, 8], S, 16, [16, 4, 16], slots, dtype)
    y0 = y.clone()
    lora_apply_vllm(x, y, A, B, s, slice_offsets=[0, 24, 32])
    check(y, y0, x, A, B, s)


def test_grouping_built_once_serves_every_module_of_a_group():
    """The runtime builds vLLM's LoRAKernelMeta once per group per batch and hands it to each module."""
    from runtime.vllm_lora import lora_apply_vllm, vllm_grouping

    T, S = 40, 3
    slots = [(-1, 2, 0, 2)[t % 4] for t in range(T)]
    mods = [make_case(10 + i, T, 32, [o], S, 16, [16, 8, 16], slots, torch.float16) for i, o in enumerate((16, 48))]
    grouping = vllm_grouping(mods[0][4], S)
    for x, y, A, B, s in mods:
        y0 = y.clone()
        lora_apply_vllm(x, y, A, B, s, grouping=grouping)
        check(y, y0, x, A, B, s)


def test_no_adapter_rows_leave_y_bit_identical():
    from runtime.vllm_lora import lora_apply_vllm

    x, y, A, B, s = make_case(2, 17, 32, [16], 2, 16, [16, 16], [-1] * 17, torch.float16)
    y0 = y.clone()
    lora_apply_vllm(x, y, A, B, s)
    assert torch.equal(y, y0)


def test_non_contiguous_output_is_written_back():
    from runtime.vllm_lora import lora_apply_vllm

    x, y, A, B, s = make_case(3, 20, 32, [16], 2, 16, [16, 16], [1, -1, 0, 1] * 5, torch.float16)
    wide = torch.zeros(20, 32, dtype=y.dtype, device=y.device)
    view = wide[:, ::2]  # every other column: not contiguous
    view.copy_(y)
    lora_apply_vllm(x, view, A, B, s)
    check(view, y, x, A, B, s)
    assert torch.equal(wide[:, 1::2], torch.zeros_like(wide[:, 1::2]))


def _one_line_value_error(fn, needle):
    with pytest.raises(ValueError) as e:
        fn()
    assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)


def test_refusals_are_one_line():
    from runtime.providers import PROVIDERS
    from runtime.vllm_lora import lora_apply_vllm, vllm_grouping

    check = PROVIDERS["vllm"].check
    x, y, A, B, s = make_case(4, 8, 32, [16], 2, 16, [16, 16], [0, 1] * 4, torch.float16)
    _one_line_value_error(lambda: check(torch.float32, "cpu"), "float32")
    if interpreted():
        _one_line_value_error(lambda: check(torch.bfloat16, "cpu"), "interpreter")
    _one_line_value_error(lambda: lora_apply_vllm(x.float(), y.float(), [a.float() for a in A],
                                                  [b.float() for b in B], s), "torch.float32")
    _one_line_value_error(lambda: vllm_grouping(torch.tensor([0, 2], device=DEV), 2), "max 2")
    _one_line_value_error(lambda: vllm_grouping(torch.tensor([-2, 0], device=DEV), 2), "min -2")
    _one_line_value_error(lambda: lora_apply_vllm(x, y, A, B, s, slice_offsets=[3]), "side by side")
    _one_line_value_error(lambda: lora_apply_vllm(x, y, A, B, s, grouping=vllm_grouping(s[:4], 2)), "4 rows")


def test_runtime_model_runs_every_lora_module_through_vllm(monkeypatch, tmp_path):
    """A tiny Llama 4 at fp16 with --kernel vllm: each LoRA module of tower, connector and LM calls vLLM's
    kernels, and the meta is prepared once per group per batch (not once per module)."""
    from reference.adapters import DEFAULT_SPECS, add_adapters, save_adapters
    from runtime import vllm_lora
    from runtime.model import RuntimeModel
    from vlm.arch import get_arch
    from vlm.checkpoint import build_tiny, load_checkpoint, save_checkpoint
    from vlm.requests import make_request

    arch = get_arch("llama4")
    _, model = build_tiny(arch)
    save_checkpoint(model, tmp_path / "ckpt")
    _, cfg, ref_model = load_checkpoint(tmp_path / "ckpt")
    folders = save_adapters(add_adapters(ref_model, arch, DEFAULT_SPECS), tmp_path / "ad")
    rt = RuntimeModel.from_checkpoint(tmp_path / "ckpt", dtype=torch.float16, kernel="vllm")
    for name, folder in folders.items():
        rt.load_adapter(name, folder)
    calls, metas = [], []
    shrink, make = vllm_lora.load().lora_shrink, vllm_lora.vllm_grouping
    monkeypatch.setattr(vllm_lora, "vllm_grouping", lambda *a: metas.append(1) or make(*a))
    ops = vllm_lora.load()
    monkeypatch.setattr(vllm_lora, "load", lambda: ops._replace(
        lora_shrink=lambda *a, **k: calls.append(a[0].shape[0]) or shrink(*a, **k)))
    g = arch.default_geometry(cfg)
    reqs = [make_request(arch, cfg, [g], "all", seed=0), make_request(arch, cfg, [g], None, seed=1),
            make_request(arch, cfg, [], "lm", seed=2)]
    out = rt.run(reqs)
    assert all(torch.isfinite(t["out"]).all() for o in out for t in o.values())
    assert len(calls) == len(rt.lora_names)  # every LoRA module, once each, in one forward
    assert len(metas) == len({arch.group_of(n) for n in rt.lora_names})  # once per group

