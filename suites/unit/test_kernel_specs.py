"""What every kernel spec (runtime/kernels, found by discovery) gets without a test of its own: its op against
its torch twin on its own sample inputs, at every dtype its tolerance names (OpInfo's idea: one spec drives
the generic test); and the bench it feeds keys every planned point apart (a parameter dropped from the row key
would make two points share one results.csv row, and the store keeps only the first)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from harness.bench import schema
from harness.bench.presets import PRESETS
from harness.bench.sweep import plan
from runtime.kernels import KERNELS
from runtime.kernels.spec import DTYPES
from suites.helpers import DEV, assert_close_scaled

_NAMES = {v: k for k, v in DTYPES.items()}
CASES = [(name, dt) for name, spec in KERNELS.items() for dt in spec.rel_tol]


def _outputs(result) -> list[torch.Tensor]:
    return [t for t in (result if isinstance(result, (tuple, list)) else [result]) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{_NAMES[d]}" for n, d in CASES])
def test_op_matches_its_twin_on_its_sample(name, dtype):
    spec = KERNELS[name]
    p = {**spec.sweeps["smoke"].base, "dtype": _NAMES[dtype]}
    spec.check(p)
    # each side gets its own inputs (the seeded sample, built twice): an op that writes its output in place
    # (expand, apply) must not hand the twin what it wrote
    args, kwargs = spec.sample(p, torch.device(DEV))
    got = _outputs(spec.op(*args, **kwargs))
    args, kwargs = spec.sample(p, torch.device(DEV))
    want = _outputs(spec.twin(*args, **kwargs))
    assert got and len(got) == len(want), (name, len(got), len(want))
    for g, w in zip(got, want):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert_close_scaled(g, w, spec.rel_tol[dtype], f"{name} {_NAMES[dtype]} at {p}")


def test_every_declared_parameter_is_a_column_and_every_sweep_point_is_declared():
    for name, spec in KERNELS.items():
        assert set(spec.params) <= set(schema.PARAM_COLUMNS), (name, spec.params)
        for preset, sweep in spec.sweeps.items():
            for point in sweep.points():
                assert set(point) <= set(spec.params), (name, preset, point)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_no_two_planned_points_share_a_row_key(preset):
    points = plan(PRESETS[preset], None, None, {}, cuda=True).points
    keys = Counter(pt.key() for pt in points)
    dup = [k for k, n in keys.items() if n > 1]
    assert not dup, f"{preset}: {len(dup)} keys planned twice, e.g. {dup[0]}"


def test_a_parameter_no_column_holds_is_refused_not_dropped():
    with pytest.raises(ValueError, match="window.*no column of results.csv"):
        schema.point_key("lora_apply", "torch", {"dtype": "fp32", "T": 16, "window": 4})
