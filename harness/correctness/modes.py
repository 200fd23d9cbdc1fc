"""The two comparison modes, each judging the runtime against the reference's own error w.r.t. the truth.

  e2e     each side feeds itself (the runtime one mixed batch, the reference and the truth each request
          alone): shows drift through the model; the truth is the whole reference model at high precision
  replay  each runtime LoRA module is fed the reference's recorded inputs for the whole batch (with the
          runtime's own batch mapping); the truth is the same PEFT module at high precision on those very
          inputs, so the first faulty module is named exactly

The reference's side comes from its bundle (the bundle package), read one module and request at a time; e2e streams
the runtime's captures into an output bundle first, the very format an engine of its own may hand in
(`compare_outputs`, `mmlora compare REF GOT`).

Anything raised inside the runtime under test is that runtime's failure: an `error` row naming the module
(and the request where it is known), never a crash of the harness.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from harness.correctness.bundle import Key, judged_modules, stream_outputs
from harness.correctness.compare import Metrics, Row, check, error_metrics, held_adapter, judge_tensor
from harness.correctness.rules import rule
from harness.output import one_line
from runtime.mapping import MappingError, rows_phrase
from vlm.capture import first_tensor
from vlm.rows import BOUNDARY_GROUP, LM_IMAGE_EMBEDS, TOWER_OUT, group_row_counts, rows_per_request


def _image_counts(p, req, name: str, group: str) -> list[int] | None:
    """Rows each image of the request contributes to this capture (None for token-indexed captures)."""
    if name == LM_IMAGE_EMBEDS:
        return [p.arch.lm_tokens(p.config, g) for g in req.images]
    if group in ("tower", "connector"):
        return [p.arch.image_rows(p.config, g, group) for g in req.images]
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


def _first_differing_image(p, flat: torch.Tensor, mode: str) -> tuple[int, int, int] | None:
    """(request, image, its expected rows) of the first image whose rows at @tower_out, laid out in batch
    order with the registry's counts, leave the rule against the reference's and the truth's own rows
    there (or run out); None when every image's rows pass."""
    pos, r = 0, rule(p.dtype, mode)
    for i, req in enumerate(p.reqs):
        if not req.images or not p.bundle.has(i, TOWER_OUT) or not p.bundle.has(i, TOWER_OUT, Key.TRUTH_OUT):
            continue
        ref, tru = p.bundle.get(i, TOWER_OUT, Key.OUT), p.bundle.get(i, TOWER_OUT, Key.TRUTH_OUT)
        start = 0
        for j, g in enumerate(req.images):
            n = p.arch.image_rows(p.config, g, "connector")
            got = flat[pos: pos + n]
            if got.shape[0] < n or not check(got, ref[start: start + n], tru[start: start + n], r).ok:
                return i, j, n
            pos, start = pos + n, start + n
    return None


def _row_count_rows(p, mode: str, name: str, err: MappingError, tower_out: list) -> list[Row]:
    """Rows for a row-count mismatch, at the request(s) and image(s) whose rows differ and the first place
    whose count disagrees with the registry's formulas (the group's mapping, or the boundary the model
    delivered the wrong rows at); [] when nothing better than one error row per request can be said."""
    raised = f"runtime raised {one_line(err, 500)}"
    bad = err.miscounted
    if bad:  # the mapping's own per-image counts are wrong: the model's rows are right
        rows = []
        for i in dict.fromkeys(im.request for im in bad):
            mine = [im for im in bad if im.request == i]
            detail = "; ".join(rows_phrase(im, f"{name} ({err.group} mapping)") for im in mine)
            row = make_row(p, mode, i, name, error_metrics(), f"{detail} - {raised}")
            row.bad_image = mine[0].image
            rows.append(row)
        return rows
    if not err.images:
        return []
    # the mapping holds the registry's counts: the model delivered other rows. Into the connector: the tower's
    # output (@tower_out, the connector's input) is the first boundary whose count can disagree
    expected = sum(im.expected for im in err.images)
    if err.group != "connector" or not tower_out or TOWER_OUT not in p.order:
        return []
    t = tower_out[0]
    n_images = len(err.images)
    if t.dim() == 3 and t.shape[0] == n_images:  # one leading row block per image: the split is visible
        per = [im for im in err.images if im.expected != t.shape[1]]
        if per:
            return [_at(p, mode, TOWER_OUT, im.request, im.image,
                        rows_phrase(dataclasses.replace(im, mapped=t.shape[1]), TOWER_OUT) + f" - {raised}")
                    for im in per[:1]]
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in tower_out])
    if flat.shape[0] == expected:
        return []
    first = _first_differing_image(p, flat, mode)
    if first is None:
        return []
    i, j, n = first
    detail = (f"rows: expected {expected} got {flat.shape[0]} at {TOWER_OUT}; the first rows that differ are "
              f"image {j}'s of request {i} ({n} expected there; the runtime's per-image counts cannot be told "
              f"from its flat output) - {raised}")
    return [_at(p, mode, TOWER_OUT, i, j, detail)]


def _at(p, mode: str, name: str, i: int, image: int, detail: str) -> Row:
    row = make_row(p, mode, i, name, error_metrics(), detail)
    row.bad_image = image
    return row


def _error_rows(p, mode: str, name: str, err: BaseException, requests=None, tower_out=()) -> list[Row]:
    where = re.search(r"module '([^']+)'", str(err))
    name = where.group(1) if where and where.group(1) in p.order else name
    if isinstance(err, MappingError) and err.group in ("tower", "connector"):
        rows = _row_count_rows(p, mode, name, err, list(tower_out))
        if rows:
            return rows
    idx = [i for i in (requests if requests is not None else range(len(p.reqs))) if p.bundle.has(i, name)] or [0]
    return [make_row(p, mode, i, name, error_metrics(), f"runtime raised {one_line(err, 500)}") for i in idx]


def _base_weight(p, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's base Linear of `name` as recorded (weight, bias), on the reference's device."""
    b = p.bundle.get(None, name, Key.BIAS)
    return p.bundle.get(None, name, Key.WEIGHT).to(p.device), None if b is None else b.to(p.device)


def compare_outputs(p, got) -> list[Row]:
    """Each module's output of a full runtime (or engine) forward, an output bundle, against the reference
    and the truth of each request run alone; read one module and request at a time. Rows come request by
    request, modules in the reference's order; only the groups the bundle answers (its "groups"), less the
    modules its engine's model does not have (its "not_produced")."""
    rows = []
    r = rule(p.dtype, "e2e")
    for name in judged_modules(p.bundle, got):  # in the reference's order (p.order)
        base = None  # its base Linear, read once for all requests (at real widths a weight is hundreds of MB)
        for i in range(len(p.reqs)):
            if not p.bundle.has(i, name):
                continue
            if not got.has(i, name):
                rows.append(make_row(p, "e2e", i, name, error_metrics(), "runtime did not capture this module"))
                continue
            g_in = got.get(i, name, Key.IN)
            bases = None
            if not name.startswith("@") and g_in is not None and p.bundle.has(None, name, Key.WEIGHT) \
                    and p.bundle.has(i, name, Key.BASE) and p.bundle.has(i, name, Key.TRUTH_BASE):
                base = base or _base_weight(p, name)
                # the reference's base Linear on the engine's input, at the run dtype: an input stored at another
                # float dtype (docs/bundles.md) is rounded to the one the reference's own base output was taken at,
                # so the engine's delta is measured against the base output the reference would give on it
                with torch.no_grad():
                    got_base = F.linear(g_in.to(p.device, base[0].dtype), *base).cpu()
                bases = (got_base, p.bundle.get(i, name, Key.BASE), p.bundle.get(i, name, Key.TRUTH_BASE))
            m = judge_tensor(got.get(i, name, Key.OUT), p.bundle.get(i, name, Key.OUT),
                             p.bundle.get(i, name, Key.TRUTH_OUT), r, bases)
            rows.append(make_row(p, "e2e", i, name, m))
            del g_in, bases
        del base
    rows.sort(key=lambda row: row.request)  # stable: each request's rows keep the modules' order
    return rows


def e2e(p, rt, step: Callable[[], None] = lambda: None) -> list[Row]:
    """The runtime's one mixed batch, streamed into an output bundle, against each request run alone by the
    reference and the truth (`step()` per module output the runtime's forward captures: progress)."""
    current: list[str] = [p.order[0]]

    def entering(name: str) -> Callable:
        def hook(*_):
            current[0] = name
        return hook

    # the connector's input as the runtime's model delivers it: a row-count mismatch there is localised to
    # the image whose rows differ (the bundle stream stops at the runtime's error)
    tower_out: list[torch.Tensor] = []

    def keep(_mod, args, kwargs):
        x = first_tensor(args, kwargs, "hidden_states", "input", "x")
        if x is not None:
            tower_out.append(x.detach().cpu())

    conn = p.arch.measure_points(rt.model).get("connector")
    conn = conn if conn in dict(rt.model.named_modules()) else None
    with tempfile.TemporaryDirectory(prefix="mmlora-got-") as tmp:
        handles = [rt.model.get_submodule(n).register_forward_pre_hook(entering(n)) for n in rt.lora_names]
        if conn is not None:
            handles.append(rt.model.get_submodule(conn).register_forward_pre_hook(keep, with_kwargs=True))
        try:
            got = stream_outputs(rt, p.reqs, Path(tmp), step, reference=p.bundle.sha256)
        except Exception as e:  # noqa: BLE001 - a runtime failure is a verdict, not a harness crash
            return _error_rows(p, "e2e", current[0], e, tower_out=tower_out)
        finally:
            for h in handles:
                h.remove()
        return compare_outputs(p, got)


def _replay_module(p, rt, name: str, have: list[int], mapping) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The runtime module on the reference's inputs of every request at once: per-request outputs, and
    per-request outputs of its base Linear on the same batch (what the runtime's LoRA was added to)."""
    group = p.arch.group_of(name)
    lengths = [len(r.prompt_ids) for r in p.reqs]
    l_max = max(lengths)
    ins = {i: p.bundle.get(i, name, Key.IN) for i in have}
    if group == "language_model":
        x = torch.zeros(len(p.reqs), l_max, ins[have[0]].shape[-1], dtype=p.torch_dtype)
        for i in have:
            x[i, : lengths[i]] = ins[i]
        counts = None
    else:
        x = torch.cat([ins[i] for i in have])
        counts = group_row_counts(p.arch, p.config, p.reqs, group)
    module = rt.model.get_submodule(name)
    held: list[torch.Tensor] = []
    # the base Linear's output inside this very call, cloned before the LoRA is added into it in place: what
    # the runtime added its LoRA to, with no second GEMM
    hook = module.base_layer.register_forward_hook(lambda _m, _a, out: held.append(out.detach().cpu().clone()))
    rt.mapping = mapping
    try:
        with torch.no_grad():
            y = module(x.to(rt.device)).cpu()
    finally:
        rt.mapping = None
        hook.remove()
    base = held[0]
    return (rows_per_request(y, group, counts, lengths, l_max, name),
            rows_per_request(base, group, counts, lengths, l_max, name))


def held_allowance(p, i: int, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """The allowance for request i's adapter held at the run dtype on module `name` fed `x` (None where
    the request's adapter does not act on the module)."""
    a = p.adapters.get(p.reqs[i].adapter) if p.reqs[i].adapter else None
    w = a.modules.get(name) if a is not None else None
    return None if w is None else held_adapter(x, w.A, w.B, w.scale, p.torch_dtype)


def replay(p, rt, step: Callable[[], None] = lambda: None) -> list[Row]:
    """Every LoRA module of the runtime fed the reference's recorded inputs (`step()` after each: progress)."""
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
        step()
        have = [i for i in range(len(p.reqs)) if p.bundle.has(i, name) and p.bundle.has(i, name, Key.IN)]
        if not have:
            continue
        try:
            pieces, bases = _replay_module(p, rt, name, have, mapping)
        except Exception as e:  # noqa: BLE001 - a runtime failure is a verdict, not a harness crash
            rows += _error_rows(p, "replay", name, e, have)
            continue
        for i in have:
            # recorded on the reference's own input: the same PEFT module at high precision (output and base
            # output), and the reference's base output at the run dtype. Each side's delta is taken against
            # its own base output: the runtime's batched base GEMM may round a few elements one ulp apart
            # from the reference's per-request one (seen at fp16 on CPUs with AMX: 0.8% of a no-adapter
            # request's elements, margin 1.07 on its delta's rms), a difference of the base, not of the LoRA
            m = judge_tensor(pieces[i], p.bundle.get(i, name, Key.OUT), p.bundle.get(i, name, Key.REPLAY_TRUTH_OUT),
                             r, (bases[i], p.bundle.get(i, name, Key.BASE),
                                 p.bundle.get(i, name, Key.REPLAY_TRUTH_BASE)),
                             held_allowance(p, i, name, p.bundle.get(i, name, Key.IN)))
            rows.append(make_row(p, "replay", i, name, m))
        del pieces, bases
    return rows
