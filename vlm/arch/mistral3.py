"""Mistral 3 (Mistral-Small-3.1): Pixtral tower at native resolution, patch merger + MLP projector.

An image of (H, W) pixels (the processor resizes it to multiples of p*m, longest edge at most the
tower's image_size) becomes (H/p)(W/p) patch rows; all images of a batch are packed into one sequence
(no CLS, block-diagonal attention), so the tower's layers see sum (H/p)(W/p) rows. The projector
RMS-normalises, unfolds m x m neighbourhoods into one row (`patch_merger.merging_layer`, the
connector's first Linear, sees (H/p/m)(W/p/m) rows) and runs linear_1 / GELU / linear_2 on those rows;
the prompt carries that many [IMG] placeholders (the processor's [IMG_BREAK] / [IMG_END] markers are
text tokens the forward does not need).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm.arch import register
from vlm.arch.base import (
    ArchSpec,
    DrawInt,
    ImageGeometry,
    ReferenceFix,
    TokenCounts,
    decoder_lm_recipe,
    require_int,
)


@dataclass(frozen=True)
class Mistral3(ArchSpec):
    model_type = "mistral3"
    model_class_name = "Mistral3ForConditionalGeneration"

    tower: tuple[str, ...] = ("model.vision_tower.",)
    connector: tuple[str, ...] = ("model.multi_modal_projector.",)
    language_model: tuple[str, ...] = ("model.language_model.",)
    lora_targets: dict = field(default_factory=lambda: {
        "tower": r"model\.vision_tower\.transformer\.layers\.\d+\.(attention\.(q|k|v|o)_proj"
                 r"|feed_forward\.(gate|up|down)_proj)",
        "connector": r"model\.multi_modal_projector\.(patch_merger\.merging_layer|linear_(1|2))",
        "language_model": decoder_lm_recipe("model.language_model."),
    })
    geometry_fields: tuple[str, ...] = ("size",)

    def reference_fixes(self) -> tuple[ReferenceFix, ...]:
        # A listed fix (the manifest's `fixes`, bundles.md "Reference fixes in force"), not only the hook in
        # forward_logits: an outside engine replays the recorded inputs with HF's own forward and must know
        # the reference did not run HF's code unchanged (a 28x28 request crashed the example engine).
        return (
            ReferenceFix("mistral3-single-row-split", "Mistral3MultiModalProjector", "forward", _projector_forward,
                         "transformers' Mistral3Model.get_image_features squeezes the projector's (rows, D) output "
                         "before splitting it per image: with one row in the whole batch it splits D and "
                         "split_with_sizes fails; the fix returns a one-row output as (1, 1, D)", runtime_too=True),
        )

    # ---------------------------------------------------------------- formulas
    @staticmethod
    def _units(config) -> tuple[int, int]:
        p = config.vision_config.patch_size
        if isinstance(p, list | tuple):
            raise ValueError(f"invalid geometry: vision_config.patch_size={p!r} must be one integer")
        return require_int("vision_config.patch_size", p), require_int("spatial_merge_size", config.spatial_merge_size)

    def _validate(self, config, geom: ImageGeometry) -> None:
        size = geom.size
        if not isinstance(size, tuple | list) or len(size) != 2:
            raise ValueError(f"invalid geometry: size={size!r} must be (H, W) pixels")
        h, w = size
        require_int("size.H", h)
        require_int("size.W", w)
        p, m = self._units(config)
        for name, v in (("H", h), ("W", w)):
            if v % (p * m):
                # HF never complains: the tower floors v/p (drops the last pixels) and the merger's
                # unfold drops an odd last patch row/column, so part of the image silently vanishes
                raise ValueError(
                    f"invalid geometry: size.{name}={v} is not a multiple of patch_size*spatial_merge_size="
                    f"{p}*{m}={p * m}"
                )

    def _counts(self, config, geom: ImageGeometry) -> TokenCounts:
        p, m = self._units(config)
        gh, gw = geom.size[0] // p, geom.size[1] // p
        merged = (gh // m) * (gw // m)
        return TokenCounts(encoder_rows=gh * gw, connector_rows=merged, lm_tokens=merged)

    def default_geometry(self, config) -> ImageGeometry:
        p, m = self._units(config)
        return ImageGeometry(size=(2 * p * m, 3 * p * m))

    def mixed_geometries(self, config) -> list[ImageGeometry]:
        p, m = self._units(config)
        u = p * m
        return [ImageGeometry(size=(2 * u, 3 * u)), ImageGeometry(size=(u, u)), ImageGeometry(size=(3 * u, u))]

    def draw_geometry(self, config, draw: DrawInt, valid: bool = True) -> ImageGeometry:
        p, m = self._units(config)
        unit = p * m
        # stay within the tower's image_size (the processor's longest edge) and a few hundred rows
        most = max(1, min(config.vision_config.image_size // unit, 12 // m))
        h, w = draw("h_units", 1, most) * unit, draw("w_units", 1, most) * unit
        if valid:
            return ImageGeometry(size=(h, w))
        kind = draw("invalid_kind", 0, 2)
        if kind == 0:
            return ImageGeometry(size=(draw("h_bad", -unit, 0), w))
        if kind == 1:
            # a whole number of patches but an odd patch row count before the m x m merge (or, with
            # m = 1, a partial patch): the case HF silently truncates
            off = p if m > 1 else 1
            return ImageGeometry(size=(h + off, w))
        return ImageGeometry(size=(h, w + draw("w_off", 1, unit - 1)))

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import Mistral3Config

        return Mistral3Config(
            vision_config=dict(
                model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, head_dim=16, patch_size=14, image_size=168,
            ),
            text_config=dict(
                model_type="mistral", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=None,
                bos_token_id=252, eos_token_id=253, pad_token_id=254,
            ),
            image_token_index=250, spatial_merge_size=2,
        )

    def config_variants(self) -> list[dict]:
        return [
            {},
            {"spatial_merge_size": 1},
            {"vision_config.patch_size": 8, "spatial_merge_size": 3},
        ]

    def build_pixel_inputs(self, config, geoms, generator) -> dict:
        for g in geoms:
            self.validate_geometry(config, g)
        hmax = max(g.size[0] for g in geoms)
        wmax = max(g.size[1] for g in geoms)
        # the processor pads every image to the batch's largest (H, W) with zeros; image_sizes says
        # how much of each is real
        pixel_values = torch.zeros(len(geoms), 3, hmax, wmax)
        for i, g in enumerate(geoms):
            pixel_values[i, :, : g.size[0], : g.size[1]] = torch.randn(3, *g.size, generator=generator)
        return {"pixel_values": pixel_values,
                "image_sizes": torch.tensor([list(g.size) for g in geoms], dtype=torch.long)}

    def collate_pixel_inputs(self, config, per_request) -> dict:
        # images of different requests have different padded sizes: pad to the common max, then stack
        present = [d for d in per_request if "pixel_values" in d]
        if not present:
            return {}
        hmax = max(d["pixel_values"].shape[-2] for d in present)
        wmax = max(d["pixel_values"].shape[-1] for d in present)
        pix = []
        for d in present:
            t = d["pixel_values"]
            pix.append(torch.nn.functional.pad(t, (0, wmax - t.shape[-1], 0, hmax - t.shape[-2])))
        return {"pixel_values": torch.cat(pix, dim=0),
                "image_sizes": torch.cat([d["image_sizes"] for d in present], dim=0)}

    def forward_logits(self, model, **inputs) -> torch.Tensor:
        # Upstream bug (transformers 5.17 and 5.24, Mistral3Model.get_image_features): the projector's
        # output (rows, D) goes through `.squeeze(0)` before being split per image, so when the whole
        # batch yields exactly one image token (e.g. a single 28x28 image with p=14, m=2) it becomes
        # (D,) and torch.split raises "split_with_sizes expects split_sizes to sum exactly to D".
        # Work around it only in that case: hand back (1, 1, D), which the squeeze turns into the
        # intended (1, D). Any other row count passes through untouched. The reference and the runtime run
        # the same as the listed fix `mistral3-single-row-split`; the hook stays for callers that run a model
        # without install_fixes (a no-op where the fix already made the output 3-D).
        projectors = [m for m in model.modules() if type(m).__name__ == "Mistral3MultiModalProjector"]

        def keep_row_axis(_mod, _args, out):
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1:
                return out.unsqueeze(0)
            return out

        handles = [p.register_forward_hook(keep_row_axis) for p in projectors]
        try:
            return model(**inputs).logits
        finally:
            for h in handles:
                h.remove()

    def measure_points(self, model) -> dict[str, str]:
        return {"encoder": "model.vision_tower.transformer.layers.0",
                "connector": "model.multi_modal_projector.patch_merger.merging_layer"}


def _projector_forward(self, *args, **kwargs):
    """`Mistral3MultiModalProjector.forward`, its one-row output (1, D) returned as (1, 1, D), which HF's
    squeeze turns into the intended (1, D) (see Mistral3.forward_logits); every other output unchanged."""
    out = type(self).forward(self, *args, **kwargs)
    return out.unsqueeze(0) if out.dim() == 2 and out.shape[0] == 1 else out


register(Mistral3())
