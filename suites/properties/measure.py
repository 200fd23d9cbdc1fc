"""Measure, with forward hooks on a real tiny HF model, how many rows reach each group."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import torch

from vlm.arch import ArchSpec, ImageGeometry, apply_overrides
from vlm.capture import first_tensor


def _rows(t: torch.Tensor) -> int:
    return t.numel() // t.shape[-1]


def make_config(arch: ArchSpec, overrides_json: str = "{}"):
    cfg = arch.tiny_config()
    apply_overrides(cfg, json.loads(overrides_json))
    return cfg


@functools.lru_cache(maxsize=32)
def tiny_model(model_type: str, overrides_json: str = "{}"):
    """Build (and cache: hypothesis draws geometries far more often than configs) a tiny model."""
    from vlm.arch import get_arch

    arch = get_arch(model_type)
    cfg = make_config(arch, overrides_json)
    torch.manual_seed(0)
    model = arch.model_class()(cfg).eval()
    arch.randomize_tiny(model)
    # where HF crashes on a valid input (Gemma4's partial pooling bins) it runs with the reference's fix of
    # that one module: the rows are then those of the stated semantics
    arch.install_fixes(model)
    return cfg, model


def build_input_ids(arch: ArchSpec, cfg, geoms: Sequence[ImageGeometry], n_text: int = 3) -> torch.Tensor:
    lo, hi = arch.text_vocab_safe_ids(cfg)
    ids: list[int] = list(range(lo, lo + n_text))
    for g in geoms:
        ids += arch.prompt_image_ids(cfg, g)
        ids += list(range(lo, lo + n_text))
    assert max(ids) < cfg.get_text_config().vocab_size
    return torch.tensor([ids], dtype=torch.long)


def measure(arch: ArchSpec, cfg, model, geoms: Sequence[ImageGeometry], lm_tokens_override=None) -> dict:
    """Run one forward and count rows at the arch's measure points."""
    gen = torch.Generator().manual_seed(0)
    pix = arch.build_pixel_inputs(cfg, geoms, gen)
    input_ids = build_input_ids(arch, cfg, geoms)
    counts = {"encoder": 0, "connector": 0}
    points = arch.measure_points(model)
    modules = dict(model.named_modules())
    handles = []
    for key, name in points.items():
        if name not in modules:
            raise AssertionError(f"measure point {name!r} is not a module of {type(model).__name__}")

        def hook(mod, args, kwargs, key=key, name=name):
            x = first_tensor(args, kwargs, "hidden_states")
            assert x is not None, f"{name} received no tensor"
            counts[key] += _rows(x)

        handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = arch.forward_logits(model, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **pix)
    finally:
        for h in handles:
            h.remove()
    counts["logits_rows"] = _rows(out)
    counts["seq_len"] = input_ids.shape[1]
    return counts
