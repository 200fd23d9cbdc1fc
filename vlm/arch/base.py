"""The architecture contract: one frozen dataclass per VLM family, registered under its HF `model_type`.

Everything that must agree between the reference, the runtime and the suites lives here once:
module groups (which runtime module belongs to the tower, the connector or the language model),
token formulas (how many rows each group sees per image), LoRA target recipes, and quantization skips.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

GROUPS: tuple[str, ...] = ("tower", "connector", "language_model")

# Draw function handed to `ArchSpec.draw_geometry`: draw(name, lo, hi) -> int in [lo, hi].
# The suites back it with hypothesis; nothing in the package imports hypothesis.
DrawInt = Callable[[str, int, int], int]


@dataclass(frozen=True)
class ImageGeometry:
    """One image after preprocessing, in the units each family's processor produces.

    Only the fields an architecture lists in `geometry_fields` are used:
      tiles    tiled towers (llama4, internvl, llava_next): number of S x S tiles fed to the tower
      grid     qwen-style (t, h, w) in patches, as in `image_grid_thw`
      patches  gemma4 (Hp, Wp) real patch grid
      size     pixel (H, W) for towers that take any size (mistral3 / pixtral)
      split    idefics3 / smolvlm (rows, cols) of sub-images; (0, 0) means the global image alone
    """

    tiles: int | None = None
    grid: tuple[int, int, int] | None = None
    patches: tuple[int, int] | None = None
    size: tuple[int, int] | None = None
    split: tuple[int, int] | None = None

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if getattr(self, f.name) is not None]
        return ",".join(parts) or "default"


@dataclass(frozen=True)
class TokenCounts:
    """Rows per image: through the tower's layers (CLS and padding included), into the connector's
    Linear layers (all tiles / sub-images of the image summed), and placeholder tokens in the prompt."""

    encoder_rows: int
    connector_rows: int
    lm_tokens: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def rows(self, group: str) -> int:
        """Rows this image contributes to a row-indexed group: `tower` -> encoder_rows, `connector` ->
        connector_rows (the language model is indexed by tokens, not by image rows)."""
        if group == "tower":
            return self.encoder_rows
        if group == "connector":
            return self.connector_rows
        raise ValueError(f"group {group!r} is split by tokens, not by image rows")


@dataclass(frozen=True)
class KernelSite:
    """Where the runtime substitutes one of its vision kernels for HF code. The arch file knows the HF code;
    the runtime knows the kernel. `bind(kernel)` returns the replacement: a method for `hf_class.attr`
    (instance-level, the reference model is never touched), or, with `hf_class=None`, a function for the
    module global at dotted path `attr` (patched only while the runtime model runs). `kernel` is resolved at
    call time, so a fault hook on the kernel applies on the very path a healthy run takes."""

    kernel: str
    hf_class: str | None
    attr: str
    bind: Callable[[Callable], Callable]


@dataclass(frozen=True)
class ReferenceFix:
    """Where HF is wrong or crashes on a valid input, the reference replaces that one piece of HF code with
    the stated semantics (`hf_class.attr` <- `replacement`, a method), on its own model instances only; the
    report names each fix in force and the upstream bug it covers. `runtime_too`: the runtime needs the same
    corrected code path to run at all (glue around a kernel it substitutes, not a kernel of its own)."""

    name: str
    hf_class: str
    attr: str
    replacement: Callable
    upstream_bug: str
    runtime_too: bool = False


@dataclass(frozen=True)
class ForbiddenTarget:
    pattern: str   # regex, full match on a runtime module name
    reason: str
    refuse: bool = True  # False: the adapter runs and the report carries the reason as a warning
    # the module runs but the model never reads its output (a reference bundle lists it in "unused_modules": the
    # one kind of module an engine's output bundle may say it does not produce)
    unused: bool = False


def _require_int(name: str, value: Any, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"invalid geometry: {name}={value!r} must be an integer >= {lo}")
    return value


@dataclass(frozen=True)
class ArchSpec:
    """Base class: subclasses are frozen dataclasses whose field defaults hold the family's facts.

    Prefixes are *runtime* module names of the `*ForConditionalGeneration` model (transformers 5.x).
    """

    model_type: ClassVar[str]
    # HF class name inside `transformers`, e.g. "Llama4ForConditionalGeneration".
    model_class_name: ClassVar[str]

    tower: tuple[str, ...]
    connector: tuple[str, ...]
    language_model: tuple[str, ...]
    # group -> regex (PEFT full-matches a string `target_modules` against the module name).
    # A group whose value is None has no Linear a LoRA can target; `no_lora_reason` says why.
    lora_targets: Mapping[str, str | None]
    geometry_fields: tuple[str, ...]
    no_lora_reason: Mapping[str, str] = field(default_factory=dict)
    # Modules (regex, full match) kept out of weight-only int8 besides tower and connector: norms stay
    # fp32, and the output head stays in full precision as bitsandbytes' int8 loading keeps it.
    quant_skip_extra: tuple[str, ...] = (r".*norm.*", r"(.*\.)?lm_head")

    # ---------------------------------------------------------------- module groups
    def prefixes(self) -> dict[str, tuple[str, ...]]:
        return {"tower": self.tower, "connector": self.connector, "language_model": self.language_model}

    def group_of(self, module_name: str) -> str:
        """Group of a runtime module name by longest matching prefix; no match is an error."""
        best, best_len = None, -1
        for group, prefixes in self.prefixes().items():
            for p in prefixes:
                if _prefix_match(module_name, p) and len(p) > best_len:
                    best, best_len = group, len(p)
        if best is None:
            raise ValueError(
                f"module {module_name!r} matches no group of {self.model_type} "
                f"(prefixes: {self.prefixes()})"
            )
        return best

    def group_or_none(self, module_name: str) -> str | None:
        try:
            return self.group_of(module_name)
        except ValueError:
            return None

    # ---------------------------------------------------------------- LoRA recipes
    def target_regex(self, groups: Sequence[str]) -> str:
        """One regex PEFT accepts as `target_modules` covering the given groups."""
        parts = []
        for g in groups:
            if g not in GROUPS:
                raise ValueError(f"unknown group {g!r}; expected one of {GROUPS}")
            rx = self.lora_targets.get(g)
            if rx is None:
                raise ValueError(
                    f"{self.model_type} has no LoRA target in group {g!r}: "
                    f"{self.no_lora_reason.get(g, 'no Linear layer')}"
                )
            parts.append(f"(?:{rx})")
        if not parts:
            raise ValueError("at least one group is needed for a LoRA recipe")
        return "|".join(parts)

    def targetable_groups(self) -> tuple[str, ...]:
        return tuple(g for g in GROUPS if self.lora_targets.get(g) is not None)

    def forbidden_targets(self, config: Any) -> tuple[ForbiddenTarget, ...]:
        """Modules an adapter must not target (refused) or whose LoRA cannot act (flagged), with the reason;
        the LLaMA-Factory registry's idea. Checked against every adapter a run loads."""
        return ()

    def check_targets(self, config: Any, modules: Sequence[str], adapter: str = "adapter") -> list[str]:
        """Raise ValueError for a target the arch refuses; return one warning per flagged target pattern."""
        warnings: list[str] = []
        for rule in self.forbidden_targets(config):
            hits = sorted(m for m in modules if re.fullmatch(rule.pattern, m))
            if not hits:
                continue
            if rule.refuse:
                raise ValueError(f"{adapter} targets {hits[0]!r}, which {self.model_type} forbids: {rule.reason}")
            more = f" and {len(hits) - 1} more" if len(hits) > 1 else ""
            warnings.append(f"{adapter} targets {hits[0]!r}{more}: {rule.reason}")
        return warnings

    def unused_modules(self, config: Any, modules: Sequence[str]) -> list[str]:
        """Those of `modules` (in their order) that run but whose output the model never reads: the flagged
        targets marked `unused` (the tower layers after `vision_feature_layer`); [] for an arch with none."""
        rules = [r.pattern for r in self.forbidden_targets(config) if r.unused]
        return [m for m in modules if any(re.fullmatch(rx, m) for rx in rules)]

    def quant_skip_modules(self) -> list[str]:
        """Regexes (full match) of modules that weight-only int8 must leave alone: the whole tower and
        connector (as LLaVA keeps its projector in full precision) and every norm (kept fp32)."""
        out = [re.escape(p) + ".*" for p in self.tower + self.connector]
        return out + list(self.quant_skip_extra)

    def is_quant_skipped(self, module_name: str) -> bool:
        return any(re.fullmatch(rx, module_name) for rx in self.quant_skip_modules())

    # ---------------------------------------------------------------- token formulas
    def validate_geometry(self, config: Any, geom: ImageGeometry) -> None:
        """Raise ValueError naming the bad value when the geometry cannot occur for this config."""
        for name in self.geometry_fields:
            if getattr(geom, name) is None:
                raise ValueError(f"{self.model_type} needs geometry field {name!r} (got {geom.describe()})")
        for f in dataclasses.fields(geom):
            if f.name not in self.geometry_fields and getattr(geom, f.name) is not None:
                raise ValueError(
                    f"{self.model_type} does not take geometry field {f.name!r}; "
                    f"it takes {list(self.geometry_fields)}"
                )
        self._validate(config, geom)

    def _validate(self, config: Any, geom: ImageGeometry) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def counts(self, config: Any, geom: ImageGeometry) -> TokenCounts:
        self.validate_geometry(config, geom)
        return self._counts(config, geom)

    def _counts(self, config: Any, geom: ImageGeometry) -> TokenCounts:  # pragma: no cover
        raise NotImplementedError

    def encoder_rows(self, config: Any, geom: ImageGeometry) -> int:
        return self.counts(config, geom).encoder_rows

    def connector_rows(self, config: Any, geom: ImageGeometry) -> int:
        return self.counts(config, geom).connector_rows

    def lm_tokens(self, config: Any, geom: ImageGeometry) -> int:
        return self.counts(config, geom).lm_tokens

    def image_rows(self, config: Any, geom: ImageGeometry, group: str) -> int:
        """Rows of `group` (tower / connector) for one image of this geometry."""
        return self.counts(config, geom).rows(group)

    def default_geometry(self, config: Any) -> ImageGeometry:  # pragma: no cover - overridden
        raise NotImplementedError

    def draw_geometry(self, config: Any, draw: DrawInt, valid: bool = True) -> ImageGeometry:
        """A random geometry; valid=False returns one `validate_geometry` must reject."""
        raise NotImplementedError  # pragma: no cover

    # ---------------------------------------------------------------- models and inputs
    def tiny_config(self) -> Any:  # pragma: no cover
        raise NotImplementedError

    def randomize_tiny(self, model: Any) -> None:
        """Give a freshly built tiny model the non-trivial values HF's init leaves trivial where that would
        hide a fault (seeded by the caller's torch seed); nothing by default."""

    # Real-size variants for the bench: name -> dotted overrides of the tiny config (`<arch>/<name>`).
    bench_models: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def kernel_sites(self) -> tuple[KernelSite, ...]:
        """The vision kernels the runtime substitutes for this arch's HF code (none by default)."""
        return ()

    def reference_fixes(self) -> tuple[ReferenceFix, ...]:
        """The reference's fixes of HF code that is wrong or crashes on valid inputs (none by default)."""
        return ()

    def install_fixes(self, model: Any, runtime: bool = False) -> list[str]:
        """Bind the fixes into `model`'s own modules (instance-level); `runtime`: only those the runtime needs
        too. Returns the names of the fixes in force."""
        import types

        names = []
        for fix in self.reference_fixes():
            if runtime and not fix.runtime_too:
                continue
            mods = [m for m in model.modules() if type(m).__name__ == fix.hf_class]
            if not mods:
                raise ValueError(f"{self.model_type}: reference fix {fix.name!r} found no {fix.hf_class}")
            for m in mods:
                setattr(m, fix.attr, types.MethodType(fix.replacement, m))
            names.append(fix.name)
        return names

    def mixed_geometries(self, config: Any) -> list[ImageGeometry]:
        """Image geometries the default correctness batch mixes (different sizes / tile counts / grids where
        the processor allows several; one for fixed-size towers)."""
        return [self.default_geometry(config)]

    def vision_features(self, model: Any, pixel_inputs: Mapping[str, Any]) -> Any:
        """Tower + connector output for these pixel inputs, [rows, D], as the HF forward computes it before
        merging into the prompt (default: the model's own `get_image_features`)."""
        import torch

        out = model.get_image_features(**pixel_inputs)
        t = getattr(out, "pooler_output", None)
        t = out if t is None else t
        if isinstance(t, list | tuple):
            t = torch.cat([x.reshape(-1, x.shape[-1]) for x in t])
        return t.reshape(-1, t.shape[-1])

    def config_variants(self) -> list[dict[str, Any]]:
        """Small override sets (dotted keys) the property suite draws from: they change the quantities
        the formulas depend on (patch size, image size, merge / shuffle ratio ...)."""
        return [{}]

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class_name)

    def image_token_id(self, config: Any) -> int:
        for key in ("image_token_id", "image_token_index"):
            v = getattr(config, key, None)
            if v is not None:
                return int(v)
        raise ValueError(f"{self.model_type} config has no image token id")

    def prompt_image_ids(self, config: Any, geom: ImageGeometry) -> list[int]:
        """Token ids standing for one image in the prompt: `lm_tokens` placeholders plus whatever
        markers the model's forward needs (e.g. qwen's vision_start before the placeholders)."""
        return [self.image_token_id(config)] * self.lm_tokens(config, geom)

    def build_pixel_inputs(self, config: Any, geoms: Sequence[ImageGeometry], generator: Any) -> dict:
        """Forward kwargs (pixel_values and friends) for these images, random pixels from `generator`."""
        raise NotImplementedError  # pragma: no cover

    def collate_pixel_inputs(self, config: Any, per_request: Sequence[dict]) -> dict:
        """Merge the pixel inputs of several requests into one batch (default: concatenate dim 0)."""
        import torch

        keys = {k for d in per_request for k in d}
        return {k: torch.cat([d[k] for d in per_request if k in d], dim=0) for k in sorted(keys)}

    def forward_logits(self, model: Any, **inputs: Any) -> Any:
        """Run the HF model's own forward and return its logits (hook point for upstream quirks)."""
        return model(**inputs).logits

    def invalid_config_variants(self) -> list[dict[str, Any]]:
        """Config overrides under which `validate_geometry` must reject every geometry (e.g. an odd
        patch grid before a pixel shuffle)."""
        return []

    def measure_points(self, model: Any) -> dict[str, str]:
        """Runtime module names whose input rows the property suite counts:
        {"encoder": a tower layer, "connector": a connector Linear}."""
        raise NotImplementedError  # pragma: no cover

    def text_vocab_safe_ids(self, config: Any) -> tuple[int, int]:
        """A range [lo, hi) of ordinary text token ids that are no special/image token."""
        vocab = config.get_text_config().vocab_size
        specials = {int(v) for k, v in _special_ids(config).items()}
        lo = 3
        hi = min(vocab, lo + 64)
        while any(lo <= s < hi for s in specials):
            # the tiny configs keep special ids at the top of the vocabulary; shrink below them
            hi = min(s for s in specials if lo <= s < hi)
        if hi - lo < 8:
            raise ValueError(f"{self.model_type}: vocabulary too small for text ids (vocab={vocab})")
        return lo, hi


def _special_ids(config: Any) -> dict[str, int]:
    out = {}
    for k, v in vars(config).items():
        if k.endswith(("_token_id", "_token_index")) and isinstance(v, int):
            out[k] = v
    return out


def _prefix_match(name: str, prefix: str) -> bool:
    # A prefix ending in "." matches names below it; one without (e.g. "model.image_newline")
    # matches itself exactly or names below it.
    if prefix.endswith("."):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


# -------------------------------------------------------------------- fixed-size towers
def patch_side(config: Any) -> int:
    """Patches per side, S // p: the tower's patch conv (stride p) and its position table both use it."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    if side < 1:
        raise ValueError(f"invalid geometry: image_size={vc.image_size} is smaller than patch_size={vc.patch_size}")
    return side


class FixedSizeTower:
    """Mixin for towers that take one S x S image (CLIP / SigLIP without position interpolation): the
    geometry field `size` must be (S, S), the size the processor resizes every image to."""

    def check_size(self, config: Any, geom: ImageGeometry) -> None:
        patch_side(config)
        if not isinstance(geom.size, tuple) or len(geom.size) != 2:
            raise ValueError(f"invalid geometry: size={geom.size!r} must be (H, W)")
        h, w = geom.size
        _require_int("H", h)
        _require_int("W", w)
        s = config.vision_config.image_size
        if (h, w) != (s, s):
            # the tower's position table holds (S/p)^2 rows: any other size fails inside its embeddings
            raise ValueError(f"invalid geometry: size=({h}, {w}) must be the tower's image_size ({s}, {s}) "
                             "(the processor resizes to it)")

    def default_geometry(self, config: Any) -> ImageGeometry:
        s = config.vision_config.image_size
        return ImageGeometry(size=(s, s))

    def draw_geometry(self, config: Any, draw: DrawInt, valid: bool = True) -> ImageGeometry:
        s = config.vision_config.image_size
        if valid:
            return ImageGeometry(size=(s, s))
        kind = draw("invalid kind", 0, 2)
        off = draw("offset", 1, s)
        if kind == 0:
            return ImageGeometry(size=(s, s + off))
        if kind == 1:
            return ImageGeometry(size=(s + off, s))
        return ImageGeometry(size=(draw("H", -2, 0), s))


# -------------------------------------------------------------------- targets whose LoRA cannot act
def unused_feature_layers(config: Any, tower_prefix: str) -> tuple[ForbiddenTarget, ...]:
    """LLaVA-style models read the tower's hidden state `vision_feature_layer` (default -2): the layers after
    it still run (HF computes every layer) but their output is never used, so a LoRA there changes nothing
    downstream. hidden_states[e] is the output of layer e - 1, so with L layers and feature layer f < 0
    the last used layer is L + f; a list of feature layers uses its latest one."""
    f = config.vision_feature_layer
    n = config.vision_config.num_hidden_layers
    entries = [v if v >= 0 else n + 1 + v for v in (f if isinstance(f, list | tuple) else [f])]
    unused = list(range(max(entries), n))  # entry e is layer e - 1's output: layers from max(e) on are unused
    if not unused:
        return ()
    layers = "|".join(str(i) for i in unused)
    return (ForbiddenTarget(re.escape(tower_prefix) + rf"encoder\.layers\.({layers})\..*",
                            f"tower layer(s) {unused} run but their output is unused (vision_feature_layer={f}): "
                            f"a LoRA there changes nothing downstream", refuse=False, unused=True),)


# -------------------------------------------------------------------- recipe fragments
def decoder_lm_recipe(prefix: str) -> str:
    """q/k/v/o attention and gate/up/down MLP of every layer of a Llama-style decoder below `prefix`
    (the LM of most VLMs)."""
    return re.escape(prefix) + r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def clip_tower_recipe(prefix: str) -> str:
    """q/k/v/out attention and fc1/fc2 MLP of every layer of a CLIP / SigLIP encoder below `prefix`."""
    return re.escape(prefix) + r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"


# -------------------------------------------------------------------- config overrides
def parse_set(item: str) -> tuple[str, Any]:
    """'vision_config.image_size=504' -> ('vision_config.image_size', 504)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ValueError(f"--set {item!r}: bad key {key!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


_MUST_STAY_POSITIVE = re.compile(r"(size|dim|ratio|factor|^num_|_len$|length|_tokens?$)")


def apply_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    """Set dotted keys on a (nested) HF config in place; unknown keys and wrong types raise ValueError."""
    for key, value in overrides.items():
        obj = config
        parts = key.split(".")
        for p in parts[:-1]:
            if not hasattr(obj, p) or getattr(obj, p) is None:
                raise ValueError(f"--set {key}: config has no key {p!r}")
            obj = getattr(obj, p)
        last = parts[-1]
        if not hasattr(obj, last):
            raise ValueError(f"--set {key}: config has no key {last!r}")
        old = getattr(obj, last)
        new = _coerce(key, old, value)
        if _MUST_STAY_POSITIVE.search(last) and isinstance(old, int | float) and not isinstance(old, bool) \
                and old > 0 and not new > 0:
            # a size, count or ratio of 0 reaches the geometry formulas as a division by zero
            raise ValueError(f"--set {key}={value!r}: must be > 0 (a size, count or ratio; it is {old!r})")
        setattr(obj, last, new)
    return config


def _coerce(key: str, old: Any, value: Any) -> Any:
    if old is None:
        return value
    if isinstance(old, bool):
        if not isinstance(value, bool):
            raise ValueError(f"--set {key}={value!r}: expected a boolean like {old!r}")
        return value
    if isinstance(old, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"--set {key}={value!r}: expected an integer like {old!r}")
        return value
    if isinstance(old, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"--set {key}={value!r}: expected a number like {old!r}")
        return float(value)
    if isinstance(old, str):
        if not isinstance(value, str):
            raise ValueError(f"--set {key}={value!r}: expected a string like {old!r}")
        return value
    if isinstance(old, list | tuple):
        if not isinstance(value, list):
            raise ValueError(f"--set {key}={value!r}: expected a list like {list(old)!r}")
        return type(old)(value)
    raise ValueError(f"--set {key}: cannot override a value of type {type(old).__name__}")


def require_int(name: str, value: Any, lo: int = 1) -> int:
    """Public alias used by the arch files' validators."""
    return _require_int(name, value, lo)
