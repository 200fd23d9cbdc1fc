"""Unit checks of the bench pieces: roofline formulas, profile resolution, derived metrics, timing,
store repair, plots with several GPUs."""

from __future__ import annotations

import re

import pytest
import torch

from harness.bench import roofline, schema
from harness.bench.case import Work
from harness.bench.catalog import all_cases
from harness.bench.kernel_cases import KERNEL_CASES
from harness.bench.report import render_html
from harness.bench.store import Store
from harness.bench.sweep import derive
from harness.bench.timing import Timing, measure
from runtime.kernels import KERNELS, interpreted


def _lora(T, H, Ow, n, r, s, dtype):
    return dict(T=T, H=H, O=Ow, n_adapters=n, rank=r, slices=s, dtype=dtype)


def test_lora_byte_and_flop_counts():
    """bf16 (e = 2): shrink 2THr flops, 2TH + 2nHr + 4Tr bytes; expand 2TrO flops, 4Tr + 2nrO + 4TO bytes."""
    T, H, Ow, n, r = 4096, 4096, 1408, 4, 16
    shrink, expand, apply = (KERNELS[f"lora_{op}"].work for op in ("shrink", "expand", "apply"))
    assert shrink(_lora(T, H, Ow, n, r, 1, "bf16")) == (2 * T * H + 2 * n * H * r + 4 * T * r, 2 * T * H * r)
    assert expand(_lora(T, H, Ow, n, r, 1, "bf16")) == (4 * T * r + 2 * n * r * Ow + 4 * T * Ow, 2 * T * r * Ow)
    assert apply(_lora(T, H, Ow, n, r, 1, "bf16")) == (
        shrink(_lora(T, H, Ow, n, r, 1, "bf16"))[0] + expand(_lora(T, H, Ow, n, r, 1, "bf16"))[0],
        2 * T * H * r + 2 * T * r * Ow)
    # fp32 elements double the x / weight / y terms, the fp32 intermediate stays 4 bytes
    assert shrink(_lora(T, H, Ow, n, r, 1, "fp32"))[0] == 4 * T * H + 4 * n * H * r + 4 * T * r
    # slices: x read once, everything else per slice
    assert shrink(_lora(T, H, Ow, n, r, 3, "bf16"))[0] == 2 * T * H + 3 * (2 * n * H * r + 4 * T * r)


def test_roofline_is_memory_bound_for_lora():
    p = roofline.PROFILES["h100"]
    nbytes, flops = KERNELS["lora_apply"].work(_lora(4096, 4096, 4096, 4, 16, 1, "bf16"))
    assert p.roof_seconds(nbytes, flops) == pytest.approx(nbytes / 3.35e12)


@pytest.mark.parametrize("gpu,device,want,warns", [
    ("auto", None, None, True),
    ("auto", "NVIDIA H100 80GB HBM3", "h100", False),
    ("auto", "NVIDIA H200", "h200", False),
    ("auto", "NVIDIA A100-SXM4-80GB", "a100", False),
    ("auto", "NVIDIA L4", None, True),
    # same name, other peaks (H100 PCIe 2.0 TB/s, H100 NVL 3.9 TB/s, A100 40GB 1.56 TB/s): no profile claims them
    ("auto", "NVIDIA H100 PCIe", None, True),
    ("auto", "NVIDIA H100 NVL", None, True),
    ("auto", "NVIDIA A100-SXM4-40GB", None, True),
    ("h100", "NVIDIA H100 80GB HBM3", "h100", False),
])
def test_profile_resolution(gpu, device, want, warns):
    p, warning = roofline.resolve(gpu, device)
    assert (p.name if p else None) == want
    assert bool(warning) == warns
    if warning:
        assert "\n" not in warning


@pytest.mark.parametrize("gpu,device,needle", [
    ("h100", "NVIDIA H200", "'NVIDIA H200'"),
    ("a100", None, "cpu"),
    ("h100", "NVIDIA H100 PCIe", "'NVIDIA H100 PCIe'"),
])
def test_a_profile_the_device_does_not_match_is_refused(gpu, device, needle):
    """A % of a GPU's roofline computed from another device's timings is a claim the run cannot make."""
    with pytest.raises(ValueError, match=needle) as e:
        roofline.resolve(gpu, device)
    assert "\n" not in str(e.value)


def _kernel_point(provider: str, nbytes: float = 1e9):
    from harness.bench import sweep
    from harness.bench.case import Case, Timed

    case = Case("pixel_shuffle", "kernel", (provider,), "T",
                lambda p, prov, dev: Timed(lambda: None, Work(1.0, nbytes=nbytes)))
    return sweep.Point("pixel_shuffle", provider, {"T": 16}), case


def test_no_roofline_rows_for_a_device_the_profile_does_not_match(monkeypatch):
    """A sweep handed the H100 profile on a CPU writes no pct_roofline / roof_us, and each row says why;
    on an H100 the same point gets them, pct_roofline = bytes / 3.35 TB/s over the measured p50."""
    from harness.bench import sweep

    monkeypatch.setattr(sweep, "measure", lambda *a, **k: Timing(2.0, 2.0, 2.0, 5))
    point, case = _kernel_point("torch")
    h100 = roofline.PROFILES["h100"]
    cpu = sweep.Context(torch.device("cpu"), h100, {"gpu_name": "cpu (some x86)"}, 1.0, 0.0, 3, ["x"])
    rows = sweep.run_point(point, case, cpu)
    assert rows and not {"pct_roofline", "roof_us"} & {r["metric"] for r in rows}
    assert all("no % of roofline: measured on cpu (some x86)" in r["note"] for r in rows)
    gpu = sweep.Context(torch.device("cpu"), h100, {"gpu_name": "NVIDIA H100 80GB HBM3"}, 1.0, 0.0, 3, ["x"])
    pct = {r["metric"]: r for r in sweep.run_point(point, case, gpu)}["pct_roofline"]
    assert float(pct["p50"]) == pytest.approx(100 * (1e9 / 3.35e12) / 2e-3, rel=1e-5)
    assert "roofline" not in pct["note"]


def test_triton_rows_timed_in_the_interpreter_say_so(monkeypatch):
    """Every Triton row of a CPU run (the LoRA kernel / eager / grouping variants too) is an interpreter
    timing, and its note says so; a torch row is a real CPU timing and says nothing of the kind."""
    from harness.bench import sweep

    if not interpreted():
        pytest.skip("Triton runs compiled here")
    monkeypatch.setattr(sweep, "measure", lambda *a, **k: Timing(1.0, 1.0, 1.0, 5))
    ctx = sweep.Context(torch.device("cpu"), None, {"gpu_name": "cpu"}, 1.0, 0.0, 3, ["x"])
    for provider, said in (("triton", True), ("torch", False)):
        point, case = _kernel_point(provider)
        assert all(("Triton interpreter" in r["note"]) == said for r in sweep.run_point(point, case, ctx)), provider


def test_unknown_profile_is_a_value_error():
    with pytest.raises(ValueError, match="'b200'"):
        roofline.resolve("b200", None)


def test_derived_quantiles_keep_order():
    t = Timing(p50_ms=2.0, p20_ms=1.5, p80_ms=3.0, samples=10, peak_bytes=2**20)
    w = Work(tokens=1000, images=4, nbytes=1e9, flops=1e12)
    p = roofline.PROFILES["h200"]
    for m in ("latency_ms", "tokens_per_s", "images_per_s", "gbps", "tflops", "pct_roofline", "peak_mem_mib"):
        p50, p20, p80 = derive(m, t, w, p)
        assert p20 <= p50 <= p80, m
    assert derive("gbps", t, w, p)[0] == pytest.approx(500.0)
    # 1 TFLOP at 989 TFLOP/s takes longer than 1 GB at 4.8 TB/s: the compute roof applies
    assert derive("pct_roofline", t, w, p)[0] == pytest.approx(100 * (1e12 / 989e12) / 2e-3)


def test_case_metrics_per_device():
    c = KERNEL_CASES["lora_apply"]
    assert c.metrics(False, False) == ("latency_ms", "tokens_per_s", "gbps", "tflops", "bytes_mb")
    assert c.metrics(True, True, copy=True) == ("latency_ms", "tokens_per_s", "gbps", "tflops", "bytes_mb",
                                                "pct_roofline", "roof_us", "pct_copy", "copy_us", "peak_mem_mib")
    assert c.metrics(True, True, copy=True, variant="grouping") == ("latency_ms", "tokens_per_s", "peak_mem_mib")
    assert "tflops" not in KERNEL_CASES["pixel_shuffle"].metrics(False, False)
    assert "copy_us" not in KERNEL_CASES["copy"].metrics(True, True, copy=True)  # the yardstick itself
    assert all_cases()["tower_connector"].metrics(False, True) == ("latency_ms", "images_per_s", "tokens_per_s")


def test_lora_variants_per_provider():
    """triton is timed as kernel / eager (+ grouping for apply); the twin and PEFT as called; vLLM's kernels
    with their metadata prepared outside the timed call, like the runtime's kernel rows."""
    assert KERNEL_CASES["lora_apply"].variants_of("triton") == ("kernel", "eager", "grouping")
    assert KERNEL_CASES["lora_shrink"].variants_of("triton") == ("kernel", "eager")
    assert KERNEL_CASES["lora_apply"].variants_of("peft") == ("eager",)
    assert KERNEL_CASES["lora_expand"].variants_of("vllm") == ("kernel",)
    assert KERNEL_CASES["pixel_shuffle"].variants_of("triton") == (None,)


def test_copy_and_limit_metrics():
    """bytes_mb, roof_us, copy_us are the byte model's figures (constant over quantiles); pct_copy is the
    copy-bandwidth time over the measured time, like pct_roofline against the profile's peak."""
    t = Timing(p50_ms=0.05, p20_ms=0.04, p80_ms=0.06, samples=10)
    w = Work(tokens=4096, nbytes=100e6, flops=1e9)
    p = roofline.PROFILES["h200"]
    assert derive("bytes_mb", t, w, p) == (100.0, 100.0, 100.0)
    assert derive("roof_us", t, w, p)[0] == pytest.approx(100e6 / 4.8e12 * 1e6)
    assert derive("copy_us", t, w, p, copy_gbps=4000.0) == pytest.approx((25.0, 25.0, 25.0))
    p50, p20, p80 = derive("pct_copy", t, w, p, copy_gbps=4000.0)
    assert p50 == pytest.approx(50.0) and p20 < p50 < p80


def test_noisy_points_are_flagged_and_uncapturable_calls_timed_anyway(monkeypatch):
    from harness.bench import sweep
    from harness.bench.case import Case, Timed

    ctx = sweep.Context(torch.device("cpu"), None, {"gpu_name": "cpu"}, 1.0, 0.0, 3, ["x"])
    case = Case("pixel_shuffle", "kernel", ("torch",), "T", lambda p, prov, dev: Timed(lambda: None, Work(1.0)))
    point = sweep.Point("pixel_shuffle", "torch", {"T": 16})
    monkeypatch.setattr(sweep, "measure", lambda *a, **k: Timing(1.0, 1.0, 1.3, 5))
    assert all("noisy: p80/p20 1.30 > 1.2" in r["note"] for r in sweep.run_point(point, case, ctx))
    monkeypatch.setattr(sweep, "measure", lambda *a, **k: Timing(1.0, 1.0, 1.1, 5))
    assert all(r["note"] == "" for r in sweep.run_point(point, case, ctx))


def test_copy_bandwidth_is_the_best_copy_row_of_this_gpu():
    from harness.bench import sweep

    ctx = sweep.Context(torch.device("cpu"), None, {"gpu_name": "g0"}, 1.0, 0.0, 3, ["x"], measures_copy=True)
    rows = [_row("copy", "torch", "4096", "gbps", "3000", "g0"), _row("copy", "torch", "16384", "gbps", "3500", "g0"),
            _row("copy", "torch", "16384", "gbps", "9000", "other GPU"), _row("pixel_shuffle", metric="gbps", p50="9e9")]
    ctx.note_copy(rows)
    assert ctx.copy_gbps == 3500.0


def test_cpu_timing_loop_excludes_first_call_and_orders_quantiles():
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            import time

            time.sleep(0.2)  # a slow first call (compilation) must not reach the quantiles
    t = measure(fn, torch.device("cpu"), rep_ms=5, warmup_ms=0, min_reps=5)
    assert t.samples >= 5 and t.p20_ms <= t.p50_ms <= t.p80_ms < 100
    assert t.peak_bytes is None


def _row(case="pixel_shuffle", provider="torch", T="16", metric="latency_ms", p50="1", gpu="g0", status="ok"):
    r = {c: "" for c in schema.COLUMNS}
    r.update(case=case, provider=provider, T=T, H="32", batch="2", dtype="fp32", metric=metric,
             unit=schema.UNITS[metric], p50=p50, p20=p50, p80=p50, status=status, gpu_name=gpu)
    return r


def test_store_drops_a_torn_tail_with_its_point_and_duplicates(tmp_path):
    s = Store(tmp_path / "run")
    assert s.open() == set()
    a = [_row(T="16"), _row(T="16", metric="gbps")]
    b = [_row(T="64"), _row(T="64", metric="gbps")]
    s.append(a)
    s.append(a[:1])  # a duplicate row
    s.append(b)
    with open(s.csv, "ab") as f:
        f.write(b"pixel_shuffle,torch,,fp32,256,3")  # a write torn by SIGKILL
    done = Store(tmp_path / "run").open()
    # the torn point's predecessor (T=64) is dropped too: it may be the point whose write was torn
    assert done == {schema.row_key(a[0])[:-1]}
    rows = s.rows()
    assert [schema.row_key(r) for r in rows] == [schema.row_key(r) for r in a]
    assert s.csv.read_text().endswith("\n")


@pytest.mark.parametrize("content", [b"", b"case,provider,mo"])
def test_store_restarts_an_empty_or_torn_header_file(tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.csv").write_bytes(content)
    assert Store(out).open() == set()
    assert (out / "results.csv").read_text().splitlines() == [",".join(schema.COLUMNS)]


def test_report_with_several_gpus_in_one_csv():
    rows = []
    for gpu, scale in (("NVIDIA H100 80GB HBM3", 1.0), ("NVIDIA H200", 0.7)):
        for case in ("lora_apply", "pixel_shuffle"):
            for prov in ("triton", "torch", "peft") if case == "lora_apply" else ("triton", "torch"):
                for T in ("16", "256", "4096"):
                    lat = scale * float(T) / (100 if prov == "triton" else 10)
                    rows.append(_row(case, prov, T, "latency_ms", f"{lat:.4g}", gpu))
                    rows.append(_row(case, prov, T, "pct_roofline", f"{50 / lat:.4g}", gpu))
    rows.append(_row("lora_apply", "vllm", "", "latency_ms", "", "g0", "unavailable"))
    html = render_html(rows, all_cases(), {"preset": "test"})
    imgs = re.findall(r"src='data:image/png;base64,", html)
    assert len(imgs) == 3
    assert "unavailable" in html


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_timing_on_cuda_and_its_fallback():
    dev = torch.device("cuda")
    x = torch.randn(1 << 20, device=dev)
    y = torch.empty_like(x)
    t = measure(lambda: y.copy_(x), dev, rep_ms=20, warmup_ms=5, graph=True)
    assert t.note == "CUDA graph replay" and t.p20_ms <= t.p50_ms <= t.p80_ms
    t = measure(lambda: float(y.copy_(x).sum()), dev, rep_ms=20, warmup_ms=5, graph=True)  # a host read
    assert "not capturable" in t.note and t.p50_ms > 0


def test_tuner_writes_a_config_file_the_runtime_reads(tmp_path):
    """The tuning script's plumbing on CPU (the smoke sweep's first point, block shape / split stage only):
    every candidate is checked against the twin before it may win, the file parses, the tuned bucket's
    rule comes first and the base rules follow. Its timings mean nothing here; the GPU run tunes."""
    import csv as _csv
    import json

    from harness.bench import tune
    from runtime.kernels import lora_config as lc

    base = lc.CONFIG_DIR / "h200.json"
    out = tmp_path / "tuned.json"
    assert tune.main(["--out", str(out), "--preset", "smoke", "--buckets", "1", "--stages", "1", "--rep-ms", "1",
                      "--base", str(base)]) == 0
    data = json.loads(out.read_text())
    table = lc.parse_table(data, str(out))
    assert table.shrink[0].when == {"T_max": 64, "W_max": 64, "rank_max": 8, "slices": 1, "dtype": "fp32"}
    assert len(table.shrink) == 1 + len(json.loads(base.read_text())["shrink"])
    rows = list(_csv.DictReader(open(f"{out}.csv")))
    assert {r["op"] for r in rows} == {"shrink", "expand"} and all(r["status"] == "ok" for r in rows)
    assert len(rows) >= 4


def test_tuner_candidates_are_valid_configs():
    from harness.bench import tune
    from runtime.kernels import lora_config as lc

    for p in tune.buckets():
        s = lc.fallback_shrink(p["T"], p["H"], p["rank"], p["slices"])
        e = lc.fallback_expand(p["T"], p["O"], p["rank"], p["slices"])
        for stage in (0, 1):
            for c in tune.shrink_candidates(p, s, stage):
                lc._check(c, "shrink candidate")
            for c in tune.expand_candidates(p, e, stage):
                lc._check(c, "expand candidate")
    assert tune.buckets()[0]["T"] == 4096 and tune.buckets()[0]["dtype"] == "bf16"  # the headline first
