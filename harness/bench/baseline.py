"""Regression check against a baseline results.csv: latency p50 slower than the baseline's by more
than 5 % (same case, provider, params; status ok on both sides) is a regression (exit code 1)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from harness.bench import schema

THRESHOLD = 0.05
REQUIRED: tuple[str, ...] = (*schema.KEY_COLUMNS, "metric", "p50")


@dataclass(frozen=True)
class Comparison:
    key: tuple[str, ...]          # point key
    gpu: str
    base_p50: float
    p50: float

    @property
    def ratio(self) -> float:
        return self.p50 / self.base_p50 if self.base_p50 > 0 else math.inf

    @property
    def regression(self) -> bool:
        return self.ratio > 1.0 + THRESHOLD

    def label(self) -> str:
        params = " ".join(f"{c}={v}" for c, v in zip(schema.PARAM_COLUMNS, self.key[2:]) if v)
        return f"{self.key[0]} {self.key[1]} {params}".strip()


def load(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--baseline {str(path)!r}: no such file")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise ValueError(f"--baseline {str(path)!r} lacks column {missing[0]!r} (a bench results.csv "
                                 f"has {', '.join(REQUIRED)})")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"--baseline {str(path)!r} cannot be read: {' '.join(str(e).split())}") from None


def _p50(row: dict) -> float | None:
    if (row.get("status") or "ok") != "ok" or row.get("metric") != "latency_ms":
        return None
    try:
        v = float(row.get("p50") or "nan")
    except ValueError:
        return None
    return v if math.isfinite(v) and v > 0 else None


def compare(rows: list[dict], base_rows: list[dict]) -> list[Comparison]:
    """One comparison per current ok latency row that the baseline also holds (same GPU preferred)."""
    base: dict[tuple, dict[str, float]] = {}
    for r in base_rows:
        v = _p50(r)
        if v is not None:
            base.setdefault(schema.row_key(r)[:-1], {}).setdefault(r.get("gpu_name", ""), v)
    out = []
    for r in rows:
        v = _p50(r)
        k = schema.row_key(r)[:-1]
        if v is None or k not in base:
            continue
        by_gpu = base[k]
        gpu = r.get("gpu_name", "")
        b = by_gpu.get(gpu, next(iter(by_gpu.values())))
        out.append(Comparison(k, gpu, b, v))
    return sorted(out, key=lambda c: (not c.regression, -c.ratio))


def format_table(comps: list[Comparison], baseline: str) -> str:
    n_reg = sum(c.regression for c in comps)
    lines = [f"regressions vs {baseline}: {n_reg} of {len(comps)} latency rows slower by more than "
             f"{THRESHOLD:.0%} (p50)"]
    if comps:
        lines.append(f"{'':<11} {'ratio':>7} {'base p50 ms':>12} {'p50 ms':>12}  point")
        for c in comps:
            flag = "REGRESSION" if c.regression else "ok"
            lines.append(f"{flag:<11} {c.ratio:>7.3f} {c.base_p50:>12.4g} {c.p50:>12.4g}  {c.label()}")
    return "\n".join(lines)
