"""docs/rows.md, measured: for every registered arch, on its tiny HF model, the row order inside one image and what
each boundary (`@tower_out`, `@lm_image_embeds`) is, as the page states them.

Independent of the registry where it can be: the expected rows are built here, by the page's index formulas, from
tensors that forward hooks take off the HF model (a tower's output, a patch embedding), and compared with what
other hooks see further on (the connector's first Linear's input, the LM's input embeddings). The boundaries the
harness records (`vlm.capture.Recorder`) are then held to those hooked tensors. Counts are the property suite's
business (suites/properties/test_token_formulas.py); they are not re-derived here beyond what the gathers imply.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from suites.properties.measure import build_input_ids
from vlm.arch import REGISTRY, ImageGeometry, get_arch
from vlm.capture import Recorder
from vlm.checkpoint import build_tiny
from vlm.rows import LM_IMAGE_EMBEDS, TOWER_OUT


@functools.cache
def _model(model_type: str):
    arch = get_arch(model_type)
    cfg, model = build_tiny(arch)
    # Gemma 4's partial pooling bins crash in HF's pooler: the reference runs the stated semantics (its fix), and
    # that is what a bundle records; the other archs have no fix the reference runs
    arch.install_fixes(model)
    return cfg, model.double()


def _main(args, kwargs):
    for k in ("hidden_states", "hidden_state", "inputs_embeds", "input", "x", "image_features", "vision_features"):
        if isinstance(kwargs.get(k), torch.Tensor):
            return kwargs[k]
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


def _out(o):
    if isinstance(o, torch.Tensor):
        return o
    if isinstance(o, tuple | list):
        return o[0]
    return o.last_hidden_state if getattr(o, "last_hidden_state", None) is not None else o[0]


def run(model_type: str, geoms, pre=(), post=()):
    """One forward of the tiny model on these images: {("in", name) / ("out", name): [tensors per call]}, plus the
    harness's own boundary captures under "@..." and the logits."""
    arch = get_arch(model_type)
    cfg, model = _model(model_type)
    pix = arch.build_pixel_inputs(cfg, geoms, torch.Generator().manual_seed(1))
    pix = {k: v.double() if v.is_floating_point() else v for k, v in pix.items()}
    ids = build_input_ids(arch, cfg, geoms)
    got: dict = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(
        lambda _m, a, kw, n=n: got.setdefault(("in", n), []).append(_main(a, kw)), with_kwargs=True) for n in pre]
    handles += [mods[n].register_forward_hook(
        lambda _m, _a, o, n=n: got.setdefault(("out", n), []).append(_out(o))) for n in post]
    rec = Recorder(model, [], arch, sink=lambda name, key, t: got.setdefault(name, []).append(t))
    rec.set_image_positions(ids == arch.image_token_id(cfg))
    try:
        with torch.no_grad():
            got["logits"] = arch.forward_logits(model, input_ids=ids, attention_mask=torch.ones_like(ids), **pix)
    finally:
        rec.close()
        for h in handles:
            h.remove()
    got["pix"], got["ids"], got["cfg"], got["model"] = pix, ids, cfg, model
    return got


def one(got, key) -> torch.Tensor:
    ts = got[key]
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in ts])


def close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def shuffle(grid: torch.Tensor, k: int) -> torch.Tensor:
    """The page's pixel-shuffle order: [n, n, d] patch grid -> [(n/k)^2, k^2 d]: output row (a, b) row-major, its
    features the k x k patches (a*k+i, b*k+j), i then j, each patch's d channels contiguous."""
    n, _, d = grid.shape
    return grid.reshape(n // k, k, n // k, k, d).permute(0, 2, 1, 3, 4).reshape((n // k) ** 2, k * k * d)


def unfold(grid: torch.Tensor, m: int) -> torch.Tensor:
    """Mistral 3's merge order: [h, w, d] -> [(h/m)(w/m), d m^2], block (a, b) row-major, features channel-major
    (channel c of patches (i, j), c slowest)."""
    h, w, d = grid.shape
    return grid.reshape(h // m, m, w // m, m, d).permute(0, 2, 4, 1, 3).reshape((h // m) * (w // m), d * m * m)


def tower_out_and_embeds_match(got, tower_out: torch.Tensor, embeds: torch.Tensor | None):
    """The harness's @tower_out is the page's tensor; its @lm_image_embeds the LM's input rows at the
    placeholders, which are `embeds` (in that order) where given."""
    close(one(got, TOWER_OUT), tower_out)
    lm = one(got, LM_IMAGE_EMBEDS)
    if embeds is not None:
        close(lm, embeds)


def cls_position(layer0_in: torch.Tensor) -> list[int]:
    """Row positions whose value is the same in every tile (pixel-independent: the class embedding)."""
    same = (layer0_in - layer0_in[:1]).abs().amax(dim=(0, 2)) == 0
    return [int(i) for i in torch.nonzero(same).flatten()]


# ---------------------------------------------------------------------------------------------- tiled towers
def test_llama4_cls_last_per_tile_and_tower_out_is_the_adapter_fc1_input_after_the_shuffle():
    arch = get_arch("llama4")
    cfg = _model("llama4")[0]
    geoms = arch.mixed_geometries(cfg)
    got = run("llama4", geoms, pre=["vision_model.model.layers.0", "vision_model.vision_adapter.mlp.fc1",
                                    "multi_modal_projector.linear_1"],
              post=["vision_model.layernorm_post", "vision_model", "multi_modal_projector"])
    vc = cfg.vision_config
    side, k = vc.image_size // vc.patch_size, round(1 / vc.pixel_shuffle_ratio)
    x0 = got[("in", "vision_model.model.layers.0")][0]
    assert x0.shape[1] == side * side + 1
    assert cls_position(x0) == [side * side]  # CLS: the last row of every tile
    post = got[("out", "vision_model.layernorm_post")][0]
    tiles = post.shape[0]
    assert tiles == 1 + 3 + 5  # 1 tile; 2 + global; 4 + global
    want = torch.cat([shuffle(post[t, :-1].reshape(side, side, -1), k) for t in range(tiles)])
    fc1 = one(got, ("in", "vision_model.vision_adapter.mlp.fc1"))
    close(fc1, want)
    # not the tower's output: that is the adapter MLP's output, the projector's input
    assert fc1.shape[-1] == k * k * vc.hidden_size
    close(one(got, ("in", "multi_modal_projector.linear_1")), one(got, ("out", "vision_model")))
    tower_out_and_embeds_match(got, want, one(got, ("out", "multi_modal_projector")))


def test_internvl_cls_first_and_tower_out_is_linear_1_input_after_shuffle_and_layer_norm():
    arch = get_arch("internvl")
    cfg = _model("internvl")[0]
    got = run("internvl", arch.mixed_geometries(cfg), pre=["model.vision_tower.encoder.layer.0",
                                                           "model.multi_modal_projector.linear_1"],
              post=["model.vision_tower", "model.multi_modal_projector.layer_norm", "model.multi_modal_projector"])
    vc = cfg.vision_config
    side, k = vc.image_size[0] // vc.patch_size[0], round(1 / cfg.downsample_ratio)
    x0 = got[("in", "model.vision_tower.encoder.layer.0")][0]
    assert cls_position(x0) == [0]  # CLS: the first row of every tile
    assert cfg.vision_feature_layer == -1
    last = got[("out", "model.vision_tower")][0]
    shuffled = torch.cat([shuffle(last[t, 1:].reshape(side, side, -1), k) for t in range(last.shape[0])])
    ln = got["model"].model.multi_modal_projector.layer_norm
    want = ln(shuffled)
    close(one(got, ("in", "model.multi_modal_projector.linear_1")), want)
    tower_out_and_embeds_match(got, want, one(got, ("out", "model.multi_modal_projector")))


def test_idefics3_no_cls_and_tower_out_is_the_shuffled_post_layernorm_output():
    arch = get_arch("idefics3")
    cfg = _model("idefics3")[0]
    got = run("idefics3", arch.mixed_geometries(cfg), pre=["model.vision_model.encoder.layers.0"],
              post=["model.vision_model", "model.connector"])
    vc = cfg.vision_config
    side, k = vc.image_size // vc.patch_size, cfg.scale_factor
    x0 = got[("in", "model.vision_model.encoder.layers.0")][0]
    assert x0.shape[1] == side * side and cls_position(x0) == []
    last = got[("out", "model.vision_model")][0]
    want = torch.cat([shuffle(last[t].reshape(side, side, -1), k) for t in range(last.shape[0])])
    tower_out_and_embeds_match(got, want, one(got, ("out", "model.connector")))


def test_llava_next_tiles_cls_first_and_lm_embeds_base_then_unpadded_grid_with_newlines():
    arch = get_arch("llava_next")
    cfg, model = _model("llava_next")
    # the mix, and a wide and a tall image whose grid is cropped back to their aspect ratio (unpad)
    geoms = arch.mixed_geometries(cfg) + [ImageGeometry(size=(20, 64)), ImageGeometry(size=(64, 20))]
    got = run("llava_next", geoms, pre=["model.vision_tower.encoder.layers.0"],
              post=["model.vision_tower.encoder.layers.0", "model.multi_modal_projector"])
    side, s = cfg.vision_config.image_size // cfg.vision_config.patch_size, cfg.vision_config.image_size
    x0 = got[("in", "model.vision_tower.encoder.layers.0")][0]
    assert cls_position(x0) == [0]
    # vision_feature_layer -2 of a 2-layer tower: the output of layer 0, CLS dropped
    assert cfg.vision_feature_layer == -2 and cfg.vision_config.num_hidden_layers == 2
    feat = got[("out", "model.vision_tower.encoder.layers.0")][0][:, 1:]
    close(one(got, TOWER_OUT), feat.reshape(-1, feat.shape[-1]))
    proj = got[("out", "model.multi_modal_projector")][0]  # [tiles, side^2, D]
    newline = model.model.image_newline
    want, t0 = [], 0
    for g in geoms:
        h, w = g.size
        # the processor's grid for this image, from the pinpoints as select_best_resolution picks them
        best = max(cfg.image_grid_pinpoints, key=lambda p: (
            min(int(w * min(p[1] / w, p[0] / h)) * int(h * min(p[1] / w, p[0] / h)), w * h), -p[0] * p[1]))
        gh, gw = best[0] // s, best[1] // s
        tiles = proj[t0: t0 + 1 + gh * gw]
        t0 += 1 + gh * gw
        grid = tiles[1:].reshape(gh, gw, side, side, -1).permute(0, 2, 1, 3, 4).reshape(gh * side, gw * side, -1)
        rows, cols = grid.shape[:2]
        if w / h > cols / rows:  # wider than the grid: crop rows, centred
            pad = (rows - int(round(h * cols / w, 7))) // 2
            grid = grid[pad: rows - pad]
        else:
            pad = (cols - int(round(w * rows / h, 7))) // 2
            grid = grid[:, pad: cols - pad]
        grid = torch.cat([grid, newline.expand(grid.shape[0], 1, -1)], dim=1)
        want += [tiles[0], grid.reshape(-1, grid.shape[-1])]
    assert t0 == proj.shape[0]
    tower_out_and_embeds_match(got, one(got, TOWER_OUT), torch.cat(want))


# ---------------------------------------------------------------------------------------------- packed towers
def _window_order(grid, m: int, ws: int) -> list[int]:
    """Qwen2.5-VL's window order of one image's merge blocks: frames in turn, windows of ws x ws blocks
    row-major over the block grid (the last ones cut short), blocks row-major inside a window."""
    t, h, w = grid
    hb, wb = h // m, w // m
    order = []
    for f in range(t):
        for wy in range(0, hb, ws):
            for wx in range(0, wb, ws):
                order += [f * hb * wb + y * wb + x for y in range(wy, min(wy + ws, hb))
                          for x in range(wx, min(wx + ws, wb))]
    return order


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_packed_rows_merge_view_and_window_order(model_type):
    arch = get_arch(model_type)
    cfg = _model(model_type)[0]
    geoms = arch.mixed_geometries(cfg)
    m = cfg.vision_config.spatial_merge_size
    fc1 = "model.visual.merger.linear_fc1" if model_type == "qwen3_vl" else "model.visual.merger.mlp.0"
    norm = "model.visual.merger.norm" if model_type == "qwen3_vl" else "model.visual.merger.ln_q"
    got = run(model_type, geoms, pre=["model.visual.blocks.0", fc1],
              post=["model.visual.patch_embed", "model.visual.blocks.1", norm, "model.visual.merger"])
    emb = one(got, ("out", "model.visual.patch_embed"))
    x0 = one(got, ("in", "model.visual.blocks.0"))
    n = sum(g.grid[0] * g.grid[1] * g.grid[2] for g in geoms)
    assert emb.shape[0] == x0.shape[0] == n  # packed: every image's rows, nothing else
    if model_type == "qwen2_5_vl":
        ws = cfg.vision_config.window_size // m // cfg.vision_config.patch_size
        perm, off = [], 0
        for g in geoms:
            perm += [off + b for b in _window_order(g.grid, m, ws)]
            off += g.grid[0] * g.grid[1] * g.grid[2] // (m * m)
        perm = torch.tensor(perm)
        assert not torch.equal(perm, torch.arange(len(perm)))  # the mix has grids that span several windows
    else:
        perm = torch.arange(n // (m * m))
    d = emb.shape[-1]
    # tower rows: the patch embedding's rows, whole merge blocks (m^2 consecutive rows) in window order (Qwen3-VL
    # adds its interpolated position table to them first, row by row)
    if model_type != "qwen3_vl":
        close(x0, emb.reshape(-1, m * m, d)[perm].reshape(n, d))
    last = one(got, ("out", "model.visual.blocks.1"))
    normed = one(got, ("out", norm))
    # @tower_out: m^2 consecutive rows of the merger's LayerNorm output viewed as one row (patch-major)
    want = normed.reshape(-1, m * m * d)
    close(one(got, ("in", fc1)), want)
    close(normed, got["model"].get_submodule(norm)(last))
    merged = one(got, ("out", "model.visual.merger"))
    # the LM's rows are the merger's, un-permuted back to image order (merge blocks row-major per frame)
    embeds = merged[torch.argsort(perm)]
    tower_out_and_embeds_match(got, want, embeds)


def test_qwen3_vl_deepstack_merger_norms_after_the_merge_view():
    arch = get_arch("qwen3_vl")
    cfg = _model("qwen3_vl")[0]
    assert list(cfg.vision_config.deepstack_visual_indexes) == [0]
    m = cfg.vision_config.spatial_merge_size
    got = run("qwen3_vl", arch.mixed_geometries(cfg), pre=["model.visual.deepstack_merger_list.0.linear_fc1"],
              post=["model.visual.blocks.0"])
    after0 = one(got, ("out", "model.visual.blocks.0"))
    ds = got["model"].model.visual.deepstack_merger_list[0]
    close(one(got, ("in", "model.visual.deepstack_merger_list.0.linear_fc1")),
          ds.norm(after0.reshape(-1, m * m * after0.shape[-1])))


def test_mistral3_packs_each_images_own_patch_grid_and_merges_channel_major():
    arch = get_arch("mistral3")
    cfg = _model("mistral3")[0]
    geoms = arch.mixed_geometries(cfg)
    p, m = cfg.vision_config.patch_size, cfg.spatial_merge_size
    got = run("mistral3", geoms, pre=["model.vision_tower.ln_pre"],
              post=["model.vision_tower.patch_conv", "model.vision_tower", "model.multi_modal_projector.norm",
                    "model.multi_modal_projector"])
    conv = got[("out", "model.vision_tower.patch_conv")][0]  # [images, d, Hmax/p, Wmax/p]: batch padding included
    want_in = torch.cat([conv[i, :, : g.size[0] // p, : g.size[1] // p].flatten(1).T for i, g in enumerate(geoms)])
    close(one(got, ("in", "model.vision_tower.ln_pre")), want_in)  # row-major per image, padding dropped
    normed = one(got, ("out", "model.multi_modal_projector.norm"))
    parts, off = [], 0
    for g in geoms:
        h, w = g.size[0] // p, g.size[1] // p
        parts.append(unfold(normed[off: off + h * w].reshape(h, w, -1), m))
        off += h * w
    tower_out_and_embeds_match(got, torch.cat(parts), one(got, ("out", "model.multi_modal_projector")))


def test_gemma4_real_patches_then_padding_and_bins_row_major():
    arch = get_arch("gemma4")
    cfg, model = _model("gemma4")
    geoms = arch.mixed_geometries(cfg)
    k = cfg.vision_config.pooling_kernel_size
    got = run("gemma4", geoms, post=["model.vision_tower.encoder", "model.embed_vision"])
    enc = got[("out", "model.vision_tower.encoder")][0]  # [images, max_patches, d]
    pos = got["pix"]["image_position_ids"]
    vt = model.model.vision_tower
    want = []
    for i, g in enumerate(geoms):
        hp, wp = g.patches
        # the positions as the processor writes them: real patches row-major first, (-1, -1) padding after
        assert (pos[i, hp * wp:] == -1).all() and (pos[i, : hp * wp, 0] == torch.arange(hp * wp) % max(wp, 1)).all()
        real = enc[i, : hp * wp].reshape(hp, wp, -1) if hp * wp else enc[i, :0]
        for by in range(-(-hp // k)):
            for bx in range(-(-wp // k)):
                b = real[by * k: by * k + k, bx * k: bx * k + k].reshape(-1, enc.shape[-1])
                want.append(b.sum(0) / (k * k))  # a partial bin: the sum of its real patches over k^2
    want = torch.stack(want) * vt.config.hidden_size ** 0.5
    if vt.config.standardize:
        want = (want - vt.std_bias) * vt.std_scale
    tower_out_and_embeds_match(got, want, one(got, ("out", "model.embed_vision")))
    assert one(got, TOWER_OUT).shape[0] == sum(-(-g.patches[0] // k) * -(-g.patches[1] // k) for g in geoms)


# ---------------------------------------------------------------------------------------------- fixed size
def test_gemma3_tower_out_is_the_avg_pooled_grid_before_the_norm():
    cfg = _model("gemma3")[0]
    arch = get_arch("gemma3")
    got = run("gemma3", [arch.default_geometry(cfg)] * 2, post=["model.vision_tower", "model.multi_modal_projector"])
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    kk = side // math.isqrt(cfg.mm_tokens_per_image)
    last = got[("out", "model.vision_tower")][0]
    want = torch.cat([last[t].reshape(side // kk, kk, side // kk, kk, -1).mean(dim=(1, 3)).reshape(-1, last.shape[-1])
                      for t in range(last.shape[0])])
    tower_out_and_embeds_match(got, want, one(got, ("out", "model.multi_modal_projector")))


def test_llava_cls_first_and_tower_out_is_feature_layer_without_cls():
    cfg = _model("llava")[0]
    arch = get_arch("llava")
    got = run("llava", [arch.default_geometry(cfg)] * 2, pre=["model.vision_tower.encoder.layers.0"],
              post=["model.vision_tower.encoder.layers.0", "model.multi_modal_projector"])
    assert cls_position(got[("in", "model.vision_tower.encoder.layers.0")][0]) == [0]
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    feat = got[("out", "model.vision_tower.encoder.layers.0")][0][:, 1:]
    tower_out_and_embeds_match(got, feat.reshape(-1, feat.shape[-1]), one(got, ("out", "model.multi_modal_projector")))


def test_paligemma_tower_out_is_the_towers_output():
    cfg = _model("paligemma")[0]
    arch = get_arch("paligemma")
    got = run("paligemma", [arch.default_geometry(cfg)] * 2, post=["model.vision_tower", "model.multi_modal_projector"])
    tower_out_and_embeds_match(got, one(got, ("out", "model.vision_tower")), one(got, ("out", "model.multi_modal_projector")))


def test_every_registered_arch_is_covered_here():
    covered = {"llama4", "internvl", "idefics3", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mistral3",
               "gemma4", "gemma3", "llava", "paligemma"}
    assert set(REGISTRY) == covered, sorted(set(REGISTRY) ^ covered)

# ---------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("model_type,old,new", [
    ("llava", "language_model.model.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.q_proj"),
    ("llava", "vision_tower.vision_model.encoder.layers.0.mlp.fc1", "model.vision_tower.encoder.layers.0.mlp.fc1"),
    ("qwen2_vl", "model.layers.0.mlp.gate_proj", "model.language_model.layers.0.mlp.gate_proj"),
    ("qwen2_vl", "visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.qkv"),
    # Llama 4 keeps the checkpoint's layout as its module names: nothing to convert
    ("llama4", "language_model.model.layers.0.self_attn.q_proj", "language_model.model.layers.0.self_attn.q_proj"),
])
def test_checkpoint_names_convert_to_module_names(model_type, old, new):
    from vlm.adapter_files import module_name_converter

    model = _model(model_type)[1]
    assert module_name_converter(model)(old) == new
    assert new in dict(model.named_modules())
