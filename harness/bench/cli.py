"""`mmlora bench`: sweep a preset, append rows to OUT/results.csv, write OUT/index.html when complete.

Exit codes: 0 done (no regression), 1 a regression against --baseline, 2 bad input (one line on stderr; a bad
--shard before anything is planned or created),
130 interrupted (rerun with the same --out to resume).
"""

from __future__ import annotations

from pathlib import Path

PRESET_CHOICES = ("auto", "smoke", "nightly", "full")


def _csv_list(values) -> list[str] | None:
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


def _preset(args, cuda: bool):
    from harness.bench.presets import PRESETS

    name = args.preset if args.preset != "auto" else ("nightly" if cuda else "smoke")
    if name not in PRESETS:
        raise ValueError(f"unknown --preset {args.preset!r}; expected one of {', '.join(PRESET_CHOICES)}")
    preset = PRESETS[name]
    if preset.needs_cuda and not cuda:
        raise ValueError(f"--preset {name} needs a CUDA GPU and none is available here (use --preset smoke)")
    rep_ms = preset.rep_ms if args.rep_ms is None else args.rep_ms
    warmup_ms = preset.warmup_ms if args.warmup_ms is None else args.warmup_ms
    if rep_ms <= 0 or warmup_ms < 0:
        raise ValueError(f"--rep-ms must be > 0 and --warmup-ms >= 0, got {rep_ms} and {warmup_ms}")
    return name, preset, rep_ms, warmup_ms


def _list(the_plan) -> int:
    from harness.bench import sweep

    for p in the_plan.points:
        extra = f"  [unavailable: {p.unavailable}]" if p.unavailable else ""
        print(f"{p.case:<16} {p.provider:<7} {sweep.schema.describe(p.params)}{extra}")
    for note in the_plan.notes:
        print(f"# {note}")
    return 0


def _finish(args, out, store, name, profile, env, device_name, rep_ms, counts, base_rows, shard, n_points,
            config) -> int:
    from harness.bench import baseline as bl
    from harness.bench import sweep
    from harness.bench.catalog import all_cases
    from harness.bench.report import print_headline, render_html
    from harness.output import write_json

    rows = store.rows()
    comps = bl.compare(rows, base_rows) if base_rows is not None else None
    meta = {"preset": name, "gpu profile": profile.name if profile else "none", "device": device_name or "cpu",
            "rep_ms": rep_ms, "git": env["git_sha"], "torch": env["torch"], "triton": env["triton"]}
    if shard:
        meta["shard"] = str(shard)
    html = render_html(rows, all_cases(), meta, comps, args.baseline)
    summary = {"preset": name, "gpu_profile": profile.name if profile else None, "env": env, "config": config,
               "shard": str(shard) if shard else None, "points": n_points, "rows": len(rows),
               "points_run_now": counts, "baseline": args.baseline,
               "regressions": sum(c.regression for c in comps) if comps is not None else None}
    tmp_json = out / ".summary.json.tmp"
    write_json(tmp_json, summary)
    store.finish({"index.html": html, "summary.json": tmp_json.read_text()})
    tmp_json.unlink()
    sweep.log(f"done: {len(rows)} rows in {store.csv}; report {store.html}")
    print_headline(rows, all_cases())
    if comps is not None:
        print(bl.format_table(comps, args.baseline))
        return 1 if any(c.regression for c in comps) else 0
    return 0


def _shard(args, the_plan):
    """The plan cut down to `--shard`'s points (a note says how many), or the plan itself without it."""
    from harness.bench import shards, sweep

    if args.shard is None:
        return the_plan
    mine = shards.select(the_plan.points, args.shard)
    shared = sorted({p.case for p in mine if p.case in shards.SHARED_CASES})
    note = (f"shard {args.shard}: {len(mine)} of {len(the_plan.points)} planned points"
            + (f" ({', '.join(shared)} runs in every shard)" if shared else ""))
    return sweep.Plan(mine, [*the_plan.notes, note])


def cmd_bench(args) -> int:
    # checked before anything is imported, planned or created: a bad --shard costs nothing
    if args.shard is not None:
        from harness.bench.shards import parse

        args.shard = parse(args.shard)

    import torch

    import runtime  # noqa: F401 - sets TRITON_INTERPRET before anything imports triton (CPU machines)
    from harness.bench import baseline as bl
    from harness.bench import roofline, sweep
    from harness.bench.env import collect
    from harness.bench.store import Store
    from harness.output import MARKER, check_out, default_run_dir, mark

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    device_name = torch.cuda.get_device_name(device) if cuda else None
    profile, warning = roofline.resolve(args.gpu, device_name)
    name, preset, rep_ms, warmup_ms = _preset(args, cuda)
    filters = sweep.parse_filters(args.filter)
    the_plan = _shard(args, sweep.plan(preset, _csv_list(args.cases), _csv_list(args.providers), filters, cuda))
    base_rows = bl.load(args.baseline) if args.baseline else None
    if args.list:
        return _list(the_plan)

    out = Path(args.out) if args.out else default_run_dir("bench")
    check_out(out, "bench", resume=True)  # a bench run folder is resumed; anything else is never written into
    if not (out / MARKER).exists():  # marked before its first row: a run killed at any moment can be resumed
        out.mkdir(parents=True, exist_ok=True)
        mark(out, "bench")
    store = Store(out)
    done = store.open()
    if done:  # resuming: the folder must hold this shard's rows only, or its summary and the merge would lie
        from harness.bench.shards import recorded

        other = recorded(store.rows()) - {str(args.shard) if args.shard else None}
        if other:
            was = next(iter(other))
            raise ValueError(f"--out {str(out)!r} holds rows of {'--shard ' + was if was else 'an unsharded run'}, "
                             f"not of {'--shard ' + str(args.shard) if args.shard else 'an unsharded run'}: "
                             f"use another --out")
    for note in ([warning] if warning else []) + list(dict.fromkeys(the_plan.notes)):
        sweep.log(note)
    sweep.log(f"preset {name} on {device_name or 'cpu'}; results go to {store.csv} "
              f"(rerun with --out {out} to resume)")
    repro_base = ["python", "-m", "harness.cli", "bench", "--preset", name, "--gpu", args.gpu]
    if args.shard is not None:  # records the row's shard; the split is per point, so it selects the row again
        repro_base += ["--shard", str(args.shard)]
    if args.rep_ms is not None:
        repro_base += ["--rep-ms", f"{rep_ms:g}"]
    if args.warmup_ms is not None:
        repro_base += ["--warmup-ms", f"{warmup_ms:g}"]
    env = collect(device)
    ctx = sweep.Context(device, profile, env, rep_ms, warmup_ms, preset.min_reps, repro_base,
                        measures_copy=the_plan.measures_copy)
    ctx.note_copy(store.rows())  # a resumed run keeps the copy bandwidth it already measured
    store.begin()
    try:
        counts = sweep.run(the_plan.points, done, ctx, store.append)
    except KeyboardInterrupt:
        sweep.log(f"interrupted; finished points are in {store.csv}; rerun with --out {out} to resume")
        raise
    # what bench-merge requires equal in every shard of one sweep (the shard index aside)
    config = {"cases": sorted(_csv_list(args.cases) or []) or None,
              "providers": sorted(_csv_list(args.providers) or []) or None, "filters": filters,
              "rep_ms": rep_ms, "warmup_ms": warmup_ms, "gpu_profile": profile.name if profile else None}
    return _finish(args, out, store, name, profile, env, device_name, rep_ms, counts, base_rows, args.shard,
                   len(the_plan.points), config)


def register(sub) -> None:
    from harness.flags import finite_float
    from runtime.providers import PROVIDERS, describe

    b = sub.add_parser("bench", help="kernel and end-to-end timings, GB/s, %% of roofline; results.csv + index.html")
    b.add_argument("--gpu", default="auto", help="roofline profile: h100 | h200 | a100 | auto (detect; none on CPU)")
    b.add_argument("--preset", default="auto",
                   help="smoke (CPU-sized) | nightly | full (GPU only) | auto (nightly with CUDA, else smoke)")
    b.add_argument("--providers", action="append", metavar="P[,P...]",
                   help=f"LoRA providers, a subset of {describe(PROVIDERS)} (default: every provider a case has)")
    b.add_argument("--cases", action="append", metavar="C[,C...]", help="subset of the preset's cases")
    b.add_argument("--filter", action="append", metavar="PARAM=VALUE",
                   help="keep points whose parameter equals VALUE (repeatable; the repro column uses it)")
    b.add_argument("--baseline", help="results.csv to compare against: exit 1 when a p50 latency is > 5%% slower")
    b.add_argument("--out", help="run folder (default reports/bench/<timestamp>); an earlier bench run folder is "
                                 "resumed; a folder holding anything else (user files, another command's report) "
                                 "is refused and left as it is")
    b.add_argument("--rep-ms", type=finite_float, help="timing budget per point in ms (default: the preset's)")
    b.add_argument("--warmup-ms", type=finite_float, help="warmup per point in ms (default: the preset's)")
    b.add_argument("--shard", metavar="I/N",
                   help="run shard I of N, counted from 1: the points whose key hashes to I (copy runs in every "
                        "shard); "
                        "join the shards' folders with bench-merge")
    b.add_argument("--list", action="store_true", help="print the planned points (of --shard) and exit")
    b.set_defaults(func=cmd_bench)

    from harness.bench.merge import register as register_merge

    register_merge(sub)

