"""The bench report read at a glance, on rows written out by hand: the headline table's speed-ups and % of
roofline (hand-computed), the Triton-interpreter banner of a CPU run, no roofline drawn for a device no
profile matches, and one colour per provider with a line style per variant."""

from __future__ import annotations

import pytest

from harness.bench import report, schema
from harness.bench.catalog import all_cases

H100 = "NVIDIA H100 80GB HBM3"


def _row(provider, variant, T, p50, metric="latency_ms", gpu=H100, case="lora_apply"):
    r = {c: "" for c in schema.COLUMNS}
    r.update(case=case, provider=provider, metric=metric, unit=schema.UNITS[metric], status="ok", p50=str(p50),
             p20=str(p50), p80=str(p50), gpu_name=gpu, dtype="bf16", T=str(T), H="64", O="64", n_adapters="2",
             rank="8", slices="1", variant=variant)
    return r


def _rows(gpu=H100):
    # p50 ms at T=16 and T=64 (the headline point: the largest T of the base combination)
    lat = {("triton", "kernel"): (0.5, 1.0), ("triton", "eager"): (0.8, 2.0), ("torch", "eager"): (1.0, 5.0),
           ("peft", "eager"): (3.0, 12.0), ("vllm", "kernel"): (0.6, 1.5), ("grouped_mm", "kernel"): (0.7, 4.0)}
    rows = [_row(p, v, T, ms[i], gpu=gpu) for (p, v), ms in lat.items() for i, T in enumerate((16, 64))]
    rows.append(_row("triton", "kernel", 64, 42.0, metric="pct_roofline", gpu=gpu))
    return rows


def test_headline_speedups_are_like_for_like_and_roofline_is_the_runtime_kernel_s():
    (h,) = report.headline(_rows(), all_cases())
    assert (h["case"], h["at"], h["runtime"], h["p50_ms"]) == ("lora_apply", 64, "triton kernel", 1.0)
    # public call against public call (triton eager 2.0 ms), kernel launch against kernel launch (1.0 ms)
    assert h["versus"]["torch"] == (pytest.approx(5.0 / 2.0), "eager")
    assert h["versus"]["peft"] == (pytest.approx(12.0 / 2.0), "eager")
    assert h["versus"]["vllm"] == (pytest.approx(1.5 / 1.0), "kernel")
    assert h["versus"]["grouped_mm"] == (pytest.approx(4.0 / 1.0), "kernel")
    assert h["pct_roofline"] == 42.0
    text = report.headline_text([h])
    assert text[0].split()[:3] == ["case", "point", "runtime"]
    assert "6.00x (eager)" in text[1] and "1.50x (kernel)" in text[1] and "42 %" in text[1]
    html = report.render_html(_rows(), all_cases(), {"preset": "smoke"})
    assert html.index("<h2>Headline</h2>") < html.index("Latency (p50)")  # at the top, before the plots
    assert "Triton interpreter" not in html  # a GPU run has no interpreter banner


def test_a_cpu_run_says_its_triton_rows_are_interpreter_timings_and_draws_no_roofline():
    rows = _rows(gpu="cpu (some x86)")  # holds a pct_roofline row, as a CSV written before the refusal did
    html = report.render_html(rows, all_cases(), {"preset": "smoke"})
    assert "Triton interpreter timings" in html.split("<h2>Headline</h2>")[0]  # the banner, above the headline
    assert "no % of roofline rows" in html
    (h,) = report.headline(rows, all_cases())
    assert h["pct_roofline"] is None  # no profile matches a CPU: the roofline figure is not claimed
    assert "status: ok 13" in html and "{" not in html.split("status:")[1].split("</p>")[0]


def test_one_colour_per_provider_and_a_line_style_per_variant(monkeypatch):
    lines = []

    def capture(draw):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = draw(plt)
        lines.extend((ln.get_label(), ln.get_color(), ln.get_linestyle()) for ax in fig.axes for ln in ax.lines
                     if not ln.get_label().startswith("_"))
        plt.close(fig)
        return "data:image/png;base64,"
    monkeypatch.setattr(report, "png_data_uri", capture)
    report.plots(_rows(), all_cases())
    latency = {label: (color, style) for label, color, style in lines}
    assert latency["triton kernel"][0] == latency["triton eager"][0]  # one colour for the provider
    assert latency["triton kernel"][1] != latency["triton eager"][1]  # its variants told apart by style
    assert len({latency[f"{p} {v}"][0] for p, v in (("triton", "kernel"), ("torch", "eager"), ("peft", "eager"),
                                                    ("vllm", "kernel"), ("grouped_mm", "kernel"))}) == 5
