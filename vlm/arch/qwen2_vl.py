"""Qwen2-VL: native-resolution ViT over packed patches, 2x2 patch merger inside the tower, Qwen2 LM.

An image arrives as `image_grid_thw` = (t, h, w) in patches (t = 1 for still images: the processor
repeats the frame to fill the temporal patch). All images of a batch are packed into one sequence of
t*h*w rows (no CLS, no padding; attention is block-diagonal per frame via cu_seqlens), so the tower's
layers see t*h*w rows per image. The merger LayerNorms and then views m x m neighbouring patches as one
row (the processor emits patches in merge-block order), so its first Linear sees t*h*w/m^2 rows, and
the prompt carries exactly that many image placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm.arch import register
from vlm.arch.base import ArchSpec, DrawInt, ImageGeometry, TokenCounts, decoder_lm_recipe, require_int


@dataclass(frozen=True)
class Qwen2VL(ArchSpec):
    model_type = "qwen2_vl"
    model_class_name = "Qwen2VLForConditionalGeneration"

    tower: tuple[str, ...] = ("model.visual.",)
    # the merger lies inside the tower prefix: longest prefix wins
    connector: tuple[str, ...] = ("model.visual.merger.",)
    language_model: tuple[str, ...] = ("model.language_model.",)
    lora_targets: dict = field(default_factory=lambda: {
        # fused qkv + proj in the tower: the common q_proj/k_proj/... lists wrap nothing here
        "tower": r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc(1|2))",
        # the merger MLP is an nn.Sequential: its Linears are named by index (1 is the GELU)
        "connector": r"model\.visual\.merger\.mlp\.(0|2)",
        "language_model": decoder_lm_recipe("model.language_model."),
    })
    geometry_fields: tuple[str, ...] = ("grid",)

    # ---------------------------------------------------------------- formulas
    @staticmethod
    def merge_size(config) -> int:
        return require_int("vision_config.spatial_merge_size", config.vision_config.spatial_merge_size)

    def _validate(self, config, geom: ImageGeometry) -> None:
        grid = geom.grid
        if not isinstance(grid, tuple | list) or len(grid) != 3:
            raise ValueError(f"invalid geometry: grid={grid!r} must be (t, h, w)")
        t, h, w = grid
        require_int("grid.t", t)
        require_int("grid.h", h)
        require_int("grid.w", w)
        m = self.merge_size(config)
        # HF does not check this: a non-multiple fails deep inside the vision position ids (reshape
        # error) or, with a lucky product, silently mis-merges patches of different rows
        for name, v in (("h", h), ("w", w)):
            if v % m:
                raise ValueError(
                    f"invalid geometry: grid.{name}={v} is not divisible by spatial_merge_size={m}"
                )

    def _counts(self, config, geom: ImageGeometry) -> TokenCounts:
        t, h, w = geom.grid
        m = self.merge_size(config)
        rows = t * h * w
        merged = rows // (m * m)
        return TokenCounts(encoder_rows=rows, connector_rows=merged, lm_tokens=merged)

    def default_geometry(self, config) -> ImageGeometry:
        m = self.merge_size(config)
        return ImageGeometry(grid=(1, 2 * m, 3 * m))

    def mixed_geometries(self, config) -> list[ImageGeometry]:
        # other grids per image (the towers pack them), a two-frame one too
        m = self.merge_size(config)
        return [ImageGeometry(grid=(1, 2 * m, 3 * m)), ImageGeometry(grid=(1, m, m)), ImageGeometry(grid=(2, m, 2 * m))]

    def draw_geometry(self, config, draw: DrawInt, valid: bool = True) -> ImageGeometry:
        m = self.merge_size(config)
        # t > 1 is the video path through the same tower (frames attend separately); the formula holds
        t = draw("t", 1, 2)
        hb = draw("h_blocks", 1, max(1, 6 // m))
        wb = draw("w_blocks", 1, max(1, 6 // m))
        if valid:
            return ImageGeometry(grid=(t, hb * m, wb * m))
        kinds = 3 if m > 1 else 2
        kind = draw("invalid_kind", 0, kinds - 1)
        if kind == 0:
            return ImageGeometry(grid=(draw("t_bad", -1, 0), hb * m, wb * m))
        if kind == 1:
            return ImageGeometry(grid=(t, hb * m, draw("w_bad", -2, 0)))
        # h not a multiple of the merge size
        return ImageGeometry(grid=(t, hb * m + draw("h_off", 1, m - 1), wb * m))

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import Qwen2VLConfig

        cfg = Qwen2VLConfig(
            vision_config=dict(
                depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
            ),
            text_config=dict(
                vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                # head_dim 8 -> 4 rotary frequencies split over (t, h, w)
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                bos_token_id=254, eos_token_id=255,
            ),
            image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
        )
        return cfg

    def config_variants(self) -> list[dict]:
        return [
            {},
            {"vision_config.spatial_merge_size": 1},
            {"vision_config.spatial_merge_size": 3, "vision_config.patch_size": 8,
             "vision_config.temporal_patch_size": 1},
        ]

    def build_pixel_inputs(self, config, geoms, generator) -> dict:
        vc = config.vision_config
        for g in geoms:
            self.validate_geometry(config, g)
        rows = sum(g.grid[0] * g.grid[1] * g.grid[2] for g in geoms)
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
        return {
            "pixel_values": torch.randn(rows, width, generator=generator),
            "image_grid_thw": torch.tensor([list(g.grid) for g in geoms], dtype=torch.long),
        }

    def prompt_image_ids(self, config, geom: ImageGeometry) -> list[int]:
        # as the processor writes it; the markers (text-type tokens) also keep two adjacent images
        # apart when get_rope_index groups consecutive image tokens into one grid
        return ([config.vision_start_token_id] + [self.image_token_id(config)] * self.lm_tokens(config, geom)
                + [config.vision_end_token_id])

    def forward_logits(self, model, **inputs) -> torch.Tensor:
        # Not an upstream bug but a contract gap: since transformers 5.x the forward refuses image
        # inputs without `mm_token_type_ids` (the processor returns it; M-RoPE positions come from it),
        # and build_pixel_inputs never sees the prompt. Derive it here: 1 at image placeholders.
        if inputs.get("mm_token_type_ids") is None and inputs.get("input_ids") is not None:
            inputs["mm_token_type_ids"] = mm_token_type_ids(self, model_config(model), inputs["input_ids"])
        return model(**inputs).logits

    def measure_points(self, model) -> dict[str, str]:
        return {"encoder": "model.visual.blocks.0", "connector": "model.visual.merger.mlp.0"}


def model_config(model):
    """The HF config of a model or of a PeftModel wrapping it."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "vision_config"):
        cfg = model.get_base_model().config
    return cfg


def mm_token_type_ids(arch: ArchSpec, config, input_ids: torch.Tensor) -> torch.Tensor:
    """Token types as the Qwen processors emit them: 0 text, 1 image, 2 video."""
    out = (input_ids == arch.image_token_id(config)).to(torch.int32)
    video = getattr(config, "video_token_id", None)
    if video is not None:
        out = out + 2 * (input_ids == video).to(torch.int32)
    return out


register(Qwen2VL())
