"""The vLLM-engine survey's refusals (python -m harness.vllm_engine.survey; the cases themselves need vLLM's model
modules and run in `nox -s vllm_engine`): bad input is one line, exit 2, before minutes of work."""

from __future__ import annotations

from harness.vllm_engine import survey


def test_an_arch_without_cases_is_refused_naming_the_ones_there_are(capsys):
    assert survey.main(["--arch", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nosuch" in err and "llama4" in err and "llava" in err, err


def test_an_out_folder_holding_user_files_is_refused_before_any_case_runs(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(survey, "run_case", lambda c, work: ran.append(c))
    (tmp_path / "notes.txt").write_text("mine")
    assert survey.main(["--arch", "llama4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err, err
    assert not ran and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_crashed_step_fails_the_survey_and_a_vllm_finding_does_not(tmp_path, capsys, monkeypatch):
    rows = iter([{"rc": 1}, {"rc": 2}, {"rc": 0}])

    def fake(c, work):
        return {"arch": c.arch, "dtype": c.dtype, "geometry": "g", "flags": "", "verdict": "v", "seconds": 0.0,
                **next(rows)}

    monkeypatch.setattr(survey, "run_case", fake)
    assert survey.main(["--arch", "qwen2_vl"]) == 0  # a divergence (1) and a named refusal (2) are results
    rows = iter([{"rc": -11}] * 2)  # a step killed by a signal: no verdict to report
    assert survey.main(["--arch", "qwen2_vl"]) == 1
