"""A harness that cannot fail is worthless: every seeded fault must be caught (exit 1) and, in replay mode,
the first divergent module must be the one the fault names. Plus the CLI contract and the report files."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from harness.cli import main


def test_a_fault_exits_1_and_names_its_module_through_the_cli(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["correctness", "--arch", "llama4", "--mode", "replay", "--inject-fault", "slot-shift", "--out", str(out)])
    assert rc == 1
    s = json.loads((out / "summary.json").read_text())["archs"]["llama4"]
    assert s["fault"]["caught"] and s["fault"]["named"], s["fault"]
    q = "vision_model.model.layers.0.self_attn.q_proj"  # the catalog's rule: the first tower LoRA module
    assert s["fault"]["first"] == s["fault"]["expected_first"] == q
    # the last line, and the report's headline, say it in words with the margin of the row that decided it:
    # the earliest failing row in layers.csv (module order, then request)
    df = pd.read_csv(out / "layers.csv")
    bad = df[(df["mode"] == "replay") & ~df["ok"]].sort_values(["order", "request"])
    line = f"seeded fault slot-shift: caught, named at {q} (expected); margin {bad['margin'].iloc[0]:.3g} (llama4, replay)"
    assert capsys.readouterr().err.strip().splitlines()[-1] == line
    html = (out / "index.html").read_text()
    assert line in html
    # the first divergence links to its row in the failing-rows table
    assert "href='#first-llama4-replay'" in html
    row = html.split("id='first-llama4-replay'", 1)[1].split("</tr>", 1)[0]
    assert q in row and f">{int(bad['request'].iloc[0])}<" in row


def test_a_control_exits_0_through_the_cli(tmp_path):
    out = tmp_path / "rep"
    assert main(["correctness", "--arch", "qwen2_vl", "--inject-fault", "control-fused-merged", "--dtype", "bf16",
                 "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["archs"]["qwen2_vl"]["fault"]["passed"] is True


def test_fault_for_another_arch_is_bad_input(capsys, tmp_path):
    assert main(["correctness", "--arch", "llama4", "--inject-fault", "rope-axes-swapped",
                 "--out", str(tmp_path / "o")]) == 2
    assert "gemma4" in capsys.readouterr().err


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


def test_bf16_run_passes(tmp_path):
    """The GPU runners' dtype, on CPU: pixels must reach the runtime in the model's dtype (Llama 4's patch
    embedding does not cast), and bf16 rounding must stay within the bf16 tolerances."""
    out = tmp_path / "bf16"
    assert main(["correctness", "--arch", "llama4", "--dtype", "bf16", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())["archs"]["llama4"]
    assert s["ok"] and 0 < s["worst_margin"]["replay/tower"] <= 1  # bf16 really ran: rounding is visible


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


def test_an_exception_inside_the_runtime_is_its_failure_exit_1_with_a_report(tmp_path, monkeypatch, capsys):
    """An exception raised inside a LoRA module: exit 1 (not 2, not a crash), status `error` in layers.csv
    naming the module and request, the report written."""
    from harness.correctness import faults as catalog

    def corrupted(batch):
        raise ValueError("slot table corrupted")

    def raising(rt):
        catalog._hooks(rt, kernel=lambda name, fn, module=None: corrupted if name == "lora" else fn)
    bad = catalog.Fault("raises-inside", "a LoRA module raises", "tower", raising)
    monkeypatch.setitem(catalog.FAULTS, bad.name, bad)
    out = tmp_path / "rep"
    rc = main(["correctness", "--arch", "llama4", "--inject-fault", bad.name, "--out", str(out)])
    assert rc == 1
    df = pd.read_csv(out / "layers.csv")
    err = df[df["status"] == "error"]
    assert set(err["mode"]) == {"e2e", "replay"}
    first = "vision_model.model.layers.0.self_attn.q_proj"
    assert (err["module"] == first).any() and err["detail"].str.contains("slot table corrupted").all()
    s = json.loads((out / "summary.json").read_text())["archs"]["llama4"]
    assert s["first_divergence"]["replay"]["module"] == first and s["first_divergence"]["e2e"]["module"] == first
    assert (out / "index.html").is_file()
    assert "runtime raised ValueError" in capsys.readouterr().err


def test_a_fault_alone_runs_every_arch_it_applies_to(tmp_path):
    out = tmp_path / "rep"
    assert main(["correctness", "--inject-fault", "pool-xy-swapped", "--mode", "e2e", "--out", str(out)]) == 1
    s = json.loads((out / "summary.json").read_text())
    assert list(s["archs"]) == ["gemma4"] and s["archs"]["gemma4"]["fault"]["named"]


def test_geometry_flag_sets_the_batch(tmp_path):
    out = tmp_path / "rep"
    assert main(["correctness", "--arch", "llama4", "--mode", "replay", "--geometry", "tiles=3",
                 "--geometry", "tiles=1", "--out", str(out)]) == 0
    reqs = json.loads((out / "summary.json").read_text())["archs"]["llama4"]["requests"]
    assert [r["geometry"] for r in reqs] == [["tiles=3"], ["tiles=1"], ["tiles=3"], ["tiles=1"],
                                             ["tiles=3", "tiles=1"], [], []]
