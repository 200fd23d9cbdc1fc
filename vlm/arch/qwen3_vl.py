"""Qwen3-VL: Qwen2-VL's packed-patch tower with learned (interpolated) position embeddings and DeepStack.

Counts are Qwen2-VL's: t*h*w rows through every tower layer, t*h*w/m^2 into the merger and as
placeholders. DeepStack adds one more patch merger per `deepstack_visual_indexes` entry
(`model.visual.deepstack_merger_list.<i>`): each takes the hidden states after that tower layer, sees
the same t*h*w/m^2 merged rows per image as the final merger, and its output is added to the image
positions of LM layer i. Those mergers are connector modules too (both prefixes lie inside the tower
prefix; longest prefix wins). Every Linear in the tower and connectors is named qkv / proj /
linear_fc1 / linear_fc2, so the usual q_proj / fc1 target lists wrap nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm.arch import register
from vlm.arch.base import decoder_lm_recipe
from vlm.arch.qwen2_vl import Qwen2VL


@dataclass(frozen=True)
class Qwen3VL(Qwen2VL):
    model_type = "qwen3_vl"
    model_class_name = "Qwen3VLForConditionalGeneration"

    connector: tuple[str, ...] = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
    lora_targets: dict = field(default_factory=lambda: {
        "tower": r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc(1|2))",
        "connector": r"model\.visual\.(merger|deepstack_merger_list\.\d+)\.linear_fc(1|2)",
        "language_model": decoder_lm_recipe("model.language_model."),
    })

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                # an 8x8 learned position table, bilinearly resampled to each image's grid
                num_position_embeddings=64,
                # one DeepStack merger after tower layer 0, added into LM layer 0
                deepstack_visual_indexes=[0],
            ),
            text_config=dict(
                vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True},
                bos_token_id=254, eos_token_id=255,
            ),
            image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
        )

    def config_variants(self) -> list[dict]:
        return [
            {},
            {"vision_config.spatial_merge_size": 1},
            {"vision_config.spatial_merge_size": 3, "vision_config.patch_size": 8,
             "vision_config.temporal_patch_size": 1},
        ]

    def measure_points(self, model) -> dict[str, str]:
        return {"encoder": "model.visual.blocks.0", "connector": "model.visual.merger.linear_fc1"}


register(Qwen3VL())
