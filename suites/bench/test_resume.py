"""Interrupting a sweep (SIGKILL, SIGINT) and re-running it finishes it: no duplicate, no lost row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from harness.bench import schema
from suites.bench.helpers import REPO, expected_keys, keys, read_rows

CASES = ["pixel_shuffle", "rope_2d", "position_pool"]
PROVIDERS = ["torch"]


def _cmd(out, rep_ms: float) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "bench", "--preset", "smoke", "--cases", ",".join(CASES),
            "--providers", ",".join(PROVIDERS), "--rep-ms", str(rep_ms), "--out", str(out)]


def _env() -> dict:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _start_and_interrupt(out, sig) -> subprocess.Popen:
    """Start a slow sweep, wait until at least one whole point is on disk, then send `sig`."""
    proc = subprocess.Popen(_cmd(out, rep_ms=400), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    csv_path = out / "results.csv"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if csv_path.exists() and len(csv_path.read_bytes().splitlines()) >= 1 + 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the sweep ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
    proc.send_signal(sig)
    return proc


def _complete_rows(out) -> list[dict]:
    """Rows on disk after a crash, minus the last point when the file ends in a torn line (resume drops
    that point and runs it again)."""
    text = (out / "results.csv").read_text()
    rows = read_rows(out / "results.csv")
    if not text.endswith("\n"):
        rows = rows[:-1]
        last = schema.row_key(rows[-1])[:-1] if rows else None
        rows = [r for r in rows if schema.row_key(r)[:-1] != last]
    return rows


def _finish_and_check(out, before: list[dict]) -> None:
    done = subprocess.run(_cmd(out, rep_ms=1), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(out / "results.csv")
    got = keys(rows)
    dupes = [k for k, c in Counter(got).items() if c > 1]
    assert not dupes, f"duplicated rows after resume: {dupes[:3]}"
    assert sorted(got) == sorted(expected_keys(CASES, PROVIDERS))
    # finished rows were kept as they were, not re-measured
    final = {schema.row_key(r): r for r in rows}
    for r in before:
        assert final[schema.row_key(r)] == r
    assert f"{len({schema.row_key(r)[:-1] for r in before})} already recorded" in done.stderr
    assert not (out / ".incomplete").exists()
    assert (out / "index.html").is_file()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_rerun_finishes_without_duplicates_or_losses(tmp_path):
    out = tmp_path / "run"
    proc = _start_and_interrupt(out, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (out / ".incomplete").exists() and not (out / "index.html").exists()
    before = _complete_rows(out)
    assert 0 < len(before) < len(expected_keys(CASES, PROVIDERS))
    _finish_and_check(out, before)


def test_sigint_exits_130_cleanly_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = _start_and_interrupt(out, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    assert (out / ".incomplete").exists() and not (out / "index.html").exists()
    before = read_rows(out / "results.csv")
    assert (out / "results.csv").read_text().endswith("\n")
    assert 0 < len(before) < len(expected_keys(CASES, PROVIDERS))
    _finish_and_check(out, before)
