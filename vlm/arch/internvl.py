"""InternVL (2.5 / 3, HF-native layout): tiled InternViT tower with CLS, pixel shuffle, MLP projector.

The processor cuts an image into S x S tiles and, when there is more than one, appends a thumbnail
tile; `tiles` counts every tile fed to the tower (thumbnail included), as the processor's
`num_patches` does. Per tile the tower runs (S/p)^2 patch rows + 1 CLS row (CLS first). With the
default feature strategy the CLS row is dropped, the (S/p) x (S/p) grid is pixel-shuffled by
r = downsample_ratio into (S/p)^2 r^2 rows of width hidden / r^2, and those rows go through the
projector (LayerNorm, linear_1, GELU, linear_2) and fill as many placeholders per tile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm.arch import register
from vlm.arch.base import (
    ArchSpec,
    DrawInt,
    ImageGeometry,
    KernelSite,
    TokenCounts,
    decoder_lm_recipe,
    require_int,
)


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, list | tuple):
        if len(v) != 2:
            raise ValueError(f"invalid geometry: {name}={v!r} must be one integer or a pair")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _show(v):
    # configs store sizes as tuples; overrides (and users) write them as JSON lists
    return list(v) if isinstance(v, list | tuple) else v


@dataclass(frozen=True)
class InternVL(ArchSpec):
    model_type = "internvl"
    model_class_name = "InternVLForConditionalGeneration"

    tower: tuple[str, ...] = ("model.vision_tower.",)
    connector: tuple[str, ...] = ("model.multi_modal_projector.",)
    language_model: tuple[str, ...] = ("model.language_model.",)
    lora_targets: dict = field(default_factory=lambda: {
        # InternViT names its attention output `projection_layer`, not o_proj / out_proj
        "tower": r"model\.vision_tower\.encoder\.layer\.\d+\.(attention\.(q_proj|k_proj|v_proj|projection_layer)"
                 r"|mlp\.fc(1|2))",
        "connector": r"model\.multi_modal_projector\.linear_(1|2)",
        "language_model": decoder_lm_recipe("model.language_model."),
    })
    geometry_fields: tuple[str, ...] = ("tiles",)

    def kernel_sites(self) -> tuple[KernelSite, ...]:
        def bind(pixel_shuffle):
            def shuffle(self, vision_features, scale_factor: float = 0.5):  # InternVLModel.pixel_shuffle
                return pixel_shuffle(vision_features, scale_factor, variant="grid")
            return shuffle
        return (KernelSite("pixel_shuffle", "InternVLModel", "pixel_shuffle", bind),)

    # ---------------------------------------------------------------- formulas
    @staticmethod
    def _grid(config) -> tuple[int, int]:
        """(patches per tile side, pixel-shuffle factor 1/r) or ValueError naming the value."""
        vc = config.vision_config
        sh, sw = _pair(vc.image_size, "vision_config.image_size")
        ph, pw = _pair(vc.patch_size, "vision_config.patch_size")
        if sh != sw or ph != pw:
            # get_image_features rebuilds the grid as int(sqrt(rows)): only square grids survive
            raise ValueError(
                f"invalid geometry: image_size={_show(vc.image_size)} / patch_size={_show(vc.patch_size)} is not a "
                f"square patch grid"
            )
        if sh % ph:
            raise ValueError(
                f"invalid geometry: image_size={sh} is not a multiple of patch_size={ph}"
            )
        ratio = config.downsample_ratio
        inv = 1.0 / ratio if ratio else 0.0
        if ratio <= 0 or abs(inv - round(inv)) > 1e-9:
            # the projector is sized with int(1 / ratio): anything else mismatches its LayerNorm
            raise ValueError(f"invalid geometry: downsample_ratio={ratio} is not 1/integer")
        strategy = config.vision_feature_select_strategy
        if strategy != "default":
            # "full" keeps CLS: (S/p)^2 + 1 rows are never a square grid, the reshape before the
            # pixel shuffle fails (or mis-shapes the channels) inside HF
            raise ValueError(
                f"invalid geometry: vision_feature_select_strategy={strategy!r}; only 'default' (CLS dropped) "
                f"yields a square grid to pixel-shuffle"
            )
        return sh // ph, round(inv)

    def _validate(self, config, geom: ImageGeometry) -> None:
        require_int("tiles", geom.tiles)
        side, inv = self._grid(config)
        if side % inv:
            # HF's own divisibility check compares against the float ratio (side % 0.5 == 0 always),
            # so an odd grid fails later in a view
            raise ValueError(
                f"invalid geometry: patch grid {side}x{side} (image_size {_show(config.vision_config.image_size)} / "
                f"patch_size {_show(config.vision_config.patch_size)}) is not divisible by the pixel-shuffle factor "
                f"{inv} (downsample_ratio {config.downsample_ratio})"
            )

    def _counts(self, config, geom: ImageGeometry) -> TokenCounts:
        side, inv = self._grid(config)
        per_tile = side * side // (inv * inv)
        return TokenCounts(encoder_rows=geom.tiles * (side * side + 1), connector_rows=geom.tiles * per_tile,
                           lm_tokens=geom.tiles * per_tile)

    def default_geometry(self, config) -> ImageGeometry:
        return ImageGeometry(tiles=1)

    def mixed_geometries(self, config) -> list[ImageGeometry]:
        # one tile, and crops + thumbnail
        return [ImageGeometry(tiles=1), ImageGeometry(tiles=3), ImageGeometry(tiles=5)]

    def draw_geometry(self, config, draw: DrawInt, valid: bool = True) -> ImageGeometry:
        if valid:
            # 1 tile, or 2..6 crops + thumbnail (max_patches defaults to 12 in the processor)
            return ImageGeometry(tiles=draw("tiles", 1, 5))
        return ImageGeometry(tiles=draw("tiles", -2, 0))

    def invalid_config_variants(self) -> list[dict]:
        return [
            {"vision_config.image_size": [42, 42]},  # 3x3 patch grid: odd, cannot be shuffled by 2
            {"vision_config.image_size": [56, 28]},  # non-square tile
            {"vision_feature_select_strategy": "full"},  # CLS kept: no square grid
        ]

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import InternVLConfig

        return InternVLConfig(
            vision_config=dict(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=56, patch_size=14,
            ),
            text_config=dict(
                model_type="qwen2", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=254, eos_token_id=255,
            ),
            # image_seq_length is only read by the processor; kept consistent with the default size
            image_token_id=250, image_seq_length=4, downsample_ratio=0.5,
        )

    def config_variants(self) -> list[dict]:
        return [
            {},
            {"vision_config.image_size": [84, 84]},  # 6x6 grid -> 9 rows per tile
            {"vision_config.image_size": [32, 32], "vision_config.patch_size": [8, 8],
             "downsample_ratio": 0.25},  # 4x4 grid shuffled by 4 -> 1 row per tile
        ]

    def build_pixel_inputs(self, config, geoms, generator) -> dict:
        sh, sw = _pair(config.vision_config.image_size, "vision_config.image_size")
        n = sum(g.tiles for g in geoms)
        return {"pixel_values": torch.randn(n, 3, sh, sw, generator=generator)}

    def measure_points(self, model) -> dict[str, str]:
        return {"encoder": "model.vision_tower.encoder.layer.0", "connector": "model.multi_modal_projector.linear_1"}


register(InternVL())
