"""`mmlora faults --power` through the CLI, what a demanding user needs of a run that takes an hour: each row
printed as it is measured, a harness exception on one run is that run's row (every other figure kept, exit
1), and Ctrl-C writes the rows measured so far, marked partial (exit 130). The rows of real verdicts are
built in test_detection_power (power._row on every catalog verdict)."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from harness.cli import main

FAULT, CONTROL = "slot-shift", "control-accumulation-order"


def _power(out, *extra) -> int:
    return main(["faults", "--power", "--arch", "llava", "--fault", FAULT, "--fault", CONTROL, "--dtype", "fp32",
                 "--adapter-scale", "0.1", "--out", str(out), *extra])


def _stub(monkeypatch, on_judge):
    """prepare / judge replaced: the loop's bookkeeping, not the models, is under test here."""
    import harness.correctness.engine as engine

    monkeypatch.setattr(engine, "prepare", lambda arch, opts, tmp: object())

    def judge(prepared, opts, fault):
        on_judge(fault)
        v = {"control": fault.control, "caught": not fault.control, "named": not fault.control,
             "passed": fault.control, "margin": 0.1 if fault.control else 5.0, "expected_first": "m", "first": "m",
             "request": 0, "row": -1, "image": -1}
        return SimpleNamespace(summary={"fault": v})
    monkeypatch.setattr(engine, "judge", judge)


def test_a_harness_error_on_one_run_keeps_the_table(tmp_path, monkeypatch, capsys):
    def on_judge(fault):
        if fault.name == FAULT:
            raise KeyError("expected")  # the very crash that once lost a whole table
    _stub(monkeypatch, on_judge)
    assert _power(tmp_path / "p") == 1
    df = pd.read_csv(tmp_path / "p" / "power.csv", keep_default_na=False)
    assert list(df["fault"]) == [FAULT, CONTROL]
    assert df.iloc[0]["reason"] == "HARNESS ERROR: KeyError: 'expected'"
    assert df.iloc[1]["passed"] == "True" and df.iloc[1]["reason"] == ""
    md = (tmp_path / "p" / "power.md").read_text()
    assert f"`{CONTROL}` | control | passed 1/1, max margin 0.1 |" in md
    assert f"`{FAULT}` | fault | HARNESS ERROR 1/1 |" in md  # not "caught 0/1": an error is no miss
    err = capsys.readouterr().err
    assert f"{CONTROL} llava fp32 scale 0.1: margin 0.1, passed" in err  # each row printed as it is measured
    assert "HARNESS ERROR: KeyError" in err


def test_ctrl_c_writes_the_rows_measured_so_far(tmp_path, monkeypatch):
    def on_judge(fault):
        if fault.name == CONTROL:
            raise KeyboardInterrupt
    _stub(monkeypatch, on_judge)
    assert _power(tmp_path / "p") == 130
    df = pd.read_csv(tmp_path / "p" / "power.csv", keep_default_na=False)
    assert list(df["fault"]) == [FAULT]
    assert (tmp_path / "p" / "power.md").read_text().startswith("Partial: interrupted after 1 of 2 runs.")


@pytest.mark.parametrize("flag", ["--provider", "--kernel"])  # --kernel: the old name, still accepted
def test_a_provider_that_cannot_run_is_refused_before_any_run(tmp_path, monkeypatch, capsys, flag):
    """Bad input is exit 2 at once (one line), not one HARNESS ERROR row per run after hours of references."""
    import harness.correctness.engine as engine

    def never(*a, **k):
        raise AssertionError("a reference was prepared")
    monkeypatch.setattr(engine, "prepare", never)
    capsys.readouterr()
    assert _power(tmp_path / "p", flag, "vllm") == 2  # vLLM's kernels take fp16 / bf16 only
    assert "--provider vllm: dtype float32 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
