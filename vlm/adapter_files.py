"""Read and validate an adapter folder that PEFT saved (adapter_config.json + adapter_model.safetensors).

Shared by the reference (which still loads through PEFT itself, after this check gives a clear error)
and the runtime (which stacks the tensors into slots). Safetensors only: a pickle is refused, unread.

Given the model, module names the model lacks are converted by the model class's own checkpoint key
conversion (transformers 5's `get_model_conversion_mapping`, the rules `from_pretrained` applies to old
checkpoints): an adapter saved under transformers 4.x names (LLaVA's `language_model.model.layers...`) then
reads under the model's names on both sides.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm.files import check_safetensors, read_json

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraWeights:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float     # alpha / r, or alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class AdapterFile:
    path: Path
    config: dict
    modules: dict[str, LoraWeights]  # runtime module name -> weights
    renamed: dict[str, str] = field(default_factory=dict)  # module name -> the name the file holds, where converted


def pattern_value(patterns: dict, module: str, default):
    # PEFT matches rank_pattern / alpha_pattern keys as a regex against the end of the module name
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _files(folder: Path) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise ValueError(f"adapter folder {str(folder)!r} does not exist")
    cfg_path, st_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise ValueError(f"adapter folder {str(folder)!r} has no adapter_config.json")
    if not st_path.is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise ValueError(f"adapter {str(folder)!r} holds only {pickled[0]} (a pickle): refused, "
                             f"save it as safetensors")
        raise ValueError(f"adapter folder {str(folder)!r} has no adapter_model.safetensors")
    return cfg_path, st_path


def _config(folder: Path, cfg_path: Path) -> dict:
    config = read_json(cfg_path, "adapter config")  # NaN / Infinity anywhere refused, the key named
    if not isinstance(config, dict):
        raise ValueError(f"adapter config {str(cfg_path)!r} is not a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"adapter {str(folder)!r} has peft_type={config.get('peft_type')!r}; only LORA is supported")
    where = f"adapter config {str(cfg_path)!r}"
    if not _positive_int(config.get("r")):
        raise ValueError(f"{where}: r={config.get('r')!r} must be a positive integer")
    if not _positive_number(config.get("lora_alpha")):
        raise ValueError(f"{where}: lora_alpha={config.get('lora_alpha')!r} must be a positive number")
    for key, ok, what in (("rank_pattern", _positive_int, "a positive integer"),
                          ("alpha_pattern", _positive_number, "a positive number")):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise ValueError(f"{where}: {key} must be an object of module pattern -> value, not "
                             f"{type(patterns).__name__}")
        for pat, value in patterns.items():
            _check_regex(where, f"{key} key", pat)
            if not ok(value):
                raise ValueError(f"{where}: {key}[{pat!r}]={value!r} must be {what}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _check_regex(where, "target_modules", targets)
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{where}: target_modules={targets!r} must be a regex string or a list of module names")
    # what plain LoRA slots cannot express is refused, not silently dropped: the run would otherwise blame
    # the runtime for a difference that lies in the adapter's format
    for key in ("use_dora", "lora_bias", "use_qalora"):
        if config.get(key):
            raise ValueError(f"adapter {str(folder)!r} uses {key}=true, which the runtime's LoRA slots do not "
                             f"implement")
    for key in ("modules_to_save", "trainable_token_indices"):
        if config.get(key):
            raise ValueError(f"adapter {str(folder)!r} sets {key}={config[key]!r}, which the runtime's LoRA slots "
                             f"do not implement")
    return config


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_regex(where: str, what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: {what} {pattern!r} is not a valid regex ({e})") from None


def _pairs(st_path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"adapter {str(st_path)!r} holds tensor {key!r}, which is not a lora_A / lora_B "
                             f"weight (DoRA magnitude, bias or a saved module copy): refused")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    if not pairs:
        raise ValueError(f"adapter {str(st_path)!r} holds no lora_A/lora_B tensors")
    return pairs


def _module_weights(st_path: Path, config: dict, module: str, ab: dict[str, torch.Tensor]) -> LoraWeights:
    if set(ab) != {"A", "B"}:
        raise ValueError(f"adapter {str(st_path)!r}: module {module!r} has lora_{''.join(ab)} but not both A and B")
    A, B = ab["A"], ab["B"]
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"adapter {str(st_path)!r}: module {module!r} has lora_A {tuple(A.shape)} and "
                         f"lora_B {tuple(B.shape)} whose ranks disagree")
    r = pattern_value(config.get("rank_pattern"), module, config["r"])
    if A.shape[0] != r:
        raise ValueError(f"adapter {str(st_path)!r}: module {module!r} has rank {A.shape[0]} but the config "
                         f"says r={r}")
    alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    for name, t in (("lora_A", A), ("lora_B", B)):
        if not t.is_floating_point():
            raise ValueError(f"adapter {str(st_path)!r}: {module}.{name} has dtype {t.dtype}, not floating point")
        if not torch.isfinite(t).all():
            raise ValueError(f"adapter {str(st_path)!r}: {module}.{name} holds NaN or Inf")
    return LoraWeights(A, B, float(scale))


def read_adapter(folder: str | Path, model: torch.nn.Module | None = None) -> AdapterFile:
    """Validate a PEFT adapter folder and return its per-module weights and scales (ValueError naming the bad
    value otherwise). With `model`, a module name the model lacks is converted by the model's own key
    conversion (`module_name_converter`), and one that stays absent is refused, named as the file holds it.
    rank_pattern / alpha_pattern apply to the names the file holds (the names they were written for)."""
    folder = Path(folder)
    cfg_path, st_path = _files(folder)
    config = _config(folder, cfg_path)
    pairs = _pairs(st_path, _read_safetensors(st_path))
    modules = {module: _module_weights(st_path, config, module, ab) for module, ab in sorted(pairs.items())}
    if model is None:
        return AdapterFile(folder, config, modules)
    have = {n for n, _ in _unwrapped(model).named_modules()}
    convert = None
    converted: dict[str, LoraWeights] = {}
    renamed: dict[str, str] = {}
    for name, w in modules.items():
        new = name
        if name not in have:
            convert = convert or module_name_converter(model)
            new = convert(name)
            if new not in have:
                became = f" (converted to {new!r} by {type(_unwrapped(model)).__name__}'s key conversion)" \
                    if new != name else f" (no key conversion of {type(_unwrapped(model)).__name__} renames it)"
                raise ValueError(f"adapter {str(folder)!r} targets module {name!r}, which the model does not "
                                 f"have{became}")
        if new in converted:
            raise ValueError(f"adapter {str(folder)!r}: modules {renamed.get(new, new)!r} and {name!r} are both "
                             f"{new!r} for the model")
        if new != name:
            renamed[new] = name
        converted[new] = w
    return AdapterFile(folder, config, dict(sorted(converted.items())), renamed)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    # a PeftModel's names carry "base_model.model."; the conversion is scoped by the transformers model's names
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def module_name_converter(model: torch.nn.Module) -> Callable[[str], str]:
    """The model class's own checkpoint key conversion, as module name -> module name: transformers'
    `get_model_conversion_mapping(model)` (every PreTrainedModel part's rules, scoped to where it sits), applied
    to the module's weight key by `rename_source_key`, as `from_pretrained` renames old checkpoints and PEFT's
    `convert_peft_adapter_state_dict_for_transformers` renames adapter keys. A name the rules would fuse or
    split (a WeightConverter: the weight becomes part of another tensor) is refused: plain LoRA slots cannot
    follow it."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    base = _unwrapped(model)
    transforms = get_model_conversion_mapping(base) if hasattr(base, "config") else []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def convert(name: str) -> str:
        key, fused = rename_source_key(f"{name}.weight", renamings, converters)
        if fused is not None:
            raise ValueError(f"module {name!r}: {type(base).__name__}'s key conversion merges or splits its weight "
                             f"({fused!r}), which a LoRA on that module cannot follow")
        return key.removesuffix(".weight")

    return convert


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)  # by the file's structure: a pickle / zip is named and never loaded
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{str(path)!r} is not a valid safetensors file ({first})") from None


def check_against_model(adapter: AdapterFile, model: torch.nn.Module, prefix: str = "") -> None:
    """Every adapted module exists in the model as a Linear-like layer with matching in/out features."""
    modules = dict(model.named_modules())
    for name, w in adapter.modules.items():
        mod = modules.get(prefix + name)
        if mod is None:
            raise ValueError(f"adapter {str(adapter.path)!r} targets module {name!r}, which the model does not have")
        base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if in_f is None or out_f is None:
            raise ValueError(f"adapter {str(adapter.path)!r} targets {name!r}, a {type(base).__name__}, not a Linear")
        if w.A.shape[1] != in_f or w.B.shape[0] != out_f:
            raise ValueError(
                f"adapter {str(adapter.path)!r}: module {name!r} is Linear({in_f}->{out_f}) but lora_A is "
                f"{tuple(w.A.shape)} and lora_B {tuple(w.B.shape)}"
            )
