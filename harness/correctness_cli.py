"""`mmlora correctness` and `mmlora faults`: writes layers.csv, summary.json, index.html."""

from __future__ import annotations

import sys
from pathlib import Path

from harness.compare import CSV_COLUMNS
from harness.report import (
    PAGE,
    atomic_dir,
    check_replaceable,
    default_run_dir,
    esc,
    png_data_uri,
    write_csv,
    write_json,
)


def _parse_adapter(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"--adapter {item!r}: expected NAME=ADAPTER_DIR")
    name, folder = item.split("=", 1)
    if not name:
        raise ValueError(f"--adapter {item!r}: empty adapter name")
    return name, folder


def cmd_correctness(args) -> int:
    from harness.arch import REGISTRY, get_arch
    from harness.checkpoint import check_device, parse_dtype, read_checkpoint_config
    from harness.correctness import MODES, Options, run
    from harness.faults import get_fault

    parse_dtype(args.dtype)
    check_device(args.device)
    if args.inject_fault:
        get_fault(args.inject_fault)
    if args.model == "tiny":
        archs = args.arch or sorted(REGISTRY)
        for a in archs:
            get_arch(a)
    else:
        arch, _ = read_checkpoint_config(args.model)
        if args.arch and args.arch != [arch.model_type]:
            raise ValueError(f"--arch {args.arch} disagrees with the checkpoint's model_type {arch.model_type!r}")
        archs = [arch.model_type]
    adapters = dict(_parse_adapter(a) for a in args.adapter or [])
    for name, folder in adapters.items():
        if not Path(folder).is_dir():
            raise ValueError(f"--adapter {name}={folder}: folder does not exist")
    if args.adapters < 0:
        raise ValueError(f"--adapters {args.adapters}: must be >= 0")
    modes = MODES if args.mode == "both" else (args.mode,)
    out = Path(args.out) if args.out else default_run_dir("correctness")
    check_replaceable(out, "summary.json")
    if args.inject_fault and get_fault(args.inject_fault).mode not in modes:
        # a fault is only localised in its own mode: running without it would report "ok" for a broken runtime
        raise ValueError(f"--inject-fault {args.inject_fault} is localised in {get_fault(args.inject_fault).mode} "
                         f"mode, which --mode {args.mode} does not run")
    if args.quantize_projector and not args.quantize:
        raise ValueError("--quantize-projector needs --quantize lm-int8")
    opts = Options(archs=archs, model=args.model, adapters=adapters, n_adapters=args.adapters, dtype=args.dtype,
                   device=args.device, modes=modes, fault=args.inject_fault, kernel=args.kernel,
                   quantize=args.quantize, quantize_projector=args.quantize_projector)
    if modes == ("replay",):
        print("mmlora correctness: replay checks the LoRA modules only; group boundaries and the substituted "
              "vision kernels need --mode e2e or both", file=sys.stderr)
    results = run(opts)
    ok = all(r.summary["ok"] for r in results)
    with atomic_dir(out) as tmp:
        write_csv(tmp / "layers.csv", [row.as_dict() for r in results for row in r.rows], CSV_COLUMNS)
        summary = {"ok": ok, "exit_code": 0 if ok else 1, "options": {
            "archs": archs, "model": args.model, "dtype": args.dtype, "device": args.device, "modes": list(modes),
            "adapters": adapters or args.adapters, "fault": args.inject_fault, "kernel": args.kernel,
            "quantize": args.quantize, "quantize_projector": args.quantize_projector},
            "archs": {r.arch: r.summary for r in results}}
        write_json(tmp / "summary.json", summary)
        (tmp / "index.html").write_text(render_html(results, summary))
    if args.quantize:
        verdict = ("quantized run ok: skip list honoured, unquantized groups within tolerance (drift below)" if ok
                   else "QUANTIZED RUN FAILED: a skip-list violation, or an unquantized group / error row")
    else:
        verdict = "all modules within tolerance" if ok else "DIVERGENCE"
    print(f"mmlora correctness: {verdict}; report in {out}", file=sys.stderr)
    for r in results:
        q = r.summary.get("quantization")
        if q:
            drift = ", ".join(f"{k}={v:.3g}" for k, v in sorted(r.summary["max_abs_by_group"].items()))
            print(f"  {r.arch} {q['scheme']}{' +projector' if q['projector_quantized'] else ''}: drift {drift}; "
                  f"skip-list violations: {q['violations'] or 'none'}; failures outside the quantized groups: "
                  f"{q['unexpected_failures']}", file=sys.stderr)
            continue
        fd = r.summary.get("first_divergence", {})
        for mode, d in fd.items():
            if d:
                print(f"  {r.arch} [{mode}] first divergence: {d['module']} ({d['group']}, request {d['request']}, "
                      f"{d['status']}, max_abs={d['max_abs']:.3g})", file=sys.stderr)
    return 0 if ok else 1


def render_html(results, summary) -> str:
    parts = [f"<h1>mmlora correctness: <span class='{'ok' if summary['ok'] else 'fail'}'>"
             f"{'OK' if summary['ok'] else 'DIVERGENCE'}</span></h1>",
             f"<p>options: {esc(summary['options'])}</p>"]
    for r in results:
        s = r.summary
        parts.append(f"<h2>{esc(r.arch)} <span class='{'ok' if s['ok'] else 'fail'}'>{'ok' if s['ok'] else 'diverged'}"
                     f"</span> ({esc(s['seconds'])} s)</h2>")
        for mode, d in s.get("first_divergence", {}).items():
            parts.append(f"<p>{esc(mode)}: first divergence " + (esc(f"{d['module']} ({d['group']}, request "
                         f"{d['request']}, {d['status']}) {d['detail']}") if d else "none") + "</p>")
        if "fault" in s:
            parts.append(f"<p>fault: {esc(s['fault'])}</p>")
        if "quantization" in s:
            q = s["quantization"]
            drift = "".join(f"<tr><td class='l'>{esc(k)}</td><td>{v:.3g}</td></tr>"
                            for k, v in sorted(s["max_abs_by_group"].items()))
            parts.append(f"<p>quantization {esc(q['scheme'])}, projector quantized: {esc(q['projector_quantized'])}, "
                         f"{esc(q['quantized_modules'])} Linear layers; skip-list violations: "
                         f"<b>{esc(q['violations'] or 'none')}</b></p><table><tr><th class='l'>mode/group</th>"
                         f"<th>max abs drift</th></tr>{drift}</table>")
        parts.append(f"<img alt='error by depth' src='{_depth_plot(r)}'>")
        parts.append(_table(r))
    return PAGE.format(title="mmlora correctness", body="\n".join(parts))


def _depth_plot(r) -> str:
    def draw(plt):
        modes = [m for m in ("e2e", "replay") if any(row.mode == m for row in r.rows)] or ["e2e"]
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.2), sharey=True, squeeze=False)
        axes = axes[0]
        for ax, mode in zip(axes, modes):
            by_group: dict = {}
            for row in r.rows:
                if row.mode == mode and row.metrics.max_abs == row.metrics.max_abs:
                    cur = by_group.setdefault(row.group, {})
                    cur[row.order] = max(cur.get(row.order, 0.0), row.metrics.max_abs, 1e-12)
            for g, pts in sorted(by_group.items()):
                xs = sorted(pts)
                ax.semilogy(xs, [pts[x] for x in xs], marker=".", label=g)
            ax.set_title(f"{r.arch} {mode}: max |error| by module depth")
            ax.set_xlabel("module order (reference execution)")
            if by_group:
                ax.legend(fontsize=7)
        axes[0].set_ylabel("max abs error")
        return fig
    return png_data_uri(draw)


def _table(r) -> str:
    first = {m: (d or {}).get("module") for m, d in r.summary.get("first_divergence", {}).items()}
    bad = sorted((x for x in r.rows if not x.metrics.ok), key=lambda x: (x.mode, x.order, x.request))
    top = ""
    if bad:  # the rows a user needs first, before the full table
        top = "<h3>first divergent rows</h3>" + _rows_table(bad[:20], first)
    return top + (f"<details><summary>all {len(r.rows)} rows</summary>"
                  + _rows_table(sorted(r.rows, key=lambda x: (x.mode, x.order, x.request)), first) + "</details>")


def _rows_table(rows, first) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in ("mode", "request", "adapter", "module", "group", "status",
                                                 "max_abs", "max_rel", "mismatch", "cosine", "ref_norm"))
    body = []
    for row in rows:
        m = row.metrics
        cls = "first" if first.get(row.mode) == row.module and not m.ok else ("bad" if not m.ok else "")
        body.append(f"<tr class='{cls}'><td class='l'>{esc(row.mode)}</td><td>{row.request}</td>"
                    f"<td class='l'>{esc(row.adapter)}</td><td class='l'>{esc(row.module)}</td>"
                    f"<td class='l'>{esc(row.group)}</td><td class='l'>{esc(m.status)}</td><td>{m.max_abs:.3g}</td>"
                    f"<td>{m.max_rel:.3g}</td><td>{m.mismatch_frac:.3g}</td><td>{m.cosine:.6f}</td>"
                    f"<td>{m.ref_norm:.3g}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def cmd_faults(args) -> int:
    from harness.faults import FAULTS

    for f in FAULTS.values():
        print(f"{f.name:<28} breaks: {f.breaks}; must name: {f.must_name}")
    return 0


def register(sub) -> None:
    c = sub.add_parser("correctness", help="compare every module of runtime vs HF + PEFT; exit 0 ok, 1 divergence")
    c.add_argument("--arch", action="append", help="architecture (repeatable; default: all registered)")
    c.add_argument("--model", default="tiny", help="'tiny' (built-in random models) or a checkpoint folder")
    c.add_argument("--adapter", action="append", metavar="NAME=ADAPTER_DIR", help="a PEFT-saved adapter (repeatable)")
    c.add_argument("--adapters", type=int, default=3, help="random adapters to make when no --adapter is given")
    c.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16")
    c.add_argument("--device", default="cpu", help="cpu | cuda")
    c.add_argument("--mode", default="both", choices=["e2e", "replay", "both"])
    c.add_argument("--inject-fault", help="a seeded fault from `mmlora faults`")
    c.add_argument("--kernel", default="triton", choices=["triton", "torch"], help="runtime LoRA provider")
    c.add_argument("--quantize", choices=["lm-int8"], help="weight-only int8 on the runtime's LM Linears "
                   "(registry skip list honoured); reports drift per group, fails only on a skip violation")
    c.add_argument("--quantize-projector", action="store_true", help="with --quantize: quantize the connector too")
    c.add_argument("--out", help="report folder (default reports/correctness/<timestamp>)")
    c.set_defaults(func=cmd_correctness)
    f = sub.add_parser("faults", help="list the seeded-fault catalog")
    f.set_defaults(func=cmd_faults)
