"""The seeded-fault sentence for the outcomes a healthy catalog run rarely shows (a miss, a false alarm, a
module that raised), on summaries written out by hand: each sentence names the fault, the module the
catalog expects, and the one figure that decided the verdict."""

from __future__ import annotations

from harness.correctness.headline import fault_headline

Q = "model.vision_tower.encoder.layers.0.self_attn.q_proj"
FC1 = "model.vision_tower.encoder.layers.0.mlp.fc1"


def _summary(fault: dict, first: dict | None, mode: str = "replay") -> dict:
    base = {"name": "lora-scale-2pct", "breaks": "x", "control": False, "mode": mode, "expected_first": Q}
    return {"fault": {**base, **fault}, "first_divergence": {mode: first}}


def test_a_missed_fault_gives_the_margin_at_the_expected_module():
    s = _summary({"caught": False, "named": False, "first": None, "margin": 0.947}, None)
    assert fault_headline("llava", s) == (f"seeded fault lora-scale-2pct: MISSED (expected at {Q}); margin 0.947 "
                                          "there (llava, replay)")


def test_caught_elsewhere_gives_the_margin_of_the_row_that_failed_not_the_expected_module_s():
    s = _summary({"caught": True, "named": False, "first": FC1, "margin": 0.947},
                 {"module": FC1, "status": "mismatch", "margin": 1.0083})
    assert fault_headline("llava", s) == (f"seeded fault lora-scale-2pct: caught, but first named at {FC1} "
                                          f"(expected {Q}); margin 1.01 (llava, replay)")


def test_a_module_that_raised_is_said_so_not_given_an_infinite_margin():
    s = _summary({"caught": True, "named": True, "first": Q, "margin": float("inf")},
                 {"module": Q, "status": "error", "margin": float("inf")})
    line = fault_headline("llama4", s)
    assert line == f"seeded fault lora-scale-2pct: caught, named at {Q} (expected); the runtime raised (llama4, replay)"


def test_a_control_that_fails_is_a_false_alarm_naming_where():
    s = _summary({"name": "control-fused-merged", "control": True, "passed": False, "margin": 2.5},
                 {"module": FC1, "status": "mismatch", "margin": 2.5}, mode="e2e")
    assert fault_headline("qwen2_vl", s) == ("seeded control control-fused-merged: FALSE ALARM at "
                                             f"{FC1}; margin 2.5 (qwen2_vl, e2e)")


def test_a_run_without_a_fault_has_no_sentence():
    assert fault_headline("llava", {"first_divergence": {"e2e": None}}) is None


def test_the_report_headline_names_the_row_image_and_row_count_detail_as_the_terminal_does():
    """The page's first divergence says what the terminal says: request, adapter, row, image, and a row-count
    mismatch's counts (before, the page gave the request alone)."""
    from types import SimpleNamespace

    from harness.correctness.report import _headlines

    detail = "rows: expected 51 got 49 for image 1 of request 4 at " + Q + " (tower mapping)"
    first = {"module": Q, "group": "tower", "request": 4, "adapter": "all", "row": 65, "image": 1,
             "status": "error", "margin": float("inf"), "detail": detail}
    r = SimpleNamespace(arch="llama4", rows=[], summary={"ok": False, "first_divergence": {"e2e": first}})
    page = "".join(_headlines([r]))
    assert f"first divergence at <b>{Q}</b> (tower), request 4 (adapter all), row 65 (image 1): error" in page
    assert detail in page
