"""The one sentence a seeded-fault run ends with (terminal and report headline): was the fault caught, was the
module the catalog expects named first, and the one margin (error / bound, > 1 fails) that decided it.

  caught and named:      the first divergence's margin (the row that failed the run and named the module)
  caught, named elsewhere: the same row's margin, at the module it named
  MISSED:                the largest margin at the expected module (how close the fault came to the bound)
  a control:             passed: its largest margin anywhere; a false alarm: the first divergence's margin
"""

from __future__ import annotations

import math
import sys


def _figure(margin, status: str | None = None) -> str:
    """A margin as read: 'margin 3.2' (error / bound), or the status when the tensor could not be judged."""
    if status in ("error", "nonfinite", "shape"):
        return {"error": "the runtime raised", "nonfinite": "non-finite output",
                "shape": "wrong output shape"}[status]
    if margin is None or (isinstance(margin, float) and math.isnan(margin)):
        return "no margin (module not compared)"
    return f"margin {margin:.3g}"


def where(d: dict) -> str:
    """Where a first divergence lies: its request and adapter, and the first failing row with its image."""
    at = f"request {d['request']} (adapter {d['adapter']})"
    if d.get("row", -1) >= 0:
        at += f", row {d['row']}" + (f" (image {d['image']})" if d.get("image", -1) >= 0 else "")
    return at


def divergence(d: dict) -> str:
    """One first divergence as the terminal and the report's headline both say it: module, group, where,
    the margin (or why the tensor could not be judged) and the detail (a row-count mismatch's counts)."""
    figure = f"margin {d['margin']:.3g}" if d["status"] == "mismatch" else d["status"]
    return (f"{d['module']} ({d['group']}), {where(d)}: {figure}"
            + (f" - {d['detail']}" if d.get("detail") else ""))


def not_judged(summary: dict) -> str:
    """What one arch's run left unjudged, in words ('' when it judged everything): the groups an output
    bundle does not answer and the modules it says its engine's model does not have."""
    parts = [f"group {g}" for g in summary.get("groups_not_judged") or ()]
    n = len(summary.get("modules_not_produced") or ())
    if n:
        parts.append(f"{n} module{'s' if n > 1 else ''} not produced")
    return ", ".join(parts)


def run_not_judged(results) -> str:
    """`not_judged` over a run's archs ('' when every arch judged everything); each arch named when several ran."""
    parts = [(r.arch, w) for r in results if (w := not_judged(r.summary))]
    return "; ".join(w if len(results) < 2 else f"{arch}: {w}" for arch, w in parts)


def verdict(ok: bool, left: str = "") -> str:
    """The verdict line's words (terminal, summary.json's "verdict", the report's title): a run that left
    something unjudged (`left`, from `run_not_judged`) says so in the verdict itself, never "every module"."""
    if not left:
        return "every module within the rule" if ok else "DIVERGENCE"
    return f"{'every judged module within the rule' if ok else 'DIVERGENCE'}; NOT JUDGED: {left}"


def fault_headline(arch: str, summary: dict) -> str | None:
    """The sentence for one arch's summary, or None when the run had no seeded fault."""
    f = summary.get("fault")
    if not f:
        return None
    first = (summary.get("first_divergence") or {}).get(f["mode"]) or {}
    where = f"({arch}, {f['mode']})"
    if f["control"]:
        if f["passed"]:
            return (f"seeded control {f['name']}: passed, as a legitimate variation must; largest "
                    f"{_figure(f['margin'])} {where}")
        return (f"seeded control {f['name']}: FALSE ALARM at {first.get('module', '?')}; "
                f"{_figure(first.get('margin'), first.get('status'))} {where}")
    expected = f["expected_first"] or "an unknown module (the fault's rule names none in this model)"
    if not f["caught"]:
        return f"seeded fault {f['name']}: MISSED (expected at {expected}); {_figure(f['margin'])} there {where}"
    if not first:  # failed in another mode only: the fault's own mode named nothing
        return (f"seeded fault {f['name']}: caught, but {f['mode']} names no module (expected {expected}) "
                f"{where}")
    decided = _figure(first.get("margin"), first.get("status"))
    if f["named"]:
        return f"seeded fault {f['name']}: caught, named at {first['module']} (expected); {decided} {where}"
    return (f"seeded fault {f['name']}: caught, but first named at {first['module']} (expected {expected}); "
            f"{decided} {where}")


def fault_headlines(results) -> list[str]:
    """One sentence per arch that ran a seeded fault, in run order."""
    return [line for r in results if (line := fault_headline(r.arch, r.summary)) is not None]


def print_fault_headlines(results) -> None:
    """The run's last lines on stderr, after the verdict and its details."""
    for line in fault_headlines(results):
        print(line, file=sys.stderr)
