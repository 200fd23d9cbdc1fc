"""The front door: `mmlora --help`, `-h`, a bare `mmlora`, `--version` and every subcommand's `--help` work, and
every flag says what it does. `--help` once crashed on a '%' in one subcommand's help text, and no test ran it."""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from harness.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("argv", [["--help"], ["-h"]])
def test_top_level_help(argv):
    rc, out, err = _run(argv)
    assert rc == 0, err
    for name in _subparsers():
        assert name in out, f"{name} missing from `mmlora {argv[0]}`"


def test_bare_mmlora_shows_the_commands_and_exits_2():
    rc, out, err = _run([])
    assert rc == 2
    assert "correctness" in out and "bench" in out


def test_version_names_the_package_version_and_a_commit():
    want = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    rc, out, _ = _run(["--version"])
    assert rc == 0
    assert out.startswith(f"mmlora {want} (git "), out


def test_console_script_help_in_a_fresh_process():
    # argparse formats help lazily: only a real process with a real terminal width shows what users see
    r = subprocess.run([sys.executable, "-m", "harness.cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: mmlora" in r.stdout


@pytest.mark.parametrize("name", sorted(_subparsers()))
def test_every_subcommand_help(name):
    rc, out, err = _run([name, "--help"])
    assert rc == 0, err
    assert f"mmlora {name}" in out


@pytest.mark.parametrize("name", sorted(_subparsers()))
def test_every_flag_has_help(name):
    parser = _subparsers()[name]
    bare = [a.option_strings or [a.dest] for a in parser._actions
            if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not bare, f"mmlora {name}: flags without help: {bare}"


def test_a_closed_pipe_is_not_an_error():
    """`mmlora faults | head -1`: the reader goes away; the tool stops quietly (exit 141, as a shell reports
    SIGPIPE), with no error line or Python traceback on stderr. The pipe's read end is closed before the
    child has even imported the harness, so its first write meets the broken pipe."""
    import os

    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "faults"], stdout=w, stderr=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(w)
    os.close(r)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, (proc.returncode, err)
    assert err == "", err
