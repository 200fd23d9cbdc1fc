"""Plan and run a sweep: points -> measured rows, appended to the store as each point finishes.

A point is (case, provider, params); its rows are one per metric. LoRA kernel cases expand each parameter
point into the variants its provider is timed in (the `variant` column). The `copy` case runs first, and
its best GB/s in this run (also when resumed: read back from the CSV) is the copy bandwidth kernel rows are
held against (copy_us, pct_copy); a point whose p80 / p20 exceeds schema.NOISY_RATIO says so in its note. A provider that cannot run here gives
one params-less row per case with status `unavailable` (never a number). A point that raises
torch.OutOfMemoryError gives one `oom` row, any other exception one `error` row naming it; the sweep goes
on. Finished points (any status) are never re-run on resume. A Triton provider's rows timed in the Triton
interpreter say so in their note; a GPU profile that does not match the device measured gives no roofline
rows (the note says why).
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from harness.bench import schema
from harness.bench.case import Case, Timed, Work
from harness.bench.catalog import all_cases
from harness.bench.presets import Preset
from harness.bench.roofline import GpuProfile
from harness.bench.timing import Timing, measure
from harness.output import one_line
from runtime.kernels import interpreted
from runtime.providers import INTERPRETER_NOTE, PROVIDERS, Unavailable


def _triton(provider: str) -> bool:
    """The provider's kernels are Triton programs: run by the Triton interpreter on a machine without a GPU."""
    p = PROVIDERS.get(provider)
    return p is not None and p.triton


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

    @property
    def measures_copy(self) -> bool:
        """The run measures the copy bandwidth, so kernel rows carry copy_us / pct_copy."""
        return any(p.case == "copy" and not p.unavailable for p in self.points)


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
            reason = case.unavailable(prov)
            if reason:
                if _matches({}, filters):
                    mine.append(Point(name, prov, {}, reason))
                continue
            if _triton(prov) and case.kind == "e2e" and not cuda:
                notes.append(f"{name}: {prov} provider skipped on CPU (the Triton interpreter takes ~0.5 s per tiny "
                             f"forward); no rows written for it")
                continue
            for p in plist:
                why = case.skip(prov, p)
                if why:
                    if f"{name}: {why}" not in notes:
                        notes.append(f"{name}: {why}")
                    continue
                for variant in case.variants_of(prov):
                    q = {**p, "variant": variant} if variant else dict(p)
                    if _matches(q, filters):
                        mine.append(Point(name, prov, q))
        if case.kind == "e2e":  # consecutive points share one built model (see e2e._bucket)
            from harness.bench.e2e import _bucket

            mine.sort(key=lambda pt: (*(schema.fmt(pt.params.get(k)) for k in ("model", "dtype", "rank")),
                                      _bucket(pt.params.get("n_adapters", 0)), pt.provider,
                                      pt.params.get("n_adapters", 0), pt.params.get("images", 0)))
        points += mine
    # the copy bandwidth is measured before the kernels it is the yardstick of
    points.sort(key=lambda pt: pt.case != "copy")
    return Plan(points, notes)


def _matches(params: dict, filters: dict[str, str]) -> bool:
    return all(schema.fmt(params.get(k)) == v for k, v in filters.items())


# ---------------------------------------------------------------------- metrics
def derive(metric: str, t: Timing, w: Work, profile: GpuProfile | None, copy_gbps: float | None = None
           ) -> tuple[float, float, float]:
    """(p50, p20, p80) of a metric. Throughputs invert latency: their p20 comes from latency's p80.
    bytes_mb, roof_us and copy_us do not depend on the timing (p50 = p20 = p80)."""
    lat = (t.p50_ms, t.p20_ms, t.p80_ms)
    if metric == "latency_ms":
        return lat
    if metric == "peak_mem_mib":
        m = (t.peak_bytes or 0) / 2**20
        return m, m, m
    const = {"bytes_mb": lambda: w.nbytes / 1e6,
             "roof_us": lambda: 1e6 * profile.roof_seconds(w.nbytes, w.flops),
             "copy_us": lambda: 1e6 * w.nbytes / (copy_gbps * 1e9)}.get(metric)
    if const is not None:
        v = const()
        return v, v, v
    amount = {"tokens_per_s": w.tokens, "images_per_s": w.images, "gbps": w.nbytes / 1e9,
              "tflops": w.flops / 1e12}.get(metric)
    if metric == "pct_roofline":
        amount = 100.0 * profile.roof_seconds(w.nbytes, w.flops)
    if metric == "pct_copy":
        amount = 100.0 * w.nbytes / (copy_gbps * 1e9)
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
    measures_copy: bool = False       # the plan holds copy points (kernel rows carry copy_us / pct_copy)
    copy_gbps: float | None = None    # best copy bandwidth measured so far in this run

    def note_copy(self, rows: list[dict]) -> None:
        """Take the best ok copy GB/s among `rows` of this run's GPU."""
        for r in rows:
            if r.get("case") == "copy" and r.get("metric") == "gbps" and r.get("status") == "ok" and \
                    r.get("gpu_name", "") == self.env.get("gpu_name", ""):
                try:
                    v = float(r["p50"])
                except (TypeError, ValueError):
                    continue
                self.copy_gbps = max(self.copy_gbps or 0.0, v)


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


def run_point(point: Point, case: Case, ctx: Context) -> list[dict]:
    if point.unavailable:
        return [_row(point, ctx, "latency_ms", None, "unavailable", point.unavailable)]
    cuda = ctx.device.type == "cuda"
    try:
        built = case.build(point.params, point.provider, ctx.device)
        timed = built if isinstance(built, Timed) else Timed(*built)
        work, note = timed.work, getattr(timed.fn, "note", "")  # e.g. it ran in the Triton interpreter
        t = measure(timed.fn, ctx.device, ctx.rep_ms, ctx.warmup_ms, ctx.min_reps, graph=timed.graph)
        del built, timed
    except Unavailable as e:
        return [_row(point, ctx, "latency_ms", None, "unavailable", str(e))]
    except torch.OutOfMemoryError as e:
        _free(case)
        return [_row(point, ctx, "latency_ms", None, "oom", one_line(e))]
    except Exception as e:  # noqa: BLE001 - recorded as a row; the sweep goes on
        _free(case)
        return [_row(point, ctx, "latency_ms", None, "error", one_line(e))]
    notes = [n for n in (note, t.note) if n]
    if _triton(point.provider) and interpreted() and not any("interpreter" in n for n in notes):
        notes.insert(0, INTERPRETER_NOTE)  # a Triton kernel timed on a CPU: never read as a GPU figure
    if t.spread > schema.NOISY_RATIO:
        notes.append(f"noisy: p80/p20 {t.spread:.2f} > {schema.NOISY_RATIO}")
    profile = ctx.profile
    if profile is not None and not profile.matches(ctx.env.get("gpu_name")):
        # the CLI refuses such a profile; any other caller still gets no roofline claim for another device
        notes.append(f"no % of roofline: measured on {ctx.env.get('gpu_name') or 'an unknown device'}, not on "
                     f"the {profile.name} profile's GPU")
        profile = None
    metrics = case.metrics(cuda, profile is not None, ctx.measures_copy, point.params.get("variant"))
    if ctx.copy_gbps is None and "copy_us" in metrics:
        log(f"{point.case}: no copy bandwidth measured in this run (the copy case failed?): no copy_us / pct_copy")
        metrics = tuple(m for m in metrics if m not in ("copy_us", "pct_copy"))
    rows = [_row(point, ctx, m, derive(m, t, work, profile, ctx.copy_gbps), "ok", "; ".join(notes))
            for m in metrics]
    if point.case == "copy":
        ctx.note_copy(rows)
    return rows


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
