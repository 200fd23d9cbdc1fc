"""The correctness engine: reference (HF + PEFT, each request alone) and its high-precision truth vs the
runtime (one mixed batch), every LoRA module and group boundary, per request, in two modes (modes.py).

`prepare` does everything that does not depend on the runtime (checkpoint, adapters, requests, reference and
truth runs, adapter ratios) once per arch, recorded into a bundle (`record`, the bundle package) and read back
(`load`); `judge` builds a runtime, applies a fault if asked, and compares. The
detection-power table (`mmlora faults --power`) judges many faults against one prepared reference.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.correctness import bundle, modes
from harness.correctness.compare import Row, first_divergence
from harness.correctness.faults import Fault, get_fault
from harness.correctness.resolution import blind_spots, dropped_adapter_margins
from harness.correctness.rules import DEFAULT_ADAPTER_SCALE, NEGLIGIBLE_DELTA
from harness.correctness.truth import run_truth, trivial_warnings, truth_dtype
from harness.output import atomic_dir
from harness.progress import Progress, counting
from reference.adapters import add_adapters, calibrate, default_specs, load_adapters, save_adapters
from reference.run import run_reference
from runtime.model import RuntimeModel
from runtime.providers import DEFAULT
from vlm.adapter_files import AdapterFile, read_adapter
from vlm.arch import ArchSpec, ImageGeometry, get_arch
from vlm.checkpoint import (
    build_tiny,
    check_device,
    load_checkpoint,
    parse_dtype,
    read_checkpoint_config,
    save_checkpoint,
    shared_twin,
)
from vlm.requests import Request, make_request

MODES = ("e2e", "replay")


@dataclass
class Options:
    archs: Sequence[str]
    model: str = "tiny"
    adapters: dict[str, str] = field(default_factory=dict)
    n_adapters: int = 3
    adapter_scale: float = DEFAULT_ADAPTER_SCALE  # generated adapters: rms(delta) / rms(base output)
    dtype: str = "fp32"
    device: str = "cpu"
    modes: Sequence[str] = MODES
    fault: str | None = None
    kernel: str | None = DEFAULT  # the runtime's LoRA provider (runtime/providers); None: no runtime runs
    seed: int = 0
    quantize: str | None = None  # "lm-int8": weight-only int8 of the runtime's LM Linears
    quantize_projector: bool = False  # also quantize the connector (against the registry's skip list)
    geometries: Sequence[ImageGeometry] = ()  # the batch's image geometries in turn (default: the arch's mix)
    device_map: str | dict | None = None  # accelerate's placement over this node's devices (vlm.checkpoint)
    max_memory: dict | None = None  # the most accelerate may place per device (implies device_map "auto")


@dataclass
class ArchResult:
    arch: str
    rows: list[Row]
    summary: dict


@dataclass(kw_only=True)
class Prepared:
    """Everything the comparison needs that does not depend on the runtime under test (fields by keyword:
    there are too many to tell apart by position)."""

    arch: ArchSpec
    config: object
    ckpt: Path
    dtype: str
    torch_dtype: torch.dtype
    truth_dtype: torch.dtype
    device: torch.device
    reqs: list[Request]
    adapters: dict[str, AdapterFile]
    # the reference's and the truth's captures on disk, read one module at a time (bundle.reader)
    bundle: bundle.Bundle
    order: list[str]
    notes: list[str]  # targets the arch flags (the run goes on)
    ratios: dict[str, dict[str, float]]  # adapter -> group -> rms(delta) / rms(base)
    warnings: list[str]  # adapters whose comparison is trivial
    fixes: list[str]  # reference fixes in force (HF code replaced where it is wrong on valid inputs)
    # this process's time on the reference side before the judge: recording it (`prepare`), or opening and
    # checking the bundles (`mmlora compare`); never the seconds a bundle's manifest says its recording took
    seconds: float = 0.0
    # in one `correctness` process: the checkpoint's model as loaded, before the reference's fixes and PEFT;
    # the runtime is a twin of it over the very same weight tensors (vlm.checkpoint.shared_twin). None when a
    # bundle is compared in another process: the runtime loads the checkpoint itself
    base: object = field(default=None, repr=False)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_requests(arch: ArchSpec, config, adapter_names: Sequence[str],
                     geometries: Sequence[ImageGeometry] | None = None) -> list[Request]:
    """One image per adapter, a no-adapter image, a two-image request, a text-only request with an adapter and
    one without. Images take the geometries in turn (the arch's mix by default: other sizes, tile counts,
    grids per image), so a mapping that reuses one image's row count for another cannot pass."""
    pick = itertools.cycle(list(geometries) if geometries else arch.mixed_geometries(config))
    names = list(adapter_names)
    mix = [(n, [next(pick)]) for n in names] + [(None, [next(pick)])]
    mix.append((names[-1] if names else None, [next(pick), next(pick)]))
    mix.append((names[0] if names else None, []))
    mix.append((None, []))
    return [make_request(arch, config, ims, a, seed=i) for i, (a, ims) in enumerate(mix)]


def _order(captures) -> list[str]:
    order: list[str] = []
    for c in sorted(captures, key=len, reverse=True):
        for n in c:
            if n not in order:
                order.append(n)
    return order


def check_fault(fault: Fault | None, model_type: str) -> None:
    if fault is not None and not fault.applies_to(model_type):
        raise ValueError(f"fault {fault.name!r} applies only to {', '.join(fault.archs())} (the archs that "
                         f"substitute {fault.kernel}), not {model_type!r}")


def _checkpoint(arch_name: str, opts: Options, workdir: Path) -> Path:
    """One set of weights for both sides, through the real loading code (a tiny model is saved first)."""
    if opts.model != "tiny":
        return Path(opts.model)
    _, model = build_tiny(get_arch(arch_name), seed=opts.seed)
    return save_checkpoint(model, workdir / arch_name / "ckpt")


def _adapters(arch, config, ref_model, opts: Options, workdir: Path, device, torch_dtype):
    """The reference PeftModel with the adapters (given, or made from the recipes and calibrated)."""
    if opts.adapters:
        folders = {k: Path(v) for k, v in opts.adapters.items()}
        return load_adapters(ref_model, folders), folders
    specs = default_specs(opts.n_adapters)
    if not specs:
        return add_adapters(ref_model, arch, default_specs(1)), {}  # hooks only: every request runs with none
    pm = add_adapters(ref_model, arch, specs)
    calibrate(pm, arch, config, default_requests(arch, config, [s.name for s in specs], opts.geometries),
              opts.adapter_scale, device, torch_dtype)
    return pm, save_adapters(pm, workdir / arch.model_type / "adapters")


def _record(arch_name: str, opts: Options, workdir: Path, out: Path, overwrite: bool = False):
    """The reference and its truth, streamed into a bundle at `out` (bundle.record; written whole or not at all):
    each capture goes to disk as the hooks see it, then one module at a time into the module's file. Returns
    the bundle folder and the loaded base model (for a runtime that shares its weights)."""
    t0 = time.time()
    torch_dtype, device = parse_dtype(opts.dtype), check_device(opts.device)
    ckpt = _checkpoint(arch_name, opts, workdir)
    arch, config, ref_model = load_checkpoint(ckpt, dtype=torch_dtype, device=device, device_map=opts.device_map,
                                              max_memory=opts.max_memory,
                                              offload_folder=workdir / arch_name / "offload")
    base = shared_twin(ref_model)  # taken before the fixes and PEFT change the reference's module tree
    fixes = arch.install_fixes(ref_model)
    pm, folders = _adapters(arch, config, ref_model, opts, workdir, device, torch_dtype)
    # under the model's module names (an adapter saved with transformers 4.x names is converted, as PEFT's copy was)
    adapters = {name: read_adapter(folder, ref_model) for name, folder in folders.items()}
    notes = [w for name, a in adapters.items() for w in arch.check_targets(config, list(a.modules), f"adapter {name!r}")]
    for n in notes:
        _log(f"  {arch.model_type}: note: {n}")
    reqs = default_requests(arch, config, list(folders), opts.geometries)
    _log(f"  {arch.model_type}: reference and truth ({len(reqs)} requests, {len(folders)} adapters, {opts.dtype})")
    with atomic_dir(out, "bundle", overwrite) as tmp:
        stage = bundle.Stage(tmp / ".stage")
        fed = bundle.InputRecord(tmp)  # each request's forward inputs, as the reference runs them
        at = arch.model_type
        with Progress(f"{at}: reference", None, "module output") as pr:
            run_reference(pm, arch, config, reqs, "single", device, torch_dtype,
                          sink=lambda i: counting(stage.sink(("ref", i)), pr), fed=fed.put)
        truth_at = f"truth at {str(truth_dtype(device)).removeprefix('torch.')}"
        _log(f"  {at}: {truth_at}")
        # the truth is the reference model itself run at high precision (truth.high_precision): no second copy;
        # the same forward, so it captures as many module outputs as the reference did
        with Progress(f"{at}: {truth_at}", pr.done, "module output") as pt:
            run_truth(pm, arch, config, reqs, device, torch_dtype, sink=lambda i: counting(stage.sink(("truth", i)), pt))
        targets = {name: set(a.modules) for name, a in adapters.items()}
        order = _order(bundle.captured(stage, "ref", len(reqs)))
        _log(f"  {at}: writing the reference bundle ({len(order)} modules)")
        with Progress(f"{at}: bundle", len(order)) as pb:
            writer, ratios = bundle.write_reference(tmp, stage, order=order, arch=arch, config=config, reqs=reqs,
                                                    pm=pm, device=device, targets=targets, step=pb.step)
        warnings = trivial_warnings(ratios, targets, arch, NEGLIGIBLE_DELTA[opts.dtype])
        for w in warnings:
            _log(f"  {arch.model_type}: WARNING: {w}")
        bundle.finish_reference(writer, opts=opts, arch=arch, reqs=reqs, inputs=fed.entries(len(reqs)), ckpt=ckpt,
                                folders=folders, device=device, model=ref_model, ratios=ratios, warnings=warnings,
                                notes=notes, fixes=fixes, seconds=round(time.time() - t0, 2))
    return out, base


def record(arch_name: str, opts: Options, workdir: Path, out: Path, overwrite: bool = False) -> Path:
    """`mmlora record`: the reference and truth runs of one arch written into the bundle folder `out` (an earlier
    bundle there is replaced only with `overwrite`: harness.output.check_out)."""
    return _record(arch_name, opts, workdir, out, overwrite)[0]


def load(folder: str | Path, verify: bool = True) -> Prepared:
    """A reference bundle as what the judge needs; the requests are the recorded ones, held to their recorded
    inputs (bundle.BundleError otherwise). `verify`: see bundle.sources.open_reference."""
    b, ckpt, arch, config, adapters = bundle.open_reference(folder, verify)
    m = b.manifest
    torch_dtype, device = parse_dtype(m["dtype"]), check_device(m["device"])
    reqs = bundle.recorded_requests(b, arch, config, torch_dtype)
    return Prepared(arch=arch, config=config, ckpt=ckpt, dtype=m["dtype"], torch_dtype=torch_dtype,
                    truth_dtype=truth_dtype(device), device=device, reqs=reqs, adapters=adapters, bundle=b,
                    order=b.names, notes=m["notes"], ratios=m["ratios"], warnings=m["warnings"], fixes=m["fixes"])


def prepare(arch_name: str, opts: Options, workdir: Path) -> Prepared:
    """The reference and truth runs recorded into a bundle in `workdir`, read back as the judge needs them:
    `mmlora correctness` is `mmlora record` then `mmlora compare`, except that the runtime shares the
    reference's loaded weights (one copy in memory) instead of loading the checkpoint again."""
    t0 = time.time()
    out, base = _record(arch_name, opts, workdir, workdir / arch_name / "bundle")
    p = load(out, verify=False)  # recorded a moment ago from the files it would hash again
    p.base, p.seconds = base, time.time() - t0
    return p


def _runtime(p: Prepared, opts: Options, offload: Path | None = None) -> RuntimeModel:
    ranks = [w.rank for a in p.adapters.values() for w in a.modules.values()] or [1]
    targets = {m for a in p.adapters.values() for m in a.modules}  # user adapters may go beyond the recipes
    # one slot per adapter plus one left empty: a mapping that shifts the last adapter's rows into the next
    # slot reads zeros and fails (the slot-shift fault); more empty slots would only cost memory, the slot
    # tables being per module [slots, r_max, in] + [slots, out, r_max] (at LLaVA-7B widths, 5 MB per slot
    # and LM layer)
    kw = dict(kernel=opts.kernel, max_slots=len(p.adapters) + 1, r_max=max(16, *ranks), extra_targets=targets)
    if p.base is not None:
        # a twin of the reference's base model over the same weight tensors: one copy of the weights in memory
        rt = RuntimeModel(p.arch, p.config, shared_twin(p.base), **kw)
    else:
        # a bundle compared in its own process: the reference is not in memory, the runtime loads the checkpoint
        # (placed by accelerate when a device map is given, disk offload into `offload`)
        rt = RuntimeModel.from_checkpoint(p.ckpt, dtype=p.torch_dtype, device=p.device, device_map=opts.device_map,
                                          max_memory=opts.max_memory, offload_folder=offload, **kw)
    for name, adapter in p.adapters.items():
        rt.load_adapter(name, adapter)
    return rt


def _quantize(rt: RuntimeModel, arch: ArchSpec, opts: Options) -> dict:
    from harness.correctness.quantize import quantize_model, skip_violations, snapshot

    before = snapshot(rt.model, arch, opts.quantize_projector)
    done = quantize_model(rt.model, arch, opts.quantize, opts.quantize_projector)
    _log(f"  {arch.model_type}: {opts.quantize} on {len(done)} Linear layers"
         f"{' (projector too)' if opts.quantize_projector else ''}")
    return {"scheme": opts.quantize, "projector_quantized": opts.quantize_projector, "quantized_modules": len(done),
            "violations": skip_violations(before, rt.model)}


def _first(row: Row | None) -> dict | None:
    if row is None:
        return None
    m = row.metrics
    return {"module": row.module, "group": row.group, "request": row.request, "adapter": row.adapter,
            "row": row.bad_row, "image": row.bad_image, "status": m.status, "margin": m.margin,
            "err": m.out.err if m.out else None, "ref_err": m.out.ref_err if m.out else None,
            "ratio": m.out.ratio if m.out else None, "bound": m.out.bound if m.out else None,
            "delta_margin": m.delta.margin if m.delta else None, "detail": row.detail}


def _summarize(p: Prepared, rows: list[Row], opts: Options, modes_run=None) -> dict:
    """`modes_run`: the modes whose detection power counts (an engine's output bundle is judged e2e only)."""
    modes_run = opts.modes if modes_run is None else modes_run
    summary: dict = {"arch": p.arch.model_type, "requests": [
        {"adapter": r.adapter, "images": len(r.images), "geometry": [g.describe() for g in r.images],
         "tokens": len(r.prompt_ids)} for r in p.reqs]}
    summary["first_divergence"] = {mode: _first(first_divergence([r for r in rows if r.mode == mode]))
                                   for mode in opts.modes}
    worst: dict = {}
    for r in rows:
        key = f"{r.mode}/{r.group}"
        worst[key] = max(worst.get(key, 0.0), r.metrics.margin)
    summary["worst_margin"] = worst
    summary["adapter_ratios"] = p.ratios
    # what this batch could have seen: the margin a runtime that dropped each adapter would get (resolution.py)
    summary["detection_power"] = power = dropped_adapter_margins(p, modes_run)
    blind = blind_spots(power)
    for w in blind:
        _log(f"  {p.arch.model_type}: WARNING: {w}")
    summary["warnings"], summary["notes"] = p.warnings + blind, p.notes
    bugs = {f.name: f.upstream_bug for f in p.arch.reference_fixes()}
    summary["reference_fixes"] = {name: bugs[name] for name in p.fixes}
    summary["groups_not_judged"] = []  # an output bundle answering some groups only (its "groups") sets them
    summary["modules_not_produced"] = []  # and one listing modules its engine's model lacks (its "not_produced")
    summary["ok"] = all(r.metrics.ok for r in rows)
    return summary


def _judge_quantized(summary: dict, rows: list[Row], quant: dict, opts: Options) -> None:
    """Quantization drifts by design in the groups it touched: the report shows that drift per group.
    Everything else must still hold: unquantized groups within the rule, no errors, no NaN, and the
    registry's skip list honoured."""
    drifting = {"language_model"} | ({"connector"} if opts.quantize_projector else set())
    broken = [r for r in rows if not r.metrics.ok and (r.metrics.status != "mismatch" or r.group not in drifting)]
    drift: dict = {}
    for r in rows:
        if r.metrics.out is not None:
            key = f"{r.mode}/{r.group}"
            drift[key] = max(drift.get(key, 0.0), r.metrics.out.err / max(r.metrics.out.scale, 1e-30))
    quant["unexpected_failures"] = len(broken)
    quant["drift_by_group"] = drift  # max |runtime - truth| / max |truth|
    summary["quantization"] = quant
    summary["ok"] = not quant["violations"] and not broken


def judge(p: Prepared, opts: Options, fault: Fault | None = None) -> ArchResult:
    """Build the runtime, break it if asked, compare in every mode of `opts`."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="mmlora-offload-") as offload:
        return _judge(p, opts, fault, _runtime(p, opts, Path(offload)), t0)


def _judge(p: Prepared, opts: Options, fault: Fault | None, rt: RuntimeModel, t0: float) -> ArchResult:
    if fault is not None:
        fault.apply(rt)
    quant = _quantize(rt, p.arch, opts) if opts.quantize else None
    rows: list[Row] = []
    at = p.arch.model_type
    if "e2e" in opts.modes:
        _log(f"  {at}: runtime e2e")
        with Progress(f"{at}: runtime e2e", None, "module output") as pe:
            rows += modes.e2e(p, rt, pe.step)
    if "replay" in opts.modes:
        _log(f"  {at}: replay of {len(rt.lora_names)} LoRA modules")
        with Progress(f"{at}: replay", sum(n in rt.tables.shapes for n in p.order)) as pr:
            rows += modes.replay(p, rt, pr.step)
    summary = _summarize(p, rows, opts)
    if quant is not None:
        _judge_quantized(summary, rows, quant, opts)
    if fault is not None:
        summary["fault"] = fault.verdict(rt, p.order, summary, rows)
    summary["seconds"] = round(p.seconds + time.time() - t0, 2)
    _log(f"  {p.arch.model_type}: {'ok' if summary['ok'] else 'DIVERGED'} in {summary['seconds']} s")
    return ArchResult(p.arch.model_type, rows, summary)


def judge_outputs(p: Prepared, got: bundle.Bundle, opts: Options, warnings: Sequence[str] = ()) -> ArchResult:
    """An output bundle (an engine's own) against a reference bundle, e2e: no runtime, no model. `warnings`:
    what checking the output bundle found (modules the reference lacks), reported beside the verdict."""
    t0 = time.time()
    rows = modes.compare_outputs(p, got)
    summary = _summarize(p, rows, opts, ("e2e",))
    summary["groups_not_judged"] = bundle.groups_left_out(p.bundle, got)  # the reference's groups only
    summary["modules_not_produced"] = list(bundle.not_produced(got))
    for w in warnings:
        _log(f"  {p.arch.model_type}: WARNING: {w}")
    summary["warnings"] = summary["warnings"] + list(warnings)
    summary["seconds"] = round(p.seconds + time.time() - t0, 2)
    _log(f"  {p.arch.model_type}: {'ok' if summary['ok'] else 'DIVERGED'} in {summary['seconds']} s")
    return ArchResult(p.arch.model_type, rows, summary)


def run_arch(arch_name: str, opts: Options, workdir: Path) -> ArchResult:
    fault = get_fault(opts.fault) if opts.fault else None
    check_fault(fault, arch_name if opts.model == "tiny" else read_checkpoint_config(opts.model)[0].model_type)
    return judge(prepare(arch_name, opts, workdir), opts, fault)


def run(opts: Options) -> list[ArchResult]:
    for m in opts.modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; expected one of {', '.join(MODES)}")
    parse_dtype(opts.dtype)
    check_device(opts.device)
    results = []
    with tempfile.TemporaryDirectory(prefix="mmlora-work-") as tmp:
        for k, name in enumerate(opts.archs, 1):
            _log(f"[{k}/{len(opts.archs)}] {name}")
            results.append(run_arch(name, opts, Path(tmp)))
    return results
