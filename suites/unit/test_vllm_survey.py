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


def _fake(outcomes, margin=0.5):
    it = iter(outcomes)

    def fake(c, work):
        outcome = next(it)
        if isinstance(outcome, Exception):
            raise outcome
        return {"arch": c.arch, "dtype": c.dtype, "geometry": "g", "flags": "", "verdict": "v", "seconds": 0.0,
                "rc": 0, "outcome": outcome, "tower": margin, "connector": None}
    return fake


def test_a_known_vllm_finding_passes_the_survey_and_a_change_or_an_error_fails_it(capsys, monkeypatch):
    # llava's one case is measured to diverge (vLLM's tower count): that outcome is a result, the survey passes
    monkeypatch.setattr(survey, "run_case", _fake(["diverges"]))
    assert survey.main(["--arch", "llava"]) == 0
    out = capsys.readouterr().out
    assert "| yes |" in out and "| 0.5 / - |" in out, out  # a margin vLLM never produced prints as -
    # the same case passing (a vLLM release that fixed its count), or erring, is a change to look at: exit 1
    for outcome in ("pass", "error", RuntimeError("boom")):
        monkeypatch.setattr(survey, "run_case", _fake([outcome]))
        assert survey.main(["--arch", "llava"]) == 1, outcome
        err = capsys.readouterr().err
        assert "UNEXPECTED" in err and "diverges" in err, err


def test_an_outcome_can_be_stated_per_vllm_version():
    case = next(c for c in survey.CASES if c.expect_since)
    assert case.expected("0.32.0") != case.expected("0.33.0")
    assert all(c.expected("0.32.0") in survey.OUTCOMES and c.expected("0.33.0") in survey.OUTCOMES
               for c in survey.CASES)
