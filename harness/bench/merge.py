"""`mmlora bench-merge RUN_DIR... --out OUT`: join the finished run folders of one sweep (its shards, and
any shard's rerun) into one results.csv, index.html and summary.json.

Refused (exit 2, one line on stderr, nothing written), because the result would not be one sweep:
- a folder that is not a finished bench run (no results.csv, no summary.json, `.incomplete` present: finish
  it by rerunning its bench command with the same --out), or whose results.csv has other columns;
- runs of another sweep: a different preset, --cases, --providers, --filter, --rep-ms, --warmup-ms or --gpu
  profile, or shards of different counts (1/3 beside 2/4);
- runs of different commits (git sha) or GPUs, unless --allow-mixed: each row keeps its own environment
  columns, so the merged CSV still says which code and GPU measured it;
- a shard I/N missing from the folders given, unless --partial (then one line on stderr, and summary.json
  and index.html list the missing shards).

Duplicates are resolved per point (case, provider, parameters), never per row, so a point's metric rows
always come from one run:
- the same status and numbers (a folder given twice): one kept, counted as identical;
- a shared case (`copy`, which every shard runs: see harness.bench.shards): one kept, counted as shared;
  summary.json lists each run's copy GB/s, the yardstick its own kernel rows were held against;
- other numbers (a rerun shard): the point whose rows carry the later timestamp is kept (a tie goes to the
  folder named later), counted as a conflict; one line on stderr says how many, summary.json and
  index.html list them. Conflicts do not change the exit code: both were measured, the report says which
  one it shows.
Rows are copied as they are: environment columns (GPU, driver, versions, git sha, timestamp) and repro.

The output folder is written atomically (harness.output.atomic_dir), and only where nothing but an earlier
bench-merge report is replaced, with --overwrite (harness.output.check_out). Exit codes: 0 merged, 1 a regression
against --baseline, 2 bad input.
"""

from __future__ import annotations

import csv
import datetime
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness.bench import schema
from harness.bench.shards import SHARED_CASES, parse

_VALUES = ("status", "p50", "p20", "p80")
# summary.json's config -> the bench option it records
_FLAGS = {"cases": "--cases", "providers": "--providers", "filters": "--filter", "rep_ms": "--rep-ms",
          "warmup_ms": "--warmup-ms", "gpu_profile": "--gpu profile"}


@dataclass
class Source:
    path: Path
    order: int          # position on the command line (ties of the duplicate rule)
    summary: dict
    points: dict = field(default_factory=dict)  # point key -> its rows (first row per metric, file order)

    @property
    def shard(self) -> str | None:
        return self.summary.get("shard")


def _refuse(path: Path, why: str) -> ValueError:
    return ValueError(f"bench-merge: {str(path)!r} {why}")


def load(path: Path, order: int) -> Source:
    """One finished bench run, checked."""
    if not path.is_dir():
        raise _refuse(path, "is not a folder" if path.exists() else "does not exist")
    if not (path / "results.csv").is_file():
        raise _refuse(path, "is not a bench run (no results.csv)")
    if (path / ".incomplete").exists():
        raise _refuse(path, "is an unfinished run (.incomplete present): finish it by rerunning its bench "
                            "command with --out on it")
    try:
        summary = json.loads((path / "summary.json").read_text())
        text = (path / "results.csv").read_text()
    except FileNotFoundError:
        raise _refuse(path, "is not a finished bench run (no summary.json)") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _refuse(path, f"cannot be read: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(summary, dict) or "preset" not in summary:
        raise _refuse(path, "has a summary.json that no bench run wrote (no 'preset')")
    if text and not text.endswith("\n"):  # a finished run's CSV ends in a newline: this one was cut or edited
        raise _refuse(path, "has a results.csv whose last line is cut short")
    try:
        reader = csv.DictReader(text.splitlines(keepends=True))
        if list(reader.fieldnames or []) != list(schema.COLUMNS):
            raise _refuse(path, "has a results.csv with other columns than this version of mmlora bench writes")
        rows = list(reader)
    except csv.Error as e:
        raise _refuse(path, f"has a results.csv that is not valid CSV: {' '.join(str(e).split())}") from None
    src = Source(path, order, summary)
    for r in rows:
        mine = src.points.setdefault(schema.row_key(r)[:-1], [])
        if all(x["metric"] != r["metric"] for x in mine):  # the store keeps a key's first row, so do we
            mine.append(r)
    return src


def check(sources: list[Source], allow_mixed: bool) -> None:
    """Refuse runs that are not of one sweep (module docstring)."""
    first = sources[0]

    def same(what: str, get) -> None:
        for s in sources[1:]:
            if get(s) != get(first):
                raise ValueError(f"bench-merge: {str(first.path)!r} and {str(s.path)!r} differ in {what} "
                                 f"({get(first)!r} vs {get(s)!r}): merge the runs of one sweep"
                                 + (" (or pass --allow-mixed)" if what in ("git sha", "GPU") else ""))

    same("preset", lambda s: s.summary.get("preset"))
    configs = [s.summary.get("config") or {} for s in sources]
    for key in dict.fromkeys(k for c in configs for k in c):  # name the first option that differs
        same(_FLAGS.get(key, key), lambda s, key=key: (s.summary.get("config") or {}).get(key))
    same("shard count", lambda s: s.shard and parse(s.shard).count)  # None (unsharded) matches none
    if not allow_mixed:
        same("git sha", lambda s: (s.summary.get("env") or {}).get("git_sha"))
        same("GPU", lambda s: (s.summary.get("env") or {}).get("gpu_name"))


def missing_shards(sources: list[Source]) -> list[str]:
    """Shards I/N not given (no unsharded run is among the sources, or it would cover every point)."""
    if not sources or any(s.shard is None for s in sources):
        return []
    count = parse(sources[0].shard).count
    have = {parse(s.shard).index for s in sources}
    return [f"{i}/{count}" for i in range(1, count + 1) if i not in have]


def _stamp(rows: list[dict]) -> datetime.datetime:
    """The latest timestamp of a point's rows (sweep writes %Y-%m-%dT%H:%M:%S%z); unreadable: the oldest."""
    best = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    for r in rows:
        try:
            v = datetime.datetime.strptime(r.get("timestamp") or "", "%Y-%m-%dT%H:%M:%S%z")
        except ValueError:
            continue
        best = max(best, v)
    return best


def _numbers(rows: list[dict]) -> dict:
    return {r["metric"]: tuple(r.get(k, "") for k in _VALUES) for r in rows}


def _label(key: tuple[str, ...]) -> str:
    params = " ".join(f"{c}={v}" for c, v in zip(schema.PARAM_COLUMNS, key[2:]) if v)
    return f"{key[0]} {key[1]} {params}".strip()


@dataclass
class Merged:
    rows: list[dict] = field(default_factory=list)
    kept: dict = field(default_factory=dict)      # point key -> (Source, its rows), in output order
    identical: int = 0
    shared: int = 0
    conflicts: list[dict] = field(default_factory=list)


def merge(sources: list[Source], case_order: list[str]) -> Merged:
    """Rows of every source, one run's rows per point (the rule in the module docstring)."""
    kept: dict[tuple, tuple[Source, list[dict]]] = {}
    seen: dict[tuple, list[str]] = {}   # point key -> the runs holding it
    conflicting: dict[tuple, None] = {}  # ordered set
    out = Merged()
    for src in sources:
        for key, rows in src.points.items():
            seen.setdefault(key, []).append(str(src.path))
            if key not in kept:
                kept[key] = (src, rows)
                continue
            old_src, old_rows = kept[key]
            if _numbers(rows) == _numbers(old_rows):
                out.identical += 1
                continue
            if (_stamp(rows), src.order) > (_stamp(old_rows), old_src.order):
                kept[key] = (src, rows)
            if key[0] in SHARED_CASES:
                out.shared += 1
            else:
                conflicting[key] = None
    out.conflicts = [{"point": _label(k), "runs": seen[k], "kept": str(kept[k][0].path)} for k in conflicting]
    # cases in the registry's order (copy first, as a sweep writes them), then in the order first seen
    rank = {c: i for i, c in enumerate(case_order)}
    first = {k: i for i, k in enumerate(seen)}
    for key in sorted(kept, key=lambda k: (rank.get(k[0], len(rank)), first[k])):
        out.rows += kept[key][1]
        out.kept[key] = kept[key]
    return out


def _copy_gbps(src: Source) -> float | None:
    vals = []
    for key, rows in src.points.items():
        for r in rows:
            if key[0] == "copy" and r["metric"] == "gbps" and r["status"] == "ok":
                try:
                    vals.append(float(r["p50"]))
                except ValueError:
                    pass
    return max(vals) if vals else None


def _sources_html(sources: list[Source], merged: Merged, missing: list[str]) -> str:
    from harness.output import esc

    used = Counter(id(s) for s, _ in merged.kept.values())

    def gbps(s):
        v = _copy_gbps(s)
        return "" if v is None else f"{v:.4g}"

    head = "".join(f"<th class=l>{h}</th>" for h in ("run", "shard", "git", "GPU", "points", "kept", "copy GB/s"))
    body = "".join(
        f"<tr><td class='l'>{esc(s.path)}</td><td class='l'>{esc(s.shard or '')}</td>"
        f"<td class='l'>{esc((s.summary.get('env') or {}).get('git_sha', ''))}</td>"
        f"<td class='l'>{esc((s.summary.get('env') or {}).get('gpu_name', ''))}</td>"
        f"<td>{len(s.points)}</td><td>{used.get(id(s), 0)}</td><td>{gbps(s)}</td></tr>" for s in sources)
    parts = [f"<h2>Merged runs</h2><p>{len(sources)} runs; duplicate points: {merged.identical} identical, "
             f"{merged.shared} shared ({esc(', '.join(SHARED_CASES))}: run by every shard, each shard's kernel "
             f"rows held against its own), {len(merged.conflicts)} conflicting (kept: the later timestamp)"
             + (f"; <b class='fail'>missing shards: {esc(', '.join(missing))}</b>" if missing else "")
             + f"</p><table><tr>{head}</tr>{body}</table>"]
    if merged.conflicts:
        rows = "".join(f"<tr><td class='l'>{esc(c['point'])}</td><td class='l'>{esc(c['kept'])}</td>"
                       f"<td class='l'>{esc(', '.join(c['runs']))}</td></tr>" for c in merged.conflicts)
        parts.append("<details><summary>Conflicting duplicates (the same point measured in several runs with "
                     "other numbers; the later is kept)</summary><table><tr><th class=l>point</th>"
                     f"<th class=l>kept from</th><th class=l>runs</th></tr>{rows}</table></details>")
    return "".join(parts)


def _log(msg: str) -> None:
    import sys

    print(f"bench-merge: {msg}", file=sys.stderr, flush=True)


def cmd_merge(args) -> int:
    import runtime  # noqa: F401 - sets TRITON_INTERPRET before the case registry imports triton (CPU machines)
    from harness.bench import baseline as bl
    from harness.bench.catalog import all_cases
    from harness.bench.report import render_html
    from harness.bench.store import Store
    from harness.output import atomic_dir, check_out, write_json

    out = Path(args.out)
    paths = [Path(p) for p in args.runs]
    for p in paths:  # atomic_dir replaces OUT whole: a run inside it would be deleted
        if p.resolve() == out.resolve() or out.resolve() in p.resolve().parents:
            raise ValueError(f"bench-merge: --out {str(out)!r} holds the run {str(p)!r}; choose another --out")
    check_out(out, "bench-merge", args.overwrite)
    base_rows = bl.load(args.baseline) if args.baseline else None
    sources = [load(p, i) for i, p in enumerate(paths)]
    check(sources, args.allow_mixed)
    missing = missing_shards(sources)
    if missing and not args.partial:
        raise ValueError(f"bench-merge: shard {', '.join(missing)} not given: its points would be missing "
                         f"(pass --partial to merge without it)")

    cases = all_cases()
    merged = merge(sources, list(cases))
    if missing:
        _log(f"shard {', '.join(missing)} not given (--partial): its points are missing from the merge")
    if merged.conflicts:
        c = merged.conflicts[0]
        _log(f"{len(merged.conflicts)} points measured in several runs with other numbers; kept the later "
             f"(e.g. {c['point']} from {c['kept']}); all are listed in summary.json")

    comps = bl.compare(merged.rows, base_rows) if base_rows is not None else None
    first = sources[0].summary
    meta = {"merged": f"{len(sources)} runs", "preset": first.get("preset"),
            "shards": ", ".join(sorted({s.shard for s in sources if s.shard})) or "none",
            "conflicts": len(merged.conflicts), "GPUs": ", ".join(sorted({r["gpu_name"] for r in merged.rows}))}
    html = render_html(merged.rows, cases, meta, comps, args.baseline, extra=_sources_html(sources, merged, missing))
    summary = {
        "preset": first.get("preset"), "config": first.get("config"), "shard": None,
        "merged_from": [{"dir": str(s.path), "shard": s.shard, "points": len(s.points),
                         "kept_points": sum(v is s for v, _ in merged.kept.values()),
                         "copy_gbps": _copy_gbps(s), "env": s.summary.get("env")} for s in sources],
        "missing_shards": missing, "points": len(merged.kept), "rows": len(merged.rows),
        "status": dict(Counter(rows[0]["status"] for _, rows in merged.kept.values())),
        "duplicates": {"identical": merged.identical, "shared": merged.shared, "conflicting": len(merged.conflicts)},
        "conflicts": merged.conflicts, "baseline": args.baseline,
        "regressions": sum(c.regression for c in comps) if comps is not None else None,
    }
    with atomic_dir(out, "bench-merge", args.overwrite) as tmp:
        (tmp / "results.csv").write_bytes(Store._encode(merged.rows, header=True))
        (tmp / "index.html").write_text(html)
        write_json(tmp / "summary.json", summary)
    _log(f"{len(merged.rows)} rows of {len(merged.kept)} points from {len(sources)} runs in {out / 'results.csv'}; "
         f"report {out / 'index.html'}")
    if comps is not None:
        print(bl.format_table(comps, args.baseline))
        return 1 if any(c.regression for c in comps) else 0
    return 0


def register(sub) -> None:
    m = sub.add_parser("bench-merge", help="join the run folders of one sweep (e.g. its --shard runs) into one "
                                           "results.csv + index.html + summary.json")
    m.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished bench run folders (e.g. --shard 1/3 .. 3/3)")
    m.add_argument("--out", required=True, help="merged report folder, written atomically: only when absent, "
                   "empty, or an earlier bench-merge report (with --overwrite); anything else is refused and left "
                   "as it is")
    m.add_argument("--overwrite", action="store_true", help="replace an earlier bench-merge report at --out")
    m.add_argument("--partial", action="store_true", help="merge even when a shard I/N is missing (listed)")
    m.add_argument("--allow-mixed", action="store_true",
                   help="merge runs of different git commits or GPUs (each row keeps its own environment columns)")
    m.add_argument("--baseline", help="results.csv to compare the merged rows against: exit 1 when a p50 latency "
                                      "is > 5%% slower")
    m.set_defaults(func=cmd_merge)
