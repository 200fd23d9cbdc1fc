"""A harness that cannot fail is worthless: every seeded fault must be caught (exit 1) and, in replay mode,
the first divergent module must be the one the fault names. Plus the CLI contract and the report files."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from harness.cli import main
from harness.correctness.compare import CSV_COLUMNS
from harness.correctness.faults import FAULTS

# LoRA and mapping faults on Llama 4 (tiled tower, connector inside the tower prefix); each vision-kernel
# fault on every arch that substitutes its kernel
CATALOG = [(name, arch) for name, f in sorted(FAULTS.items()) for arch in (f.archs() if f.kernel else ["llama4"])]


@pytest.mark.parametrize("fault,arch", CATALOG)
def test_fault_is_caught_at_the_named_module(fault, arch, tmp_path):
    f = FAULTS[fault]
    out = tmp_path / "rep"
    rc = main(["correctness", "--arch", arch, "--mode", f.mode, "--inject-fault", fault, "--out", str(out)])
    assert rc == 1
    s = json.loads((out / "summary.json").read_text())["archs"][arch]
    assert s["fault"]["expected_first"] is not None
    assert s["fault"]["first"] == s["fault"]["expected_first"], s["fault"]
    assert s["fault"]["caught"] is True


def test_fault_for_another_arch_is_bad_input(capsys, tmp_path):
    assert main(["correctness", "--arch", "llama4", "--inject-fault", "rope-axes-swapped",
                 "--out", str(tmp_path / "o")]) == 2
    assert "gemma4" in capsys.readouterr().err


def test_clean_run_exits_0_and_writes_a_complete_report(tmp_path):
    out = tmp_path / "rep"
    assert main(["correctness", "--arch", "llama4", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "layers.csv", "summary.json"]
    df = pd.read_csv(out / "layers.csv")
    assert list(df.columns) == CSV_COLUMNS
    assert set(df["mode"]) == {"e2e", "replay"}
    # one row per (arch, request, module, mode)
    assert not df.duplicated(["arch", "request", "module", "mode"]).any()
    assert df["ok"].all()
    # every group is covered, boundaries included
    assert {"tower", "connector", "language_model"} <= set(df["group"])
    assert {"@tower_out", "@lm_image_embeds", "@logits"} <= set(df["module"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True and summary["exit_code"] == 0
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html and "llama4" in html
    assert not list(tmp_path.glob(".rep.partial-*"))


@pytest.mark.parametrize("argv,needle", [
    (["correctness", "--arch", "nope"], "'nope'"),
    (["correctness", "--arch", "llama4", "--dtype", "fp8"], "'fp8'"),
    (["correctness", "--arch", "llama4", "--inject-fault", "gremlins"], "'gremlins'"),
    (["correctness", "--arch", "llama4", "--mode", "sideways"], "sideways"),
    (["correctness", "--model", "/no/such/ckpt"], "/no/such/ckpt"),
    (["correctness", "--arch", "llama4", "--adapter", "x=/no/such/adapter"], "/no/such/adapter"),
    (["tokens", "--arch", "llama4", "--set", "vision_config.nokey=1"], "nokey"),
    (["tokens", "--arch", "llama4", "--tiles", "0"], "tiles=0"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys, tmp_path):
    rc = main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "correctness" else []))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert not (tmp_path / "o").exists()


def test_default_correctness_run_passes_for_every_registered_arch(tmp_path):
    """What `nox -s correctness` runs: every arch, both modes, 3 adapters + none, fp32 CPU."""
    out = tmp_path / "all"
    assert main(["correctness", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    from vlm.arch import REGISTRY

    assert set(s["archs"]) == set(REGISTRY)


def test_bf16_run_passes(tmp_path):
    """The GPU runners' dtype, on CPU: pixels must reach the runtime in the model's dtype (Llama 4's patch
    embedding does not cast), and bf16 rounding must stay within the bf16 tolerances."""
    out = tmp_path / "bf16"
    assert main(["correctness", "--arch", "llama4", "--dtype", "bf16", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())["archs"]["llama4"]
    assert s["ok"] and s["max_abs_by_group"]["replay/tower"] > 0  # bf16 really ran: rounding is visible


def test_local_checkpoint_with_peft_saved_adapters(tmp_path):
    """The user path: a checkpoint folder (arch read from its config.json) and adapter folders PEFT saved."""
    from reference.adapters import AdapterSpec, add_adapters, save_adapters
    from vlm.checkpoint import build_tiny, save_checkpoint

    _, model = build_tiny("qwen2_vl", seed=7)
    save_checkpoint(model, tmp_path / "ckpt")
    from vlm.arch import get_arch

    arch = get_arch("qwen2_vl")
    pm = add_adapters(build_tiny(arch, seed=7)[1], arch, [AdapterSpec("mine", ("tower", "language_model"), 4, 8)])
    folders = save_adapters(pm, tmp_path / "ad")
    out = tmp_path / "rep"
    assert main(["correctness", "--model", str(tmp_path / "ckpt"), "--adapter", f"mine={folders['mine']}",
                 "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert list(s["archs"]) == ["qwen2_vl"]
    assert {r["adapter"] for r in s["archs"]["qwen2_vl"]["requests"]} == {"mine", None}


def test_rank_and_alpha_patterns_from_peft(tmp_path):
    """A PEFT adapter whose per-module rank (rank_pattern) exceeds r: slots sized by the real ranks, and
    alpha_pattern scales checked against PEFT itself."""
    from peft import LoraConfig, get_peft_model

    from reference.adapters import randomize, save_adapters
    from vlm.arch import get_arch
    from vlm.checkpoint import build_tiny, save_checkpoint

    arch = get_arch("llava")
    save_checkpoint(build_tiny(arch)[1], tmp_path / "ckpt")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=arch.target_regex(["tower", "language_model"]),
                     rank_pattern={"q_proj": 32}, alpha_pattern={"v_proj": 3})
    pm = get_peft_model(build_tiny(arch)[1], cfg, adapter_name="pat")
    randomize(pm, "pat", seed=3)
    folders = save_adapters(pm, tmp_path / "ad")
    assert main(["correctness", "--model", str(tmp_path / "ckpt"), "--adapter", f"pat={folders['pat']}",
                 "--out", str(tmp_path / "rep")]) == 0
