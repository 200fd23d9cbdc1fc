"""Progress inside long phases (harness/progress.py): off a terminal a plain line at most every EVERY seconds
("module i of N (p%), t s"); on a terminal a bar redrawn in place and ended by a newline; and a whole run's
phases count what they really did (the truth as many module outputs as the reference captured, the bundle
and replay one step per module), seen through the CLI with lines forced on every step."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stderr

from harness import progress
from harness.cli import main


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_are_throttled(monkeypatch):
    monkeypatch.setattr(progress, "EVERY", 3600.0)
    out = io.StringIO()
    with progress.Progress("x: truth", 50, stream=out) as p:
        for _ in range(50):
            p.step()
    assert out.getvalue() == ""  # a phase shorter than EVERY prints nothing
    monkeypatch.setattr(progress, "EVERY", 0.0)
    out = io.StringIO()
    with progress.Progress("x: truth", 4, stream=out) as p:
        for _ in range(4):
            p.step()
    lines = out.getvalue().splitlines()
    assert [re.sub(r", \d+ s$", "", ln) for ln in lines] == [
        f"  x: truth: module {i} of 4 ({25 * i}%)" for i in range(1, 5)], lines


def test_a_terminal_gets_a_bar_ended_by_a_newline(monkeypatch):
    monkeypatch.setattr(progress, "_REDRAW", 0.0)
    out = _Tty()
    with progress.Progress("x: bundle", 2, stream=out) as p:
        p.step()
        p.step()
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and "[" + "#" * 24 + "] module 2 of 2 (100%)" in text
    assert "\n" not in text[:-1]  # redrawn in place, one line


def test_a_run_reports_its_phases_step_by_step(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "EVERY", 0.0)
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["correctness", "--arch", "llava", "--arch", "qwen2_vl", "--kernel", "torch",
                   "--out", str(tmp_path / "r")])
    lines = err.getvalue().splitlines()
    assert rc == 0, err.getvalue()

    def last(label):
        got = [ln for ln in lines if ln.startswith(f"  llava: {label}: ")]
        assert got, (label, lines)
        return got[-1]
    ref = int(re.search(r": (\d+) module outputs,", last("reference")).group(1))
    truth = re.search(r"module output (\d+) of (\d+) \(100%\)", last("truth at float64"))
    assert truth and int(truth.group(1)) == int(truth.group(2)) == ref  # the same forward at high precision
    n_bundle = int(re.search(r"writing the reference bundle \((\d+) modules\)",
                             "\n".join(lines)).group(1))
    assert re.search(rf"module {n_bundle} of {n_bundle} \(100%\)", last("bundle"))
    n_lora = int(re.search(r"llava: replay of (\d+) LoRA modules", "\n".join(lines)).group(1))
    assert re.search(rf"module {n_lora} of {n_lora} \(100%\)", last("replay"))
    # the recap of a multi-arch run: its last line
    assert re.fullmatch(r"mmlora correctness: 2 archs: 2 passed, 0 failed; worst margin [0-9.e+-]+ \((llava|qwen2_vl) "
                        r"(e2e|replay), \S+\); report in .*", lines[-1]), lines[-1]
