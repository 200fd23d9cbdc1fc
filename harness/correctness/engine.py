"""The correctness engine: reference (HF + PEFT, each request alone) vs runtime (one mixed batch), every
LoRA module and group boundary, per request, in two modes:

  e2e     each side feeds itself: shows drift through the model
  replay  each runtime LoRA module is fed the reference's recorded inputs for the whole batch (with the
          runtime's own batch mapping), so the first faulty module is named exactly
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.correctness.compare import Row, compare_tensors, error_metrics, first_divergence, tolerance
from harness.correctness.faults import get_fault
from reference.adapters import add_adapters, default_specs, load_adapters, save_adapters
from reference.run import run_reference
from runtime.mapping import MappingError
from runtime.model import RuntimeModel
from vlm.adapter_files import read_adapter
from vlm.arch import ArchSpec, get_arch
from vlm.checkpoint import (
    build_tiny,
    check_device,
    load_checkpoint,
    parse_dtype,
    read_checkpoint_config,
    save_checkpoint,
)
from vlm.requests import Request, make_request
from vlm.rows import BOUNDARY_GROUP, group_row_counts, rows_per_request

MODES = ("e2e", "replay")


@dataclass
class Options:
    archs: Sequence[str]
    model: str = "tiny"
    adapters: dict[str, str] = field(default_factory=dict)
    n_adapters: int = 3
    dtype: str = "fp32"
    device: str = "cpu"
    modes: Sequence[str] = MODES
    fault: str | None = None
    kernel: str = "triton"
    seed: int = 0
    quantize: str | None = None  # "lm-int8": weight-only int8 of the runtime's LM Linears
    quantize_projector: bool = False  # also quantize the connector (against the registry's skip list)
    quant_honour_skips: bool = True  # False only in tests: a quantizer that ignores the skip list


@dataclass
class ArchResult:
    arch: str
    rows: list[Row]
    summary: dict


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_requests(arch: ArchSpec, config, adapter_names: Sequence[str]) -> list[Request]:
    """One image per adapter, a no-adapter image, a two-image request, a text-only request."""
    g = arch.default_geometry(config)
    names = list(adapter_names)
    mix = [(n, [g]) for n in names] + [(None, [g])]
    mix.append((names[-1] if names else None, [g, g]))
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


def _row(arch, i, req, mode, order, name, tol, dtype, metrics, detail=""):
    group = BOUNDARY_GROUP.get(name) or arch.group_of(name)
    return Row(arch.model_type, i, req.adapter or "-", mode, order, name, group,
               "boundary" if name.startswith("@") else "lora", dtype, tol.atol, tol.rtol, metrics, detail)


def _module_of_error(msg: str, fallback: str) -> str:
    m = re.search(r"module '([^']+)'", msg)
    return m.group(1) if m else fallback


def compare_e2e(arch, reqs, ref, got, order, dtype) -> list[Row]:
    tol = tolerance(dtype, "e2e")
    rows = []
    for i, req in enumerate(reqs):
        for name in order:
            if name not in ref[i]:
                continue
            if name not in got[i]:
                rows.append(_row(arch, i, req, "e2e", order.index(name), name, tol, dtype,
                                 error_metrics(), "runtime did not capture this module"))
                continue
            m = compare_tensors(ref[i][name]["out"], got[i][name]["out"], tol)
            rows.append(_row(arch, i, req, "e2e", order.index(name), name, tol, dtype, m))
    return rows


def replay(arch, config, rt: RuntimeModel, reqs, ref, order, dtype, device, torch_dtype) -> list[Row]:
    """Feed every runtime LoRA module the reference's inputs for the whole batch at once."""
    tol = tolerance(dtype, "replay")
    rows = []
    lengths = [len(r.prompt_ids) for r in reqs]
    l_max = max(lengths)
    for name in order:
        if name not in rt.tables.shapes:
            continue
        group = arch.group_of(name)
        have = [i for i in range(len(reqs)) if name in ref[i] and "in" in ref[i][name]]
        if not have:
            continue
        if group == "language_model":
            d = ref[have[0]][name]["in"].shape[-1]
            x = torch.zeros(len(reqs), l_max, d, dtype=torch_dtype)
            for i in have:
                x[i, : lengths[i]] = ref[i][name]["in"]
            counts = None
        else:
            x = torch.cat([ref[i][name]["in"] for i in have])
            counts = group_row_counts(arch, config, reqs, group)
        module = rt.model.get_submodule(name)
        try:
            rt.mapping = rt.make_mapping(reqs, l_max)
            with torch.no_grad():
                y = module(x.to(device)).cpu()
            pieces = rows_per_request(y, group, counts, lengths, l_max, name)
        except MappingError as e:
            for i in have:
                rows.append(_row(arch, i, reqs[i], "replay", order.index(name), name, tol, dtype,
                                 error_metrics(), " ".join(str(e).split())))
            continue
        finally:
            rt.mapping = None
        for i in have:
            m = compare_tensors(ref[i][name]["out"], pieces[i], tol)
            rows.append(_row(arch, i, reqs[i], "replay", order.index(name), name, tol, dtype, m))
    return rows


def check_fault(fault, model_type: str) -> None:
    if fault is not None and not fault.applies_to(model_type):
        raise ValueError(f"fault {fault.name!r} applies only to {', '.join(fault.archs())} (the archs that "
                         f"substitute {fault.kernel}), not {model_type!r}")


def _checkpoint(arch_name: str, opts: Options, workdir: Path) -> Path:
    """One set of weights for both sides, through the real loading code (a tiny model is saved first)."""
    if opts.model != "tiny":
        return Path(opts.model)
    _, model = build_tiny(get_arch(arch_name), seed=opts.seed)
    return save_checkpoint(model, workdir / arch_name / "ckpt")


def _reference_side(ckpt: Path, opts: Options, workdir: Path, torch_dtype, device):
    """HF + PEFT: the adapters (given, or made from the recipes), the requests, and the per-request captures."""
    arch, config, ref_model = load_checkpoint(ckpt, dtype=torch_dtype, device=device)
    if opts.adapters:
        folders = {k: Path(v) for k, v in opts.adapters.items()}
        pm = load_adapters(ref_model, folders)
    else:
        specs = default_specs(opts.n_adapters)
        pm = add_adapters(ref_model, arch, specs) if specs else None
        folders = save_adapters(pm, workdir / arch.model_type / "adapters") if specs else {}
    notes = [w for name, folder in folders.items()
             for w in arch.check_targets(config, list(read_adapter(folder).modules), f"adapter {name!r}")]
    for n in notes:
        _log(f"  {arch.model_type}: note: {n}")
    reqs = default_requests(arch, config, list(folders))
    _log(f"  {arch.model_type}: reference ({len(reqs)} requests, {len(folders)} adapters, {opts.dtype})")
    if pm is None:
        pm = add_adapters(ref_model, arch, default_specs(1))  # hooks only: every request runs with none
    ref = run_reference(pm, arch, config, reqs, "single", device, torch_dtype).captures
    return arch, config, reqs, folders, ref, notes


def _runtime_side(ckpt: Path, opts: Options, folders: dict, torch_dtype, device) -> RuntimeModel:
    adapters = {name: read_adapter(folder) for name, folder in folders.items()}
    ranks = [w.rank for a in adapters.values() for w in a.modules.values()] or [1]
    targets = {m for a in adapters.values() for m in a.modules}  # user adapters may go beyond the recipes
    rt = RuntimeModel.from_checkpoint(ckpt, dtype=torch_dtype, device=device, kernel=opts.kernel,
                                      max_slots=max(8, len(folders)), r_max=max(16, *ranks),
                                      extra_targets=targets)
    for name, adapter in adapters.items():
        rt.load_adapter(name, adapter)
    return rt


def _quantize(rt: RuntimeModel, arch: ArchSpec, opts: Options) -> dict:
    from harness.correctness.quantize import quantize_model, skip_violations, snapshot

    before = snapshot(rt.model)
    done = quantize_model(rt.model, arch, opts.quantize, opts.quantize_projector, opts.quant_honour_skips)
    _log(f"  {arch.model_type}: {opts.quantize} on {len(done)} Linear layers"
         f"{' (projector too)' if opts.quantize_projector else ''}")
    return {"scheme": opts.quantize, "projector_quantized": opts.quantize_projector, "quantized_modules": len(done),
            "violations": skip_violations(before, rt.model, arch, opts.quantize_projector)}


def _run_e2e(arch, rt, reqs, ref, order, dtype) -> list[Row]:
    _log(f"  {arch.model_type}: runtime e2e")
    try:
        return compare_e2e(arch, reqs, ref, rt.run(reqs), order, dtype)
    except MappingError as e:
        name = _module_of_error(str(e), order[0])
        tol = tolerance(dtype, "e2e")
        rows = [_row(arch, i, r, "e2e", order.index(name) if name in order else 0, name, tol, dtype,
                     error_metrics(), " ".join(str(e).split())) for i, r in enumerate(reqs) if name in ref[i]]
        return rows or [_row(arch, 0, reqs[0], "e2e", 0, name, tol, dtype, error_metrics(), str(e))]


def _summarize(arch, reqs, rows: list[Row], opts: Options) -> dict:
    summary: dict = {"arch": arch.model_type, "requests": [{"adapter": r.adapter, "images": len(r.images),
                                                             "tokens": len(r.prompt_ids)} for r in reqs]}
    for mode in opts.modes:
        first = first_divergence([r for r in rows if r.mode == mode])
        summary.setdefault("first_divergence", {})[mode] = None if first is None else {
            "module": first.module, "group": first.group, "request": first.request, "status": first.metrics.status,
            "max_abs": first.metrics.max_abs, "detail": first.detail}
    worst: dict = {}
    for r in rows:
        if r.metrics.max_abs == r.metrics.max_abs:  # not NaN
            key = f"{r.mode}/{r.group}"
            worst[key] = max(worst.get(key, 0.0), r.metrics.max_abs)
    summary["max_abs_by_group"] = worst
    summary["ok"] = all(r.metrics.ok for r in rows)
    return summary


def _judge_quantized(summary: dict, rows: list[Row], quant: dict, opts: Options) -> None:
    """Quantization drifts by design in the groups it touched: the report shows that drift per group.
    Everything else must still hold: unquantized groups within tolerance, no errors, no NaN, and the
    registry's skip list honoured."""
    drifting = {"language_model"} | ({"connector"} if opts.quantize_projector else set())
    broken = [r for r in rows if not r.metrics.ok and (r.metrics.status != "mismatch" or r.group not in drifting)]
    quant["unexpected_failures"] = len(broken)
    summary["quantization"] = quant
    summary["ok"] = not quant["violations"] and not broken


def run_arch(arch_name: str, opts: Options, workdir: Path) -> ArchResult:
    t0 = time.time()
    torch_dtype, device = parse_dtype(opts.dtype), check_device(opts.device)
    fault = get_fault(opts.fault) if opts.fault else None
    check_fault(fault, arch_name if opts.model == "tiny" else read_checkpoint_config(opts.model)[0].model_type)
    ckpt = _checkpoint(arch_name, opts, workdir)
    arch, config, reqs, folders, ref, notes = _reference_side(ckpt, opts, workdir, torch_dtype, device)
    rt = _runtime_side(ckpt, opts, folders, torch_dtype, device)
    if fault is not None:
        fault.apply(rt)
    quant = _quantize(rt, arch, opts) if opts.quantize else None
    order = _order(ref)
    rows: list[Row] = []
    if "e2e" in opts.modes:
        rows += _run_e2e(arch, rt, reqs, ref, order, opts.dtype)
    if "replay" in opts.modes:
        _log(f"  {arch.model_type}: replay of {len(rt.lora_names)} LoRA modules")
        rows += replay(arch, config, rt, reqs, ref, order, opts.dtype, device, torch_dtype)
    summary = _summarize(arch, reqs, rows, opts)
    summary["notes"] = notes
    if quant is not None:
        _judge_quantized(summary, rows, quant, opts)
    if fault is not None:
        expected = fault.expected_first(rt, order)
        got_first = (summary["first_divergence"].get(fault.mode) or {}).get("module")
        summary["fault"] = {"name": fault.name, "breaks": fault.breaks, "expected_first": expected,
                            "mode": fault.mode, "first": got_first, "caught": expected is not None and got_first == expected}
    summary["seconds"] = round(time.time() - t0, 2)
    _log(f"  {arch.model_type}: {'ok' if summary['ok'] else 'DIVERGED'} in {summary['seconds']} s")
    return ArchResult(arch.model_type, rows, summary)


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
