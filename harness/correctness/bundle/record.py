"""Recording a reference bundle: from the staged reference and truth captures, each module's tensors (the
reference's, the truth's, the base Linear's outputs and the replay truth) computed and written, then the
manifest."""

from __future__ import annotations

import dataclasses
import shutil
import statistics
from pathlib import Path

import torch

from harness.correctness.bundle.format import Key, Kind, tensor_name
from harness.correctness.bundle.sources import record_sources
from harness.correctness.bundle.stage import Stage, split
from harness.correctness.bundle.writer import BundleWriter, request_entry
from harness.correctness.truth import high_precision, truth_dtype
from reference.run import BASE_PREFIX, base_output, module_outputs
from vlm.capture import boundary_points
from vlm.rows import BOUNDARY_GROUP


def write_reference(tmp: Path, stage: Stage, *, order: list[str], arch, config, reqs, pm, device,
                    targets: dict[str, set[str]],
                    step=lambda: None) -> tuple[BundleWriter, dict[str, dict[str, float]]]:
    """Every module's file, in the reference's order, from the staged reference and truth captures; returns
    the writer (manifest still to finish) and the adapters' measured rms(delta) / rms(base) per group.
    `step()` after each module (progress)."""
    tdt = truth_dtype(device)
    per_ratio: dict[str, dict[str, list[float]]] = {}
    writer = BundleWriter(tmp, len(reqs))
    for name in order:
        tensors = _module_tensors(stage, name, arch=arch, config=config, reqs=reqs, pm=pm, device=device,
                                  tdt=tdt, targets=targets, per_ratio=per_ratio)
        writer.add(name, BOUNDARY_GROUP.get(name) or arch.group_of(name), tensors)
        del tensors
        step()
    shutil.rmtree(stage.folder)
    return writer, {a: {g: statistics.median(v) for g, v in groups.items()} for a, groups in per_ratio.items()}


def finish_reference(writer: BundleWriter, *, opts, arch, reqs, inputs: list[dict], ckpt: Path,
                     folders: dict[str, Path], device, model, **fields) -> None:
    """The manifest; a generated checkpoint and generated adapters (in a work folder) are copied in. `inputs`:
    per request its input file's `file` and `sha256` (bundle.inputs.InputRecord). `model`: the reference's
    loaded HF model (where its boundaries were taken, the image token and attention it ran with)."""
    checkpoint, adapters = record_sources(writer.folder, opts, ckpt, folders)
    # the very table the capture hooks were placed from (vlm.capture.boundary_points): an engine reads where
    # each boundary is taken instead of carrying its own per-arch copy
    points = boundary_points(arch, model)
    for m in writer.modules:
        if m["name"] in points:
            m["taken_at"] = points[m["name"]]
    writer.finish({
        "kind": Kind.REFERENCE, "arch": arch.model_type, "dtype": opts.dtype, "device": str(device),
        "truth_dtype": str(truth_dtype(device)).removeprefix("torch."), "seed": opts.seed,
        "options": {"model": opts.model, "n_adapters": opts.n_adapters, "adapter_scale": opts.adapter_scale},
        "checkpoint": checkpoint, "adapters": adapters,
        # the id the reference matched `input_ids` against for `@lm_image_embeds` (the arch's config key, read
        # as the registry reads it), and the attention the checkpoint loaded with (transformers' default: not
        # fixed by the harness, so recorded)
        "image_token_id": arch.image_token_id(model.config),
        "attn_implementation": model.config._attn_implementation,
        "geometries": [dataclasses.asdict(g) for g in opts.geometries],
        # the LoRA modules that run but whose output the model never reads (the tower layers after
        # vision_feature_layer): the only names an output bundle's "not_produced" may list (bundle.reader)
        "unused_modules": arch.unused_modules(model.config, [m["name"] for m in writer.modules
                                                             if not m["name"].startswith("@")]),
        # the seed draws the project's own pixels (bundle.requests); an engine feeds the recorded inputs
        "requests": [{**request_entry(r), "seed": r.seed, **f} for r, f in zip(reqs, inputs, strict=True)],
        **fields})


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def _module_tensors(stage: Stage, name: str, *, arch, config, reqs, pm, device, tdt: torch.dtype,
                    targets: dict[str, set[str]], per_ratio: dict[str, dict[str, list[float]]]) -> dict:
    """One module's tensors for every request (what the judge reads, so that it needs no model): the staged
    captures split per request, base outputs through the reference's own base Linear at the run dtype, then,
    with the same model inside `high_precision` (the truth: no second copy), the replay truth through the
    PEFT module on the reference's input and the truth's base outputs. `per_ratio` gathers each targeted
    module's rms(delta) / rms(base) of the truth, per adapter and group."""
    lora = not name.startswith("@")
    out: dict[str, torch.Tensor] = {}
    truth_work = []  # (request, the reference's input, the truth's input, the truth's output)
    for i, req in enumerate(reqs):
        alone = {"arch": arch, "config": config, "reqs": [req], "l_max": len(req.prompt_ids)}  # run by itself
        ref_out = split(stage, ("ref", i), name, Key.OUT, **alone)[0]
        ref_in = split(stage, ("ref", i), name, Key.IN, **alone)[0]
        if ref_out is None and ref_in is None:
            continue
        tru_out = split(stage, ("truth", i), name, Key.OUT, **alone)[0]
        tru_in = split(stage, ("truth", i), name, Key.IN, **alone)[0]
        stage.drop(("ref", i), name)
        stage.drop(("truth", i), name)
        out[tensor_name(Key.OUT, i)] = ref_out
        if tru_out is not None:
            out[tensor_name(Key.TRUTH_OUT, i)] = tru_out
        if not lora:
            continue
        if ref_in is not None:
            out[tensor_name(Key.IN, i)] = ref_in
            out[tensor_name(Key.BASE, i)] = base_output(pm, name, ref_in.to(device)).cpu()
        truth_work.append((i, req, ref_in, tru_in, tru_out))
    if truth_work:
        with high_precision(pm, tdt):
            for i, req, ref_in, tru_in, tru_out in truth_work:
                if ref_in is not None:
                    t_out, t_base = module_outputs(pm, name, ref_in.to(device, tdt), req.adapter)
                    out[tensor_name(Key.REPLAY_TRUTH_OUT, i)] = t_out.cpu()
                    out[tensor_name(Key.REPLAY_TRUTH_BASE, i)] = t_base.cpu()
                if tru_in is not None:
                    t_base = base_output(pm, name, tru_in.to(device)).cpu()
                    out[tensor_name(Key.TRUTH_BASE, i)] = t_base
                    if req.adapter is not None and name in targets.get(req.adapter, ()) and tru_out is not None:
                        r = _rms(tru_out - t_base) / max(_rms(t_base), 1e-300)
                        per_ratio.setdefault(req.adapter, {}).setdefault(arch.group_of(name), []).append(r)
    if lora:
        from accelerate.utils import align_module_device

        base = pm.get_submodule(BASE_PREFIX + name).get_base_layer()
        # a module accelerate offloads (device maps) holds meta tensors until its hook loads them
        with align_module_device(base, torch.device("cpu")):
            # no copy: on the CPU this is the model's own tensor, which safetensors reads as it writes the file
            out[Key.WEIGHT] = base.weight.detach().cpu()
            if base.bias is not None:
                out[Key.BIAS] = base.bias.detach().cpu()
    return out
