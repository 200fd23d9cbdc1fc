"""`mmlora bench --shard I/N` and `mmlora bench-merge`: three shards merged equal one unsharded run (by key),
every point in exactly one shard, bad --shard values, runs that are not of one sweep refused."""

from __future__ import annotations

import json
import random
import shlex
import shutil
from collections import Counter

import pytest

from harness.bench import schema, shards, sweep
from harness.bench.presets import PRESETS
from harness.cli import main
from suites.bench.helpers import expected_keys, keys, read_rows

CASES = ["copy", "pixel_shuffle", "position_pool", "rope_2d"]
PROVIDERS = ["torch"]
ARGS = ["bench", "--preset", "smoke", "--cases", ",".join(CASES), "--providers", ",".join(PROVIDERS),
        "--rep-ms", "1"]
# columns that do not depend on the timing (p50 / p20 / p80, the noisy note and the timestamp do)
FIXED = [c for c in schema.COLUMNS if c not in ("p50", "p20", "p80", "note", "timestamp", "repro")]


def _one_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def _no_plots():
    """index.html without its PNGs (test_smoke checks those): drawing them is most of these runs' time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("harness.bench.report.png_data_uri", lambda draw: "data:image/png;base64,")
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Shards 1/3, 2/3, 3/3 and one unsharded run of the same small sweep."""
    root = tmp_path_factory.mktemp("shards")
    for name, extra in [("s1", ["--shard", "1/3"]), ("s2", ["--shard", "2/3"]), ("s3", ["--shard", "3/3"]),
                        ("all", [])]:
        assert main([*ARGS, *extra, "--out", str(root / name)]) == 0
    return root


def _by_key(rows):
    return {schema.row_key(r): r for r in rows}


def _unsharded_repro(r: dict) -> str:
    argv = shlex.split(r["repro"])
    if "--shard" in argv:
        i = argv.index("--shard")
        del argv[i:i + 2]
    return shlex.join(argv)


def test_three_shards_merged_equal_one_unsharded_run(runs, capsys):
    # each shard holds a proper part of the sweep (else this test could not tell a merge from a copy)
    whole = set(keys(read_rows(runs / "all" / "results.csv")))
    parts = [set(keys(read_rows(runs / s / "results.csv"))) for s in ("s1", "s2", "s3")]
    assert all(p and p < whole for p in parts)
    assert json.loads((runs / "s2" / "summary.json").read_text())["shard"] == "2/3"

    assert main(["bench-merge", str(runs / "s1"), str(runs / "s2"), str(runs / "s3"), "--out", str(runs / "m")]) == 0
    merged = read_rows(runs / "m" / "results.csv")
    got, want = _by_key(merged), _by_key(read_rows(runs / "all" / "results.csv"))
    assert len(got) == len(merged), "duplicate keys in the merged CSV"
    assert set(got) == set(want) == set(expected_keys(CASES, PROVIDERS))
    for k, r in got.items():
        assert {c: r[c] for c in FIXED} == {c: want[k][c] for c in FIXED}, k
        assert _unsharded_repro(r) == want[k]["repro"]
    assert (runs / "m" / "index.html").is_file()
    summary = json.loads((runs / "m" / "summary.json").read_text())
    assert summary["missing_shards"] == [] and summary["rows"] == len(merged)
    assert summary["duplicates"]["shared"] == 2 and summary["duplicates"]["conflicting"] == 0  # copy, x3 shards
    assert not list(runs.glob(".m.partial-*"))


def test_a_dropped_shard_is_refused_or_shows_as_missing_rows(runs, capsys):
    out = runs / "m-drop"
    rc = main(["bench-merge", str(runs / "s1"), str(runs / "s3"), "--out", str(out)])
    line = _one_line(capsys)
    assert rc == 2 and "2/3" in line and "--partial" in line
    assert not out.exists()

    assert main(["bench-merge", str(runs / "s1"), str(runs / "s3"), "--out", str(out), "--partial"]) == 0
    assert "2/3" in capsys.readouterr().err
    got = set(keys(read_rows(out / "results.csv")))
    whole = set(keys(read_rows(runs / "all" / "results.csv")))
    lost = whole - got
    assert got < whole and lost == set(keys(read_rows(runs / "s2" / "results.csv"))) - {
        k for k in whole if k[0] in shards.SHARED_CASES}
    assert json.loads((out / "summary.json").read_text())["missing_shards"] == ["2/3"]


def test_a_rerun_shard_is_a_conflict_resolved_to_the_later_run(runs, capsys):
    rerun = runs / "s2-rerun"
    shutil.copytree(runs / "s2", rerun)
    rows = read_rows(rerun / "results.csv")
    for r in rows:  # measured again, later, with other numbers
        r["timestamp"], r["p50"] = "2999-01-01T00:00:00+0000", "123"
    from harness.bench.store import Store

    (rerun / "results.csv").write_bytes(Store._encode(rows, header=True))
    out = runs / "m-rerun"
    # the rerun given first: the timestamp decides, not the order
    assert main(["bench-merge", str(rerun), str(runs / "s1"), str(runs / "s2"), str(runs / "s3"),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    n = len({schema.row_key(r)[:-1] for r in rows if r["case"] not in shards.SHARED_CASES})
    assert f"{n} points measured in several runs" in err
    merged = read_rows(out / "results.csv")
    assert Counter(keys(merged)) == Counter(keys(read_rows(runs / "all" / "results.csv")))
    redone = {schema.row_key(r) for r in rows if r["case"] not in shards.SHARED_CASES}
    assert all(r["p50"] == "123" for r in merged if schema.row_key(r) in redone)
    assert json.loads((out / "summary.json").read_text())["duplicates"]["conflicting"] == n



def test_the_same_folder_twice_is_one_identical_duplicate(runs):
    from harness.bench import merge

    sources = [merge.load(runs / s, i) for i, s in enumerate(("s1", "s2", "s1", "s3"))]
    merge.check(sources, allow_mixed=False)
    m = merge.merge(sources, CASES)
    own = [k for k in sources[0].points if k[0] not in shards.SHARED_CASES]  # copy: measured by every shard
    assert m.identical == len(own) and not m.conflicts
    assert Counter(keys(m.rows)) == Counter(keys(read_rows(runs / "all" / "results.csv")))


def _variant(runs, name, edit):
    """A copy of shard 2/3 whose summary.json is edited (another sweep, commit, GPU...)."""
    d = runs / name
    shutil.copytree(runs / "s2", d)
    s = json.loads((d / "summary.json").read_text())
    edit(s)
    (d / "summary.json").write_text(json.dumps(s))
    return d


@pytest.mark.parametrize("name, edit, words", [
    ("rep", lambda s: s["config"].update(rep_ms=50.0), "--rep-ms (1.0 vs 50.0)"),
    ("filter", lambda s: s["config"].update(filters={"dtype": "fp32"}), "--filter"),
    ("cases", lambda s: s["config"].update(cases=["copy"]), "--cases"),
    ("preset", lambda s: s.update(preset="nightly"), "preset"),
    ("count", lambda s: s.update(shard="2/4"), "shard count"),
    ("unsharded", lambda s: s.update(shard=None), "shard count"),
    ("sha", lambda s: s["env"].update(git_sha="0123456789ab"), "git sha"),
    ("gpu", lambda s: s["env"].update(gpu_name="NVIDIA H200"), "GPU"),
])
def test_runs_of_another_sweep_are_refused(runs, capsys, name, edit, words):
    other = _variant(runs, f"v-{name}", edit)
    out = runs / f"m-{name}"
    rc = main(["bench-merge", str(runs / "s1"), str(other), str(runs / "s3"), "--out", str(out)])
    line = _one_line(capsys)
    assert rc == 2 and words in line and str(other) in line
    assert not out.exists()
    if words == "git sha":  # --allow-mixed takes it (each row keeps its own environment columns)
        assert main(["bench-merge", str(runs / "s1"), str(other), str(runs / "s3"), "--out", str(out),
                     "--allow-mixed"]) == 0


def test_unfinished_or_foreign_folders_are_refused(runs, capsys, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs / "s2", unfinished)
    (unfinished / ".incomplete").write_text("")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for src, words in [(unfinished, "unfinished"), (foreign, "no results.csv"), (tmp_path / "nope", "does not exist")]:
        rc = main(["bench-merge", str(runs / "s1"), str(src), str(runs / "s3"), "--out", str(tmp_path / "m")])
        line = _one_line(capsys)
        assert rc == 2 and words in line and str(src) in line
    rc = main(["bench-merge", str(runs / "s1"), str(runs / "s2"), str(runs / "s3"), "--out", str(runs)])
    assert rc == 2 and "holds the run" in _one_line(capsys)
    assert not (tmp_path / "m").exists() and (runs / "s1" / "results.csv").is_file()


@pytest.mark.parametrize("value", ["0/3", "4/3", "x", "1/0", "-1/3", "1/3/3", "", "٣/3"])
def test_bad_shard_values_exit_2_naming_the_value_and_write_nothing(capsys, tmp_path, value):
    out = tmp_path / "o"
    rc = main([*ARGS, f"--shard={value}", "--out", str(out)])
    line = _one_line(capsys)
    assert rc == 2 and repr(value) in line and "--shard" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def _smoke_points():
    return sweep.plan(PRESETS["smoke"], None, None, {}, False).points  # every case and provider, CPU plan


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_every_point_is_in_exactly_one_shard(n):
    points = _smoke_points()
    taken = Counter(p.key() for i in range(1, n + 1) for p in shards.select(points, shards.Shard(i, n)))
    for p in points:
        assert taken[p.key()] == (n if p.case in shards.SHARED_CASES else 1), p.key()
    assert len({p.key() for p in points}) == len(points)
    # balanced over the keys: no shard empty or holding twice its share
    own = [p for p in points if p.case not in shards.SHARED_CASES]
    counts = Counter(shards.shard_of(p.key(), n) for p in own)
    assert set(counts) == set(range(1, n + 1))
    assert max(counts.values()) <= 2 * len(own) / n


def test_the_shard_of_a_point_depends_on_its_key_alone():
    points = _smoke_points()
    shuffled = list(points)
    random.Random(0).shuffle(shuffled)
    for n in (2, 3, 5):
        for i in range(1, n + 1):
            a = [p.key() for p in shards.select(points, shards.Shard(i, n))]
            b = [p.key() for p in shards.select(shuffled, shards.Shard(i, n))]
            assert sorted(a) == sorted(b)
    # a plan cut down to one point (a row's repro command) keeps the point in its shard
    for p in points[::7]:
        i = shards.shard_of(p.key(), 3)
        assert shards.select([p], shards.Shard(i, 3)) == [p]
        assert p.case in shards.SHARED_CASES or shards.select([p], shards.Shard(i % 3 + 1, 3)) == []


@pytest.mark.parametrize("shard", [["--shard", "2/3"], []])
def test_resuming_a_folder_of_another_shard_is_refused(runs, capsys, tmp_path, shard):
    out = tmp_path / "s1"
    shutil.copytree(runs / "s1", out)
    before = (out / "results.csv").read_bytes()
    rc = main([*ARGS, *shard, "--out", str(out)])
    line = _one_line(capsys)
    assert rc == 2 and "--shard 1/3" in line and str(out) in line
    assert (out / "results.csv").read_bytes() == before and not (out / ".incomplete").exists()


def _workflow_step(job: str, step: str) -> str:
    """The `run:` script of a step of the nightly workflow, as GitHub would hand it to bash."""
    from pathlib import Path

    import yaml

    wf = yaml.safe_load((Path(__file__).parents[2] / ".github" / "workflows" / "nightly-gpu.yml").read_text())
    return next(s["run"] for s in wf["jobs"][job]["steps"] if s.get("name") == step)


def test_the_nightly_merge_job_runs_its_own_script(runs, tmp_path):
    """The workflow's merge and verdict steps, their very bash taken from the YAML, on the shards' folders
    laid out as actions/download-artifact lays them out (one folder per artifact): all three merge into the
    unsharded run's rows and the verdict passes; an unfinished shard is left out with a warning and the
    verdict then fails, naming the missing shard. (The matrix jobs run `mmlora bench --shard I/3`, which the
    fixture runs too.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # the runner's python3 holds the stack
    (shim / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).parents[2])}
    merge_sh = _workflow_step("bench-merge", "Merge")
    verdict_sh = (_workflow_step("bench-merge", "Verdict").replace("${{ needs.bench.result }}", "success")
                  .replace("${{ steps.merge.outcome }}", "success"))

    def run(work: Path, script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)

    whole = Counter(keys(read_rows(runs / "all" / "results.csv")))
    for case, unfinished in (("all", None), ("one-unfinished", "s2")):
        work = tmp_path / case
        for s in ("s1", "s2", "s3"):
            shutil.copytree(runs / s, work / "reports" / "bench" / "shards" / f"nightly-bench-shard-{s[1]}-7")
        if unfinished:
            (work / "reports" / "bench" / "shards" / f"nightly-bench-shard-{unfinished[1]}-7" / ".incomplete").touch()
        merged = run(work, merge_sh)
        assert merged.returncode == 0, merged.stdout + merged.stderr
        assert "the regression check is skipped" in merged.stdout  # no baseline for this machine
        rows = Counter(keys(read_rows(work / "reports" / "bench" / "nightly" / "results.csv")))
        verdict = run(work, verdict_sh)
        if unfinished is None:
            assert rows == whole
            assert verdict.returncode == 0, verdict.stdout + verdict.stderr
        else:
            assert "is an unfinished shard: left out of the merge" in merged.stdout
            assert rows < whole
            assert verdict.returncode != 0 and "missing shards: ['2/3']" in verdict.stderr
