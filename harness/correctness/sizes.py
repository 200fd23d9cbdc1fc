"""Negative controls over the adapter sizes users meet: healthy runs (no fault) at each adapter scale, every
arch, dtype and mode, and the worst margin each reached (error over bound; a healthy run must stay below 1).

    python -m harness.correctness.sizes [--arch A ...] [--dtype fp32,fp16,bf16]
        [--adapter-scale 0.01,0.03,0.1,0.3,1,mix] [--provider P] --out DIR

`mix`: adapters calibrated to scale 1 and then each module's B multiplied by a seeded factor drawn
log-uniformly in [0.01, 1], so one adapter holds modules at every size of that range.
Writes DIR/sizes.csv (one row per arch x dtype x scale x mode, appended as measured, so a long sweep keeps
what it measured) and DIR/sizes.md (arch x scale per dtype: worst e2e / replay margins). Exit 1 if any
healthy run failed.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

COLUMNS = ["arch", "dtype", "adapter_scale", "mode", "ok", "worst_margin", "module", "request", "seconds"]
MIX = "mix"


def _mixed_adapters(arch_name: str, dtype: str, workdir: Path, seed: int = 0) -> tuple[Path, dict[str, str]]:
    """A tiny checkpoint and the default adapter recipes, each module's B scaled to its own size."""
    from harness.correctness.engine import default_requests
    from reference.adapters import add_adapters, calibrate, default_specs, save_adapters
    from vlm.arch import get_arch
    from vlm.checkpoint import build_tiny, load_checkpoint, parse_dtype, save_checkpoint

    arch = get_arch(arch_name)
    ckpt = save_checkpoint(build_tiny(arch, seed=seed)[1], workdir / "ckpt")
    _, config, model = load_checkpoint(ckpt, dtype=parse_dtype(dtype))
    arch.install_fixes(model)
    specs = default_specs(3)
    pm = add_adapters(model, arch, specs)
    calibrate(pm, arch, config, default_requests(arch, config, [s.name for s in specs]), 1.0, "cpu",
              parse_dtype(dtype))
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(1234 + seed)
    with torch.no_grad():
        for _, mod in sorted(pm.named_modules(), key=lambda kv: kv[0]):
            if isinstance(mod, LoraLayer):
                for name in sorted(mod.lora_B):
                    f = math.exp(float(torch.empty(()).uniform_(math.log(0.01), 0.0, generator=g)))
                    mod.lora_B[name].weight.mul_(f)
    folders = save_adapters(pm, workdir / "adapters")
    return ckpt, {k: str(v) for k, v in folders.items()}


def _one(arch: str, dtype: str, scale, kernel: str, work: Path) -> list[dict]:
    from harness.correctness.engine import Options, judge, prepare

    t0 = time.time()
    if scale == MIX:
        ckpt, folders = _mixed_adapters(arch, dtype, work / "mix")
        opts = Options(archs=[arch], model=str(ckpt), adapters=folders, dtype=dtype, kernel=kernel)
    else:
        opts = Options(archs=[arch], dtype=dtype, adapter_scale=float(scale), kernel=kernel)
    res = judge(prepare(arch, opts, work), opts)
    out = []
    for mode in opts.modes:
        rows = [r for r in res.rows if r.mode == mode]
        worst = max(rows, key=lambda r: r.metrics.margin)
        out.append({"arch": arch, "dtype": dtype, "adapter_scale": scale, "mode": mode,
                    "ok": all(r.metrics.ok for r in rows), "worst_margin": worst.metrics.margin,
                    "module": worst.module, "request": worst.request, "seconds": round(time.time() - t0, 1)})
    return out


def table(rows: list[dict]) -> str:
    """Per dtype: one line per arch, one column per scale, cell = worst e2e / replay margin."""
    lines = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        mine = [r for r in rows if r["dtype"] == dtype]
        scales = list(dict.fromkeys(str(r["adapter_scale"]) for r in mine))
        lines += [f"**{dtype}** (worst margin e2e / replay; > 1 is a false alarm)", "",
                  "| arch | " + " | ".join(f"scale {s}" for s in scales) + " |", "|---|" + "---|" * len(scales)]
        for arch in dict.fromkeys(r["arch"] for r in mine):
            cells = []
            for s in scales:
                got = {r["mode"]: float(r["worst_margin"]) for r in mine
                       if r["arch"] == arch and str(r["adapter_scale"]) == s}
                cells.append(" / ".join(f"{got[m]:.2f}" if m in got else "-" for m in ("e2e", "replay")))
            lines.append(f"| {arch} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    from harness.provider_flags import add_provider_flag
    from runtime.providers import TWIN_PROVIDER
    from vlm.arch import REGISTRY, get_arch

    ap = argparse.ArgumentParser(prog="python -m harness.correctness.sizes", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", help="architecture (repeatable; default: all registered)")
    ap.add_argument("--dtype", default="fp32,fp16,bf16", help="dtypes, comma-separated")
    ap.add_argument("--adapter-scale", default="0.01,0.03,0.1,0.3,1,mix", help="scales, comma-separated; "
                    "'mix': per-module sizes from 0.01 to 1")
    # the twins by default: fast on a CPU, where the Triton kernels run in the interpreter
    add_provider_flag(ap, default=TWIN_PROVIDER)
    ap.add_argument("--out", required=True, help="folder for sizes.csv and sizes.md")
    args = ap.parse_args(argv)
    archs = args.arch or sorted(REGISTRY)
    try:
        for a in archs:
            get_arch(a)
        scales = [s.strip() if s.strip() == MIX else float(s) for s in args.adapter_scale.split(",") if s.strip()]
    except ValueError as e:
        print(f"sizes: {e}", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with open(out / "sizes.csv", "w", newline="") as f, tempfile.TemporaryDirectory(prefix="mmlora-sizes-") as tmp:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for dtype in dtypes:
            for scale in scales:
                for arch in archs:
                    print(f"[sizes] {arch} {dtype} scale {scale}", file=sys.stderr, flush=True)
                    work = Path(tmp) / f"{arch}-{dtype}-{scale}"
                    got = _one(arch, dtype, scale, args.kernel, work)
                    shutil.rmtree(work, ignore_errors=True)  # a sweep keeps one run's files at a time
                    for r in got:
                        w.writerow(r)
                        print(f"[sizes]   {r['mode']}: worst margin {r['worst_margin']:.3f} at {r['module']} "
                              f"(request {r['request']})", file=sys.stderr, flush=True)
                    f.flush()
                    rows += got
        (out / "sizes.md").write_text(table(rows))
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
