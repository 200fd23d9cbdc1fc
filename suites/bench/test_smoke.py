"""`mmlora bench --preset smoke` end to end on CPU: CSV contract, report, repro, baseline regressions."""

from __future__ import annotations

import base64
import math
import re
import shlex
import shutil
import struct
import time
from collections import Counter

import pytest

from harness.bench import schema
from harness.bench.catalog import all_cases
from harness.cli import main
from runtime.kernels import interpreted
from runtime.vllm_lora import unavailable_reason
from suites.bench.helpers import expected_keys, header, keys, read_rows

CASES = tuple(all_cases())  # one case per kernel spec plus the end-to-end cases
VLLM_MISSING = unavailable_reason() is not None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    t0 = time.perf_counter()
    rc = main(["bench", "--preset", "smoke", "--out", str(out)])
    return {"out": out, "rc": rc, "seconds": time.perf_counter() - t0}


def test_smoke_completes(smoke):
    out = smoke["out"]
    assert smoke["rc"] == 0
    assert (out / "results.csv").is_file() and (out / "index.html").is_file() and (out / "summary.json").is_file()
    assert not (out / ".incomplete").exists()


def test_csv_columns_are_the_documented_set(smoke):
    assert header(smoke["out"] / "results.csv") == list(schema.COLUMNS)


def test_one_row_per_case_provider_params_metric(smoke):
    got = keys(read_rows(smoke["out"] / "results.csv"))
    dupes = [k for k, c in Counter(got).items() if c > 1]
    assert not dupes, f"duplicate row keys: {dupes[:3]}"
    assert sorted(got) == sorted(expected_keys())


def test_every_case_name_appears(smoke):
    rows = read_rows(smoke["out"] / "results.csv")
    assert {r["case"] for r in rows} == set(CASES)
    ok_cases = {r["case"] for r in rows if r["status"] == "ok"}
    assert ok_cases == set(CASES)


def test_statuses_and_quantiles(smoke):
    rows = read_rows(smoke["out"] / "results.csv")
    for r in rows:
        assert r["status"] in schema.STATUSES
        assert r["unit"] == schema.UNITS[r["metric"]]
        if r["provider"] == "vllm" and (VLLM_MISSING or r["case"] in ("tower_connector", "prefill")):
            # never faked: without vLLM (and end to end, always) a vllm row is unavailable, with no number
            assert r["status"] == "unavailable" and r["p50"] == r["p20"] == r["p80"] == "" and r["note"], r
            continue
        assert r["status"] == "ok", r
        p50, p20, p80 = (float(r[q]) for q in ("p50", "p20", "p80"))
        assert all(math.isfinite(v) and v > 0 for v in (p50, p20, p80)), r
        assert p20 <= p50 <= p80, r


def test_vllm_and_grouped_mm_kernel_rows_hold_numbers(smoke):
    """grouped_mm (torch's grouped GEMM) runs every LoRA point; vLLM's kernels run the fp16 points wherever
    vLLM is installed, and say in the note that the Triton interpreter timed them on a CPU."""
    rows = read_rows(smoke["out"] / "results.csv")
    lora = ("lora_shrink", "lora_expand", "lora_apply")
    gmm = [r for r in rows if r["provider"] == "grouped_mm"]
    assert {r["case"] for r in gmm} == set(lora) and all(r["status"] == "ok" for r in gmm)
    vllm = [r for r in rows if r["provider"] == "vllm" and r["case"] in lora]
    if VLLM_MISSING:
        assert all(r["status"] == "unavailable" for r in vllm)
        return
    assert {r["case"] for r in vllm} == set(lora) and all(r["status"] == "ok" and r["dtype"] == "fp16" for r in vllm)
    if interpreted():
        assert all("interpreter" in r["note"] for r in vllm)


def test_every_row_has_env_columns_and_a_repro(smoke):
    for r in read_rows(smoke["out"] / "results.csv"):
        for c in ("gpu_name", "torch", "triton", "transformers", "peft", "timestamp"):
            assert r[c], f"{c} empty in {r['case']} {r['provider']}"
        argv = shlex.split(r["repro"])
        assert argv[:4] == ["python", "-m", "harness.cli", "bench"], r["repro"]
        assert argv[argv.index("--cases") + 1] == r["case"]
        assert argv[argv.index("--providers") + 1] == r["provider"]


def test_repro_reruns_exactly_that_point(smoke, tmp_path):
    rows = read_rows(smoke["out"] / "results.csv")
    row = next(r for r in rows if r["case"] == "pixel_shuffle" and r["provider"] == "torch" and r["T"] == "16")
    argv = shlex.split(row["repro"])[3:]
    argv[argv.index("--out") + 1] = str(tmp_path / "repro")
    assert main(argv) == 0
    got = {k[:-1] for k in keys(read_rows(tmp_path / "repro" / "results.csv"))}
    assert got == {schema.row_key(row)[:-1]}


def _pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)]


def test_html_is_self_contained_with_inline_plots(smoke):
    html = (smoke["out"] / "index.html").read_text()
    pngs = _pngs(html)
    assert len(pngs) >= 3  # latency, GB/s (no GPU profile on CPU) or % roofline, speed-up over peft
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = struct.unpack(">II", png[16:24])
        assert w > 300 and h > 200
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "Speed-up over peft" in html and "Latency" in html


def test_rerun_of_a_finished_run_runs_nothing_and_baseline_equal_passes(smoke, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(smoke["out"], out)
    before = (out / "results.csv").read_bytes()
    rc = main(["bench", "--preset", "smoke", "--out", str(out), "--baseline", str(smoke["out"] / "results.csv")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert (out / "results.csv").read_bytes() == before  # resumed: nothing re-run, nothing appended
    assert "0 to run" in captured.err
    assert "regressions vs" in captured.out and "REGRESSION" not in captured.out
    assert "Regressions vs baseline" in (out / "index.html").read_text()


def test_baseline_regression_exits_1_and_is_reported(smoke, tmp_path, capsys):
    rows = read_rows(smoke["out"] / "results.csv")
    for r in rows:  # a baseline twice as fast as this run: every latency row regressed
        if r["metric"] == "latency_ms" and r["status"] == "ok":
            r["p50"] = str(float(r["p50"]) / 2)
    base = tmp_path / "base.csv"
    from harness.output import write_csv

    write_csv(base, rows, list(schema.COLUMNS))
    out = tmp_path / "run"
    shutil.copytree(smoke["out"], out)
    rc = main(["bench", "--preset", "smoke", "--out", str(out), "--baseline", str(base)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "REGRESSION" in captured.out
    html = (out / "index.html").read_text()
    assert "Regressions vs baseline" in html and "REGRESSION" in html


def test_smoke_wall_time_is_reported(smoke):
    print(f"smoke preset wall time: {smoke['seconds']:.1f} s")
    assert smoke["seconds"] < 120
