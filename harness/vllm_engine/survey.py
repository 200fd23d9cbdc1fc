"""`python -m harness.vllm_engine.survey`: vLLM's tower/connector LoRA path judged on each arch it runs here, the
way a user would do it by hand (`nox -s vllm_engine` runs it after `mmlora audit-vllm`). Per case, each in its
own process: `mmlora record` a reference bundle, `mmlora vllm-engine` it, `mmlora compare REF GOT`; one table row
per case as it finishes, and the table as markdown under --out.

Each case states the outcome this project has measured: `pass`, `diverges` (compare exit 1: vLLM disagrees with
PEFT, a finding), `vllm fails` (the engine's exit 1: vLLM's own path cannot run the reference, named) or `engine
refuses` (its exit 2: vLLM's configuration refuses the reference). A vLLM finding is a row of the table, not a
failure; the survey fails (exit 1) when an outcome is not the one stated (a vLLM release that changes what it
does, a harness regression) or a step errs (a record that fails, a compare that refuses, a crash), so the nightly
job turns red on a change, not on a known finding."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Case:
    arch: str
    dtype: str = "fp32"
    geometries: tuple[str, ...] = ()  # --geometry items; () = the arch's default mixed batch
    flags: tuple[str, ...] = ()  # vllm-engine flags
    why: str = ""
    # record with only these of the arch's generated adapters (`mmlora record --adapter NAME=DIR`, from a first
    # default record); () = all of them
    adapters: tuple[str, ...] = ()
    # top-level config.json values over the tiny checkpoint's (recorded with --model from a first default record's
    # checkpoint, edited); () = the tiny config
    config: tuple[tuple[str, object], ...] = ()
    expect: str = "pass"  # one of OUTCOMES: what this project measured with the pinned vLLM
    # vLLM versions (prefixes of vllm.__version__) where the outcome is another: ((version, outcome), ...)
    expect_since: tuple[tuple[str, str], ...] = field(default=())

    def expected(self, vllm_version: str) -> str:
        return next((o for v, o in self.expect_since if vllm_version.startswith(v)), self.expect)


# `engine refuses`: the engine's exit 2, where vLLM's own configuration refuses the reference (Gemma 3 at fp16)
OUTCOMES = ("pass", "diverges", "vllm fails", "engine refuses")


# Two punica wrappers: vLLM's CPU platform's (`cpu`, its torch ops: what the engine builds by default) and the one
# vLLM's CUDA platform builds (`gpu`: PunicaWrapperGPU, vLLM's Triton LoRA kernels, here in the interpreter, which
# needs fp16). With `cpu`, one empty slot above the adapters (--spare-slot: --max-loras = adapters + 1): vLLM 0.32's
# torch ops give rows mapped to no adapter (-1) the LAST slot's adapter (docs/vllm.md); the "every slot filled" row
# shows that finding itself. Its CUDA kernels leave such rows alone: no spare slot with `gpu`.
GPU = ("--punica", "gpu")
FULL_BINS = ("patches=4x4", "patches=2x6", "patches=6x2")  # Gemma 4 grids that are multiples of the pooling kernel
PALIGEMMA_TOWER = ("tower", "lm")  # PaliGemma's adapters without connector LoRA (vLLM's projector is an nn.Linear)
CASES = (
    Case("llama4", flags=("--spare-slot",), why="tiled tower, CLS per tile, pixel-shuffle connector"),
    Case("llama4", why="every slot filled: vLLM 0.32's CPU ops give -1 rows the last slot", expect="diverges",
         expect_since=(("0.33", "pass"),)),
    Case("llama4", "fp16", flags=GPU, why="vLLM's Triton kernels"),
    Case("llama4", "fp16", flags=(*GPU, "--all-modules"),
         why="vLLM's default deployment: every supported module wrapped, the patch embedding too",
         expect="vllm fails"),
    Case("qwen2_vl", flags=("--spare-slot",), why="packed qkv, patch merger"),
    Case("qwen2_vl", "fp16", flags=GPU, why="vLLM's Triton kernels"),
    Case("gemma4", geometries=FULL_BINS, flags=("--spare-slot", "--per-image"),
         why="full pooling bins, one image per encoder step"),
    Case("gemma4", "fp16", geometries=FULL_BINS, flags=(*GPU, "--per-image"), why="vLLM's Triton kernels"),
    Case("gemma4", geometries=FULL_BINS, flags=("--spare-slot",), why="several images per encoder step",
         expect="vllm fails"),
    Case("gemma4", geometries=("patches=3x5",), flags=("--spare-slot", "--per-image"),
         why="a partial pooling bin (3x5 patches)", expect="vllm fails"),
    Case("llava_next", flags=("--spare-slot",), why="CLIP tower cut at vision_feature_layer, anyres tiles"),
    Case("llava_next", "fp16", flags=GPU, why="vLLM's Triton kernels"),
    Case("llava", "fp16", flags=GPU, why="CLIP tower: CLS + patches, vLLM counts patches only", expect="diverges"),
    Case("qwen2_5_vl", flags=("--spare-slot",), why="Qwen2-VL's inputs, windowed attention, gated MLP"),
    Case("qwen2_5_vl", "fp16", flags=GPU, why="vLLM's Triton kernels"),
    Case("qwen3_vl", flags=("--spare-slot",), why="DeepStack mergers as connector modules"),
    Case("qwen3_vl", "fp16", flags=GPU, why="vLLM's Triton kernels"),
    Case("idefics3", flags=("--spare-slot",), why="sub-images, pixel-shuffle connector, LM at model.text_model"),
    Case("idefics3", "fp16", flags=GPU, why="vLLM's Triton kernels"),
    Case("paligemma", flags=("--spare-slot",), why="the generated adapters hold connector LoRA",
         expect="vllm fails"),
    Case("paligemma", flags=("--spare-slot",), adapters=PALIGEMMA_TOWER,
         why="tower LoRA only: vLLM cannot wrap the connector"),
    Case("paligemma", "fp16", flags=GPU, adapters=PALIGEMMA_TOWER, why="vLLM's Triton kernels"),
    Case("gemma3", flags=("--spare-slot",), why="SigLIP tower, 4x4 average pool (tiny: 8x8 patches to 4x4 tokens)",
         expect="vllm fails"),
    Case("gemma3", "fp16", flags=GPU, why="vLLM's float16 refusal", expect="engine refuses"),
    Case("gemma3", flags=("--spare-slot",), config=(("mm_tokens_per_image", 4),),
         why="the real checkpoints' 4x4 pool (8x8 patches to 2x2 tokens), which vLLM's helper assumes"),
)


def _mmlora(*argv: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "harness.cli", *argv], capture_output=True, text=True)
    return p.returncode, p.stderr


def _last_line(text: str) -> str:
    """The command's last line, without the `mmlora <command>:` prefixes a table cell need not repeat."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    line = " ".join(lines[-1].split()) if lines else ""
    for prefix in ("mmlora vllm-engine: vLLM cannot run this reference: ", "mmlora vllm-engine: ", "mmlora: error: ",
                   "mmlora compare: "):
        line = line.removeprefix(prefix)
    return line[:300]


def spare_slots(ref: Path) -> str:
    """--max-loras one above the reference's adapters (`--spare-slot`): the last slot stays empty."""
    return str(len(json.loads((ref / "manifest.json").read_text())["adapters"]) + 1)


def _row(c: Case) -> dict:
    """What every row of case `c` says of the case itself, whatever its outcome."""
    batch = " ".join(c.geometries) or "default batch"
    if c.adapters:
        batch += f" (adapters {', '.join(c.adapters)} only)"
    if c.config:
        batch += f" ({', '.join(f'{k}={v}' for k, v in c.config)})"
    return {"arch": c.arch, "dtype": c.dtype, "geometry": batch, "flags": " ".join(c.flags), "why": c.why}


def _record_failed(row: dict, rc: int, err: str, t0: float) -> dict:
    return {**row, "step": "record", "rc": rc, "outcome": "error", "verdict": f"record failed: {_last_line(err)}",
            "seconds": time.monotonic() - t0}


def run_case(c: Case, work: Path) -> dict:
    t0 = time.monotonic()
    ref, got, cmp = work / "ref", work / "got", work / "cmp"
    row = _row(c)
    argv = ["record", "--arch", c.arch, "--dtype", c.dtype]
    for g in c.geometries:
        argv += ["--geometry", g]
    if c.config:
        rc, err = _mmlora(*argv, "--out", str(work / "tiny"))
        if rc != 0:
            return _record_failed(row, rc, err, t0)
        ckpt = work / "checkpoint"
        shutil.copytree(work / "tiny" / "checkpoint", ckpt)
        cfg = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**cfg, **dict(c.config)}, indent=1))
        argv += ["--model", str(ckpt)]
    if c.adapters:
        full = work / "all-adapters"
        rc, err = _mmlora(*argv, "--out", str(full))
        if rc != 0:
            return _record_failed(row, rc, err, t0)
        for n in c.adapters:
            argv += ["--adapter", f"{n}={full / 'adapters' / n}"]
    rc, err = _mmlora(*argv, "--out", str(ref))
    if rc != 0:
        return _record_failed(row, rc, err, t0)
    flags = [f for f in c.flags if f != "--spare-slot"]
    if "--spare-slot" in c.flags:
        flags += ["--max-loras", spare_slots(ref)]
    rc, err = _mmlora("vllm-engine", str(ref), "--out", str(got), *flags)
    if rc != 0:  # 1: vLLM's own path cannot run the reference (named); 2: the engine refused the reference
        what = "vLLM fails" if rc == 1 else "engine refused"
        return {**row, "step": "vllm-engine", "rc": rc,
                "outcome": {1: "vllm fails", 2: "engine refuses"}.get(rc, "error"),
                "verdict": f"{what}: {_last_line(err)}", "seconds": time.monotonic() - t0}
    rc, err = _mmlora("compare", str(ref), str(got), "--out", str(cmp))
    s = json.loads((cmp / "summary.json").read_text()) if (cmp / "summary.json").exists() else {}
    a = s.get("archs", {}).get(c.arch, {})
    margins = a.get("worst_margin", {})
    first = (a.get("first_divergence") or {}).get("e2e")
    verdict = {0: "pass", 1: "DIVERGES"}.get(rc, f"compare refused: {_last_line(err)}")
    if first:
        verdict += (f" at {first.get('module')} request {first.get('request')} row {first.get('row')} "
                    f"image {first.get('image')} (margin {_fmt(first.get('margin'))})")
    if unbuilt := a.get("modules_not_produced"):
        verdict += f"; {len(unbuilt)} modules vLLM does not build NOT JUDGED"
    return {**row, "step": "compare", "rc": rc, "outcome": {0: "pass", 1: "diverges"}.get(rc, "error"),
            "verdict": verdict,
            "tower": margins.get("e2e/tower"), "connector": margins.get("e2e/connector"),
            "not_judged": a.get("groups_not_judged", []), "seconds": time.monotonic() - t0}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"  # None: no margin (an error row's, written as null)


def _as_expected(r: dict) -> str:
    return "yes" if r["outcome"] == r["expected"] else f"**NO** (expected {r['expected']})"


def table(rows: list[dict]) -> str:
    head = ("| arch | dtype | geometry | engine flags | verdict (tower + connector; the language model is not run) "
            "| as expected | worst margin tower / connector | seconds |\n|---|---|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r['arch']} | {r['dtype']} | {r['geometry']} | {r['flags'] or '-'} | {r['verdict']} | "
                          f"{_as_expected(r)} | {_fmt(r.get('tower'))} / {_fmt(r.get('connector'))} | "
                          f"{r['seconds']:.0f} |\n" for r in rows)


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return "none"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.vllm_engine.survey", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="only the cases of this arch (repeatable)")
    ap.add_argument("--out", type=Path, help="write survey.md and survey.json into this folder (a new one, or an "
                                             "earlier survey's with --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier survey at --out")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if not args.arch or c.arch in args.arch]
    if not cases:
        print(f"survey: no case for --arch {', '.join(args.arch)}; cases exist for "
              f"{', '.join(sorted({c.arch for c in CASES}))}", file=sys.stderr)
        return 2
    if args.out:
        from harness.output import check_out

        try:  # before the minutes of work, not after
            check_out(args.out.resolve(), "vllm-survey", args.overwrite)
        except ValueError as e:
            print(f"survey: {e}", file=sys.stderr)
            return 2
    rows, t0, vllm_version = [], time.monotonic(), _vllm_version()
    for k, c in enumerate(cases, 1):
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="mmlora-vllm-survey-") as work:
            try:
                r = run_case(c, Path(work))
            except Exception as e:  # noqa: BLE001 - one case's harness error is its row; the others still run
                r = {**_row(c), "step": "survey", "rc": None, "outcome": "error",
                     "verdict": f"survey error: {type(e).__name__}: {' '.join(str(e).split())[:200]}",
                     "seconds": time.monotonic() - start}
        r["expected"] = c.expected(vllm_version)
        rows.append(r)
        surprise = "" if r["outcome"] == r["expected"] else f"; UNEXPECTED: {r['expected']} was measured"
        print(f"[{k}/{len(cases)}] {r['arch']} {r['dtype']} {r['geometry']} {r['flags']}: {r['verdict']} "
              f"({r['seconds']:.0f} s){surprise}", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    print(f"survey: {len(rows)} cases in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if args.out:
        from harness.output import atomic_dir

        with atomic_dir(args.out, "vllm-survey", args.overwrite) as tmp:
            (tmp / "survey.md").write_text(text)
            (tmp / "survey.json").write_text(json.dumps(rows, indent=1) + "\n")
    unexpected = [r for r in rows if r["outcome"] != r["expected"]]
    for r in unexpected:
        print(f"survey: UNEXPECTED: {r['arch']} {r['dtype']} {r['flags']}: {r['outcome']} where {r['expected']} was "
              f"measured (vLLM {vllm_version}): {r['verdict']}", file=sys.stderr)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
