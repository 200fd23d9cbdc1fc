"""What `nox -s correctness` runs: every registered arch, both modes, 3 generated adapters + none, fp32 CPU.

One test per arch (not one test for the whole run) so that parallel workers share the work and a failure
names its arch; a separate check holds that the CLI's default arch list is the whole registry."""

from __future__ import annotations

import json

import pytest

from harness.cli import build_parser, main
from vlm.arch import REGISTRY


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_default_correctness_run_passes(arch, tmp_path):
    out = tmp_path / "rep"
    assert main(["correctness", "--arch", arch, "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())["archs"]
    assert list(s) == [arch] and s[arch]["ok"], s


def test_default_run_covers_every_registered_arch():
    from harness.correctness.cli import _options

    assert set(_options(build_parser().parse_args(["correctness"])).archs) == set(REGISTRY)
