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


def test_tokens_reads_a_real_config_json(tmp_path, capsys):
    """`--config` reads a config.json saved by transformers itself (sizes unlike the tiny config's) and answers
    the rows that hooks measure on a model built from that very file."""
    from suites.properties.measure import measure
    from vlm.arch import ImageGeometry, apply_overrides, get_arch

    arch = get_arch("llama4")
    cfg = apply_overrides(arch.tiny_config(), {"vision_config.image_size": 48, "vision_config.patch_size": 8})
    cfg.save_pretrained(tmp_path)  # the real writer of config.json
    assert main(["tokens", "--config", str(tmp_path / "config.json"), "--tiles", "2"]) == 0
    got = json.loads(capsys.readouterr().out)
    model = arch.model_class()(cfg).eval()
    rows = measure(arch, cfg, model, [ImageGeometry(tiles=2)])
    assert got["encoder_rows"] == rows["encoder"] and got["connector_rows"] == rows["connector"], (got, rows)
    # the folder works the same, and an --arch that contradicts the file's model_type is refused
    assert main(["tokens", "--config", str(tmp_path), "--tiles", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == got
    assert main(["tokens", "--config", str(tmp_path), "--arch", "llava"]) == 2
    assert "model_type is 'llama4'" in capsys.readouterr().err


def test_tiles_help_says_what_each_tiled_arch_counts(capsys):
    """Every arch that takes `tiles` is named in --tiles' help (its count differs per processor)."""
    with pytest.raises(SystemExit):
        from harness.cli import build_parser

        build_parser().parse_args(["tokens", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    tiled = [a for a, spec in REGISTRY.items() if "tiles" in spec.geometry_fields]
    assert tiled and all(a in text for a in tiled), (tiled, text)
