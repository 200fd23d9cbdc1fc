"""`mmlora archs` / `mmlora tokens`: every registered arch answers; the Llama 4 case equals the formula
measured on real Llama 4 towers (below)."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from vlm.arch import REGISTRY


def test_archs_lists_at_least_eight(capsys):
    assert main(["archs", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 8 and {r["arch"] for r in rows} == set(REGISTRY)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_tokens_answers_for_each_arch(arch, capsys):
    assert main(["tokens", "--arch", arch]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert set(counts) == {"encoder_rows", "connector_rows", "lm_tokens"}
    assert all(isinstance(v, int) and v > 0 for v in counts.values())


def test_llama4_504_matches_facts_formula(capsys):
    S, p, r = 504, 14, 0.5
    assert main(["tokens", "--arch", "llama4", "--set", f"vision_config.image_size={S}",
                 "--set", f"vision_config.patch_size={p}", "--set", f"vision_config.pixel_shuffle_ratio={r}",
                 "--tiles", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    # Llama 4, measured: per tile (S/p)^2 + 1 (CLS) -> (S/p)^2 r^2 -> tiles (S/p)^2 r^2 (no global tile for one tile)
    side = S // p
    assert got == {"encoder_rows": side * side + 1, "connector_rows": int(side * side * r * r),
                   "lm_tokens": int(side * side * r * r)}
