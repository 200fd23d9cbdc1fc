"""A report says what produced it (code, libraries, device, date, the exact command line) and, for every
failing row, a command that reproduces it: each value checked against its own source, the repro command run."""

from __future__ import annotations

import datetime
import json
import shlex
import subprocess
from pathlib import Path

import torch
import transformers

from harness.cli import main

REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def test_summary_and_report_hold_the_provenance_and_a_repro_command_that_reproduces(tmp_path):
    out = tmp_path / "rep"
    argv = ["correctness", "--arch", "llama4", "--mode", "replay", "--inject-fault", "slot-shift", "--adapters", "2",
            "--out", str(out)]
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    assert main(argv) == 1
    s = json.loads((out / "summary.json").read_text())
    p = s["provenance"]
    assert p["git_sha"] == _git("rev-parse", "--short=12", "HEAD")
    assert p["git_dirty"] is bool(_git("status", "--porcelain", "--untracked-files=no"))
    assert p["versions"]["torch"] == torch.__version__
    assert p["versions"]["transformers"] == transformers.__version__
    assert set(p["versions"]) == {"torch", "triton", "transformers", "peft", "vllm"}
    assert p["argv"] == argv and shlex.split(p["command"]) == ["mmlora", *argv]
    assert p["device"].startswith("cpu (") if not torch.cuda.is_available() else p["device"]
    when = datetime.datetime.strptime(p["date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert before <= when <= datetime.datetime.now(datetime.timezone.utc)

    first = s["archs"]["llama4"]["first_divergence"]["replay"]
    repro = s["archs"]["llama4"]["repro"]
    assert list(repro) == ["replay"]  # the one mode run, and it failed
    page = (out / "index.html").read_text()
    assert "Provenance" in page and p["git_sha"] in page and "Reproduce the failing rows" in page

    words = shlex.split(repro["replay"])
    assert words[0] == "mmlora" and "--out" not in words
    again = tmp_path / "again"
    assert main([*words[1:], "--out", str(again)]) == 1
    s2 = json.loads((again / "summary.json").read_text())
    assert s2["archs"]["llama4"]["first_divergence"]["replay"] == first
