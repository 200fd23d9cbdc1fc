"""SIGTERM (a job scheduler's stop) is handled like Ctrl-C: a run over a folder of user files, stopped at a
random moment of any phase, exits 143 and leaves every user file and no temporary data: nothing at --out (or,
when the signal came after the report was moved into place, that whole report), no `.<out>.partial-*`
beside it, no `mmlora-*` folder in TMPDIR."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the phase's first progress line -> the longest seeded wait after it (seconds): each stop lands inside
# the phase, whatever the machine's speed (waits are short beside each phase's length)
PHASES = {
    "model build": ("[1/1] llava", 1.0),
    "truth": ("truth at", 0.5),
    "compare": ("runtime e2e", 0.5),
    "report writing": ("ok in", 0.2),
}
USER_FILES = {"notes.txt": "keep me", "data/table.csv": "a,b\n1,2\n", "summary.json": '{"mine": true}'}


def _start(tmp: Path, out: Path) -> subprocess.Popen:
    private = tmp / "tmpdir"
    private.mkdir()
    env = {**os.environ, "TMPDIR": str(private), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "correctness", "--arch", "llava", "--mode", "e2e",
                             "--adapters", "1", "--out", str(out)], cwd=tmp, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)


def _stop_after(proc: subprocess.Popen, needle: str, delay: float, log: list[str]) -> None:
    """Read the run's progress lines; `delay` seconds after the one holding `needle`, send SIGTERM."""
    for line in proc.stderr:
        log.append(line)
        if needle in line:
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            break
    log.extend(proc.stderr)  # to the end: the process exits


def _check(folder: Path, tmp: Path, proc: subprocess.Popen, log: str) -> None:
    if proc.returncode == -signal.SIGTERM:
        # the signal came after main() had returned (the interpreter shutting down, our handler gone): the run was
        # over, its report whole, and a shell reports this death as 143 too
        assert "report in" in log.splitlines()[-1], log[-3000:]
        assert (folder / "X" / ".mmlora-report").exists(), log[-3000:]
    else:
        assert proc.returncode == 143, log[-3000:]
        assert "terminated (SIGTERM)" in log.splitlines()[-1], log[-3000:]
    for name, text in USER_FILES.items():
        assert (folder / name).read_text() == text, name
    left = sorted(p.name for p in folder.iterdir())
    if "X" in left:  # the signal came after the report was complete and moved into place: it must be whole
        assert sorted(p.name for p in (folder / "X").iterdir()) == [".mmlora-report", "index.html", "layers.csv",
                                                                    "summary.json"], left
    assert set(left) - {"X"} == {"notes.txt", "data", "summary.json"}, left  # no .X.partial-*, no .X.old-*
    assert not list((tmp / "tmpdir").glob("mmlora-*")), list((tmp / "tmpdir").iterdir())


def test_sigterm_at_a_random_moment_of_each_phase_leaves_user_files_and_no_temporary_data(tmp_path):
    # one run per phase, side by side: the test takes as long as the longest run, not their sum
    runs = {}
    for phase, (needle, longest) in PHASES.items():
        tmp = tmp_path / phase.replace(" ", "-")
        folder = tmp / "work"
        for name, text in USER_FILES.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        delay = random.Random(f"sigterm {phase}").uniform(0.0, longest)
        proc = _start(tmp, folder / "X")
        log: list[str] = []
        reader = threading.Thread(target=_stop_after, args=(proc, needle, delay, log), daemon=True)
        reader.start()
        runs[phase] = (tmp, folder, proc, reader, log, needle)
    try:
        for phase, (tmp, folder, proc, reader, log, needle) in runs.items():
            reader.join(timeout=900)
            proc.wait(timeout=60)
            text = "".join(log)
            assert needle in text, f"{phase}: the run never printed {needle!r}:\n{text[-3000:]}"
            _check(folder, tmp, proc, text)
    finally:
        for _, _, proc, _, _, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
