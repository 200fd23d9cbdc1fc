"""Gemma 4: variable-resolution ViT over pre-patchified pixels, position-based average pooling, embedder.

The processor resizes an image so its patch grid Hp x Wp is a multiple of the pooling kernel k, patchifies
it and pads every image to the same `max_patches = max_soft_tokens * k^2` rows (padding positions are
(-1, -1)). The tower's layers see all of those rows, padding included (it is masked in attention only).
The pooler averages k x k blocks by patch position and keeps `max_soft_tokens` slots per image, then
strips the empty ones: `Hp*Wp/k^2` soft tokens per image reach the embedder's Linear and the prompt.

`max_soft_tokens` is a processor setting (70/140/280/560/1120 on real checkpoints), not a field of the
model config. The harness reads it from `vision_config.max_soft_tokens` when present (the tiny configs
set it, so `--set vision_config.max_soft_tokens=...` works) and otherwise uses the processor default 280.
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

# Gemma4ImageProcessor.max_soft_tokens default (transformers 5.x)
PROCESSOR_MAX_SOFT_TOKENS = 280


@dataclass(frozen=True)
class Gemma4(ArchSpec):
    model_type = "gemma4"
    model_class_name = "Gemma4ForConditionalGeneration"

    tower: tuple[str, ...] = ("model.vision_tower.",)
    connector: tuple[str, ...] = ("model.embed_vision.",)
    language_model: tuple[str, ...] = ("model.language_model.",)
    lora_targets: dict = field(default_factory=lambda: {
        # Every tower projection is a Gemma4ClippableLinear, which PEFT refuses as a target: aim at the
        # nn.Linear inside it. (The clamp around it stays outside the LoRA, as in the checkpoint.)
        "tower": r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj"
                 r"|mlp\.(gate|up|down)_proj)\.linear",
        "connector": r"model\.embed_vision\.embedding_projection",
        "language_model": decoder_lm_recipe("model.language_model."),
    })
    geometry_fields: tuple[str, ...] = ("patches",)

    def kernel_sites(self) -> tuple[KernelSite, ...]:
        rope_global = "transformers.models.gemma4.modeling_gemma4.apply_multidimensional_rope"
        return (KernelSite("position_pool", "Gemma4VisionPooler", "forward", _pooler_forward),
                # the vision attention looks the RoPE up as a module global: patched only during runtime forwards
                KernelSite("rope_2d", None, rope_global, _rope_function))

    # ---------------------------------------------------------------- formulas
    @staticmethod
    def max_soft_tokens(config) -> int:
        v = getattr(config.vision_config, "max_soft_tokens", None)
        return PROCESSOR_MAX_SOFT_TOKENS if v is None else v

    @classmethod
    def _kernel_and_budget(cls, config) -> tuple[int, int]:
        vc = config.vision_config
        k = require_int("pooling_kernel_size", vc.pooling_kernel_size)
        if k == 1:
            # transformers 5.24 Gemma4VisionPooler: when no pooling happens it returns the padding mask
            # (True = padding) where its caller expects a validity mask, so the padding rows are kept
            # and the real ones dropped (HF then fails with a feature/token count mismatch).
            raise ValueError(
                "invalid geometry: pooling_kernel_size=1 is broken upstream (the unpooled path keeps "
                "padding rows instead of image rows)"
            )
        budget = require_int("max_soft_tokens", cls.max_soft_tokens(config))
        return k, budget

    def _validate(self, config, geom: ImageGeometry) -> None:
        if not isinstance(geom.patches, tuple) or len(geom.patches) != 2:
            raise ValueError(f"invalid geometry: patches={geom.patches!r} must be (Hp, Wp)")
        hp, wp = geom.patches
        require_int("Hp", hp)
        require_int("Wp", wp)
        k, budget = self._kernel_and_budget(config)
        for name, v in (("Hp", hp), ("Wp", wp)):
            if v % k:
                # Upstream pools with row stride floor(Wp/k) (correct: ceil): a grid that is not a multiple
                # of k mixes patches of two block-rows into one token or crashes in one_hot. The processor
                # never produces such grids; the registry refuses them.
                raise ValueError(
                    f"invalid geometry: {name}={v} is not a multiple of pooling_kernel_size={k}"
                )
        if (hp // k) * (wp // k) > budget:
            raise ValueError(
                f"invalid geometry: patches {hp}x{wp} pool to {(hp // k) * (wp // k)} soft tokens, more than "
                f"max_soft_tokens={budget}"
            )
        pos = config.vision_config.position_embedding_size
        for name, v in (("Hp", hp), ("Wp", wp)):
            if v > pos:
                raise ValueError(
                    f"invalid geometry: {name}={v} exceeds position_embedding_size={pos} (position table)"
                )

    def _counts(self, config, geom: ImageGeometry) -> TokenCounts:
        k, budget = self._kernel_and_budget(config)
        hp, wp = geom.patches
        soft = (hp // k) * (wp // k)
        # every image is padded to budget * k^2 patch rows: the tower runs them all
        return TokenCounts(encoder_rows=budget * k * k, connector_rows=soft, lm_tokens=soft)

    def default_geometry(self, config) -> ImageGeometry:
        k, _ = self._kernel_and_budget(config)
        return ImageGeometry(patches=(2 * k, 2 * k))

    def draw_geometry(self, config, draw: DrawInt, valid: bool = True) -> ImageGeometry:
        k, budget = self._kernel_and_budget(config)
        side_max = max(1, config.vision_config.position_embedding_size // k)
        if valid:
            hk = draw("pooled rows", 1, min(budget, side_max))
            wk = draw("pooled cols", 1, min(budget // hk, side_max))
            return ImageGeometry(patches=(hk * k, wk * k))
        kind = draw("invalid kind", 0, 2)
        if kind == 0:  # a side that is not a multiple of the pooling kernel (k >= 2 here)
            hk = draw("pooled rows", 1, 3)
            return ImageGeometry(patches=(hk * k, draw("pooled cols", 1, 3) * k + draw("remainder", 1, k - 1)))
        if kind == 1:  # non-positive side
            return ImageGeometry(patches=(draw("Hp", -3, 0), k))
        # more soft tokens than the padding budget
        return ImageGeometry(patches=(k * (budget + draw("excess", 1, 3)), k))

    def invalid_config_variants(self) -> list[dict]:
        return [{"vision_config.pooling_kernel_size": 1}]

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self):
        from transformers import Gemma4Config

        cfg = Gemma4Config(
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8,
                # full-attention layers use their own head size (512 by default): keep it tiny. Passed as
                # the keyword older 5.x releases had as a field (5.24 folds it into per-layer overrides).
                global_head_dim=8,
                layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                # per-layer embeddings (PLE) default to a 262144-row table: shrink, keep the path alive
                vocab_size=256, vocab_size_per_layer_input=256, hidden_size_per_layer_input=8,
                pad_token_id=0, eos_token_id=1, bos_token_id=2,
            ),
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2,
                position_embedding_size=64,
                # processor setting kept on the config for the harness (see module docstring)
                max_soft_tokens=16,
            ),
            audio_config=None,
            image_token_id=250, boi_token_id=251, eoi_token_id=252, video_token_id=253,
            audio_token_id=254, boa_token_id=255, eoa_token_index=249,
        )
        return cfg

    def config_variants(self) -> list[dict]:
        return [
            {},
            {"vision_config.pooling_kernel_size": 3},  # 144 padded rows per image
            {"vision_config.patch_size": 8, "vision_config.max_soft_tokens": 9},
        ]

    def prompt_image_ids(self, config, geom: ImageGeometry) -> list[int]:
        # as the processor writes it: <boi> soft tokens <eoi>
        return [config.boi_token_id, *super().prompt_image_ids(config, geom), config.eoi_token_id]

    def build_pixel_inputs(self, config, geoms, generator) -> dict:
        vc = config.vision_config
        k, budget = self._kernel_and_budget(config)
        max_patches = budget * k * k
        dim = 3 * vc.patch_size * vc.patch_size
        n = len(geoms)
        pixel_values = torch.zeros(n, max_patches, dim)
        positions = torch.full((n, max_patches, 2), -1, dtype=torch.long)
        for i, g in enumerate(geoms):
            self.validate_geometry(config, g)
            hp, wp = g.patches
            # pixels in [0, 1) as the processor rescales them (the model maps them to [-1, 1))
            pixel_values[i, : hp * wp] = torch.rand(hp * wp, dim, generator=generator)
            # row-major patches, each position (x, y) = (column, row), as the processor's meshgrid "xy"
            ys, xs = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
            positions[i, : hp * wp] = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
        return {"pixel_values": pixel_values, "image_position_ids": positions}

    def measure_points(self, model) -> dict[str, str]:
        return {"encoder": "model.vision_tower.encoder.layers.0",
                "connector": "model.embed_vision.embedding_projection"}


def _pooler_forward(position_pool):
    """Drop-in for `Gemma4VisionPooler.forward` (called with hidden_states=, pixel_position_ids=,
    padding_positions=, output_length=), pooling with the runtime's `position_pool` kernel. Returns
    (fp32 [B, L, D] scaled by sqrt(hidden_size), valid mask [B, L] True = real), like HF. One deliberate
    difference: when N == output_length HF skips pooling and returns `padding_positions` (True = padding)
    where its caller expects True = valid; this returns the valid mask."""

    def forward(self, hidden_states, pixel_position_ids, padding_positions, output_length=None):
        n = hidden_states.shape[1]
        if output_length is None or output_length > n:
            raise ValueError(f"Cannot output {output_length} soft tokens from {n} patches")
        if n == output_length:  # HF skips pooling here; keep its sequence order, but return True = valid
            pooled, valid = hidden_states.masked_fill(padding_positions.unsqueeze(-1), 0.0), ~padding_positions
        else:
            k = int((n // output_length) ** 0.5)
            if k * k * output_length != n:
                raise ValueError(f"Cannot pool {tuple(hidden_states.shape)} to {output_length}: k={k}, k^2*L != {n}")
            positions = pixel_position_ids.masked_fill(padding_positions.unsqueeze(-1), -1)
            pooled, valid = position_pool(hidden_states, positions, k, output_length)
        return pooled.float() * self.root_hidden_size, valid
    return forward


def _rope_function(rope_2d):
    def apply_multidimensional_rope(x, cos, sin, position_ids, unsqueeze_dim: int = 2):
        return rope_2d(x, cos, sin, position_ids, unsqueeze_dim=unsqueeze_dim)
    return apply_multidimensional_rope


register(Gemma4())
