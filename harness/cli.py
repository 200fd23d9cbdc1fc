"""`mmlora` command line: archs, tokens, audit-vllm, correctness, record, compare, faults, bench, vllm-engine.

Exit codes: 0 success, 1 a divergence or regression was found, 2 bad input (one line on stderr), 130 Ctrl-C,
143 SIGTERM (cleaned up as for Ctrl-C: no partial report, no temporary folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from harness.geometry_flags import UsageError, add_geometry_flags, geometry_from_args


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message over several lines; we want one
        raise UsageError(f"{self.prog}: {message}")


def parse_sets(items: Sequence[str] | None) -> dict:
    from vlm.arch import parse_set

    out = {}
    for item in items or ():
        k, v = parse_set(item)
        out[k] = v
    return out


# ---------------------------------------------------------------------------- subcommands
def cmd_archs(args) -> int:
    from vlm.arch import all_archs

    rows = []
    for a in all_archs():
        rows.append({
            "arch": a.model_type, "model_class": a.model_class_name, "geometry": list(a.geometry_fields),
            "tower": list(a.tower), "connector": list(a.connector), "language_model": list(a.language_model),
            "lora_groups": list(a.targetable_groups()),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            j = lambda xs: ", ".join(xs) or "-"  # noqa: E731 - a list as a person reads it, not its repr
            print(f"{r['arch']:<12} geometry {j(r['geometry']):<8} tower {j(r['tower'])}  connector "
                  f"{j(r['connector'])}  lm {j(r['language_model'])}  LoRA on {j(r['lora_groups'])}")
    return 0


def _config_from_file(path_text: str, arch_name: str | None):
    """(arch, config) from a real config.json (or a checkpoint folder holding one): its model_type picks the arch."""
    from pathlib import Path

    from vlm.checkpoint import read_checkpoint_config

    path = Path(path_text)
    if path.is_file():
        if path.name != "config.json":
            raise UsageError(f"--config {path_text!r}: expected a config.json or a folder holding one")
        path = path.parent
    arch, raw = read_checkpoint_config(path)
    if arch_name is not None and arch_name != arch.model_type:
        raise UsageError(f"--arch {arch_name!r} disagrees with --config {path_text!r}, whose model_type is "
                         f"{arch.model_type!r}: drop --arch")
    try:
        return arch, arch.model_class().config_class.from_dict(raw)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UsageError(f"--config {path_text!r}: transformers cannot build a {arch.model_type} config from it "
                         f"({type(e).__name__}: {' '.join(str(e).split())})") from None


def cmd_tokens(args) -> int:
    from vlm.arch import ImageGeometry, apply_overrides, get_arch

    if args.config is not None:
        arch, cfg = _config_from_file(args.config, args.arch)
    elif args.arch is None:
        raise UsageError("mmlora tokens: give --arch A (its tiny config) or --config PATH (a real config.json)")
    else:
        arch, cfg = get_arch(args.arch), None
    cfg = apply_overrides(cfg if cfg is not None else arch.tiny_config(), parse_sets(args.set))
    geom_kw = geometry_from_args(args)
    geom = ImageGeometry(**geom_kw) if geom_kw else arch.default_geometry(cfg)
    counts = arch.counts(cfg, geom)
    print(json.dumps(counts.as_dict()))
    return 0


def cmd_audit_vllm(args) -> int:
    """Exit 0 when the audit ran (a disagreement is a finding, printed in the table), 2 without vLLM."""
    from harness.audit_vllm import VllmMissing, markdown, run_audit
    from vlm.arch import get_arch

    for a in args.arch or ():
        get_arch(a)  # an unknown name is a usage error, before vLLM's slow import
    try:
        version, rows = run_audit(args.arch)
    except VllmMissing as e:
        print(f"mmlora audit-vllm: {e}", file=sys.stderr)
        return 2
    table = markdown(version, rows)
    print(table, end="")
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(table)
    return 0


def version_line() -> str:
    """`mmlora --version`: the installed package's version and, when run from a git checkout, its commit."""
    from importlib import metadata

    from harness.provenance import git_sha

    try:
        version = metadata.version("mmlora-harness")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "unknown (not installed)"
    return f"mmlora {version} (git {git_sha() or 'unknown'})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmlora", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=version_line(),
                   help="print the package version and the git commit it runs from, then exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    a = sub.add_parser("archs", help="list registered architectures and their module groups")
    a.add_argument("--json", action="store_true", help="print the table as JSON (one object per arch)")
    a.set_defaults(func=cmd_archs)

    t = sub.add_parser("tokens", help="rows per group for one image: encoder_rows, connector_rows, lm_tokens")
    t.add_argument("--arch", help="registered architecture (model_type), see `mmlora archs`; counts for its tiny "
                                   "config unless --config is given")
    t.add_argument("--config", metavar="PATH",
                   help="a real model's config.json (or the checkpoint folder holding it): its model_type picks "
                        "the arch and its sizes replace the tiny config's")
    t.add_argument("--set", action="append", metavar="dotted.key=value",
                   help="override a key of the config (repeatable), e.g. vision_config.image_size=504")
    add_geometry_flags(t)
    t.set_defaults(func=cmd_tokens)

    v = sub.add_parser("audit-vllm", help="vLLM's tower/connector LoRA token-count helpers vs the registry's "
                                          "measured rows, one markdown row per arch (needs vLLM's model modules)")
    v.add_argument("--arch", action="append", metavar="A",
                   help="audit only this architecture (repeatable); default: every registered one")
    v.add_argument("--out", metavar="PATH", help="also write the markdown table to PATH")
    v.set_defaults(func=cmd_audit_vllm)

    from harness.bench.cli import register as register_bench
    from harness.correctness.cli import register as register_correctness
    from harness.vllm_engine.cli import register as register_vllm_engine

    register_correctness(sub)
    register_bench(sub)
    register_vllm_engine(sub)
    return p


def _quiet_libraries() -> None:
    # progress bars and deprecation chatter from transformers would bury the harness's own progress lines
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader closed the pipe


def main(argv: Sequence[str] | None = None) -> int:
    from harness import signals

    argv = list(sys.argv[1:] if argv is None else argv)
    with signals.sigterm_raises():
        return _main(argv)


def _main(argv: list[str]) -> int:
    from harness import signals

    try:
        _quiet_libraries()
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = argv  # the exact command line, for the reports' provenance and repro commands
        if args.cmd is None:  # bare `mmlora`: show what it can do instead of an error about a missing word
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except (UsageError, ValueError) as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        prefix = "" if msg.startswith("mmlora") else "mmlora: error: "
        print(f"{prefix}{msg}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help / --version from argparse: its exit code, not an exception
        return int(e.code or 0)
    except BrokenPipeError:  # `mmlora faults | head`: the reader has gone; nothing left to say, nowhere to say it
        import os

        # stdout is flushed again at exit: point it at /dev/null so that flush cannot raise a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (signals.Terminated): cleaned up on the way here
        code = signals.exit_code(e)
        print(f"mmlora: {'terminated (SIGTERM)' if code == signals.EXIT_TERMINATED else 'interrupted'}",
              file=sys.stderr)
        return code
    except Exception as e:  # noqa: BLE001 - an upstream crash must not read as "divergence" (exit 1)
        import os
        import traceback

        if os.environ.get("MMLORA_TRACEBACK"):
            traceback.print_exc()
        where = traceback.extract_tb(e.__traceback__)[-1]
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"mmlora: error: {type(e).__name__}: {msg} (at {where.filename}:{where.lineno}; "
              f"MMLORA_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
