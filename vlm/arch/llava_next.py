"""LLaVA-NeXT (1.6) "anyres": CLIP tower over a base tile plus a grid of S x S tiles, two-Linear projector,
unpadding and one learned newline embedding per feature row.

For an original image of (H, W) pixels the processor picks the best pinpoint resolution (bh, bw)
(`select_best_resolution`), resizes and pads the image into it and cuts it into gh x gw = bh/S x bw/S
tiles, plus one base tile of the whole image. Every tile runs (S/p)^2 patch rows + 1 CLS row through the
tower; the "default" strategy drops CLS, so each tile sends (S/p)^2 rows through the projector. The grid
features (gh*S/p x gw*S/p) are cropped back to the image's aspect ratio (`unpad_image`) and each row gets
the `image_newline` vector appended: lm = (S/p)^2 + rows * (cols + 1).

Geometry: `size` = the original (H, W) the model receives as `image_sizes`; the tiles follow from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm.arch import register
from vlm.arch.base import (
    ArchSpec,
    DrawInt,
    ImageGeometry,
    TokenCounts,
    clip_tower_recipe,
    decoder_lm_recipe,
    patch_side,
    require_int,
    unused_feature_layers,
)


def _best_resolution(h: int, w: int, pinpoints) -> tuple[int, int]:
    # transformers.image_processing_utils.select_best_resolution, restated so that the registry does not
    # depend on a helper's location; same float operations, same tie-breaking (first best wins)
    best, max_eff, min_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            best, max_eff, min_waste = (ph, pw), eff, waste
    return best


def _unpadded(rows: int, cols: int, h: int, w: int) -> tuple[int, int]:
    # transformers.models.llava_next.modeling_llava_next.unpad_image on a (rows x cols) feature map
    if w / h > cols / rows:
        new_h = int(round(h * (cols / w), 7))
        pad = (rows - new_h) // 2
        return rows - 2 * pad, cols
    new_w = int(round(w * (rows / h), 7))
    pad = (cols - new_w) // 2
    return rows, cols - 2 * pad


@dataclass(frozen=True)
class LlavaNext(ArchSpec):
    model_type = "llava_next"
    model_class_name = "LlavaNextForConditionalGeneration"

    tower: tuple[str, ...] = ("model.vision_tower.",)
    # image_newline is an nn.Parameter (no Linear): it belongs to the connector side of the model
    connector: tuple[str, ...] = ("model.multi_modal_projector.", "model.image_newline")
    language_model: tuple[str, ...] = ("model.language_model.",)
    lora_targets: dict = field(default_factory=lambda: {
        "tower": clip_tower_recipe("model.vision_tower."),
        "connector": r"model\.multi_modal_projector\.linear_(1|2)",
        "language_model": decoder_lm_recipe("model.language_model."),
    })
    geometry_fields: tuple[str, ...] = ("size",)

    def forbidden_targets(self, config):
        return unused_feature_layers(config, "model.vision_tower.")

    # ---------------------------------------------------------------- formulas
    @staticmethod
    def _side_and_tile(config) -> tuple[int, int]:
        vc = config.vision_config
        s = vc.image_size
        side = patch_side(config)
        if config.vision_feature_select_strategy != "default":
            # with CLS kept, a tile's (S/p)^2 + 1 rows cannot be viewed as the (S/p) x (S/p) grid that
            # pack_image_features builds (HF: a view error after its own warning)
            raise ValueError(
                f"invalid geometry: vision_feature_select_strategy={config.vision_feature_select_strategy!r} "
                "does not work with a CLS tower in LLaVA-NeXT (only 'default')"
            )
        pins = config.image_grid_pinpoints
        if not pins or any(len(p) != 2 or p[0] < s or p[1] < s or p[0] % s or p[1] % s for p in pins):
            # the grid is counted with ceil (image_size_to_num_patches) but viewed with floor
            # (get_anyres_image_grid_shape): pinpoints must be positive multiples of the tile size
            raise ValueError(
                f"invalid geometry: image_grid_pinpoints={pins} must all be multiples of image_size={s}"
            )
        return side, s

    def _grid(self, config, geom: ImageGeometry) -> tuple[int, int]:
        h, w = geom.size
        _, s = self._side_and_tile(config)
        bh, bw = _best_resolution(h, w, config.image_grid_pinpoints)
        return bh // s, bw // s

    def _validate(self, config, geom: ImageGeometry) -> None:
        self._side_and_tile(config)
        if not isinstance(geom.size, tuple) or len(geom.size) != 2:
            raise ValueError(f"invalid geometry: size={geom.size!r} must be (H, W)")
        require_int("H", geom.size[0])
        require_int("W", geom.size[1])

    def tower_tiles(self, config, geom: ImageGeometry) -> int:
        gh, gw = self._grid(config, geom)
        return 1 + gh * gw

    def _counts(self, config, geom: ImageGeometry) -> TokenCounts:
        side, _ = self._side_and_tile(config)
        gh, gw = self._grid(config, geom)
        n = 1 + gh * gw
        rows, cols = _unpadded(gh * side, gw * side, *geom.size)
        return TokenCounts(encoder_rows=n * (side * side + 1), connector_rows=n * side * side,
                           lm_tokens=side * side + rows * (cols + 1))

    def default_geometry(self, config) -> ImageGeometry:
        s = config.vision_config.image_size
        return ImageGeometry(size=(s, 2 * s))

    def mixed_geometries(self, config) -> list[ImageGeometry]:
        # wide, tall and small images: other tile grids, other unpadded rows and newlines
        s = config.vision_config.image_size
        return [ImageGeometry(size=(s, 2 * s)), ImageGeometry(size=(2 * s, s)), ImageGeometry(size=(s // 2, s))]

    def draw_geometry(self, config, draw: DrawInt, valid: bool = True) -> ImageGeometry:
        s = config.vision_config.image_size
        if valid:
            return ImageGeometry(size=(draw("H", 1, 4 * s), draw("W", 1, 4 * s)))
        if draw("bad side", 0, 1):
            return ImageGeometry(size=(draw("H", -3, 0), draw("W", 1, 2 * s)))
        return ImageGeometry(size=(draw("H", 1, 2 * s), draw("W", -3, 0)))

    def invalid_config_variants(self) -> list[dict]:
        return [
            {"vision_feature_select_strategy": "full"},
            {"image_grid_pinpoints": [[48, 64]]},  # not multiples of the 32-pixel tile
        ]

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import LlavaNextConfig

        return LlavaNextConfig(
            text_config=dict(
                model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=256,
                pad_token_id=0, eos_token_id=1, bos_token_id=2,
            ),
            vision_config=dict(
                model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32,
            ),
            # the checkpoints' pinpoints scaled from 336 to the 32-pixel tile
            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
            image_token_index=250, image_seq_length=16,
        )

    def config_variants(self) -> list[dict]:
        return [
            {},
            {"vision_config.patch_size": 4},  # 8x8 patches per tile
            {"image_grid_pinpoints": [[32, 32], [64, 64], [32, 64], [64, 32]]},  # a 1x1 grid is possible
            {"vision_feature_layer": -1},
        ]

    def build_pixel_inputs(self, config, geoms, generator) -> dict:
        # tiles of all images concatenated (4-D); HF splits them back per image from image_sizes
        s = config.vision_config.image_size
        n = 0
        for g in geoms:
            self.validate_geometry(config, g)
            n += self.tower_tiles(config, g)
        return {
            "pixel_values": torch.randn(n, 3, s, s, generator=generator),
            "image_sizes": torch.tensor([list(g.size) for g in geoms], dtype=torch.long),
        }

    def measure_points(self, model) -> dict[str, str]:
        return {"encoder": "model.vision_tower.encoder.layers.0",
                "connector": "model.multi_modal_projector.linear_1"}


register(LlavaNext())
