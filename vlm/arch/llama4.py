"""Llama 4 (Scout / Maverick): tiled CLIP-like tower, pixel-shuffle adapter inside the tower, projector.

Per tile the tower runs (S/p)^2 patch rows + 1 CLS row (appended last); the adapter drops CLS, pixel-
shuffles the grid by ratio r (rows x r^2) and feeds (S/p)^2 r^2 rows to its MLP and the projector.
The processor adds a global tile when the image is split into more than one tile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm.arch import register
from vlm.arch.base import (
    ArchSpec,
    DrawInt,
    ForbiddenTarget,
    ImageGeometry,
    KernelSite,
    TokenCounts,
    require_int,
)


@dataclass(frozen=True)
class Llama4(ArchSpec):
    model_type = "llama4"
    model_class_name = "Llama4ForConditionalGeneration"

    tower: tuple[str, ...] = ("vision_model.",)
    # the adapter lies inside the tower prefix: longest prefix wins
    connector: tuple[str, ...] = ("vision_model.vision_adapter.", "multi_modal_projector.")
    language_model: tuple[str, ...] = ("language_model.",)
    lora_targets: dict = field(default_factory=lambda: {
        "tower": r"vision_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.fc(1|2))",
        "connector": r"(vision_model\.vision_adapter\.mlp\.fc(1|2)|multi_modal_projector\.linear_1)",
        "language_model": r"language_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj"
                          r"|feed_forward\.shared_expert\.(gate|up|down)_proj)",
    })
    geometry_fields: tuple[str, ...] = ("tiles",)

    # Llama 4 Scout's tower (hidden 1408, MLP 5632, 34 layers, 336 px tiles of 14 px patches, pixel-shuffle
    # adapter 5632 -> 4096 -> 4096, projector -> 5120); the LM stays the tiny 2-layer one at hidden 5120.
    bench_models = {"scout": {
        "vision_config.hidden_size": 1408, "vision_config.intermediate_size": 5632,
        "vision_config.num_hidden_layers": 34, "vision_config.num_attention_heads": 16,
        "vision_config.image_size": 336, "vision_config.patch_size": 14, "vision_config.vision_output_dim": 4096,
        "vision_config.projector_input_dim": 4096, "vision_config.projector_output_dim": 4096,
        "text_config.hidden_size": 5120,
    }}

    def forbidden_targets(self, config) -> tuple[ForbiddenTarget, ...]:
        return (ForbiddenTarget(
            r"language_model\.model\.layers\.\d+\.feed_forward\.router",
            "the MoE router (a Linear) picks experts; a LoRA on it changes routing, which the runtime's "
            "multi-LoRA path (attention and shared-expert projections) does not serve"),)

    def kernel_sites(self) -> tuple[KernelSite, ...]:
        def bind(pixel_shuffle):
            def forward(self, encoded_patches):  # Llama4VisionPixelShuffleMLP.forward with our permutation
                return self.mlp(pixel_shuffle(encoded_patches, self.pixel_shuffle_ratio, variant="tokens"))
            return forward
        return (KernelSite("pixel_shuffle", "Llama4VisionPixelShuffleMLP", "forward", bind),)

    def vision_features(self, model, pixel_inputs):
        # get_image_features stops before the projector: run tower then projector, as the forward does
        out = model.vision_model(pixel_inputs["pixel_values"])
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return model.multi_modal_projector(h.reshape(-1, h.shape[-1]))

    # ---------------------------------------------------------------- formulas
    @staticmethod
    def _grid(config) -> tuple[int, int]:
        vc = config.vision_config
        if vc.image_size % vc.patch_size:
            raise ValueError(
                f"invalid geometry: image_size={vc.image_size} is not a multiple of patch_size={vc.patch_size}"
            )
        inv = 1.0 / vc.pixel_shuffle_ratio
        if abs(inv - round(inv)) > 1e-9:
            raise ValueError(f"invalid geometry: pixel_shuffle_ratio={vc.pixel_shuffle_ratio} is not 1/integer")
        return vc.image_size // vc.patch_size, round(inv)

    def _validate(self, config, geom: ImageGeometry) -> None:
        require_int("tiles", geom.tiles)
        side, inv = self._grid(config)
        if side % inv:
            raise ValueError(
                f"invalid geometry: patch grid {side}x{side} (image_size {config.vision_config.image_size} / "
                f"patch_size {config.vision_config.patch_size}) is not divisible by the pixel-shuffle "
                f"factor {inv}"
            )

    @staticmethod
    def tower_tiles(geom: ImageGeometry) -> int:
        return geom.tiles + (1 if geom.tiles > 1 else 0)

    def _counts(self, config, geom: ImageGeometry) -> TokenCounts:
        side, inv = self._grid(config)
        n = self.tower_tiles(geom)
        per_tile = side * side // (inv * inv)
        return TokenCounts(encoder_rows=n * (side * side + 1), connector_rows=n * per_tile,
                           lm_tokens=n * per_tile)

    def default_geometry(self, config) -> ImageGeometry:
        return ImageGeometry(tiles=1)

    def mixed_geometries(self, config) -> list[ImageGeometry]:
        # one tile, and tiled images (2 and 4 tiles, each plus the processor's global tile)
        return [ImageGeometry(tiles=1), ImageGeometry(tiles=2), ImageGeometry(tiles=4)]

    def draw_geometry(self, config, draw: DrawInt, valid: bool = True) -> ImageGeometry:
        if valid:
            return ImageGeometry(tiles=draw("tiles", 1, 4))
        return ImageGeometry(tiles=draw("tiles", -2, 0))

    def invalid_config_variants(self) -> list[dict]:
        # 42 / 14 = 3 patches per side: odd, cannot be pixel-shuffled by 2 (HF: deep view error)
        return [{"vision_config.image_size": 42}]

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import Llama4Config

        return Llama4Config(
            vision_config=dict(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                # the adapter MLP's input is hidden / ratio^2 (5632 = 1408 * 4 in Scout)
                intermediate_size=128, vision_output_dim=32, image_size=56, patch_size=14,
                pixel_shuffle_ratio=0.5, projector_input_dim=32, projector_output_dim=32,
            ),
            text_config=dict(
                hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=256,
                num_local_experts=2, interleave_moe_layer_step=1, attention_chunk_size=128,
            ),
            image_token_index=250, boi_token_index=251, eoi_token_index=252,
        )

    def config_variants(self) -> list[dict]:
        return [
            {},
            {"vision_config.image_size": 84},  # 6x6 grid
            {"vision_config.image_size": 32, "vision_config.patch_size": 8},  # 4x4 grid, other patch
        ]

    def build_pixel_inputs(self, config, geoms, generator) -> dict:
        s = config.vision_config.image_size
        n = sum(self.tower_tiles(g) for g in geoms)
        return {"pixel_values": torch.randn(n, 3, s, s, generator=generator)}

    def measure_points(self, model) -> dict[str, str]:
        return {"encoder": "vision_model.model.layers.0",
                "connector": "vision_model.vision_adapter.mlp.fc1"}

    def forward_logits(self, model, **inputs) -> torch.Tensor:
        # transformers 5.24 Llama4ForConditionalGeneration.forward builds its output from
        # `outputs.image_outputs`, which the language model's output lacks (AttributeError after the
        # whole forward ran). The logits are complete by then: take them from the LM's own output.
        captured = {}

        def grab(_mod, _args, out):
            captured["logits"] = out[0] if isinstance(out, tuple) else out.logits

        handle = model.language_model.register_forward_hook(grab)
        try:
            return model(**inputs).logits
        except AttributeError as e:
            if "image_outputs" not in str(e) or "logits" not in captured:
                raise
            return captured["logits"]
        finally:
            handle.remove()


register(Llama4())
