"""--out is written only when absent, empty, or an earlier report of the same command that the user lets go
(--overwrite); a report being written is dropped whole on an interrupt (Ctrl-C or SIGTERM). No model runs."""

from __future__ import annotations

import os
import signal

import pytest

from harness.output import KINDS, MARKER, atomic_dir, check_out, report_kind
from harness.provenance import repro_command
from harness.signals import Terminated, sigterm_raises


def _user_files(folder):
    (folder / "data").mkdir(parents=True)
    (folder / "summary.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    (folder / "data" / "x.bin").write_bytes(b"\0\1")


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", KINDS)
def test_a_folder_of_user_files_is_never_written_even_with_overwrite(kind, tmp_path):
    mine = tmp_path / "mine"
    _user_files(mine)
    before = _files(mine)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a report of mmlora"):
            with atomic_dir(mine, kind, overwrite) as tmp:
                (tmp / "summary.json").write_text("{}")
    assert _files(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no partial folder beside it


def test_absent_and_empty_folders_are_written_and_marked(tmp_path):
    for out in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with atomic_dir(out, "power") as tmp:
            (tmp / "power.csv").write_text("x\n")
        assert (out / MARKER).read_text() == "power\n" and report_kind(out) == "power"
        assert (out / "power.csv").read_text() == "x\n"


def test_an_earlier_report_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "rep"
    with atomic_dir(out, "correctness") as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="pass --overwrite"):
        check_out(out, "correctness")
    with atomic_dir(out, "correctness", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # the old one removed, not parked beside


def test_a_report_of_another_kind_is_never_replaced(tmp_path):
    out = tmp_path / "rep"
    with atomic_dir(out, "correctness") as tmp:
        (tmp / "summary.json").write_text("{}")
    for kind in set(KINDS) - {"correctness"}:
        with pytest.raises(ValueError, match="holds a correctness report"):
            check_out(out, kind, overwrite=True)
    # a marker naming no kind this tool writes is no report of it
    (out / MARKER).write_text("something else\n")
    with pytest.raises(ValueError, match="not a report of mmlora"):
        check_out(out, "correctness", overwrite=True)


def test_bench_resumes_its_own_folder_without_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("bench\n")
    (out / "results.csv").write_text("a\n")
    check_out(out, "bench", resume=True)
    with pytest.raises(ValueError, match="holds a bench report"):
        check_out(out, "bench-merge", overwrite=True)


def test_sigterm_while_a_report_is_written_leaves_the_old_report_and_no_partial(tmp_path):
    out = tmp_path / "rep"
    with atomic_dir(out, "compare") as tmp:
        (tmp / "summary.json").write_text('{"old": 1}')
    with sigterm_raises(), pytest.raises(Terminated):
        with atomic_dir(out, "compare", overwrite=True) as tmp:
            (tmp / "summary.json").write_text('{"new": 1}')
            os.kill(os.getpid(), signal.SIGTERM)  # its handler raises at the next bytecode
            (tmp / "index.html").write_text("never reached")
    assert (out / "summary.json").read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main's handler is not left behind


@pytest.mark.parametrize(("argv", "want"), [
    (["correctness", "--arch", "llava", "--arch", "qwen2_vl", "--mode", "both", "--out", "r", "--dtype", "bf16"],
     "mmlora correctness --dtype bf16 --arch llava --mode replay"),
    (["correctness", "--arch=llava", "--out=r", "--inject-fault", "slot-shift", "--adapter", "a b=dir"],
     "mmlora correctness --inject-fault slot-shift --adapter 'a b=dir' --arch llava --mode replay"),
])
def test_repro_command_narrows_the_run_to_one_arch_and_mode(argv, want):
    assert repro_command(argv, "llava", "replay") == want
