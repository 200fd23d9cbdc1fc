"""One copy of the base weights: the runtime the engine builds reads the reference's very tensors, the
quantization scenario quantizes its own copies, and the truth runs on the reference's weights upcast in
place (no second model), with the numbers a separate upcast copy gives."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from harness.correctness import engine
from harness.correctness.quantize import quantize_model
from harness.correctness.truth import _linear_in_chunks, _upcast, high_precision, truth_dtype
from reference.adapters import DEFAULT_SPECS, add_adapters, default_specs, load_adapters, save_adapters
from reference.run import run_reference
from vlm.adapter_files import read_adapter
from vlm.checkpoint import build_tiny, load_checkpoint, save_checkpoint, shared_twin
from vlm.requests import make_request


def truth_model(ckpt, run_dtype: torch.dtype, device: torch.device, folders):
    """A separate reference PeftModel at high precision (checkpoint loaded at the run dtype, adapters from the
    very folders the reference loads, then every floating tensor upcast): the truth computed on a fully
    upcast copy, the plain way the in-place truth of `high_precision` is held to here."""
    arch, config, model = load_checkpoint(ckpt, dtype=run_dtype, device=device)
    arch.install_fixes(model)
    pm = load_adapters(model, folders) if folders else add_adapters(model, arch, default_specs(1))
    _upcast(pm, truth_dtype(device))
    return pm


def _loaded(tmp_path, arch_name="llava", specs=DEFAULT_SPECS[:2]):
    """(arch, config, the base twin, the reference PeftModel, adapter folders), as engine.prepare builds them."""
    ckpt = save_checkpoint(build_tiny(arch_name)[1], tmp_path / "ckpt")
    arch, config, model = load_checkpoint(ckpt)
    base = shared_twin(model)
    arch.install_fixes(model)
    pm = add_adapters(model, arch, specs)
    return arch, config, base, pm, save_adapters(pm, tmp_path / "ad")


def _runtime(arch, config, base, folders):
    p = SimpleNamespace(arch=arch, config=config, base=base, torch_dtype=torch.float32, device=torch.device("cpu"),
                        adapters={n: read_adapter(f) for n, f in folders.items()})
    return engine._runtime(p, engine.Options(archs=[arch.model_type], kernel="torch"))


def _shared(pm, rt) -> tuple[int, int]:
    """(runtime weight tensors that are the reference's storage, all runtime weight tensors); the adapter slot
    tables are the runtime's own and not counted (they are not module parameters)."""
    ref = {t.data_ptr() for t in pm.parameters()}
    mine = [t for t in rt.model.parameters()]
    return sum(t.data_ptr() in ref for t in mine), len(mine)


def test_runtime_shares_the_reference_base_weights(tmp_path):
    arch, config, base, pm, folders = _loaded(tmp_path)
    rt = _runtime(arch, config, base, folders)
    shared, total = _shared(pm, rt)
    assert total > 0 and shared == total, f"{total - shared} of {total} runtime weights are copies"
    for name in rt.lora_names:  # the LoRA-wrapped Linears too: PEFT's base layer and the runtime's wrap one tensor
        assert rt.model.get_submodule(name).weight.data_ptr() == \
            pm.get_submodule("base_model.model." + name).get_base_layer().weight.data_ptr()


def test_a_copying_runtime_is_caught(tmp_path, monkeypatch):
    """The check above fails on a runtime that loads its own copy (what the engine did before)."""
    arch, config, base, pm, folders = _loaded(tmp_path)
    monkeypatch.setattr(engine, "shared_twin", copy.deepcopy)
    shared, total = _shared(pm, _runtime(arch, config, base, folders))
    assert shared == 0 and total > 0


def test_quantized_runtime_leaves_the_reference_weights_untouched(tmp_path):
    arch, config, base, pm, folders = _loaded(tmp_path)
    before = {n: t.detach().clone() for n, t in pm.named_parameters()}
    rt = _runtime(arch, config, base, folders)
    done = quantize_model(rt.model, arch)
    assert done
    changed = [n for n in done if not torch.equal(rt.model.get_submodule(n).weight,
                                                  pm.get_submodule("base_model.model." + n).get_base_layer().weight)]
    assert changed, "quantization changed nothing: the check below would be vacuous"
    after = dict(pm.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before), "the reference's weights changed"


def test_truth_in_place_equals_a_separate_upcast_copy(tmp_path):
    """Bit for bit, on the reference's own model with every Linear and Embedding on the piecewise path
    (`big=0`; the rest upcast whole), and the reference's tensors are given back: same storage, same dtype.
    (At the default threshold the tiny models take the whole-upcast path only.)"""
    arch, config, base, pm, folders = _loaded(tmp_path, "qwen2_vl", DEFAULT_SPECS[:1])
    reqs = [make_request(arch, config, [arch.default_geometry(config)], "all", seed=0),
            make_request(arch, config, [], None, seed=1)]
    copy_pm = truth_model(tmp_path / "ckpt", torch.float32, torch.device("cpu"), folders)
    want = run_reference(copy_pm, arch, config, reqs, "single", "cpu", torch.float32, torch.float64).captures
    ptrs = {n: (t.data_ptr(), t.dtype) for n, t in pm.named_parameters()}
    with high_precision(pm, torch.float64, big=0, chunk=1 << 30):
        got = run_reference(pm, arch, config, reqs, "single", "cpu", torch.float32, torch.float64).captures
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for name in w:
            for key in w[name]:
                assert torch.equal(w[name][key], g[name][key]), f"{name} {key}"
    assert {n: (t.data_ptr(), t.dtype) for n, t in pm.named_parameters()} == ptrs


def test_linear_in_chunks_equals_one_float64_linear():
    lin = torch.nn.Linear(64, 300)
    x = torch.randn(5, 64, dtype=torch.float64)
    want = torch.nn.functional.linear(x, lin.weight.double(), lin.bias.double())
    got = _linear_in_chunks(lin, torch.float64, chunk=64 * 8 * 7)(x)  # 7 output columns a piece
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_chunk_buffer_holds_the_largest_piece_only_and_empty_linears_run():
    from harness.correctness.truth import ChunkBuffer

    buf = ChunkBuffer(torch.float64, 1 << 30)  # a chunk far above any weight here: the buffer is the weight's size
    lin = torch.nn.Linear(64, 300)
    x = torch.randn(5, 64, dtype=torch.float64)
    got = _linear_in_chunks(lin, torch.float64, 1 << 30, buffer=buf)(x)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, lin.weight.double(), lin.bias.double()),
                               rtol=0, atol=0)
    assert [t.numel() for t in buf._flat.values()] == [300 * 64]
    empty = _linear_in_chunks(torch.nn.Linear(64, 0), torch.float64, 64 * 8 * 7)(x)
    assert empty.shape == (5, 0)
