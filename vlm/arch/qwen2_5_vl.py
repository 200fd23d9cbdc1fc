"""Qwen2.5-VL: Qwen2-VL's packed-patch tower with windowed attention, a gated MLP, RMSNorm merger.

Counts are Qwen2-VL's: t*h*w rows through every tower layer, t*h*w/m^2 into the merger's first Linear
and as placeholders. What differs is the row *order* inside the tower: before the first block the
patches are permuted (in units of m x m merge blocks) so that each attention window of
window_size/(m*p) merged tokens per side is contiguous, and the merger output is un-permuted
afterwards. `last_hidden_state` therefore stays window-ordered (only `pooler_output` is in image
order). The permutation never crosses images (window indices are offset per image), so the rows of
one image remain one contiguous block and a per-image token -> adapter-slot mapping is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm.arch import register
from vlm.arch.base import ImageGeometry, decoder_lm_recipe
from vlm.arch.qwen2_vl import Qwen2VL


@dataclass(frozen=True)
class Qwen2_5VL(Qwen2VL):
    model_type = "qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"

    lora_targets: dict = field(default_factory=lambda: {
        # fused qkv + proj, and a gated MLP (unlike Qwen2-VL's fc1/fc2) in the tower
        "tower": r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate|up|down)_proj)",
        "connector": r"model\.visual\.merger\.mlp\.(0|2)",
        "language_model": decoder_lm_recipe("model.language_model."),
    })

    # ---------------------------------------------------------------- formulas
    def _validate(self, config, geom: ImageGeometry) -> None:
        super()._validate(config, geom)
        vc = config.vision_config
        m = self.merge_size(config)
        if vc.window_size // m // vc.patch_size < 1:
            # get_vision_window_index takes the grid modulo window_size // m // p: zero divides by zero
            raise ValueError(
                f"invalid geometry: vision_config.window_size={vc.window_size} is smaller than "
                f"spatial_merge_size*patch_size={m}*{vc.patch_size}: no attention window fits"
            )

    def invalid_config_variants(self) -> list[dict]:
        return [{"vision_config.window_size": 20}]  # 20 // 2 // 14 = 0 merged tokens per window

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                # windows of 2x2 merged tokens (4x4 patches): the drawn grids span several windows;
                # block 1 attends over the full image, block 0 within windows
                window_size=56, fullatt_block_indexes=[1],
            ),
            text_config=dict(
                vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                bos_token_id=254, eos_token_id=255,
            ),
            image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
        )

    def config_variants(self) -> list[dict]:
        return [
            {},
            {"vision_config.spatial_merge_size": 1},
            {"vision_config.spatial_merge_size": 3, "vision_config.patch_size": 8,
             "vision_config.temporal_patch_size": 1, "vision_config.window_size": 48},
        ]


register(Qwen2_5VL())
