"""LLaVA 1.5: CLIP tower at one fixed resolution, two-Linear GELU projector, Llama-style LM.

The processor resizes and centre-crops every image to S x S; the tower runs (S/p)^2 patch rows plus one
CLS row (first) through every layer, also the layers after `vision_feature_layer` (with the default -2
the last CLIP layer runs but its output is unused, so a LoRA there gets no gradient). The "default"
feature strategy drops CLS before the projector; "full" keeps it. Geometry: `size`, the pixel (H, W) fed
to the tower, which CLIP requires to be exactly (S, S).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm.arch import register
from vlm.arch.base import (
    ArchSpec,
    FixedSizeTower,
    ImageGeometry,
    TokenCounts,
    clip_tower_recipe,
    decoder_lm_recipe,
    patch_side,
    unused_feature_layers,
)


@dataclass(frozen=True)
class Llava(FixedSizeTower, ArchSpec):
    model_type = "llava"
    model_class_name = "LlavaForConditionalGeneration"

    tower: tuple[str, ...] = ("model.vision_tower.",)
    connector: tuple[str, ...] = ("model.multi_modal_projector.",)
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
    def _keeps_cls(config) -> bool:
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(
                f"invalid geometry: vision_feature_select_strategy={strategy!r} is not 'default' or 'full'"
            )
        return strategy == "full"

    def _validate(self, config, geom: ImageGeometry) -> None:
        # CLIPVisionEmbeddings raises on any other size (no interpolate_pos_encoding in LLaVA's forward)
        self.check_size(config, geom)
        self._keeps_cls(config)

    def _counts(self, config, geom: ImageGeometry) -> TokenCounts:
        side = patch_side(config)
        feats = side * side + (1 if self._keeps_cls(config) else 0)
        return TokenCounts(encoder_rows=side * side + 1, connector_rows=feats, lm_tokens=feats)

    def invalid_config_variants(self) -> list[dict]:
        # (an unknown vision_feature_select_strategy is refused by the strict config itself)
        return [{"vision_config.image_size": 2}]  # smaller than one 4-pixel patch: no patch row at all

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import LlavaConfig

        return LlavaConfig(
            text_config=dict(
                model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=256,
                pad_token_id=0, eos_token_id=1, bos_token_id=2,
            ),
            vision_config=dict(
                model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=32, patch_size=4, projection_dim=32,
            ),
            # image_seq_length is read by the processor only: (32/4)^2 with the default strategy
            image_token_index=250, image_seq_length=64,
        )

    def config_variants(self) -> list[dict]:
        return [
            {},
            {"vision_feature_select_strategy": "full"},  # CLS reaches the projector and the prompt
            {"vision_config.image_size": 48, "vision_config.patch_size": 8},  # 6x6 patches
            {"vision_feature_layer": -1},  # last layer's output used
        ]

    def build_pixel_inputs(self, config, geoms, generator) -> dict:
        for g in geoms:
            self.validate_geometry(config, g)
        s = config.vision_config.image_size
        return {"pixel_values": torch.randn(len(geoms), 3, s, s, generator=generator)}

    def measure_points(self, model) -> dict[str, str]:
        return {"encoder": "model.vision_tower.encoder.layers.0",
                "connector": "model.multi_modal_projector.linear_1"}


register(Llava())
