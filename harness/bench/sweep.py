"""Plan and run a sweep: points -> measured rows, appended to the store as each point finishes.

A point is (case, provider, params); its rows are one per metric. A provider that cannot run here gives
one params-less row per case with status `unavailable` (never a number). A point that raises
torch.OutOfMemoryError gives one `oom` row, any other exception one `error` row naming it; the sweep goes
on. Finished points (any status) are never re-run on resume.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from harness.bench import schema
from harness.bench.case import Case, Unavailable, Work
from harness.bench.cases import all_cases
from harness.bench.presets import Preset
from harness.bench.roofline import GpuProfile
from harness.bench.timing import Timing, measure


@dataclass(frozen=True)
class Point:
    case: str
    provider: str
    params: dict = field(default_factory=dict, hash=False, compare=False)
    unavailable: str | None = None

    def key(self) -> tuple[str, ...]:
        return schema.point_key(self.case, self.provider, self.params)


@dataclass
class Plan:
    points: list[Point]
    notes: list[str]      # row-less log lines (skipped providers)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def parse_filters(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--filter {item!r}: expected PARAM=VALUE")
        k, v = item.split("=", 1)
        if k not in schema.PARAM_COLUMNS:
            raise ValueError(f"--filter {item!r}: unknown parameter {k!r}; expected one of "
                             f"{', '.join(schema.PARAM_COLUMNS)}")
        out[k] = v
    return out


def plan(preset: Preset, cases: Sequence[str] | None, providers: Sequence[str] | None,
         filters: dict[str, str], cuda: bool) -> Plan:
    registry = all_cases()
    for c in cases or ():
        if c not in registry:
            raise ValueError(f"unknown case {c!r}; expected one of {', '.join(registry)}")
    for p in providers or ():
        if p not in schema.PROVIDERS:
            raise ValueError(f"unknown provider {p!r}; expected one of {', '.join(schema.PROVIDERS)}")
    points: list[Point] = []
    notes: list[str] = []
    for name, plist in preset.points.items():
        if cases and name not in cases:
            continue
        case = registry[name]
        mine: list[Point] = []
        for prov in case.providers:
            if providers and prov not in providers:
                continue
            if prov == "triton" and case.kind == "e2e" and not cuda:
                notes.append(f"{name}: triton provider skipped on CPU (the Triton interpreter takes ~0.5 s per tiny "
                             f"forward); no rows written for it")
                continue
            reason = case.unavailable(prov)
            if reason:
                if _matches({}, filters):
                    mine.append(Point(name, prov, {}, reason))
                continue
            for p in plist:
                if not _matches(p, filters):
                    continue
                why = case.skip(prov, p)
                if why:
                    if f"{name}: {why}" not in notes:
                        notes.append(f"{name}: {why}")
                    continue
                mine.append(Point(name, prov, dict(p)))
        if case.kind == "e2e":  # consecutive points share one built model (see e2e._bucket)
            from harness.bench.e2e import _bucket

            mine.sort(key=lambda pt: (*(schema.fmt(pt.params.get(k)) for k in ("model", "dtype", "rank")),
                                      _bucket(pt.params.get("n_adapters", 0)), pt.provider,
                                      pt.params.get("n_adapters", 0), pt.params.get("images", 0)))
        points += mine
    return Plan(points, notes)


def _matches(params: dict, filters: dict[str, str]) -> bool:
    return all(schema.fmt(params.get(k)) == v for k, v in filters.items())


# ---------------------------------------------------------------------- metrics
def derive(metric: str, t: Timing, w: Work, profile: GpuProfile | None) -> tuple[float, float, float]:
    """(p50, p20, p80) of a metric. Throughputs invert latency: their p20 comes from latency's p80."""
    lat = (t.p50_ms, t.p20_ms, t.p80_ms)
    if metric == "latency_ms":
        return lat
    if metric == "peak_mem_mib":
        m = (t.peak_bytes or 0) / 2**20
        return m, m, m
    amount = {"tokens_per_s": w.tokens, "images_per_s": w.images, "gbps": w.nbytes / 1e9,
              "tflops": w.flops / 1e12}.get(metric)
    if metric == "pct_roofline":
        amount = 100.0 * profile.roof_seconds(w.nbytes, w.flops)
    if amount is None:
        raise ValueError(f"unknown metric {metric!r}")
    p50, p20, p80 = (amount / (ms / 1e3) for ms in lat)
    return p50, p80, p20


@dataclass
class Context:
    device: torch.device
    profile: GpuProfile | None
    env: dict
    rep_ms: float
    warmup_ms: float
    min_reps: int
    repro_base: list[str]


def repro(point: Point, ctx: Context) -> str:
    args = [*ctx.repro_base, "--cases", point.case, "--providers", point.provider]
    for k in schema.PARAM_COLUMNS:
        if point.params.get(k) is not None:
            args += ["--filter", f"{k}={schema.fmt(point.params[k])}"]
    return shlex.join([*args, "--out", "reports/bench/repro"])


def _row(point: Point, ctx: Context, metric: str, vals, status: str, note: str = "") -> dict:
    row = {"case": point.case, "provider": point.provider, "metric": metric, "unit": schema.UNITS[metric],
           "status": status, "note": note, **ctx.env, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "repro": repro(point, ctx)}
    row.update({k: schema.fmt(point.params.get(k)) for k in schema.PARAM_COLUMNS})
    for q, v in zip(("p50", "p20", "p80"), vals or ("", "", "")):
        row[q] = schema.fmt(v)
    return row


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def run_point(point: Point, case: Case, ctx: Context) -> list[dict]:
    if point.unavailable:
        return [_row(point, ctx, "latency_ms", None, "unavailable", point.unavailable)]
    cuda = ctx.device.type == "cuda"
    try:
        fn, work = case.build(point.params, point.provider, ctx.device)
        note = getattr(fn, "note", "")  # e.g. that it ran in the Triton interpreter (lora_providers.noted)
        t = measure(fn, ctx.device, ctx.rep_ms, ctx.warmup_ms, ctx.min_reps)
        del fn
    except Unavailable as e:
        return [_row(point, ctx, "latency_ms", None, "unavailable", str(e))]
    except torch.OutOfMemoryError as e:
        _free(case)
        return [_row(point, ctx, "latency_ms", None, "oom", _one_line(e))]
    except Exception as e:  # noqa: BLE001 - recorded as a row; the sweep goes on
        _free(case)
        return [_row(point, ctx, "latency_ms", None, "error", _one_line(e))]
    return [_row(point, ctx, m, derive(m, t, work, ctx.profile), "ok", note)
            for m in case.metrics(cuda, ctx.profile is not None)]


def _free(case: Case) -> None:
    if case.kind == "e2e":
        from harness.bench.e2e import release

        release()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(points: Sequence[Point], done: set, ctx: Context, append: Callable[[list[dict]], None]) -> dict:
    """Run the points not in `done`, appending each point's rows as it finishes. Returns status counts."""
    registry = all_cases()
    todo = [p for p in points if p.key() not in done]
    log(f"{len(points)} points planned, {len(points) - len(todo)} already recorded, {len(todo)} to run")
    counts: dict[str, int] = {}
    try:
        for i, point in enumerate(todo, 1):
            t0 = time.perf_counter()
            rows = run_point(point, registry[point.case], ctx)
            append(rows)
            status = rows[0]["status"]
            counts[status] = counts.get(status, 0) + 1
            what = f"p50 {float(rows[0]['p50']):.4g} ms" if status == "ok" else rows[0]["note"]
            log(f"[{i}/{len(todo)}] {point.case} {point.provider} {schema.describe(point.params)}: {status}, "
                f"{what} ({time.perf_counter() - t0:.1f} s)")
    finally:
        from harness.bench.e2e import release

        release()
    return counts
