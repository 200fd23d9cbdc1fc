"""Idefics3: SigLIP-style tower over S x S sub-images, pixel-shuffle connector with one Linear, Llama LM.

The processor resizes an image to multiples of S and, when it exceeds S, cuts it into rows x cols
sub-images of S x S plus a global image resized to S x S; a small image is the global image alone
(split = (0, 0)). Either way rows*cols + 1 sub-images reach the tower, each as (S/p)^2 patch rows
(no CLS). The connector pixel-shuffles every sub-image by the scale factor sf into (S/p)^2 / sf^2 rows
of width hidden * sf^2 and projects them with a single Linear; the prompt holds that many <image>
placeholders per sub-image (the <row_i_col_j> / <global-img> / <fake_token_around_image> markers
are ordinary text tokens the forward does not need).

`pixel_values` is 5-D (requests, sub-images, C, S, S); HF drops every sub-image whose pixels are all
exactly zero (that is how it recognises batch padding), so a real all-black sub-image silently
disappears. Random inputs here are never all zero, and batching pads with all-zero sub-images.
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
    require_int,
)


@dataclass(frozen=True)
class Idefics3(ArchSpec):
    model_type = "idefics3"
    model_class_name = "Idefics3ForConditionalGeneration"

    tower: tuple[str, ...] = ("model.vision_model.",)
    connector: tuple[str, ...] = ("model.connector.",)
    language_model: tuple[str, ...] = ("model.text_model.",)
    lora_targets: dict = field(default_factory=lambda: {
        "tower": clip_tower_recipe("model.vision_model."),
        "connector": r"model\.connector\.modality_projection\.proj",
        "language_model": decoder_lm_recipe("model.text_model."),
    })
    geometry_fields: tuple[str, ...] = ("split",)

    # ---------------------------------------------------------------- formulas
    @staticmethod
    def _grid(config) -> tuple[int, int]:
        """(patches per sub-image side, scale factor) or ValueError naming the bad value."""
        vc = config.vision_config
        s, p = vc.image_size, vc.patch_size
        if not isinstance(s, int) or not isinstance(p, int):
            raise ValueError(
                f"invalid geometry: image_size={s!r} / patch_size={p!r} must be integers (square sub-images)"
            )
        if s % p:
            raise ValueError(f"invalid geometry: image_size={s} is not a multiple of patch_size={p}")
        sf = require_int("scale_factor", config.scale_factor)
        return s // p, sf

    def _validate(self, config, geom: ImageGeometry) -> None:
        split = geom.split
        if not isinstance(split, tuple | list) or len(split) != 2:
            raise ValueError(f"invalid geometry: split={split!r} must be (rows, cols)")
        rows, cols = split
        require_int("split.rows", rows, lo=0)
        require_int("split.cols", cols, lo=0)
        if (rows == 0) != (cols == 0):
            # the processor splits both ways or not at all
            raise ValueError(f"invalid geometry: split={tuple(split)}: rows and cols must both be 0 or both >= 1")
        side, sf = self._grid(config)
        if side % sf:
            # HF's pixel shuffle views the grid as side x side/sf: a non-multiple fails in that view
            raise ValueError(
                f"invalid geometry: patch grid {side}x{side} (image_size {config.vision_config.image_size} / "
                f"patch_size {config.vision_config.patch_size}) is not divisible by scale_factor={sf}"
            )

    @staticmethod
    def sub_images(geom: ImageGeometry) -> int:
        rows, cols = geom.split
        return rows * cols + 1  # tiles + the global image; (0, 0) is the global image alone

    def _counts(self, config, geom: ImageGeometry) -> TokenCounts:
        side, sf = self._grid(config)
        n = self.sub_images(geom)
        per_sub = side * side // (sf * sf)
        return TokenCounts(encoder_rows=n * side * side, connector_rows=n * per_sub, lm_tokens=n * per_sub)

    def default_geometry(self, config) -> ImageGeometry:
        return ImageGeometry(split=(0, 0))

    def mixed_geometries(self, config) -> list[ImageGeometry]:
        # the global image alone, and split into sub-images (+ the global one)
        return [ImageGeometry(split=(0, 0)), ImageGeometry(split=(1, 2)), ImageGeometry(split=(2, 2))]

    def draw_geometry(self, config, draw: DrawInt, valid: bool = True) -> ImageGeometry:
        if valid:
            if draw("split_or_not", 0, 1) == 0:
                return ImageGeometry(split=(0, 0))
            return ImageGeometry(split=(draw("rows", 1, 2), draw("cols", 1, 2)))
        if draw("invalid_kind", 0, 1) == 0:
            return ImageGeometry(split=(0, draw("cols", 1, 3)))  # only one side split
        return ImageGeometry(split=(draw("rows", -2, -1), draw("cols", 0, 2)))

    def invalid_config_variants(self) -> list[dict]:
        # 42 / 14 = 3 patches per side: odd, cannot be pixel-shuffled by 2
        return [{"vision_config.image_size": 42}]

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import Idefics3Config

        return Idefics3Config(
            vision_config=dict(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=56, patch_size=14,
            ),
            text_config=dict(
                model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=252, eos_token_id=253,
                pad_token_id=254,
            ),
            # pad_token_id is a top-level field in 5.17 and a deprecated property in 5.24: keep it in vocab
            image_token_id=250, scale_factor=2, pad_token_id=254,
        )

    def config_variants(self) -> list[dict]:
        return [
            {},
            {"vision_config.image_size": 84},  # 6x6 grid -> 9 rows per sub-image
            {"vision_config.image_size": 64, "vision_config.patch_size": 8, "scale_factor": 4},  # 8x8 / 4 -> 4
        ]

    def build_pixel_inputs(self, config, geoms, generator) -> dict:
        s = config.vision_config.image_size
        n = sum(self.sub_images(g) for g in geoms)
        # standard normal pixels: never an all-zero sub-image, which HF would drop as padding
        pixel_values = torch.randn(1, n, 3, s, s, generator=generator)
        return {
            "pixel_values": pixel_values,
            "pixel_attention_mask": torch.ones(1, n, s, s, dtype=torch.long),
        }

    def collate_pixel_inputs(self, config, per_request) -> dict:
        # one batch row per request, sub-image axis padded with all-zero images (and zero masks):
        # exactly HF's own padding convention, which get_image_features strips again
        present = [d for d in per_request if "pixel_values" in d]
        if not present:
            return {}
        n_max = max(d["pixel_values"].shape[1] for d in present)
        out: dict = {}
        for key in ("pixel_values", "pixel_attention_mask"):
            parts = []
            for d in present:
                t = d[key]
                pad = n_max - t.shape[1]
                if pad:
                    t = torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)
                parts.append(t)
            out[key] = torch.cat(parts, dim=0)
        return out

    def forward_logits(self, model, **inputs) -> torch.Tensor:
        # Upstream bug in transformers 5.17 (fixed by 5.24): Idefics3Model.inputs_merger masked-scatters
        # the image features without comparing counts, so a prompt one <image> short runs silently and
        # the last feature row is dropped. 5.24 raises "Image features and image tokens do not match"
        # itself; checking only after a successful forward keeps that HF error the first one seen there.
        logits = model(**inputs).logits
        ids, pix = inputs.get("input_ids"), inputs.get("pixel_values")
        if ids is not None and pix is not None:
            cfg = model.config if hasattr(model.config, "vision_config") else model.get_base_model().config
            side, sf = self._grid(cfg)
            # HF's own rule: a sub-image whose pixels are all exactly zero is batch padding
            real = int((pix.reshape(*pix.shape[:2], -1) != 0).any(-1).sum())
            features = real * side * side // (sf * sf)
            tokens = int((ids == cfg.image_token_id).sum())
            if tokens != features:
                raise ValueError(
                    f"Image features and image tokens do not match, tokens: {tokens}, features: {features} "
                    f"(checked by the harness: this transformers version scattered them without checking)"
                )
        return logits

    def measure_points(self, model) -> dict[str, str]:
        return {"encoder": "model.vision_model.encoder.layers.0",
                "connector": "model.connector.modality_projection.proj"}


register(Idefics3())
