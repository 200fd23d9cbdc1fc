"""The runtime against the reference (and its fp64 truth) on drawn mixed batches: every image of a batch
with its own drawn geometry (the registry's strategies), several images in one request, text-only requests,
mixed adapters. Few examples by default (each is a whole correctness run), 10x under the nightly profile."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.correctness.engine import Options, run_arch
from vlm.arch import all_archs, get_arch

ARCHS = [a.model_type for a in all_archs()]
EXAMPLES = {"nightly": 20, "quick": 1}.get(os.environ.get("HYPOTHESIS_PROFILE", "default"), 2)
# the Triton interpreter costs seconds per tiny forward: on CPU the LoRA provider is the torch twin (the
# mapping, slot tables and vision kernels under test are the same); on a GPU the Triton kernels
KERNEL = "triton" if torch.cuda.is_available() else "torch"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ARCHS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_runtime_matches_reference_on_drawn_mixed_batches(model_type, data):
    arch = get_arch(model_type)
    cfg = arch.tiny_config()
    n = data.draw(st.integers(2, 4), label="geometries")
    geoms = tuple(arch.draw_geometry(cfg, lambda name, lo, hi: data.draw(st.integers(lo, hi), label=name))
                  for _ in range(n))
    opts = Options(archs=[model_type], n_adapters=2, geometries=geoms, kernel=KERNEL)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_arch(model_type, opts, Path(tmp))
    assert res.summary["ok"], (geoms, res.summary["first_divergence"])
