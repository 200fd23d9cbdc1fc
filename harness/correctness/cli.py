"""`mmlora correctness` and `mmlora faults`: writes layers.csv, summary.json, index.html."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from harness.correctness.compare import CSV_COLUMNS
from harness.correctness.headline import divergence, print_fault_headlines, run_not_judged, verdict
from harness.flags import finite_float
from harness.geometry_flags import parse_geometry
from harness.output import atomic_dir, check_out, default_run_dir, write_csv, write_json

# generated adapters: each adds a slot to every LoRA module's tables ([slots, r_max, in] + [slots, out, r_max]:
# at LLaVA-7B widths 5 MB per slot and LM layer, 160 MB per adapter) and a single-image request that the
# reference runs alone, the truth again and replay module by module (a tiny model: about a second per adapter
# on a CPU). 32 covers every mix a test of slot mapping needs (the kernels' own tests go to 130 slots) and
# keeps a tiny run to a minute or so; more is a mistyped number, not a test.
MAX_ADAPTERS = 32


def _parse_adapter(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"--adapter {item!r}: expected NAME=ADAPTER_DIR")
    name, folder = item.split("=", 1)
    if not name:
        raise ValueError(f"--adapter {item!r}: empty adapter name")
    return name, folder


def _checkpoint_config(folder: str):
    """The HF config object of a checkpoint folder, read offline (no weights)."""
    from vlm.checkpoint import read_checkpoint_config

    arch, raw = read_checkpoint_config(folder)
    return arch.model_class().config_class.from_dict(raw)


def _check_quantize(args) -> None:
    if args.quantize_projector and not args.quantize:
        raise ValueError("--quantize-projector needs --quantize lm-int8")
    if args.quantize and (args.device_map is not None or args.max_memory is not None):
        # accelerate's hooks reload an offloaded module's weight from its offload map before each forward: the
        # quantized weight would be silently replaced by the original one
        raise ValueError("--quantize cannot be combined with --device-map / --max-memory (an offloaded layer "
                         "would run its original weight, not the quantized one)")


def _device_index(device) -> int | None:
    """The GPU index a device-map value names (0, "cuda:1"), None for cpu / disk / "cuda"."""
    if isinstance(device, int):
        return device
    head, sep, tail = device.partition(":")
    if head == "cuda" and sep:
        return int(tail) if tail.isdigit() else -1
    return None


def check_map_devices(dm, value: str) -> None:
    """A --device-map FILE's devices against this machine (`value`: the flag's text, named in the message)."""
    if not isinstance(dm, dict):
        return  # auto / balanced: accelerate places the model over what there is
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for key, device in dm.items():
        index = _device_index(device)
        if index is None and device not in ("cpu", "disk", "cuda"):
            raise ValueError(f"--device-map {value!r}: {key!r} -> {device!r}: expected a GPU index, 'cuda:N', "
                             f"'cpu' or 'disk'")
        if (device == "cuda" and not count) or (index is not None and not 0 <= index < count):
            raise ValueError(f"--device-map {value!r}: {key!r} -> {device!r}: this machine has "
                             f"{count or 'no'} GPU{'s' if count != 1 else ''}"
                             + (f" (0 to {count - 1})" if count > 1 else ""))


def check_map_keys(dm, value: str, arch, config) -> None:
    """A --device-map FILE's keys against the model's own module names, the nearest one suggested: accelerate
    would refuse an unknown name only after the checkpoint is read, in words of its own."""
    if not isinstance(dm, dict):
        return
    import difflib

    import torch

    with torch.device("meta"):  # module names only: no memory, no weights
        model = arch.model_class()(config)
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    for key in dm:
        if key not in names:
            near = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else " ('' places the whole model)"
            raise ValueError(f"--device-map {value!r}: {key!r} is no module of {arch.model_type}{hint}")


def _options(args):
    """Validate every flag before any work (exit 2 on bad input) and build the engine's Options."""
    from harness.correctness import MODES, Options
    from harness.correctness.engine import check_fault
    from harness.correctness.faults import get_fault
    from harness.provider_flags import check_provider
    from vlm.arch import REGISTRY, get_arch
    from vlm.checkpoint import (
        check_device,
        parse_device_map,
        parse_dtype,
        parse_max_memory,
        read_checkpoint_config,
    )

    # the LoRA provider refuses what it cannot run (vLLM missing, its dtypes) before any work
    check_provider(args.kernel, parse_dtype(args.dtype), check_device(args.device))
    device_map, max_memory = parse_device_map(args.device_map), parse_max_memory(args.max_memory)
    check_map_devices(device_map, args.device_map)
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
    pairs = [_parse_adapter(a) for a in args.adapter or []]
    adapters = dict(pairs)
    if len(adapters) != len(pairs):  # a dict keeps the last: `x=A x=B` would silently run B alone
        twice = next(n for i, (n, _) in enumerate(pairs) if n in (m for m, _ in pairs[:i]))
        raise ValueError(f"--adapter {twice!r} is given twice; each adapter needs its own name")
    for name, folder in adapters.items():
        if not Path(folder).is_dir():
            raise ValueError(f"--adapter {name}={folder}: folder does not exist")
    if not 0 <= args.adapters <= MAX_ADAPTERS:
        raise ValueError(f"--adapters {args.adapters}: must be between 0 and {MAX_ADAPTERS}")
    if not args.adapter_scale > 0:
        raise ValueError(f"--adapter-scale {args.adapter_scale}: must be > 0")
    modes = MODES if args.mode == "both" else (args.mode,)
    if fault is not None and fault.mode not in modes:
        # a fault is only localised in its own mode: running without it would report "ok" for a broken runtime
        raise ValueError(f"--inject-fault {fault.name} is localised in {fault.mode} mode, which --mode "
                         f"{args.mode} does not run")
    geometries = [parse_geometry(g) for g in args.geometry or ()]
    for a in archs:
        arch = get_arch(a)
        if not geometries and not isinstance(device_map, dict):
            break
        config = arch.tiny_config() if args.model == "tiny" else _checkpoint_config(args.model)
        for g in geometries:
            arch.validate_geometry(config, g)
        check_map_keys(device_map, args.device_map, arch, config)
    _check_quantize(args)
    return Options(archs=archs, model=args.model, adapters=adapters, n_adapters=args.adapters, dtype=args.dtype,
                   adapter_scale=args.adapter_scale, device=args.device, modes=modes, fault=args.inject_fault,
                   kernel=args.kernel, geometries=tuple(geometries),
                   quantize=args.quantize, quantize_projector=args.quantize_projector,
                   device_map=device_map, max_memory=max_memory)


def _options_table(opts) -> dict:
    return {"archs": list(opts.archs), "model": opts.model, "dtype": opts.dtype, "device": opts.device,
            "modes": list(opts.modes), "adapters": opts.adapters or opts.n_adapters,
            "adapter_scale": None if opts.adapters else opts.adapter_scale, "fault": opts.fault,
            "kernel": opts.kernel, "quantize": opts.quantize, "quantize_projector": opts.quantize_projector,
            "device_map": opts.device_map, "max_memory": opts.max_memory}


def _repro(args, results) -> None:
    """Per arch, per failing mode: the command that reproduces its failing rows (summary `repro`)."""
    from harness.provenance import repro_command

    one_arch = args.cmd == "compare"  # a bundle holds one arch: compare takes no --arch
    for r in results:
        failing = sorted({row.mode for row in r.rows if not row.metrics.ok})
        r.summary["repro"] = {m: repro_command(args.argv, None if one_arch else r.arch, m) for m in failing}


def runtime_engine(opts) -> str:
    """summary.json's "engine" where the project's runtime is judged (an output bundle names its own)."""
    return f"mmlora runtime, LoRA provider {opts.kernel}"


def _write_report(args, out: Path, results, opts, ok: bool, exit_code: int, engine: str) -> dict:
    from harness.correctness.report import render_html
    from harness.correctness.rules import RULES
    from harness.provenance import provenance

    _repro(args, results)
    with atomic_dir(out, args.cmd, args.overwrite) as tmp:
        write_csv(tmp / "layers.csv", [row.as_dict() for r in results for row in r.rows], CSV_COLUMNS)
        left = run_not_judged(results)
        summary = {"ok": ok, "exit_code": exit_code, "strict": args.strict, "engine": engine,
                   # the verdict line's words, and what the run left unjudged ("" when nothing)
                   "verdict": _verdict_words(opts, ok, left), "not_judged": left,
                   "provenance": provenance(opts.device, args.argv), "options": _options_table(opts),
                   "rules": {f"{d}/{m}": vars(r) for (d, m), r in RULES.items() if d == opts.dtype},
                   "warnings": [f"{r.arch}: {w}" for r in results for w in r.summary.get("warnings", [])],
                   "archs": {r.arch: r.summary for r in results}}
        write_json(tmp / "summary.json", summary)
        (tmp / "index.html").write_text(render_html(results, summary, f"mmlora {args.cmd}"))
    return summary


def _verdict_words(opts, ok: bool, left: str) -> str:
    if opts.quantize:
        return ("quantized run ok: skip list honoured, unquantized groups within the rule (drift below)" if ok
                else "QUANTIZED RUN FAILED: a skip-list violation, or an unquantized group / error row")
    return verdict(ok, left)


def _print_verdict(who: str, out: Path, results, opts, ok: bool, warnings: list[str]) -> None:
    print(f"{who}: {_verdict_words(opts, ok, run_not_judged(results))}; report in {out}", file=sys.stderr)
    for r in results:
        q = r.summary.get("quantization")
        if q:
            drift = ", ".join(f"{k}={v:.3g}" for k, v in sorted(q["drift_by_group"].items()))
            print(f"  {r.arch} {q['scheme']}{' +projector' if q['projector_quantized'] else ''}: drift (max err / max "
                  f"|truth|) {drift}; skip-list violations: {q['violations'] or 'none'}; failures outside the "
                  f"quantized groups: {q['unexpected_failures']}", file=sys.stderr)
            continue
        for mode, d in r.summary.get("first_divergence", {}).items():
            if d:
                print(f"  {r.arch} [{mode}] first divergence: {divergence(d)}", file=sys.stderr)
    for w in warnings:
        print(f"  WARNING {w}", file=sys.stderr)


def cmd_correctness(args) -> int:
    from harness.correctness import run

    opts = _options(args)
    out = Path(args.out) if args.out else default_run_dir("correctness")
    check_out(out, "correctness", args.overwrite)
    if opts.modes == ("replay",):
        print("mmlora correctness: replay checks the LoRA modules only; group boundaries and the substituted "
              "vision kernels need --mode e2e or both", file=sys.stderr)
    return _finish(args, out, run(opts), opts)


def _finish(args, out: Path, results, opts, engine: str | None = None) -> int:
    """Exit code, report, verdict lines: the same for `correctness` and `compare`, each speaking as itself.
    `engine`: what was judged, for summary.json (default: the project's runtime with its provider)."""
    who = f"mmlora {args.cmd}"
    ok = all(r.summary["ok"] for r in results)
    warnings = [f"{r.arch}: {w}" for r in results for w in r.summary.get("warnings", [])]
    exit_code = 0 if ok and not (args.strict and warnings) else 1
    _write_report(args, out, results, opts, ok, exit_code, engine or runtime_engine(opts))
    _print_verdict(who, out, results, opts, ok, warnings)
    if ok and exit_code:
        print(f"{who}: --strict: a warning is a failure (a trivial comparison, or an adapter this run "
              "could not tell from none: warnings above)", file=sys.stderr)
    _print_recap(who, out, results)
    print_fault_headlines(results)
    return exit_code


def _print_recap(who: str, out: Path, results) -> None:
    """A multi-arch run's last word: how many passed and failed, the worst margin and where, the report."""
    if len(results) < 2:
        return
    failed = [r.arch for r in results if not r.summary["ok"]]
    rows = [(row.metrics.margin, r.arch, row) for r in results for row in r.rows
            if math.isfinite(row.metrics.margin)]  # error rows (no figure) left out
    worst = ""
    if rows:
        m, arch, row = max(rows, key=lambda x: x[0])
        worst = f"; worst margin {m:.3g} ({arch} {row.mode}, {row.module})"
    print(f"{who}: {len(results)} archs: {len(results) - len(failed)} passed, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f"{worst}; report in {out}", file=sys.stderr)


def cmd_record(args) -> int:
    """`mmlora record`: the reference and its truth for one arch, streamed into a bundle."""
    import tempfile

    from harness.correctness.engine import record

    opts = _options(args)
    if len(opts.archs) != 1:
        raise ValueError(f"mmlora record: a bundle holds one arch; pass --arch (one of {len(opts.archs)})")
    out = Path(args.out)
    check_out(out, "bundle", args.overwrite)
    with tempfile.TemporaryDirectory(prefix="mmlora-work-") as tmp:
        record(opts.archs[0], opts, Path(tmp), out, overwrite=args.overwrite)
    print(f"mmlora record: {opts.archs[0]} reference bundle in {out}", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    """`mmlora compare BUNDLE`: the runtime against a recorded reference; `mmlora compare REF GOT`: an output
    bundle (any engine's, docs/bundles.md) against it, e2e."""
    import time

    from harness.correctness import MODES, Options
    from harness.correctness.bundle import Bundle, check_outputs, engine_of
    from harness.correctness.engine import check_fault, judge, judge_outputs, load
    from harness.correctness.faults import get_fault
    from harness.provider_flags import check_provider
    from runtime.providers import DEFAULT
    from vlm.checkpoint import parse_device_map, parse_max_memory

    t0 = time.time()
    # the flags first: reading a bundle of a real checkpoint hashes its files (minutes)
    modes = MODES if args.mode == "both" else (args.mode,)
    if args.got is not None:
        if args.mode == "replay":
            raise ValueError("mmlora compare REF GOT: an output bundle holds outputs only, compared e2e; "
                             "--mode replay needs the runtime (mmlora compare REF)")
        given = [flag for flag, value in (("--provider / --kernel", args.kernel), ("--inject-fault", args.inject_fault),
                                          ("--quantize", args.quantize)) if value]
        if given:
            raise ValueError(f"mmlora compare REF GOT runs no runtime: {' and '.join(given)} "
                             f"{'does' if len(given) == 1 else 'do'} not apply")
        if args.device_map is not None or args.max_memory is not None:
            raise ValueError("mmlora compare REF GOT loads no model: --device-map / --max-memory do not apply")
        modes = ("e2e",)
    fault = get_fault(args.inject_fault) if args.inject_fault else None
    if fault is not None and fault.mode not in modes:
        raise ValueError(f"--inject-fault {fault.name} is localised in {fault.mode} mode, which --mode "
                         f"{args.mode} does not run")
    _check_quantize(args)
    device_map, max_memory = parse_device_map(args.device_map), parse_max_memory(args.max_memory)
    check_map_devices(device_map, args.device_map)
    out = Path(args.out) if args.out else default_run_dir("correctness")
    check_out(out, "compare", args.overwrite)
    p = load(args.bundle)
    check_map_keys(device_map, args.device_map, p.arch, p.config)
    check_fault(fault, p.arch.model_type)
    got = engine = None
    extra: list[str] = []
    if args.got is not None:
        got = Bundle.open(args.got)
        extra = check_outputs(p.bundle, got)
        engine = engine_of(got)
    else:
        args.kernel = args.kernel or DEFAULT
        check_provider(args.kernel, p.torch_dtype, p.device)
    p.seconds = time.time() - t0  # this run's own: opening and checking the bundles, not their recording
    opts = Options(archs=[p.arch.model_type], model=str(p.ckpt),
                   adapters={n: str(e["path"]) for n, e in p.bundle.manifest["adapters"].items()},
                   dtype=p.dtype, device=str(p.device), modes=modes, fault=args.inject_fault, kernel=args.kernel,
                   quantize=args.quantize, quantize_projector=args.quantize_projector, device_map=device_map,
                   max_memory=max_memory)
    result = judge_outputs(p, got, opts, extra) if got is not None else judge(p, opts, fault)
    return _finish(args, out, [result], opts, engine)


def cmd_faults(args) -> int:
    from harness.correctness.faults import FAULTS

    if args.power:
        from harness.correctness.power import cmd_power

        return cmd_power(args)
    for f in FAULTS.values():
        kind = "control" if f.control else "fault"
        print(f"{f.name:<30} {kind:<8} breaks: {f.breaks}; must name: {f.must_name}")
    return 0


# what --out may be (harness.output.check_out), said in every writing command's help
OUT_RULE = ("written only when absent, empty, or an earlier report of the same command (with --overwrite); "
            "a folder holding anything else, or another command's report, is refused and left as it is")


def overwrite_arg(c) -> None:
    c.add_argument("--overwrite", action="store_true",
                   help="replace an earlier report of this command at --out (never user files, never another "
                        "command's report)")


def register(sub) -> None:
    from harness.correctness.rules import DEFAULT_ADAPTER_SCALE
    from harness.provider_flags import add_provider_flag
    from runtime.providers import DEFAULT

    def reference_args(c, one_arch: bool = False) -> None:
        c.add_argument("--arch", action="append", help="architecture" + (
            "" if one_arch else " (repeatable; default: all registered)"))
        c.add_argument("--model", default="tiny", help="'tiny' (built-in random models) or a checkpoint folder")
        c.add_argument("--adapter", action="append", metavar="NAME=ADAPTER_DIR",
                       help="a PEFT-saved adapter (repeatable)")
        c.add_argument("--adapters", type=int, default=3,
                       help=f"random adapters to make when no --adapter is given (0 to {MAX_ADAPTERS})")
        c.add_argument("--adapter-scale", type=finite_float, default=DEFAULT_ADAPTER_SCALE,
                       help="generated adapters: rms(LoRA delta) / rms(base output) per module (default "
                            f"{DEFAULT_ADAPTER_SCALE}; trained adapters show a few percent to a few tens of percent)")
        c.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16")
        c.add_argument("--device", default="cpu", help="cpu | cuda")
        c.add_argument("--geometry", action="append", metavar="NAME=VALUE",
                       help="an image geometry the batch's images take in turn (repeatable), as `mmlora tokens` "
                            "takes it: tiles=2, grid=1,4,6, patches=3x5, image-size=56x84, split=1x2 (default: the "
                            "arch's mix of sizes / tile counts / grids)")
        placement_args(c, "reference and runtime share it")

    def placement_args(c, who: str) -> None:
        c.add_argument("--device-map", metavar="auto|balanced|FILE",
                       help=f"place the model with accelerate over this node's GPUs, CPU and disk ({who}); FILE: "
                            "JSON module name -> device (0, 'cuda:1', 'cpu', 'disk')")
        c.add_argument("--max-memory", metavar="DEV=SIZE[,...]",
                       help="with --device-map (default auto): the most per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB")

    def runtime_args(c) -> None:
        c.add_argument("--strict", action="store_true",
                       help="exit 1 on any warning: an adapter that changes (almost) nothing on a group it targets, or "
                            "one this batch could not tell from no adapter (its dropped-adapter margin <= 1)")
        c.add_argument("--mode", default="both", choices=["e2e", "replay", "both"],
                       help="e2e: each side feeds itself (shows drift); replay: every runtime module is fed the "
                            "reference's recorded input (localises the faulty module); both (default)")
        c.add_argument("--inject-fault", help="a seeded fault from `mmlora faults`")
        add_provider_flag(c)
        c.add_argument("--quantize", choices=["lm-int8"], help="weight-only int8 on the runtime's LM Linears "
                       "(registry skip list honoured); reports drift per group, fails only on a skip violation")
        c.add_argument("--quantize-projector", action="store_true",
                       help="with --quantize: quantize the connector too")
        c.add_argument("--out", help="report folder (default reports/correctness/<timestamp>); " + OUT_RULE)
        overwrite_arg(c)

    c = sub.add_parser("correctness", help="compare every module of runtime vs HF + PEFT; exit 0 ok, 1 divergence")
    reference_args(c)
    runtime_args(c)
    c.set_defaults(func=cmd_correctness)
    r = sub.add_parser("record", help="record the reference and its truth for one arch into a bundle folder")
    reference_args(r, one_arch=True)
    r.add_argument("--out", required=True, help="the bundle folder to write (docs/bundles.md); " + OUT_RULE)
    overwrite_arg(r)
    r.set_defaults(func=cmd_record, kernel=DEFAULT, inject_fault=None, mode="both", quantize=None,
                   quantize_projector=False)
    m = sub.add_parser("compare", help="the runtime (or an output bundle GOT) against a recorded reference bundle; "
                       "exit 0 ok, 1 divergence, 2 bad bundle")
    m.add_argument("bundle", help="a reference bundle (mmlora record)")
    m.add_argument("got", nargs="?", help="an output bundle of an engine (docs/bundles.md): compared e2e")
    runtime_args(m)
    placement_args(m, "the runtime's checkpoint; not with GOT")
    # None when not given: with GOT a provider given at all is refused (no runtime runs), without it the default
    m.set_defaults(func=cmd_compare, kernel=None)
    f = sub.add_parser("faults", help="list the seeded-fault catalog; --power measures what the verdict catches")
    f.add_argument("--power", action="store_true",
                   help="run fault x dtype x adapter scale x arch and write the detection-power table")
    f.add_argument("--arch", action="append", help="with --power: archs (default: every arch each fault applies to)")
    f.add_argument("--fault", action="append", help="with --power: faults / controls (default: the whole catalog)")
    f.add_argument("--dtype", default="fp32,bf16", help="with --power: dtypes, comma-separated")
    f.add_argument("--adapter-scale", default=f"{DEFAULT_ADAPTER_SCALE},1.0",
                   help="with --power: generated adapters' delta / base ratios, comma-separated (realistic, large)")
    f.add_argument("--device", default="cpu", help="with --power: cpu | cuda")
    add_provider_flag(f, "with --power: the runtime's LoRA provider")
    f.add_argument("--out", help="with --power: folder for power.csv and power.md (default reports/power/<timestamp>); "
                   + OUT_RULE)
    overwrite_arg(f)
    f.set_defaults(func=cmd_faults)
