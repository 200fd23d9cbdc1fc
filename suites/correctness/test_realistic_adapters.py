"""Generated adapters are calibrated to a realistic delta / base ratio (and the report measures it for any
adapter); an adapter that changes nothing on a group it targets is a loud warning, and --strict fails."""

from __future__ import annotations

import json

import pytest

from harness.cli import main


def _summary(out, arch):
    return json.loads((out / "summary.json").read_text())["archs"][arch]


@pytest.mark.parametrize("arch,scale", [("qwen2_vl", None), ("gemma4", 0.03)])
def test_measured_ratio_is_the_target(arch, scale, tmp_path):
    """Calibrated on base-model inputs, measured on the fp64 truth with the adapters active: within 25%."""
    out = tmp_path / "r"
    argv = ["correctness", "--arch", arch, "--mode", "replay", "--out", str(out)]
    if scale is not None:
        argv += ["--adapter-scale", str(scale)]
    assert main(argv) == 0
    ratios = _summary(out, arch)["adapter_ratios"]
    target = scale or 0.1
    assert set(ratios) == {"all", "lm", "tower"}
    for adapter, groups in ratios.items():
        for group, r in groups.items():
            assert 0.75 * target <= r <= 1.25 * target, (adapter, group, r)


@pytest.fixture(scope="module")
def zero_b_adapter(tmp_path_factory):
    """An adapter as PEFT initialises it (B = 0), saved by PEFT: it changes nothing."""
    from peft import LoraConfig, get_peft_model

    from reference.adapters import save_adapters
    from vlm.arch import get_arch
    from vlm.checkpoint import build_tiny

    arch = get_arch("llava")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=arch.target_regex(["tower", "language_model"]))
    pm = get_peft_model(build_tiny(arch)[1], cfg, adapter_name="z")
    return save_adapters(pm, tmp_path_factory.mktemp("zero"))["z"]


def test_zero_b_adapter_warns(zero_b_adapter, tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["correctness", "--arch", "llava", "--adapter", f"z={zero_b_adapter}", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "adapter 'z' changes nothing on the tower" in err and "comparison is trivial" in err
    s = json.loads((out / "summary.json").read_text())
    assert any("changes nothing on the language_model" in w for w in s["warnings"])
    assert "changes nothing" in (out / "index.html").read_text()


def test_zero_b_adapter_with_strict_exits_1(zero_b_adapter, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["correctness", "--arch", "llava", "--adapter", f"z={zero_b_adapter}", "--strict",
                 "--out", str(out)]) == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] is True and s["exit_code"] == 1 and s["strict"] is True
    assert "--strict" in capsys.readouterr().err
