"""What `nox -s correctness` runs: every registered arch, both modes, 3 generated adapters + none, fp32 CPU.

One test per arch (not one test for the whole run) so that parallel workers share the work and a failure
names its arch; a separate check holds that the CLI's default arch list is the whole registry."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from harness.cli import build_parser, main
from harness.correctness.compare import CSV_COLUMNS
from vlm.arch import REGISTRY


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_default_correctness_run_passes_with_a_complete_report(arch, tmp_path):
    out = tmp_path / "rep"
    assert main(["correctness", "--arch", arch, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".mmlora-report", "index.html", "layers.csv",
                                                          "summary.json"]
    assert (out / ".mmlora-report").read_text().strip() == "correctness"
    assert not list(tmp_path.glob(".rep.partial-*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True and summary["exit_code"] == 0
    assert list(summary["archs"]) == [arch] and summary["archs"][arch]["ok"], summary["archs"]
    df = pd.read_csv(out / "layers.csv")
    assert list(df.columns) == CSV_COLUMNS
    assert set(df["mode"]) == {"e2e", "replay"}
    assert not df.duplicated(["arch", "request", "module", "mode"]).any()  # one row per request, module, mode
    assert df["ok"].all()
    # every group the arch's adapters can target is compared, and every boundary
    from vlm.arch import get_arch

    assert set(get_arch(arch).targetable_groups()) <= set(df["group"])
    assert {"@tower_out", "@lm_image_embeds", "@logits"} <= set(df["module"])
    html = (out / "index.html").read_text()
    assert arch in html
    # one margin panel per mode and group: every compared LoRA module is a point named by its hover title
    assert html.count("<svg ") >= len(set(zip(df["mode"], df["group"])) - {(m, "boundary") for m in df["mode"]})
    for module in set(df.loc[df["kind"] == "lora", "module"]):
        assert f"<title>{module}</title>" in html, module


def test_default_run_covers_every_registered_arch():
    from harness.correctness.cli import _options

    assert set(_options(build_parser().parse_args(["correctness"])).archs) == set(REGISTRY)
