"""The two comparison modes, each judging the runtime against the reference's own error w.r.t. the truth.

  e2e     each side feeds itself (the runtime one mixed batch, the reference and the truth each request
          alone): shows drift through the model; the truth is the whole reference model at high precision
  replay  each runtime LoRA module is fed the reference's recorded inputs for the whole batch (with the
          runtime's own batch mapping); the truth is the same PEFT module at high precision on those very
          inputs, so the first faulty module is named exactly

Anything raised inside the runtime under test is that runtime's failure: an `error` row naming the module
(and the request where it is known), never a crash of the harness.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable

import torch

from harness.correctness.compare import Metrics, Row, error_metrics, judge
from harness.correctness.rules import rule
from harness.correctness.truth import high_precision
from reference.run import base_output, module_outputs
from vlm.rows import BOUNDARY_GROUP, LM_IMAGE_EMBEDS, group_row_counts, rows_per_request


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]


def _image_counts(p, req, name: str, group: str) -> list[int] | None:
    """Rows each image of the request contributes to this capture (None for token-indexed captures)."""
    if name == LM_IMAGE_EMBEDS:
        return [p.arch.lm_tokens(p.config, g) for g in req.images]
    if group == "tower":
        return [p.arch.encoder_rows(p.config, g) for g in req.images]
    if group == "connector":
        return [p.arch.connector_rows(p.config, g) for g in req.images]
    return None


def make_row(p, mode: str, i: int, name: str, metrics: Metrics, detail: str = "") -> Row:
    req = p.reqs[i]
    group = BOUNDARY_GROUP.get(name) or p.arch.group_of(name)
    bad_row, bad_image = metrics.first_bad, -1
    counts = _image_counts(p, req, name, group)
    if bad_row >= 0 and counts:
        bad_image = bisect.bisect_right([sum(counts[: k + 1]) for k in range(len(counts))], bad_row)
    return Row(p.arch.model_type, mode, i, req.adapter or "-", p.order.index(name) if name in p.order else 0,
               name, group, "boundary" if name.startswith("@") else "lora", p.dtype, rule(p.dtype, mode), metrics,
               detail, bad_row, bad_image)


def _error_rows(p, mode: str, name: str, err: BaseException, requests=None) -> list[Row]:
    where = re.search(r"module '([^']+)'", str(err))
    name = where.group(1) if where and where.group(1) in p.order else name
    idx = [i for i in (requests if requests is not None else range(len(p.reqs))) if name in p.ref[i]] or [0]
    return [make_row(p, mode, i, name, error_metrics(), f"runtime raised {_one_line(err)}") for i in idx]


def _cached(p, key, make):
    if key not in p.cache:
        p.cache[key] = make()
    return p.cache[key]


def _bases(p, i: int, name: str, got_in, ref_in, truth_in):
    """The base Linear's output on each side's input (reference and truth ones are computed once)."""
    if name.startswith("@") or got_in is None or ref_in is None or truth_in is None:
        return None

    def fixed():
        with high_precision(p.truth_pm, p.truth_dtype):
            truth_base = base_output(p.truth_pm, name, truth_in.to(p.device)).cpu()
        return base_output(p.ref_pm, name, ref_in.to(p.device)).cpu(), truth_base
    ref_base, truth_base = _cached(p, ("e2e-bases", i, name), fixed)
    return base_output(p.ref_pm, name, got_in.to(p.device)).cpu(), ref_base, truth_base


def e2e(p, rt) -> list[Row]:
    """The runtime's one mixed batch against each request run alone by the reference and the truth."""
    current: list[str] = [p.order[0]]

    def entering(name: str) -> Callable:
        def hook(*_):
            current[0] = name
        return hook

    handles = [rt.model.get_submodule(n).register_forward_pre_hook(entering(n)) for n in rt.lora_names]
    try:
        got = rt.run(p.reqs)
    except Exception as e:  # noqa: BLE001 - a runtime failure is a verdict, not a harness crash
        return _error_rows(p, "e2e", current[0], e)
    finally:
        for h in handles:
            h.remove()
    rows = []
    r = rule(p.dtype, "e2e")
    for i in range(len(p.reqs)):
        for name in p.order:
            if name not in p.ref[i]:
                continue
            if name not in got[i]:
                rows.append(make_row(p, "e2e", i, name, error_metrics(), "runtime did not capture this module"))
                continue
            g, ref, tru = got[i][name], p.ref[i][name], p.truth[i][name]
            bases = _bases(p, i, name, g.get("in"), ref.get("in"), tru.get("in"))
            rows.append(make_row(p, "e2e", i, name, judge(g["out"], ref["out"], tru["out"], r, bases)))
    return rows


def _replay_module(p, rt, name: str, have: list[int], mapping) -> list[torch.Tensor]:
    """The runtime module on the reference's inputs of every request at once; per-request outputs."""
    group = p.arch.group_of(name)
    lengths = [len(r.prompt_ids) for r in p.reqs]
    l_max = max(lengths)
    if group == "language_model":
        d = p.ref[have[0]][name]["in"].shape[-1]
        x = torch.zeros(len(p.reqs), l_max, d, dtype=p.torch_dtype)
        for i in have:
            x[i, : lengths[i]] = p.ref[i][name]["in"]
        counts = None
    else:
        x = torch.cat([p.ref[i][name]["in"] for i in have])
        counts = group_row_counts(p.arch, p.config, p.reqs, group)
    rt.mapping = mapping
    try:
        with torch.no_grad():
            y = rt.model.get_submodule(name)(x.to(rt.device)).cpu()
    finally:
        rt.mapping = None
    return rows_per_request(y, group, counts, lengths, l_max, name)


def _replay_truth(p, i: int, name: str):
    """On the reference's own input to the module: the truth's output and base output (the same PEFT module
    at high precision), and the base output at the run dtype."""
    x = p.ref[i][name]["in"]
    with high_precision(p.truth_pm, p.truth_dtype):
        truth_out, truth_base = module_outputs(p.truth_pm, name, x.to(p.device, p.truth_dtype), p.reqs[i].adapter)
    return truth_out.cpu(), truth_base.cpu(), base_output(p.ref_pm, name, x.to(p.device)).cpu()


def replay(p, rt) -> list[Row]:
    rows = []
    r = rule(p.dtype, "replay")
    # one batch mapping (and its per-group groupings) for every module, as a forward of the batch builds it
    try:
        mapping = rt.make_mapping(p.reqs, max(len(q.prompt_ids) for q in p.reqs))
    except Exception as e:  # noqa: BLE001 - a runtime failure is a verdict, not a harness crash
        first = next((n for n in p.order if n in rt.tables.shapes), p.order[0])
        return _error_rows(p, "replay", first, e)
    for name in p.order:
        if name not in rt.tables.shapes:
            continue
        have = [i for i in range(len(p.reqs)) if name in p.ref[i] and "in" in p.ref[i][name]]
        if not have:
            continue
        try:
            pieces = _replay_module(p, rt, name, have, mapping)
        except Exception as e:  # noqa: BLE001 - a runtime failure is a verdict, not a harness crash
            rows += _error_rows(p, "replay", name, e, have)
            continue
        for i in have:
            truth_out, truth_base, base = _cached(p, ("replay", i, name), lambda i=i, name=name: _replay_truth(p, i, name))
            m = judge(pieces[i], p.ref[i][name]["out"], truth_out, r, (base, base, truth_base))
            rows.append(make_row(p, "replay", i, name, m))
    return rows
