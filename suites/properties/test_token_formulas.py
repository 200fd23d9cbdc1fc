"""Formula = measured: for random valid geometries and small configs, the rows that reach a tower layer
and a connector Linear of a real tiny HF model equal the registry's formulas, and HF's own forward accepts
exactly `lm_tokens` placeholders per image. Invalid geometry is refused by the registry first."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from suites.properties.measure import build_input_ids, make_config, measure, tiny_model
from vlm.arch import all_archs, apply_overrides, get_arch

ARCHS = [a.model_type for a in all_archs()]


def _drawer(data):
    return lambda name, lo, hi: data.draw(st.integers(lo, hi), label=name)


@pytest.mark.parametrize("model_type", ARCHS)
@given(data=st.data())
def test_formulas_equal_measured_rows(model_type, data):
    arch = get_arch(model_type)
    overrides = data.draw(st.sampled_from([json.dumps(v, sort_keys=True) for v in arch.config_variants()]),
                          label="config overrides")
    cfg, model = tiny_model(model_type, overrides)
    n_images = data.draw(st.integers(1, 2), label="images")
    geoms = [arch.draw_geometry(cfg, _drawer(data)) for _ in range(n_images)]
    counts = [arch.counts(cfg, g) for g in geoms]
    measured = measure(arch, cfg, model, geoms)
    assert measured["encoder"] == sum(c.encoder_rows for c in counts), (geoms, counts, measured)
    assert measured["connector"] == sum(c.connector_rows for c in counts), (geoms, counts, measured)
    # HF scatters image features into placeholder positions and raises on a count mismatch: the forward
    # having run with `lm_tokens` placeholders per image is the LM-side measurement.
    assert measured["seq_len"] == build_input_ids(arch, cfg, geoms).shape[1]


@pytest.mark.parametrize("model_type", ARCHS)
def test_one_placeholder_short_is_rejected_by_hf(model_type):
    """Independent check that the LM measurement can fail: HF refuses lm_tokens - 1 placeholders."""
    arch = get_arch(model_type)
    cfg, model = tiny_model(model_type, "{}")
    geom = arch.default_geometry(cfg)

    class Short(type(arch)):
        def prompt_image_ids(self, config, g):
            ids = super().prompt_image_ids(config, g)
            ids.remove(self.image_token_id(config))
            return ids

    with pytest.raises(Exception):  # noqa: B017 - HF raises ValueError or a shape error, either is a refusal
        measure(Short(), cfg, model, [geom])


@pytest.mark.parametrize("model_type", ARCHS)
@given(data=st.data())
def test_invalid_geometry_raises_value_error_naming_it(model_type, data):
    arch = get_arch(model_type)
    cfg = make_config(arch)
    geom = arch.draw_geometry(cfg, _drawer(data), valid=False)
    with pytest.raises(ValueError) as err:
        arch.counts(cfg, geom)
    msg = str(err.value)
    assert "\n" not in msg
    bad = [str(v) for v in (geom.tiles, geom.grid, geom.patches, geom.size, geom.split) if v is not None]
    # the message names the offending value (or one of its components)
    parts = {p for b in bad for p in b.strip("()").replace(" ", "").split(",")}
    assert any(p in msg for p in parts), (msg, geom)


@pytest.mark.parametrize("model_type", ARCHS)
def test_invalid_configs_are_refused(model_type):
    arch = get_arch(model_type)
    for variant in arch.invalid_config_variants():
        cfg = apply_overrides(arch.tiny_config(), variant)
        with pytest.raises(ValueError) as err:
            arch.counts(cfg, arch.default_geometry(make_config(arch)))
        assert any(str(v) in str(err.value) for v in variant.values()), (variant, str(err.value))
