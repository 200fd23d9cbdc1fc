"""`mmlora bench-merge RUN_DIR... --out OUT`: join bench run folders (the shards of one sweep, or a shard
and its rerun) into one results.csv, index.html and summary.json.

Sources. Each folder must be a bench run: results.csv with exactly the bench columns plus summary.json (a
finished run) or `.incomplete` (an unfinished one). An unfinished run is refused unless --force; forced,
only its whole points are taken (a torn last line drops its point, as a resume would). Runs of different
presets are refused (the merged summary has one preset). Sources are only read, never repaired.

Duplicates are resolved per point (case, provider, parameters), never per row, so a point's metric rows
always come from one run and stay consistent with each other:
- the same status and numbers for every metric (a folder given twice): one kept, nothing reported;
- a shared case (`copy`, which every shard runs: see harness.bench.shards): the later one is kept (rule
  below) and counted as shared, not as a conflict; summary.json lists each source's copy GB/s, the
  yardstick its own kernel rows were held against;
- otherwise a conflict: the point from the run whose rows carry the later timestamp is kept (a tie goes to
  the folder named later on the command line, e.g. a rerun given after the shard it redoes); each conflict
  is one line on stderr and is listed in summary.json and index.html. Conflicts do not change the exit
  code: both figures were measured, the report says which one it shows.
Rows are copied as they are, so each keeps its own environment columns (GPU, driver, versions, git sha,
timestamp) and repro command.

The output folder is written atomically (harness.output.atomic_dir): a refused or interrupted merge leaves
nothing. Exit codes: 0 merged, 1 a regression against --baseline, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness.bench import schema
from harness.bench.shards import SHARED_CASES

_VALUES = ("status", "p50", "p20", "p80")


@dataclass
class Source:
    path: Path
    order: int                  # position on the command line (ties of the duplicate rule)
    summary: dict | None        # None for a forced unfinished run
    points: dict = field(default_factory=dict)  # point key -> rows (file order, first row per metric)
    shard: str | None = None    # "I/N" from summary.json, or from the rows' repro (an unfinished run)
    preset: str | None = None

    @property
    def unfinished(self) -> bool:
        return self.summary is None


def _from_repro(rows: list[dict], flag: str) -> str | None:
    """A flag's value in the rows' repro commands (the sweep writes --preset, and --shard when sharded)."""
    for r in rows[:1]:
        try:
            argv = shlex.split(r.get("repro") or "")
        except ValueError:
            return None
        return argv[argv.index(flag) + 1] if flag in argv[:-1] else None
    return None


def _refuse(path: Path, why: str) -> ValueError:
    return ValueError(f"bench-merge: {str(path)!r} {why}")


def _read_csv(path: Path, csv_path: Path, torn_ok: bool) -> list[dict]:
    try:
        text = csv_path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise _refuse(path, f"has a results.csv that cannot be read: {' '.join(str(e).split())}") from None
    torn = bool(text) and not text.endswith("\n")
    if torn and not torn_ok:  # a finished run's CSV always ends in a newline: this one was cut or edited
        raise _refuse(path, "has a results.csv whose last line is cut short")
    if torn:
        text = text[: text.rfind("\n") + 1]
    try:
        reader = csv.DictReader(io.StringIO(text))
        header = list(reader.fieldnames or [])
        if header != list(schema.COLUMNS):
            missing = [c for c in schema.COLUMNS if c not in header]
            extra = [c for c in header if c not in schema.COLUMNS]
            what = (f"lacks column {missing[0]!r}" if missing else f"has the extra column {extra[0]!r}" if extra
                    else "has the bench columns in another order")
            raise _refuse(path, f"results.csv {what}: not written by this version of mmlora bench")
        rows = list(reader)
    except csv.Error as e:
        raise _refuse(path, f"has a results.csv that is not valid CSV: {' '.join(str(e).split())}") from None
    if torn and rows:  # the point being written when the run died is incomplete: drop it
        last = schema.row_key(rows[-1])[:-1]
        rows = [r for r in rows if schema.row_key(r)[:-1] != last]
    return rows


def load(path: Path, order: int, force: bool) -> Source:
    """One source folder, checked: a bench run, finished (or forced), with the bench columns."""
    if not path.is_dir():
        raise _refuse(path, "is not a folder" if path.exists() else "does not exist")
    csv_path = path / "results.csv"
    if not csv_path.is_file():
        raise _refuse(path, "is not a bench run (no results.csv)")
    unfinished = (path / ".incomplete").exists()
    summary = None
    if unfinished and not force:
        raise _refuse(path, "is an unfinished run (.incomplete present): finish it (rerun its bench command "
                            "with --out on it) or pass --force to merge its finished points")
    if not unfinished:
        try:
            summary = json.loads((path / "summary.json").read_text())
        except FileNotFoundError:
            raise _refuse(path, "is not a finished bench run (results.csv without summary.json or "
                                ".incomplete)") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise _refuse(path, f"has a summary.json that cannot be read: {' '.join(str(e).split())[:200]}") \
                from None
        if not isinstance(summary, dict) or "preset" not in summary:
            raise _refuse(path, "has a summary.json that no bench run wrote (no 'preset')")
    rows = _read_csv(path, csv_path, torn_ok=unfinished)
    if summary is not None:
        shard, preset = summary.get("shard"), summary["preset"]
    else:  # an unfinished run has no summary yet; its rows' repro commands say how it was run
        shard, preset = _from_repro(rows, "--shard"), _from_repro(rows, "--preset")
    src = Source(path, order, summary, shard=shard, preset=preset)
    for r in rows:
        mine = src.points.setdefault(schema.row_key(r)[:-1], [])
        if all(x["metric"] != r["metric"] for x in mine):  # the store keeps the first row of a key, so do we
            mine.append(r)
    return src


def _stamp(rows: list[dict]) -> datetime.datetime:
    """The latest timestamp of a point's rows (sweep writes %Y-%m-%dT%H:%M:%S%z); unreadable: the oldest."""
    best = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    for r in rows:
        t = r.get("timestamp") or ""
        for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"):
            try:
                v = datetime.datetime.strptime(t, fmt)
            except ValueError:
                continue
            best = max(best, v if v.tzinfo else v.replace(tzinfo=datetime.timezone.utc))
            break
    return best


def _numbers(rows: list[dict]) -> dict:
    return {r["metric"]: tuple(r.get(k, "") for k in _VALUES) for r in rows}


def _label(key: tuple[str, ...]) -> str:
    params = " ".join(f"{c}={v}" for c, v in zip(schema.PARAM_COLUMNS, key[2:]) if v)
    return f"{key[0]} {key[1]} {params}".strip()


@dataclass
class Merged:
    rows: list[dict]
    kept: dict                                  # point key -> (Source, its rows), in output order
    identical: int = 0
    shared: int = 0
    conflicts: list[dict] = field(default_factory=list)


def merge(sources: list[Source], case_order: list[str]) -> Merged:
    """Rows of every source, one point each (the rule in the module docstring)."""
    kept: dict[tuple, tuple[Source, list[dict]]] = {}
    first_seen: dict[tuple, int] = {}
    out = Merged([], {})
    conflicts: dict[tuple, dict] = {}
    for src in sources:
        for key, rows in src.points.items():
            first_seen.setdefault(key, len(first_seen))
            if key not in kept:
                kept[key] = (src, rows)
                continue
            old_src, old_rows = kept[key]
            if _numbers(rows) == _numbers(old_rows):
                out.identical += 1
                continue
            newer = (_stamp(rows), src.order) > (_stamp(old_rows), old_src.order)
            if newer:
                kept[key] = (src, rows)
            if key[0] in SHARED_CASES:
                out.shared += 1
                continue
            c = conflicts.setdefault(key, {"point": _label(key), "runs": [str(old_src.path)]})
            c["runs"].append(str(src.path))
    for key, c in conflicts.items():
        src, rows = kept[key]
        lat = next((r for r in rows if r["metric"] == "latency_ms"), rows[0])
        c.update(kept=str(src.path), kept_timestamp=lat.get("timestamp", ""), kept_status=lat.get("status", ""),
                 kept_p50_ms=lat.get("p50", "") if lat["metric"] == "latency_ms" else "")
        out.conflicts.append(c)
    # cases in the registry's order (copy first, as a sweep writes them), then each point where it first appeared
    rank = {c: i for i, c in enumerate(case_order)}
    for key in sorted(kept, key=lambda k: (rank.get(k[0], len(rank)), first_seen[k])):
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


def _missing_shards(sources: list[Source]) -> list[str]:
    """Shards I/N not given, for each N among the sources' shards; none when an unsharded run is given (it
    covers every point). A forced unfinished run counts as given: its missing points are its own warning."""
    if any(s.shard is None for s in sources):
        return []
    given: dict[int, set[int]] = {}
    for s in sources:
        m = re.fullmatch(r"([0-9]+)/([0-9]+)", s.shard or "")
        if m:
            given.setdefault(int(m[2]), set()).add(int(m[1]))
    return [f"{i}/{n}" for n, have in sorted(given.items()) for i in range(1, n + 1) if i not in have]


def _sources_html(sources: list[Source], merged: Merged, missing: list[str]) -> str:
    from harness.output import esc

    used = Counter(id(s) for s, _ in merged.kept.values())
    head = "".join(f"<th class=l>{h}</th>" for h in ("run", "shard", "state", "points", "kept", "copy GB/s", "GPUs"))
    body = "".join(
        f"<tr><td class='l'>{esc(s.path)}</td><td class='l'>{esc(s.shard or '')}</td>"
        f"<td class='l'>{'unfinished (forced)' if s.unfinished else 'finished'}</td><td>{len(s.points)}</td>"
        f"<td>{used.get(id(s), 0)}</td><td>{'' if _copy_gbps(s) is None else f'{_copy_gbps(s):.4g}'}</td>"
        f"<td class='l'>{esc(', '.join(sorted({r['gpu_name'] for rs in s.points.values() for r in rs})))}</td></tr>"
        for s in sources)
    parts = [f"<h2>Merged runs</h2><p>{len(sources)} runs; duplicates: {merged.identical} identical, "
             f"{merged.shared} shared ({', '.join(SHARED_CASES)}: run by every shard, each shard's kernel rows "
             f"held against its own copy), {len(merged.conflicts)} conflicting (kept: the later timestamp)"
             + (f"; <b class='fail'>missing shards: {esc(', '.join(missing))}</b>" if missing else "")
             + f"</p><table><tr>{head}</tr>{body}</table>"]
    if merged.conflicts:
        rows = "".join(f"<tr class='bad'><td class='l'>{esc(c['point'])}</td><td class='l'>{esc(c['kept'])}</td>"
                       f"<td class='l'>{esc(c['kept_timestamp'])}</td><td class='l'>{esc(', '.join(c['runs']))}</td></tr>"
                       for c in merged.conflicts)
        parts.append("<h2>Conflicting duplicates</h2><p>the same point measured in several runs with other "
                     "numbers; the run with the later timestamp is kept</p><table><tr><th class=l>point</th>"
                     f"<th class=l>kept from</th><th class=l>timestamp</th><th class=l>runs</th></tr>{rows}</table>")
    return "".join(parts)


def _log(msg: str) -> None:
    import sys

    print(f"bench-merge: {msg}", file=sys.stderr, flush=True)


def _check_out(out: Path, sources: list[Path]) -> None:
    o = out.resolve()
    for s in sources:
        r = s.resolve()
        if r == o or o in r.parents:  # atomic_dir replaces OUT whole: a source inside it would be deleted
            raise ValueError(f"bench-merge: --out {str(out)!r} holds the run {str(s)!r} it merges; "
                             f"choose another --out")


def cmd_merge(args) -> int:
    import runtime  # noqa: F401 - sets TRITON_INTERPRET before the case registry imports triton (CPU machines)
    from harness.bench import baseline as bl
    from harness.bench.cases import all_cases
    from harness.bench.report import render_html
    from harness.bench.store import Store
    from harness.output import atomic_dir, check_replaceable, write_json

    out = Path(args.out)
    paths = [Path(p) for p in args.runs]
    _check_out(out, paths)
    check_replaceable(out, "summary.json")
    base_rows = bl.load(args.baseline) if args.baseline else None
    sources = [load(p, i, args.force) for i, p in enumerate(paths)]
    presets = {s.preset: s.path for s in sources if s.preset}
    if len(presets) > 1:
        (a, pa), (b, pb) = list(presets.items())[:2]
        raise ValueError(f"bench-merge: {str(pb)!r} is a --preset {b} run and {str(pa)!r} a --preset {a} run: "
                         f"merge the runs of one preset")

    cases = all_cases()
    merged = merge(sources, list(cases))
    missing = _missing_shards(sources)
    for s in sources:
        if s.unfinished:
            _log(f"{s.path} is unfinished (forced): {len(s.points)} finished points taken")
    if missing:
        _log(f"shard {', '.join(missing)} not given: its points are missing from the merge")
    for c in merged.conflicts:
        _log(f"conflict: {c['point']} measured in {len(c['runs'])} runs with other numbers; kept {c['kept']} "
             f"({c['kept_timestamp']})")

    comps = bl.compare(merged.rows, base_rows) if base_rows is not None else None
    preset = next(iter(presets), None)
    sharded = sorted({s.shard for s in sources if s.shard}, key=lambda t: [int(x) for x in t.split("/")][::-1])
    meta = {"merged": f"{len(sources)} runs", "preset": preset or "unknown",
            "shards": ", ".join(sharded) or "none", "conflicts": len(merged.conflicts),
            "GPUs": ", ".join(sorted({r["gpu_name"] for r in merged.rows}))}
    html = render_html(merged.rows, cases, meta, comps, args.baseline,
                       extra=_sources_html(sources, merged, missing))
    summary = {
        "preset": preset,
        "merged_from": [{"dir": str(s.path), "shard": s.shard, "unfinished": s.unfinished, "points": len(s.points),
                         "kept_points": sum(v is s for v, _ in merged.kept.values()),
                         "copy_gbps": _copy_gbps(s), "env": (s.summary or {}).get("env")} for s in sources],
        "missing_shards": missing,
        "points": len(merged.kept), "rows": len(merged.rows),
        "status": dict(Counter(rows[0]["status"] for _, rows in merged.kept.values())),
        "duplicates": {"identical": merged.identical, "shared": merged.shared, "conflicting": len(merged.conflicts)},
        "conflicts": merged.conflicts,
        "baseline": args.baseline,
        "regressions": sum(c.regression for c in comps) if comps is not None else None,
    }
    with atomic_dir(out, marker="summary.json") as tmp:
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
    m = sub.add_parser("bench-merge", help="join bench run folders (e.g. the shards of one sweep) into one "
                                           "results.csv + index.html + summary.json")
    m.add_argument("runs", nargs="+", metavar="RUN_DIR", help="bench run folders (e.g. those of --shard 1/3 .. 3/3)")
    m.add_argument("--out", required=True, help="merged report folder (replaced whole, atomically)")
    m.add_argument("--force", action="store_true",
                   help="merge unfinished runs (.incomplete present) too: their finished points")
    m.add_argument("--baseline", help="results.csv to compare the merged rows against: exit 1 when a p50 latency "
                                      "is > 5%% slower")
    m.set_defaults(func=cmd_merge)
