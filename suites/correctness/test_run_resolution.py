"""Detection power per run (harness/correctness/resolution.py): the margin a runtime that dropped an adapter
would get, predicted from the reference bundle alone, is held to a real runtime whose adapters are dropped
(its slot tables' B zeroed) run through the very judge; and a run whose adapters are too small for its dtype
says so loudly (exit 1 under --strict), in the terminal, summary.json and the report. Tiny LLaVA at bf16, the
dtype where small adapters hide."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr

import pytest

from harness.cli import main
from harness.correctness import modes
from harness.correctness.engine import Options, _runtime, prepare
from harness.correctness.resolution import blind_spots, dropped_adapter_margins


def _measured(rows) -> dict:
    """adapter -> group -> the largest margin the dropped runtime really got (requests with an adapter)."""
    out: dict = {}
    for r in rows:
        if r.adapter != "-" and r.kind == "lora":
            g = out.setdefault(r.adapter, {})
            g[r.group] = max(g.get(r.group, 0.0), r.metrics.margin)
    return out


@pytest.mark.parametrize("scale", [0.005, 0.1])
def test_predicted_margin_is_what_a_dropped_runtime_gets(scale, tmp_path):
    opts = Options(archs=["llava"], dtype="bf16", adapter_scale=scale, kernel="torch")
    p = prepare("llava", opts, tmp_path)
    predicted = dropped_adapter_margins(p, ("replay", "e2e"))
    rt = _runtime(p, opts)
    for b in rt.tables.B.values():
        b.zero_()  # every adapter dropped: each LoRA module returns its base Linear's output
    replay = _measured(modes.replay(p, rt))
    e2e = _measured(modes.e2e(p, rt))
    assert predicted and set(predicted) == set(replay), (predicted, replay)
    for adapter, groups in predicted.items():
        for group, by_mode in groups.items():
            want, got = by_mode["replay"]["margin"], replay[adapter][group]
            # replay feeds both the same inputs: only the runtime's batched base GEMM rounds apart from the
            # reference's per-request one
            assert got == pytest.approx(want, rel=0.15), (scale, adapter, group, want, got)
            # e2e: the prediction holds where the input is still right; the dropped runtime's drift only adds
            assert e2e[adapter][group] >= 0.85 * by_mode["e2e"]["margin"], (scale, adapter, group, by_mode, e2e)
    e2e_only = {a: {g: {"e2e": d["e2e"]} for g, d in gs.items()} for a, gs in predicted.items()}
    if scale == 0.005:
        # replay resolves what e2e cannot at this scale: with both modes the run is not blind, e2e alone is
        # (an engine's output bundle is judged e2e only)
        assert all(d["replay"]["margin"] > 1 > d["e2e"]["margin"] for g in predicted.values()
                   for d in g.values()), predicted
        assert not blind_spots(predicted) and blind_spots(e2e_only)
    else:
        assert not blind_spots(e2e_only), predicted


def test_small_adapters_at_bf16_are_a_loud_warning(tmp_path):
    """At scale 0.005 bf16 rounding is as large as the delta: e2e alone cannot tell an adapter from none
    (predicted margin < 1), and says so in the terminal, summary.json and the report; --strict makes it exit 1."""
    out = tmp_path / "small"
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["correctness", "--arch", "llava", "--dtype", "bf16", "--mode", "e2e", "--kernel", "torch",
                   "--adapter-scale", "0.005", "--strict", "--out", str(out)])
    blind = [ln for ln in err.getvalue().splitlines() if "a runtime that dropped it would pass" in ln]
    assert rc == 1 and blind, err.getvalue()
    assert any("'all' on the tower" in ln for ln in blind), blind
    s = json.loads((out / "summary.json").read_text())
    power = s["archs"]["llava"]["detection_power"]
    assert power["all"]["tower"]["e2e"]["margin"] < 1, power
    assert any("a runtime that dropped it would pass" in w for w in s["warnings"]), s["warnings"]
    html = (out / "index.html").read_text()
    assert "dropped-adapter margin" in html and "(blind)" in html
