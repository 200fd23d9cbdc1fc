"""Bad input exits 2 with exactly one line on stderr, before any sweep runs."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from harness.bench import schema
from harness.cli import main


def _run_err(capsys, argv) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    return rc, lines[0]


def test_unknown_gpu_profile(capsys, tmp_path):
    rc, line = _run_err(capsys, ["bench", "--preset", "smoke", "--gpu", "h800", "--out", str(tmp_path / "o")])
    assert rc == 2 and "h800" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("preset", ["nightly", "full"])
def test_gpu_preset_without_cuda(capsys, tmp_path, preset):
    rc, line = _run_err(capsys, ["bench", "--preset", preset, "--out", str(tmp_path / "o")])
    assert rc == 2 and preset in line and "CUDA" in line
    assert not (tmp_path / "o").exists()


def test_a_gpu_profile_on_another_device_is_refused_naming_the_device(capsys, tmp_path):
    """`--gpu h100` on a CPU (or on another GPU) wrote % of H100 roofline from that device's timings."""
    from harness.bench.roofline import PROFILES

    found = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    gpu = next(g for g, p in PROFILES.items() if p.match not in (found or ""))
    rc, line = _run_err(capsys, ["bench", "--preset", "smoke", "--gpu", gpu, "--cases", "pixel_shuffle",
                                 "--out", str(tmp_path / "o")])
    assert rc == 2 and f"--gpu {gpu}" in line
    assert (repr(found) if found else "cpu") in line
    assert not (tmp_path / "o").exists()


def _write(path, columns, rows=()):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("drop", ["p50", "case", "rank"])
def test_baseline_missing_a_column_names_it(capsys, tmp_path, drop):
    base = _write(tmp_path / "base.csv", [c for c in schema.COLUMNS if c != drop])
    rc, line = _run_err(capsys, ["bench", "--preset", "smoke", "--baseline", str(base), "--out", str(tmp_path / "o")])
    assert rc == 2 and repr(drop) in line
    assert not (tmp_path / "o").exists()


def test_baseline_with_other_columns(capsys, tmp_path):
    base = _write(tmp_path / "base.csv", ["name", "time_ms"], [["x", "1.0"]])
    rc, line = _run_err(capsys, ["bench", "--preset", "smoke", "--baseline", str(base), "--out", str(tmp_path / "o")])
    assert rc == 2 and "'case'" in line


def test_baseline_that_does_not_exist(capsys, tmp_path):
    rc, line = _run_err(capsys, ["bench", "--preset", "smoke", "--baseline", str(tmp_path / "nope.csv")])
    assert rc == 2 and "nope.csv" in line


def test_out_is_an_existing_file(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    rc, line = _run_err(capsys, ["bench", "--preset", "smoke", "--out", str(f)])
    assert rc == 2 and "file" in line


def test_out_below_a_file(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    rc, line = _run_err(capsys, ["bench", "--preset", "smoke", "--out", str(f / "sub" / "run")])
    assert rc == 2 and str(f) in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, line = _run_err(capsys, ["bench", "--preset", "smoke", "--out", str(ro / "run")])
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "writable" in line


def test_results_csv_with_other_columns_is_refused(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".mmlora-report").write_text("bench\n")  # a bench run folder (resumed) whose results have other columns
    _write(out / "results.csv", ["case", "provider", "p50"])
    rc, line = _run_err(capsys, ["bench", "--preset", "smoke", "--out", str(out), "--cases", "pixel_shuffle"])
    assert rc == 2 and "other columns" in line


@pytest.mark.parametrize("argv,needle", [
    (["--providers", "cuda"], "cuda"),
    (["--cases", "lora_foo"], "lora_foo"),
    (["--filter", "Q=3"], "Q"),
    (["--filter", "T"], "PARAM=VALUE"),
    (["--preset", "huge"], "huge"),
])
def test_other_bad_flags(capsys, tmp_path, argv, needle):
    rc, line = _run_err(capsys, ["bench", *argv, "--out", str(tmp_path / "o")])
    assert rc == 2 and needle in line
    assert not (tmp_path / "o").exists()
