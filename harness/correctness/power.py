"""`mmlora faults --power`: what the verdict can see, measured. Every fault and negative control of the
catalog x dtype x adapter scale x each arch it applies to: caught (the run fails), the right module named
(the fault's own mode), and the margin (error over bound at that module: > 1 caught, how close otherwise).
One prepared reference (reference + truth runs) serves every fault of an (arch, dtype, scale). Each row is
printed as it is measured; a run on which the harness itself raises becomes a `HARNESS ERROR` row (exit 1,
every other figure kept), and Ctrl-C (SIGTERM) writes the rows measured so far, marked partial (exit 130, 143).

Writes OUT/power.csv (one row per fault x arch x dtype x scale) and OUT/power.md (the table docs/verdict.md shows).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from harness.flags import check_finite
from harness.output import atomic_dir, check_out, default_run_dir, one_line, write_csv
from harness.signals import exit_code

COLUMNS = ["fault", "kind", "arch", "dtype", "adapter_scale", "mode", "caught", "named", "passed", "margin",
           "expected", "first", "request", "row", "image", "seconds", "reason"]


def _reason(v: dict, dtype: str) -> str:
    if v["control"]:
        return "" if v["passed"] else "FALSE ALARM: a legitimate variation failed"
    if not v["caught"]:
        return (f"not seen: the error reached {v['margin']:.2f} of the bound the reference's own {dtype} error "
                f"sets at {v['expected_first']}")
    if not v["named"]:
        return (f"caught first at {v['first']} (the fault is spread over the group; at {v['expected_first']} it reached "
                f"{v['margin']:.2f} of the bound)")
    return ""


def _plan(args):
    from harness.correctness.faults import FAULTS, get_fault
    from harness.provider_flags import check_provider
    from vlm.arch import get_arch
    from vlm.checkpoint import check_device, parse_dtype

    faults = [get_fault(f) for f in args.fault] if args.fault else list(FAULTS.values())
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    device = check_device(args.device)
    for d in dtypes:
        # the provider refuses what it cannot run (vLLM missing, its dtypes) now, not as an error row per run
        check_provider(args.kernel, parse_dtype(d), device)
    try:
        scales = [float(x) for x in args.adapter_scale.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--adapter-scale {args.adapter_scale!r}: expected numbers separated by ','") from None
    for s in scales:
        check_finite("--adapter-scale", s)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"--adapter-scale {args.adapter_scale!r}: every scale must be > 0")
    for a in args.arch or ():
        get_arch(a)
    archs = sorted({a for f in faults for a in f.archs() if not args.arch or a in args.arch})
    if not archs:
        raise ValueError(f"no fault of {[f.name for f in faults]} applies to --arch {args.arch}")
    return faults, dtypes, scales, archs


def _row(f, arch: str, dtype: str, scale: float, v: dict | None, seconds: float, error: str = "") -> dict:
    row = {"fault": f.name, "kind": "control" if f.control else "fault", "arch": arch, "dtype": dtype,
           "adapter_scale": scale, "mode": f.mode, "seconds": round(seconds, 1)}
    if v is None:  # the harness itself failed on this run: a row saying so, not a lost table
        return {**row, "caught": "", "named": "", "passed": "", "margin": float("nan"), "expected": "",
                "first": "", "request": "", "row": "", "image": "", "reason": f"HARNESS ERROR: {error}"}
    return {**row, "caught": v.get("caught", ""), "named": v.get("named", ""), "passed": v.get("passed", ""),
            "margin": v["margin"], "expected": v["expected_first"] or "", "first": v["first"] or "",
            "request": v["request"], "row": v["row"], "image": v["image"], "reason": _reason(v, dtype)}


def _measure(faults, jobs, args, tmp: Path, t0: float):
    """Yields each row as it is measured. A harness exception on one run becomes that run's row (the
    table keeps every other figure); the caller keeps what was yielded if the user interrupts."""
    from harness.correctness.engine import Options, judge, prepare

    for k, (arch, dtype, scale) in enumerate(jobs, 1):
        print(f"[{k}/{len(jobs)}] {arch} {dtype} adapter scale {scale} ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        opts = Options(archs=[arch], dtype=dtype, adapter_scale=scale, device=args.device, kernel=args.kernel)
        mine = [f for f in faults if f.applies_to(arch)]
        t1 = time.time()
        try:
            prepared = prepare(arch, opts, tmp / f"{arch}-{dtype}-{scale}")
        except Exception as e:  # noqa: BLE001 - reported in the table, every other job still runs
            for f in mine:
                yield _row(f, arch, dtype, scale, None, time.time() - t1, f"preparing the reference: {one_line(e)}")
            continue
        for f in mine:
            t1 = time.time()
            try:
                # a fault is judged in the mode it is localised in; a control in both (no false alarm anywhere)
                res = judge(prepared, dataclasses.replace(opts, modes=(f.mode,) if not f.control else
                                                          ("e2e", "replay"), fault=f.name), f)
                row = _row(f, arch, dtype, scale, res.summary["fault"], time.time() - t1)
            except Exception as e:  # noqa: BLE001 - reported in the table, every other run still runs
                row = _row(f, arch, dtype, scale, None, time.time() - t1, one_line(e))
            verdict = row["reason"] or ("passed" if row["kind"] == "control" else "caught and named")
            print(f"  {f.name} {arch} {dtype} scale {scale}: margin {row['margin']:.3g}, {verdict} "
                  f"({row['seconds']} s)", file=sys.stderr, flush=True)
            yield row


def cmd_power(args) -> int:
    faults, dtypes, scales, archs = _plan(args)
    out = Path(args.out) if args.out else default_run_dir("power")
    check_out(out, "power", args.overwrite)
    rows: list[dict] = []
    jobs = [(a, d, s) for d in dtypes for s in scales for a in archs]
    planned = sum(f.applies_to(a) for a, _, _ in jobs for f in faults)
    t0 = time.time()
    interrupted = None
    with tempfile.TemporaryDirectory(prefix="mmlora-power-") as tmp:
        try:
            for row in _measure(faults, jobs, args, Path(tmp), t0):
                rows.append(row)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the rows measured so far are written, marked partial
            interrupted = e
    head = f"Partial: interrupted after {len(rows)} of {planned} runs.\n\n" if interrupted is not None else ""
    with atomic_dir(out, "power", args.overwrite) as tmp_out:
        write_csv(tmp_out / "power.csv", rows, COLUMNS)
        (tmp_out / "power.md").write_text(head + table(rows, dtypes, scales))
    print(head + table(rows, dtypes, scales))
    alarms = [r for r in rows if r["kind"] == "control" and r["passed"] is False]
    errors = [r for r in rows if r["reason"].startswith("HARNESS ERROR")]
    print(f"mmlora faults --power: {len(rows)} of {planned} runs in {time.time() - t0:.0f} s; table in "
          f"{out / 'power.md'}", file=sys.stderr)
    for r in errors:
        print(f"  {r['fault']} {r['arch']} {r['dtype']}: {r['reason']}", file=sys.stderr)
    if interrupted is not None:
        return exit_code(interrupted)
    return 1 if alarms or errors else 0


def table(rows: list[dict], dtypes: list[str], scales: list[float]) -> str:
    """Markdown: one line per fault, one column per (dtype, scale): caught/named over the archs it ran on,
    and the smallest margin at the named module (for a control: passed, and its largest margin)."""
    cols = [(d, s) for d in dtypes for s in scales]
    head = "| fault | kind | " + " | ".join(f"{d}, scale {s:g}" for d, s in cols) + " |"
    lines = [head, "|" + "---|" * (2 + len(cols))]
    for name in dict.fromkeys(r["fault"] for r in rows):
        mine = [r for r in rows if r["fault"] == name]
        cells = []
        for d, s in cols:
            every = [r for r in mine if r["dtype"] == d and r["adapter_scale"] == s]
            sel = [r for r in every if not r["reason"].startswith("HARNESS ERROR")]
            errors = f", HARNESS ERROR {len(every) - len(sel)}/{len(every)}" if len(sel) < len(every) else ""
            if not sel:
                cells.append(errors.removeprefix(", ") or "-")
            elif sel[0]["kind"] == "control":
                ok = sum(bool(r["passed"]) for r in sel)
                cells.append(f"passed {ok}/{len(sel)}, max margin {max(r['margin'] for r in sel):.2g}{errors}")
            else:
                caught = sum(bool(r["caught"]) for r in sel)
                named = sum(bool(r["named"]) for r in sel)
                cells.append(f"caught {caught}/{len(sel)}, named {named}/{len(sel)}, "
                             f"min margin {min(r['margin'] for r in sel):.2g}{errors}")
        lines.append(f"| `{name}` | {mine[0]['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
