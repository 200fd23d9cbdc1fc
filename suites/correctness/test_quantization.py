"""LLaVA practice: weight-only int8 on the LM, projector and tower kept in full precision. The report shows
drift per group; a quantizer that touches a protected module fails the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.correctness import Options, run_arch


def _drift(out):
    return json.loads((out / "summary.json").read_text())["archs"]["llava"]


def test_lm_int8_drifts_only_in_the_lm(tmp_path):
    out = tmp_path / "q"
    assert main(["correctness", "--arch", "llava", "--quantize", "lm-int8", "--out", str(out)]) == 0
    s = _drift(out)
    d = s["quantization"]["drift_by_group"]  # max |runtime - truth| / max |truth|
    assert s["quantization"]["violations"] == [] and s["quantization"]["quantized_modules"] > 0
    # replay feeds each module the reference input: unquantized groups are exact, the LM is not
    assert d["replay/tower"] < 1e-5 and d["replay/connector"] < 1e-5
    assert d["replay/language_model"] > 1e-4


def test_projector_quantized_shows_connector_drift(tmp_path):
    out = tmp_path / "q"
    assert main(["correctness", "--arch", "llava", "--quantize", "lm-int8", "--quantize-projector",
                 "--out", str(out)]) == 0
    d = _drift(out)["quantization"]["drift_by_group"]
    assert d["replay/connector"] > 1e-4 and d["replay/tower"] < 1e-5


def test_quantizer_ignoring_the_skip_list_fails_the_run(tmp_path, monkeypatch):
    from harness.correctness import quantize

    # a quantizer that ignores the skip list: every grouped Linear quantized, tower and connector too
    monkeypatch.setattr(quantize, "should_quantize", lambda arch, name, include: arch.group_or_none(name) is not None)
    res = run_arch("llava", Options(archs=["llava"], quantize="lm-int8", modes=("replay",)), Path(tmp_path))
    assert res.summary["ok"] is False
    v = res.summary["quantization"]["violations"]
    assert any(n.startswith("model.multi_modal_projector.") for n in v)
    assert any(n.startswith("model.vision_tower.") for n in v)


def test_quantize_projector_alone_is_bad_input(tmp_path, capsys):
    assert main(["correctness", "--arch", "llava", "--quantize-projector", "--out", str(tmp_path / "o")]) == 2
    assert "--quantize" in capsys.readouterr().err


@pytest.mark.parametrize("name,skipped", [("model.multi_modal_projector.linear_1", True),
                                          ("model.vision_tower.encoder.layers.0.mlp.fc1", True),
                                          ("model.language_model.norm", True), ("lm_head", True),
                                          ("model.language_model.layers.0.mlp.up_proj", False)])
def test_skip_list(name, skipped):
    from vlm.arch import get_arch

    assert get_arch("llava").is_quant_skipped(name) is skipped


def test_quantized_run_still_fails_on_a_broken_tower(tmp_path):
    """Drift is allowed only where quantization acts: a slot bug in the (unquantized) tower still fails."""
    assert main(["correctness", "--arch", "llama4", "--quantize", "lm-int8", "--inject-fault", "slot-shift",
                 "--out", str(tmp_path / "q")]) == 1
