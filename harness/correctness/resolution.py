"""What this very run could have seen: the detection power of its verdict.

A verdict of "agrees" means something only if a wrong runtime would have failed on the same batch. The most
basic wrong runtime drops an adapter: its LoRA modules return the base Linear's output. Its replay error at a
module is then the delta itself, and the reference bundle already holds everything to judge it by the very
rule a runtime is judged by (compare.judge_tensor): the base output at the run dtype (what such a runtime returns),
the reference's output, and the truth of the same module on the same inputs. No model is run.

Per adapter and group the largest such margin over the group's LoRA modules and the adapter's requests is the
run's resolution for that adapter: above 1 the run tells the adapter from no adapter; at or below 1 it cannot
(small adapters at bf16: rounding at the run dtype is as large as the delta), and "agrees" says nothing about
that adapter there.
"""

from __future__ import annotations

from harness.correctness.bundle import Key
from harness.correctness.compare import judge_tensor
from harness.correctness.modes import held_allowance
from harness.correctness.rules import rule

# where each mode's truth of a LoRA module lies in the reference bundle: (truth of the output, of the base output)
_TRUTH = {"replay": (Key.REPLAY_TRUTH_OUT, Key.REPLAY_TRUTH_BASE), "e2e": (Key.TRUTH_OUT, Key.TRUTH_BASE)}


def dropped_adapter_margins(p, modes) -> dict[str, dict[str, dict[str, dict]]]:
    """adapter -> group -> mode -> {"margin", "module", "request"}: the margin a runtime that dropped the adapter
    would get at the module of the group where it shows most (the largest over the group's modules and the
    adapter's requests). In replay that is exact; in e2e it is the figure at a module whose input is still
    right (the first one the adapter changes): further on, such a runtime's drift adds to it. Groups the adapter
    does not target (or no request of it reaches) are left out."""
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for mode in modes:
        r, (k_out, k_base) = rule(p.dtype, mode), _TRUTH[mode]
        for name in p.order:
            if name.startswith("@"):
                continue  # group boundaries: no base Linear
            group = p.arch.group_of(name)
            for i, req in enumerate(p.reqs):
                if not req.adapter or name not in p.adapters[req.adapter].modules:
                    continue  # the adapter does not target this module: nothing to drop here
                if not all(p.bundle.has(i, name, k) for k in (Key.BASE, k_out, k_base)):
                    continue  # no rows of this request reach the module (a text-only request in the tower)
                base = p.bundle.get(i, name, Key.BASE)
                truth, truth_base = p.bundle.get(i, name, k_out), p.bundle.get(i, name, k_base)
                # replay's reference error carries the allowance for an adapter held at the run dtype, as the
                # runtime's own judgement does (modes.replay); e2e's does not
                held = held_allowance(p, i, name, p.bundle.get(i, name, Key.IN)) if mode == "replay" else None
                m = judge_tensor(base, p.bundle.get(i, name, Key.OUT), truth, r, (base, base, truth_base), held)
                slot = out.setdefault(req.adapter, {}).setdefault(group, {})
                if mode not in slot or m.margin > slot[mode]["margin"]:
                    slot[mode] = {"margin": m.margin, "module": name, "request": i}
    return out


def blind_spots(margins: dict[str, dict[str, dict[str, dict]]]) -> list[str]:
    """One warning per adapter and group that no mode of this run could tell from no adapter (margin <= 1)."""
    warnings = []
    for adapter, groups in sorted(margins.items()):
        for group, by_mode in sorted(groups.items()):
            mode, d = max(by_mode.items(), key=lambda kv: kv[1]["margin"])
            if d["margin"] <= 1.0:
                warnings.append(
                    f"adapter {adapter!r} on the {group}: a runtime that dropped it would pass this batch (best "
                    f"margin {d['margin']:.3g} <= 1, {mode} at {d['module']}): the verdict cannot tell this "
                    f"adapter from none there; use larger adapters or a wider dtype")
    return warnings
