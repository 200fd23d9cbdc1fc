"""Shared by the bench suites: the expected row keys of a plan, CSV reading."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from harness.bench import roofline, schema, sweep
from harness.bench.catalog import all_cases
from harness.bench.presets import PRESETS

REPO = Path(__file__).resolve().parents[2]


def expected_keys(cases=None, providers=None, filters=None, gpu="auto") -> list[tuple[str, ...]]:
    """Row keys (case, provider, params..., metric) a smoke run must write, derived from the plan."""
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else None
    profile, _ = roofline.resolve(gpu, name)
    plan = sweep.plan(PRESETS["smoke"], cases, providers, filters or {}, cuda)
    registry = all_cases()
    out = []
    for pt in plan.points:
        metrics = ("latency_ms",) if pt.unavailable else registry[pt.case].metrics(
            cuda, profile is not None, plan.measures_copy, pt.params.get("variant"))
        out += [(*pt.key(), m) for m in metrics]
    return out


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def keys(rows: list[dict]) -> list[tuple[str, ...]]:
    return [schema.row_key(r) for r in rows]
