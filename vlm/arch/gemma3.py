"""Gemma 3: SigLIP tower at one fixed resolution, average-pooling projector with a matmul, Gemma 3 LM.

Per S x S image the tower runs (S/p)^2 patch rows (SigLIP has no CLS). The projector average-pools the
patch grid down to `mm_tokens_per_image` tokens (kernel (S/p) / sqrt(mm)), RMS-normalises them and
multiplies by `mm_input_projection_weight`. With pan-and-scan the processor turns one image into the
original plus 2..max crops, each another S x S tower image with its own <boi> ... <eoi> block: the
geometry's `tiles` counts those tower images (1 without pan-and-scan).
"""

from __future__ import annotations

import math
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
    require_int,
)


@dataclass(frozen=True)
class Gemma3(ArchSpec):
    model_type = "gemma3"
    model_class_name = "Gemma3ForConditionalGeneration"

    tower: tuple[str, ...] = ("model.vision_tower.",)
    connector: tuple[str, ...] = ("model.multi_modal_projector.",)
    language_model: tuple[str, ...] = ("model.language_model.",)
    lora_targets: dict = field(default_factory=lambda: {
        "tower": clip_tower_recipe("model.vision_tower."),
        "connector": None,
        "language_model": decoder_lm_recipe("model.language_model."),
    })
    no_lora_reason: dict = field(default_factory=lambda: {
        "connector": "Gemma3MultiModalProjector has no nn.Linear: it is AvgPool2d + RMSNorm + a matmul with "
                     "the nn.Parameter mm_input_projection_weight, which PEFT cannot wrap",
    })
    geometry_fields: tuple[str, ...] = ("tiles",)

    # SigLIP-so400m as Gemma 3 uses it: hidden 1152, MLP 4304, 27 layers, 896 px of 14 px patches (4096
    # patches avg-pooled to 256 tokens); the LM stays the tiny 2-layer one at hidden 2560.
    bench_models = {"so400m": {
        "vision_config.hidden_size": 1152, "vision_config.intermediate_size": 4304,
        "vision_config.num_hidden_layers": 27, "vision_config.num_attention_heads": 16,
        "vision_config.image_size": 896, "vision_config.patch_size": 14, "mm_tokens_per_image": 256,
        "text_config.hidden_size": 2560,
    }}

    # ---------------------------------------------------------------- formulas
    @staticmethod
    def _grid(config) -> tuple[int, int]:
        """(patches per side, pooled tokens per side); raises when the projector cannot pool to mm tokens."""
        vc = config.vision_config
        mm = require_int("mm_tokens_per_image", config.mm_tokens_per_image)
        tps = math.isqrt(mm)
        if tps * tps != mm:
            raise ValueError(
                f"invalid geometry: mm_tokens_per_image={mm} is not a square (the projector pools a square grid)"
            )
        # SigLIP's patch conv (stride p) drops a remainder of S/p, and so does the projector's reshape
        side = vc.image_size // vc.patch_size
        if side < tps or side % tps:
            # HF pools with kernel side // tps: a remainder is silently dropped (last patch rows/columns
            # never reach the LM) or the pooled count differs from mm_tokens_per_image. Refused here.
            raise ValueError(
                f"invalid geometry: patch grid {side}x{side} (image_size={vc.image_size} / patch_size="
                f"{vc.patch_size}) is not divisible by {tps} tokens per side (mm_tokens_per_image={mm})"
            )
        return side, tps

    def _validate(self, config, geom: ImageGeometry) -> None:
        require_int("tiles", geom.tiles)
        self._grid(config)

    def _counts(self, config, geom: ImageGeometry) -> TokenCounts:
        side, tps = self._grid(config)
        n = geom.tiles
        # the "connector" rows are the pooled rows the norm and the projection matmul see
        return TokenCounts(encoder_rows=n * side * side, connector_rows=n * tps * tps, lm_tokens=n * tps * tps)

    def default_geometry(self, config) -> ImageGeometry:
        return ImageGeometry(tiles=1)

    def draw_geometry(self, config, draw: DrawInt, valid: bool = True) -> ImageGeometry:
        if valid:
            # 1 = no pan-and-scan; 3..5 = original + 2..4 crops (processor default max 4 crops)
            n = draw("tiles", 1, 4)
            return ImageGeometry(tiles=1 if n == 1 else n + 1)
        return ImageGeometry(tiles=draw("tiles", -2, 0))

    def invalid_config_variants(self) -> list[dict]:
        return [
            {"mm_tokens_per_image": 15},  # not a square
            {"vision_config.image_size": 36},  # 9x9 patches cannot pool to 4x4
        ]

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import Gemma3Config

        return Gemma3Config(
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, vocab_size=256,
                sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                pad_token_id=0, eos_token_id=1, bos_token_id=2,
            ),
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=4,
                # real Gemma 3 checkpoints drop SigLIP's attention-pooling head (its output is unused)
                vision_use_head=False,
            ),
            mm_tokens_per_image=16,
            # the `_index` spellings are the stored fields; `_id` are aliases
            image_token_index=250, boi_token_index=251, eoi_token_index=252,
        )

    def config_variants(self) -> list[dict]:
        return [
            {},  # 8x8 patches -> 4x4 tokens (kernel 2)
            {"mm_tokens_per_image": 4},  # kernel 4
            {"vision_config.image_size": 48, "vision_config.patch_size": 8, "mm_tokens_per_image": 9},  # 6x6 -> 3x3
            {"vision_config.patch_size": 8},  # 4x4 -> 4x4: kernel 1, no pooling
        ]

    def prompt_image_ids(self, config, geom: ImageGeometry) -> list[int]:
        # as the processor writes it: one <boi> mm_tokens <eoi> block per tower image (original + crops)
        per_tile = self.lm_tokens(config, geom) // geom.tiles
        block = [config.boi_token_index] + [self.image_token_id(config)] * per_tile + [config.eoi_token_index]
        return block * geom.tiles

    def build_pixel_inputs(self, config, geoms, generator) -> dict:
        s = config.vision_config.image_size
        n = 0
        for g in geoms:
            self.validate_geometry(config, g)
            n += g.tiles
        return {"pixel_values": torch.randn(n, 3, s, s, generator=generator)}

    def measure_points(self, model) -> dict[str, str]:
        # no Linear in the projector: its RMSNorm sees exactly the pooled rows the matmul projects
        return {"encoder": "model.vision_tower.encoder.layers.0",
                "connector": "model.multi_modal_projector.mm_soft_emb_norm"}


register(Gemma3())
