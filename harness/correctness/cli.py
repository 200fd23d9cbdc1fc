"""`mmlora correctness` and `mmlora faults`: writes layers.csv, summary.json, index.html."""

from __future__ import annotations

import sys
from pathlib import Path

from harness.correctness.compare import CSV_COLUMNS
from harness.output import atomic_dir, check_replaceable, default_run_dir, write_csv, write_json


def _parse_adapter(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"--adapter {item!r}: expected NAME=ADAPTER_DIR")
    name, folder = item.split("=", 1)
    if not name:
        raise ValueError(f"--adapter {item!r}: empty adapter name")
    return name, folder


def _options(args):
    """Validate every flag before any work (exit 2 on bad input) and build the engine's Options."""
    from harness.correctness import MODES, Options
    from harness.correctness.engine import check_fault
    from harness.correctness.faults import get_fault
    from vlm.arch import REGISTRY, get_arch
    from vlm.checkpoint import check_device, parse_dtype, read_checkpoint_config

    parse_dtype(args.dtype)
    check_device(args.device)
    fault = get_fault(args.inject_fault) if args.inject_fault else None
    if args.model == "tiny":
        # a fault alone runs every arch it applies to; with --arch, each named arch must be one of them
        archs = args.arch or (fault.archs() if fault is not None else sorted(REGISTRY))
        for a in archs:
            get_arch(a)
            check_fault(fault, a)
    else:
        arch, _ = read_checkpoint_config(args.model)
        if args.arch and args.arch != [arch.model_type]:
            raise ValueError(f"--arch {args.arch} disagrees with the checkpoint's model_type {arch.model_type!r}")
        archs = [arch.model_type]
        check_fault(fault, arch.model_type)
    adapters = dict(_parse_adapter(a) for a in args.adapter or [])
    for name, folder in adapters.items():
        if not Path(folder).is_dir():
            raise ValueError(f"--adapter {name}={folder}: folder does not exist")
    if args.adapters < 0:
        raise ValueError(f"--adapters {args.adapters}: must be >= 0")
    modes = MODES if args.mode == "both" else (args.mode,)
    if fault is not None and fault.mode not in modes:
        # a fault is only localised in its own mode: running without it would report "ok" for a broken runtime
        raise ValueError(f"--inject-fault {fault.name} is localised in {fault.mode} mode, which --mode "
                         f"{args.mode} does not run")
    if args.quantize_projector and not args.quantize:
        raise ValueError("--quantize-projector needs --quantize lm-int8")
    return Options(archs=archs, model=args.model, adapters=adapters, n_adapters=args.adapters, dtype=args.dtype,
                   device=args.device, modes=modes, fault=args.inject_fault, kernel=args.kernel,
                   quantize=args.quantize, quantize_projector=args.quantize_projector)


def _write_report(out: Path, results, opts, ok: bool) -> dict:
    from harness.correctness.report import render_html

    with atomic_dir(out) as tmp:
        write_csv(tmp / "layers.csv", [row.as_dict() for r in results for row in r.rows], CSV_COLUMNS)
        summary = {"ok": ok, "exit_code": 0 if ok else 1, "options": {
            "archs": list(opts.archs), "model": opts.model, "dtype": opts.dtype, "device": opts.device,
            "modes": list(opts.modes), "adapters": opts.adapters or opts.n_adapters, "fault": opts.fault,
            "kernel": opts.kernel, "quantize": opts.quantize, "quantize_projector": opts.quantize_projector},
            "archs": {r.arch: r.summary for r in results}}
        write_json(tmp / "summary.json", summary)
        (tmp / "index.html").write_text(render_html(results, summary))
    return summary


def _print_verdict(out: Path, results, opts, ok: bool) -> None:
    if opts.quantize:
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
        for mode, d in r.summary.get("first_divergence", {}).items():
            if d:
                print(f"  {r.arch} [{mode}] first divergence: {d['module']} ({d['group']}, request {d['request']}, "
                      f"{d['status']}, max_abs={d['max_abs']:.3g})", file=sys.stderr)


def cmd_correctness(args) -> int:
    from harness.correctness import run

    opts = _options(args)
    out = Path(args.out) if args.out else default_run_dir("correctness")
    check_replaceable(out, "summary.json")
    if opts.modes == ("replay",):
        print("mmlora correctness: replay checks the LoRA modules only; group boundaries and the substituted "
              "vision kernels need --mode e2e or both", file=sys.stderr)
    results = run(opts)
    ok = all(r.summary["ok"] for r in results)
    _write_report(out, results, opts, ok)
    _print_verdict(out, results, opts, ok)
    return 0 if ok else 1


def cmd_faults(args) -> int:
    from harness.correctness.faults import FAULTS

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
    from runtime.model import PROVIDERS

    c.add_argument("--kernel", default="triton", choices=sorted(PROVIDERS),
                   help="the runtime's LoRA provider: " + ", ".join(sorted(PROVIDERS)))
    c.add_argument("--quantize", choices=["lm-int8"], help="weight-only int8 on the runtime's LM Linears "
                   "(registry skip list honoured); reports drift per group, fails only on a skip violation")
    c.add_argument("--quantize-projector", action="store_true", help="with --quantize: quantize the connector too")
    c.add_argument("--out", help="report folder (default reports/correctness/<timestamp>)")
    c.set_defaults(func=cmd_correctness)
    f = sub.add_parser("faults", help="list the seeded-fault catalog")
    f.set_defaults(func=cmd_faults)
