"""Tune the LoRA kernels' launch configs on this GPU; write a config file in runtime/kernels/configs' format.

    python -m harness.bench.tune --out FILE [--base runtime/kernels/configs/h200.json] [--budget-s 200]
        [--rep-ms 25] [--buckets N] [--workers 8] [--stages 2] [--preset nightly|smoke]

The buckets are the LoRA nightly sweep's points (T, H = O, rank, slices, dtype; the spec's own inputs),
the headline point (T = 4096, bf16, rank 16) first. For each, on `lora_apply` (what the runtime calls):
  1. shrink: block_m x split_k around the current choice, then block_k x warps x stages around the best;
  2. expand: block_m x col_split, then block_n x warps x stages, with shrink at its winner.
Each candidate runs under `lora_config.forced`, its output checked against the torch twin with the spec's
tolerance (a candidate outside it is rejected and listed, never chosen), then timed as a CUDA graph replay
with do_bench (L2 flushed, p50 / p20 / p80), exactly as the bench's `kernel` rows. Candidates are compiled
first by worker processes in parallel (they fill Triton's cache; the timing process then only loads).
Writes FILE (rules for the tuned buckets, ascending T, in front of the base file's rules, so untuned
buckets keep the base choice) and FILE.csv (every candidate: bucket, op, config, p50 / p20 / p80, status).
Stops starting new buckets once --budget-s is spent, and writes what it has. `--preset smoke` runs the
plumbing on the smoke sweep's tiny points (on CPU in the interpreter: the suites' test of this script;
its timings mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

BUCKET_KEYS = ("T", "H", "rank", "slices", "dtype")


def buckets(limit: int | None = None, preset: str = "nightly") -> list[dict]:
    """The LoRA sweep's points, one per (T, H, rank, slices, dtype), the base (headline) point first."""
    from runtime.kernels import KERNELS

    seen, out = set(), []
    for p in KERNELS["lora_apply"].sweeps[preset].points():
        key = tuple(p[k] for k in BUCKET_KEYS)
        if key not in seen:
            seen.add(key)
            out.append(dict(p))
    return out[:limit] if limit else out


def _pow2_range(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return out


def shrink_candidates(p: dict, cur, stage: int) -> list:
    from runtime.kernels.lora_config import ShrinkConfig

    H, R = p["H"], p["rank"]
    if stage == 0:
        return [dataclasses.replace(cur, block_m=m, split_k=s) for m in (16, 32, 64)
                for s in _pow2_range(1, max(1, H // (2 * cur.block_k)))[:6]]
    ks = (64, 128, 256) if R <= 32 else (32, 64, 128)
    return [ShrinkConfig(cur.block_m, k, cur.split_k, w, st) for k in ks for w in (4, 8) for st in (3, 4, 5)]


def expand_candidates(p: dict, cur, stage: int) -> list:
    from runtime.kernels.lora_config import ExpandConfig

    width, R = p["O"], p["rank"]
    if stage == 0:
        return [dataclasses.replace(cur, block_m=m, col_split=c) for m in (16, 32, 64)
                for c in _pow2_range(1, max(1, width // cur.block_n))[::2]]
    ns = (64, 128, 256) if R <= 32 else (32, 64, 128)
    return [ExpandConfig(cur.block_m, n, min(cur.col_split, max(1, width // n)), w, st) for n in ns for w in (4, 8)
            for st in (2, 3, 4)]


def _inputs(p: dict, device):
    from runtime.kernels import KERNELS, token_grouping

    (x, y, A, B, slots), _ = KERNELS["lora_apply"].sample(p, device)
    return x, y, A, B, slots, token_grouping(slots, A[0].shape[0])


def _run_once(p: dict, shrink, expand, inputs) -> torch.Tensor:
    from runtime.kernels import lora_apply
    from runtime.kernels import lora_config as lc

    x, y, A, B, slots, g = inputs
    with lc.forced(shrink=shrink, expand=expand):
        return lora_apply(x, y.clone(), A, B, slots, grouping=g)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _compile_worker(args) -> int:
    """Fill Triton's cache: run each (shrink, expand) pair once (no timing)."""
    p, pairs = args
    device = _device()
    inputs = _inputs(p, device)
    bad = 0
    for s, e in pairs:
        try:
            _run_once(p, s, e, inputs)
        except Exception:  # noqa: BLE001 - reported by the timing process, which runs it again
            bad += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return bad


def _precompile(p: dict, pairs: list, workers: int) -> None:
    if workers <= 1 or len(pairs) < 2:
        return
    chunks = [pairs[i::workers] for i in range(workers) if pairs[i::workers]]
    with mp.get_context("spawn").Pool(len(chunks)) as pool:
        pool.map(_compile_worker, [(p, c) for c in chunks])


def _time(p: dict, shrink, expand, inputs, ref, rel: float, rep_ms: float) -> tuple[str, tuple | None]:
    from harness.bench.timing import measure
    from runtime.kernels import lora_apply
    from runtime.kernels import lora_config as lc

    try:
        out = _run_once(p, shrink, expand, inputs)
        err = (out.double() - ref.double()).abs().max().item()
        scale = ref.double().abs().max().item()
        if not err <= rel * max(scale, 1e-30):
            return f"rejected: max abs err {err:.3g} > {rel} x max|ref| {scale:.3g}", None
        x, y, A, B, slots, g = inputs
        y = y.clone()  # the timed calls accumulate into it; the inputs stay what the reference saw
        with lc.forced(shrink=shrink, expand=expand):  # captured under the candidate's configs
            t = measure(lambda: lora_apply(x, y, A, B, slots, grouping=g), _device(), rep_ms,
                        max(1.0, rep_ms / 4), graph=True)
        return "ok", (t.p50_ms, t.p20_ms, t.p80_ms)
    except Exception as e:  # noqa: BLE001 - a candidate that fails (e.g. out of resources) is recorded, not chosen
        return f"error: {type(e).__name__}: {' '.join(str(e).split())[:200]}", None


def tune_bucket(p: dict, rep_ms: float, workers: int, log, rows: list, stages: int = 2) -> tuple:
    from runtime.kernels import KERNELS, lora_apply_torch
    from runtime.kernels import lora_config as lc
    from runtime.kernels.spec import DTYPES

    device = _device()
    inputs = _inputs(p, device)
    x, y, A, B, slots, _ = inputs
    ref = lora_apply_torch(x, y.clone(), A, B, slots)
    rel = KERNELS["lora_apply"].rel_tol[DTYPES[p["dtype"]]]
    dt = DTYPES[p["dtype"]]
    best_s = lc.shrink_config(p["T"], p["H"], p["rank"], p["slices"], dt, device)
    best_e = lc.expand_config(p["T"], p["O"], p["rank"], p["slices"], dt, device)
    label = " ".join(f"{k}={p[k]}" for k in BUCKET_KEYS)
    for op in ("shrink", "expand"):
        for stage in range(stages):
            cands = (shrink_candidates(p, best_s, stage) if op == "shrink" else expand_candidates(p, best_e, stage))
            cands = list(dict.fromkeys([best_s if op == "shrink" else best_e, *cands]))
            pairs = [(c, best_e) if op == "shrink" else (best_s, c) for c in cands]
            _precompile(p, pairs, workers)
            timed = []
            for (s, e), c in zip(pairs, cands):
                status, q = _time(p, s, e, inputs, ref, rel, rep_ms)
                rows.append({"bucket": label, "op": op, "stage": stage, "config": json.dumps(dataclasses.asdict(c)),
                             "p50_ms": q[0] if q else "", "p20_ms": q[1] if q else "", "p80_ms": q[2] if q else "",
                             "status": status})
                if q:
                    timed.append((q[0], c))
            if timed:
                win = min(timed, key=lambda t: t[0])
                log(f"{label} {op} stage {stage}: {len(timed)}/{len(cands)} ok, best {win[0] * 1e3:.1f} us "
                    f"{dataclasses.asdict(win[1])}")
                if op == "shrink":
                    best_s = win[1]
                else:
                    best_e = win[1]
    return best_s, best_e


def _rule(p: dict, cfg) -> dict:
    return {"when": {"T_max": p["T"], "W_max": p["H"] if hasattr(cfg, "block_k") else p["O"],
                     "rank_max": p["rank"], "slices": p["slices"], "dtype": p["dtype"]},
            "config": dataclasses.asdict(cfg)}


def main(argv: list[str] | None = None) -> int:
    from harness.flags import finite_float
    from runtime.kernels import lora_config as lc

    ap = argparse.ArgumentParser(prog="python -m harness.bench.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="config file to write (FILE.csv gets every candidate)")
    ap.add_argument("--base", help="config file whose rules follow the tuned ones (default: this GPU's stored file)")
    ap.add_argument("--budget-s", type=finite_float, default=200.0, help="no new bucket starts after this many seconds")
    ap.add_argument("--rep-ms", type=finite_float, default=25.0, help="do_bench rep per candidate")
    ap.add_argument("--buckets", type=int, help="at most this many buckets (headline first)")
    ap.add_argument("--workers", type=int, default=8, help="processes compiling candidates in parallel")
    ap.add_argument("--stages", type=int, default=2, choices=(1, 2), help="1: block shape and split only")
    ap.add_argument("--preset", default="nightly", choices=("nightly", "smoke"),
                    help="smoke: the tiny points, runs on CPU (tests the script; its timings mean nothing)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and args.preset != "smoke":
        print("tune: needs a CUDA GPU (or --preset smoke)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    base_path = args.base or next((str(lc.CONFIG_DIR / f"{k}.json") for m, k in lc.GPU_KINDS.items() if m in name), None)
    base = json.loads(Path(base_path).read_text()) if base_path and Path(base_path).is_file() else {}

    def log(msg):
        print(f"tune: {msg}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    rows: list[dict] = []
    tuned: list[tuple[dict, object, object]] = []
    for p in buckets(args.buckets, args.preset):
        if time.monotonic() - t0 > args.budget_s:
            log(f"budget of {args.budget_s:.0f} s spent: {len(tuned)} buckets tuned, the rest keep the base rules")
            break
        s, e = tune_bucket(p, args.rep_ms, args.workers if torch.cuda.is_available() else 1, log, rows,
                           args.stages)
        tuned.append((p, s, e))
    order = sorted(tuned, key=lambda t: (t[0]["T"], t[0]["rank"], t[0]["slices"], t[0]["dtype"]))
    out = {"gpu": name,
           "status": f"tuned on {name} by harness/bench/tune.py ({time.strftime('%Y-%m-%d')}, {len(tuned)} buckets); "
                     f"untuned buckets follow from {base_path or 'no base file'}",
           "shrink": [_rule(p, s) for p, s, _ in order] + base.get("shrink", []),
           "expand": [_rule(p, e) for p, _, e in order] + base.get("expand", [])}
    lc.parse_table(out, args.out)  # the file the runtime will read must parse
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    with open(f"{args.out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["bucket", "op", "stage", "config", "p50_ms", "p20_ms", "p80_ms", "status"])
        w.writeheader()
        w.writerows(rows)
    log(f"wrote {args.out} ({len(tuned)} tuned buckets) and {args.out}.csv ({len(rows)} candidates) in "
        f"{time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
