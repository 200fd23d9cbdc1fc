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
    ReferenceFix,
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

    def reference_fixes(self) -> tuple[ReferenceFix, ...]:
        return (
            ReferenceFix("gemma4-pooler-ceil-stride", "Gemma4VisionPooler", "forward", _reference_pooler_forward,
                         "transformers' Gemma4VisionPooler uses row stride floor(Wp/k) (correct: ceil(Wp/k)): with "
                         "Wp % k != 0 patches of two bin rows share a pooled token or one_hot crashes; padding is "
                         "clamped to (0, 0), so an all-padding image yields a pooled token marked valid"),
            ReferenceFix("gemma4-image-feature-split", "Gemma4Model", "get_image_features", _get_image_features,
                         "transformers' Gemma4Model.get_image_features splits the pooled features by real "
                         "patches // k^2 per image, which undercounts partial bins (split_with_sizes fails, or "
                         "'tokens: 4, features: 3'); the split must count valid bins", runtime_too=True),
        )

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

    @staticmethod
    def soft_tokens(hp: int, wp: int, k: int) -> int:
        """Pooled tokens of an Hp x Wp grid: one per k x k bin holding a real patch, partial bins included."""
        return -(-hp // k) * -(-wp // k)

    def _validate(self, config, geom: ImageGeometry) -> None:
        if not isinstance(geom.patches, tuple) or len(geom.patches) != 2:
            raise ValueError(f"invalid geometry: patches={geom.patches!r} must be (Hp, Wp)")
        hp, wp = geom.patches
        if (hp, wp) != (0, 0):  # (0, 0): an image whose every patch row is padding (legal, no soft token)
            require_int("Hp", hp)
            require_int("Wp", wp)
        k, budget = self._kernel_and_budget(config)
        if self.soft_tokens(hp, wp, k) > budget:
            raise ValueError(
                f"invalid geometry: patches {hp}x{wp} pool to {self.soft_tokens(hp, wp, k)} soft tokens, more "
                f"than max_soft_tokens={budget}"
            )
        pos = config.vision_config.position_embedding_size
        for name, v in (("Hp", hp), ("Wp", wp)):
            if v > pos:
                raise ValueError(
                    f"invalid geometry: {name}={v} exceeds position_embedding_size={pos} (position table)"
                )

    def _counts(self, config, geom: ImageGeometry) -> TokenCounts:
        k, budget = self._kernel_and_budget(config)
        soft = self.soft_tokens(*geom.patches, k)
        # every image is padded to budget * k^2 patch rows: the tower runs them all
        return TokenCounts(encoder_rows=budget * k * k, connector_rows=soft, lm_tokens=soft)

    def default_geometry(self, config) -> ImageGeometry:
        k, _ = self._kernel_and_budget(config)
        return ImageGeometry(patches=(2 * k, 2 * k))

    def mixed_geometries(self, config) -> list[ImageGeometry]:
        """Full bins; partial bins on the right (Wp % k != 0) and at the bottom (Hp % k != 0); all padding."""
        k, _ = self._kernel_and_budget(config)
        return [ImageGeometry(patches=(2 * k, 2 * k)), ImageGeometry(patches=(k + 1, 2 * k + 1)),
                ImageGeometry(patches=(2 * k + 1, k)), ImageGeometry(patches=(0, 0))]

    def draw_geometry(self, config, draw: DrawInt, valid: bool = True) -> ImageGeometry:
        k, budget = self._kernel_and_budget(config)
        side_max = max(1, config.vision_config.position_embedding_size // k)
        if valid:
            hk = draw("pooled rows", 1, min(budget, side_max))
            wk = draw("pooled cols", 1, min(budget // hk, side_max))
            # a partial last bin row / column: k - r patches short of full (r = 0: full)
            hp, wp = hk * k - draw("rows short", 0, k - 1), wk * k - draw("cols short", 0, k - 1)
            return ImageGeometry(patches=(hp, wp))
        kind = draw("invalid kind", 0, 2)
        if kind == 0:  # a side beyond the position table
            return ImageGeometry(patches=(config.vision_config.position_embedding_size + draw("excess", 1, 3), 1))
        if kind == 1:  # non-positive side
            return ImageGeometry(patches=(draw("Hp", -3, 0), k + draw("Wp extra", 0, 2)))
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
        # the embedder's input is the tower's output before the embedder's scale-free RMSNorm: a pooling error
        # that scales a token shows there (after the norm it could only show through std_bias)
        return {"encoder": "model.vision_tower.encoder.layers.0", "connector": "model.embed_vision"}

    def randomize_tiny(self, model) -> None:
        # HF initialises the tower's standardisation to bias 0, scale 1 (an identity); real checkpoints hold
        # trained values, and a zero bias would let a per-token scale error vanish in the embedder's norm
        vm = model.model.vision_tower
        if getattr(vm, "std_bias", None) is not None:
            with torch.no_grad():
                vm.std_bias.normal_(0.0, 0.5)
                vm.std_scale.uniform_(0.5, 1.5)


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


def _soft_tokens_of(positions: torch.Tensor, k: int) -> int:
    """Valid bins of one image from its (x, y) patch positions (-1 = padding): ceil(Hp/k) * ceil(Wp/k)."""
    real = (positions >= 0).all(dim=-1)
    if not bool(real.any()):
        return 0
    wp, hp = (int(v) + 1 for v in positions[real].max(dim=0).values)
    return Gemma4.soft_tokens(hp, wp, k)


def _reference_pooler_forward(self, hidden_states, pixel_position_ids, padding_positions, output_length=None):
    """The pooler's stated semantics, brute force in float64 (the reference fix for HF's pooler): each real
    patch (x, y) goes to bin (y // k) * ceil(Wp / k) + x // k of its image (Wp = max real x + 1), a bin is
    sum / k^2 and valid iff it holds a real patch. Returns (scaled pooled features, valid mask) as HF does,
    in fp32 (fp64 for a float64 truth)."""
    b, n, d = hidden_states.shape
    k = int((n // output_length) ** 0.5)
    out = torch.zeros(b, output_length, d, dtype=torch.float64, device=hidden_states.device)
    valid = torch.zeros(b, output_length, dtype=torch.bool, device=hidden_states.device)
    for i in range(b):
        real = ~padding_positions[i] & (pixel_position_ids[i] >= 0).all(dim=-1)
        if not bool(real.any()):
            continue
        x, y = pixel_position_ids[i][real].long().unbind(-1)
        stride = -(-(int(x.max()) + 1) // k)
        bins = (y // k) * stride + x // k
        out[i].index_add_(0, bins, hidden_states[i][real].double())
        valid[i, bins] = True
    out = out / (k * k) * self.root_hidden_size
    return out.to(torch.promote_types(hidden_states.dtype, torch.float32)), valid


def _get_image_features(self, pixel_values, image_position_ids=None, **kwargs):
    """`Gemma4Model.get_image_features` with the split by valid bins per image (the pooled features of every
    image arrive concatenated; HF splits them by real patches // k^2)."""
    vision_outputs = self.vision_tower(pixel_values=pixel_values, pixel_position_ids=image_position_ids, **kwargs)
    pooled = self.embed_vision(inputs_embeds=vision_outputs.last_hidden_state)
    k = self.config.vision_config.pooling_kernel_size
    sizes = [_soft_tokens_of(p, k) for p in image_position_ids]
    vision_outputs.pooler_output = torch.split(pooled, sizes)
    return vision_outputs


def _rope_function(rope_2d):
    def apply_multidimensional_rope(x, cos, sin, position_ids, unsqueeze_dim: int = 2):
        return rope_2d(x, cos, sin, position_ids, unsqueeze_dim=unsqueeze_dim)
    return apply_multidimensional_rope


register(Gemma4())
