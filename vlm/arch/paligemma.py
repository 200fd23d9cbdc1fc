"""PaliGemma (1 and 2): SigLIP tower at one fixed resolution, one Linear projector, Gemma LM.

The processor resizes every image to S x S; the tower runs (S/p)^2 patch rows (no CLS, no pooling head
in PaliGemma checkpoints), all of which reach the projector's Linear and the prompt: (S/p)^2 placeholders
per image, written before <bos> and the text. Geometry: `size`, the pixel (H, W) fed to the tower,
which must be exactly (S, S).
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
)


@dataclass(frozen=True)
class PaliGemma(FixedSizeTower, ArchSpec):
    model_type = "paligemma"
    model_class_name = "PaliGemmaForConditionalGeneration"

    tower: tuple[str, ...] = ("model.vision_tower.",)
    connector: tuple[str, ...] = ("model.multi_modal_projector.",)
    language_model: tuple[str, ...] = ("model.language_model.",)
    lora_targets: dict = field(default_factory=lambda: {
        "tower": clip_tower_recipe("model.vision_tower."),
        "connector": r"model\.multi_modal_projector\.linear",
        "language_model": decoder_lm_recipe("model.language_model."),
    })
    geometry_fields: tuple[str, ...] = ("size",)

    # ---------------------------------------------------------------- formulas
    def _validate(self, config, geom: ImageGeometry) -> None:
        self.check_size(config, geom)

    def _counts(self, config, geom: ImageGeometry) -> TokenCounts:
        n = patch_side(config) ** 2
        return TokenCounts(encoder_rows=n, connector_rows=n, lm_tokens=n)

    def invalid_config_variants(self) -> list[dict]:
        return [{"vision_config.image_size": 2}]  # smaller than one 4-pixel patch

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import PaliGemmaConfig

        return PaliGemmaConfig(
            text_config=dict(
                model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=8, vocab_size=256,
                pad_token_id=0, eos_token_id=1, bos_token_id=2,
            ),
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=4, vision_use_head=False,
            ),
            # projection_dim is copied into vision_config and must equal the LM hidden size;
            # top-level vocab_size / hidden_size are legacy mirrors of the text config
            projection_dim=32, hidden_size=32, vocab_size=256, image_token_index=250,
        )

    def config_variants(self) -> list[dict]:
        return [
            {},  # 8x8 patches
            {"vision_config.image_size": 48, "vision_config.patch_size": 8},  # 6x6
            {"vision_config.image_size": 40},  # 10x10
        ]

    def build_pixel_inputs(self, config, geoms, generator) -> dict:
        for g in geoms:
            self.validate_geometry(config, g)
        s = config.vision_config.image_size
        return {"pixel_values": torch.randn(len(geoms), 3, s, s, generator=generator)}

    def measure_points(self, model) -> dict[str, str]:
        return {"encoder": "model.vision_tower.encoder.layers.0",
                "connector": "model.multi_modal_projector.linear"}

    def forward_logits(self, model, **inputs):
        # PaliGemma's prefix-LM mask comes from token_type_ids (0 = prefix). Its processor returns zeros for
        # a whole prompt; without them HF builds a mask that depends on the batch's padding, so a request
        # batched with longer ones gets other logits than alone (measured: up to 0.34 on the tiny model).
        if "token_type_ids" not in inputs and "input_ids" in inputs:
            inputs = {**inputs, "token_type_ids": inputs["input_ids"].new_zeros(inputs["input_ids"].shape)}
        return model(**inputs).logits


register(PaliGemma())
