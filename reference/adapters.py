"""PEFT LoRA adapters from the registry's recipes: created with non-zero B, saved and loaded as PEFT does.

PEFT's default init makes B zero, so every adapter would equal the base model and every comparison would
pass trivially: we draw A and B from a seeded normal instead, then `calibrate` scales B module by module so
the LoRA delta is a realistic fraction of the base output (trained adapters: a few percent to a few tens of
percent), not a multiple of it: with an O(1) delta any LoRA bug is an O(1) error and detection looks easy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm.adapter_files import AdapterFile, check_against_model, pattern_value, read_adapter
from vlm.arch import ArchSpec

BASE_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    groups: tuple[str, ...]
    rank: int = 8
    alpha: float = 16
    rslora: bool = False
    seed: int = 0

    def groups_for(self, arch: ArchSpec) -> tuple[str, ...]:
        """The groups this arch can adapt (e.g. Gemma3's projector has no Linear)."""
        return tuple(g for g in self.groups if g in arch.targetable_groups())


# The default mix: everything (the Llama 4 tower/connector validation layout, r=8 alpha=16), LM only,
# tower only with rsLoRA and another rank: every slot path and both scalings get exercised.
DEFAULT_SPECS = (
    AdapterSpec("all", ("tower", "connector", "language_model"), rank=8, alpha=16, seed=1),
    AdapterSpec("lm", ("language_model",), rank=4, alpha=8, seed=2),
    AdapterSpec("tower", ("tower",), rank=16, alpha=16, rslora=True, seed=3),
)


def default_specs(n: int) -> list[AdapterSpec]:
    if n < 0:
        raise ValueError(f"--adapters {n}: must be >= 0")
    specs = list(DEFAULT_SPECS[:n])
    for i in range(len(specs), n):  # beyond three: more full adapters with other ranks
        specs.append(AdapterSpec(f"extra{i}", ("tower", "connector", "language_model"), rank=2 + 2 * (i % 4),
                                 alpha=8, seed=10 + i))
    return specs


def lora_config(arch: ArchSpec, spec: AdapterSpec):
    from peft import LoraConfig

    groups = spec.groups_for(arch)
    if not groups:
        raise ValueError(f"adapter {spec.name!r}: {arch.model_type} has no LoRA target in groups {spec.groups}")
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, use_rslora=spec.rslora, lora_dropout=0.0,
                      target_modules=arch.target_regex(groups), bias="none")


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device under a device map (its weights may sit
    on the meta device, offloaded), else where its weights are."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is not None:
        return torch.device(dev)
    return next((t.device for t in module.parameters() if t.device.type != "meta"), torch.device("cpu"))


def _materialize(peft_model) -> None:
    """PEFT creates the LoRA weights of a module accelerate offloads on the meta device (no data): they are
    small, so they live on the module's execution device instead (randomize / load fill them)."""
    from peft.tuners.lora import LoraLayer

    for mod in peft_model.modules():
        if isinstance(mod, LoraLayer):
            dev = execution_device(mod.get_base_layer())
            for d in (mod.lora_A, mod.lora_B):
                for sub in d.values():
                    if any(p.is_meta for p in sub.parameters()):
                        sub.to_empty(device=dev)


@torch.no_grad()
def randomize(peft_model, name: str, seed: int) -> None:
    """Non-zero A and B: A ~ N(0, 1/in), B ~ N(0, 1/r) / 4, so a LoRA changes a module's output by a
    visible but not dominant fraction of the base output."""
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(seed)
    for _, mod in sorted(peft_model.named_modules(), key=lambda kv: kv[0]):
        if isinstance(mod, LoraLayer) and name in mod.lora_A:
            A, B = mod.lora_A[name].weight, mod.lora_B[name].weight
            A.copy_(torch.randn(A.shape, generator=g) / math.sqrt(A.shape[1]))
            B.copy_(torch.randn(B.shape, generator=g) / (4 * math.sqrt(B.shape[1])))


@torch.no_grad()
def calibrate(peft_model, arch: ArchSpec, config, requests, target: float, device="cpu", dtype=None) -> None:
    """Scale every adapter's B, module by module, so rms(delta) / rms(base output) = `target` on the inputs
    these requests give each module in a base-model forward (no adapter active)."""
    from peft.tuners.lora import LoraLayer

    from reference.run import BASE_PREFIX, run_reference

    if target <= 0:
        raise ValueError(f"--adapter-scale {target}: must be > 0")
    base_reqs = [dataclasses.replace(r, adapter=None) for r in requests]
    caps = run_reference(peft_model, arch, config, base_reqs, "single", device, dtype).captures
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        key = name.removeprefix(BASE_PREFIX)
        ins = [c[key]["in"] for c in caps if key in c and "in" in c[key]]
        if not ins:
            continue  # a module no request reaches (e.g. an unused layer): left as drawn
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in ins]).float().to(execution_device(mod.get_base_layer()))
        base_rms = mod.get_base_layer()(x.to(mod.get_base_layer().weight.dtype)).float().pow(2).mean().sqrt()
        for adapter in mod.lora_A:
            A, B = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
            delta_rms = ((x @ A.float().T) @ B.float().T * mod.scaling[adapter]).pow(2).mean().sqrt()
            if delta_rms > 0 and base_rms > 0:
                B.mul_((target * base_rms / delta_rms).to(B.dtype))


def add_adapters(model: torch.nn.Module, arch: ArchSpec, specs: Sequence[AdapterSpec]):
    """Wrap `model` in a PeftModel holding every spec as a named adapter (random non-zero weights)."""
    from peft import get_peft_model

    if not specs:
        raise ValueError("at least one adapter spec is needed")
    peft_model = None
    for spec in specs:
        cfg = lora_config(arch, spec)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=spec.name)
        else:
            peft_model.add_adapter(spec.name, cfg)
        _materialize(peft_model)
        randomize(peft_model, spec.name, spec.seed)
    peft_model.eval()
    return peft_model


def save_adapters(peft_model, folder: str | Path) -> dict[str, Path]:
    """One PEFT folder per adapter (adapter_config.json + adapter_model.safetensors)."""
    folder = Path(folder)
    out = {}
    for name in peft_model.peft_config:
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(target), selected_adapters=[name], safe_serialization=True)
        nested = target / name  # PEFT nests non-"default" adapters one level down
        if nested.is_dir():
            for f in nested.iterdir():
                f.replace(target / f.name)
            nested.rmdir()
        out[name] = target
    return out


# "-" stands for "no adapter" in the layer table (layers.csv); an empty name cannot be told from none either
RESERVED_NAMES = ("", "-")


def check_adapter_name(name) -> None:
    if not isinstance(name, str) or name in RESERVED_NAMES or name.strip() != name:
        raise ValueError(f"adapter name {name!r} is reserved or blank ('-' and '' mean no adapter in layers.csv; "
                         f"no surrounding spaces): choose another")


def load_adapters(model: torch.nn.Module, folders: Mapping[str, str | Path]):
    """Load PEFT-saved adapters (any PEFT, not only ours) onto `model` after a clear-error pre-check.

    An adapter saved under module names the model converts (transformers 4.x names: `read_adapter` renames
    them with the model class's own key conversion) is loaded from a renamed copy: PEFT 0.21 renames the
    tensors on load too, but not `target_modules`, and it drops LLaVA's `multi_modal_projector` tensors
    (its undo-a-prefix-rename rule fires on them) with no error. Either way, `check_loaded` then verifies that
    PEFT holds every module of the file with the file's tensors and scale, so a dropped tensor is an error,
    not a module both sides skip."""
    from peft import PeftModel

    if not folders:
        raise ValueError("no adapter folders given")
    for name in folders:
        check_adapter_name(name)
    adapters = {name: read_adapter(folder, model) for name, folder in folders.items()}
    for adapter in adapters.values():
        check_against_model(adapter, model)
    offloaded = bool(set((getattr(model, "hf_device_map", None) or {}).values()) & {"cpu", "disk"})
    peft_model = None
    with tempfile.TemporaryDirectory(prefix="mmlora-adapter-") as tmp:
        sources = {name: renamed_copy(adapters[name], Path(tmp) / name) if adapters[name].renamed else Path(folder)
                   for name, folder in folders.items()}
        if offloaded:
            peft_model = _load_offloaded(model, sources, folders)
        else:
            for name, folder in folders.items():
                try:
                    if peft_model is None:
                        peft_model = PeftModel.from_pretrained(model, str(sources[name]), adapter_name=name,
                                                               is_trainable=False)
                    else:
                        peft_model.load_adapter(str(sources[name]), adapter_name=name, is_trainable=False)
                except (ValueError, RuntimeError, KeyError) as e:
                    raise _could_not_load(name, folder, e) from None
    peft_model.eval()
    for name, adapter in adapters.items():
        check_loaded(peft_model, name, adapter)
    return peft_model


def renamed_copy(adapter: AdapterFile, folder: Path) -> Path:
    """The adapter under the model's module names, as a PEFT folder: every tensor key renamed, and
    `target_modules` the exact list of the file's modules (a regex written for the old names cannot be renamed;
    a module it matched that holds no tensor would only get PEFT's zero-B init). rank / alpha patterns become
    exact per-module entries, resolved on the names the file holds."""
    from safetensors.torch import save_file


    cfg = dict(adapter.config)
    ranks, alphas = {}, {}
    for new in adapter.modules:
        old = adapter.renamed.get(new, new)
        r = pattern_value(cfg.get("rank_pattern"), old, cfg["r"])
        alpha = pattern_value(cfg.get("alpha_pattern"), old, cfg["lora_alpha"])
        if r != cfg["r"]:
            ranks[re.escape(new)] = r
        if alpha != cfg["lora_alpha"]:
            alphas[re.escape(new)] = alpha
    cfg.update(target_modules=sorted(adapter.modules), rank_pattern=ranks, alpha_pattern=alphas,
               layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {}
    for new, w in adapter.modules.items():
        tensors[f"{BASE_PREFIX}{new}.lora_A.weight"] = w.A.contiguous()
        tensors[f"{BASE_PREFIX}{new}.lora_B.weight"] = w.B.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def _same(loaded: torch.Tensor, saved: torch.Tensor) -> bool:
    # compared at the lower of the two precisions: PEFT may hold the adapter in the model's dtype
    if loaded.shape != saved.shape:
        return False
    low = loaded.dtype if loaded.element_size() < saved.element_size() else saved.dtype
    return torch.equal(loaded.detach().cpu().to(low), saved.to(low))


def check_loaded(peft_model, name: str, adapter: AdapterFile) -> None:
    """PEFT holds adapter `name` on exactly the modules the file holds, with the file's A, B and scale (a module
    adapted beyond the file must have B = 0, PEFT's init). PEFT ignores a tensor it finds no module for."""
    from peft.tuners.lora import LoraLayer

    loaded = {n.removeprefix(BASE_PREFIX): mod for n, mod in peft_model.named_modules()
              if isinstance(mod, LoraLayer) and name in mod.lora_A}
    missing = sorted(set(adapter.modules) - set(loaded))
    if missing:
        raise ValueError(f"PEFT did not load module {missing[0]!r} of adapter {name!r} from {str(adapter.path)!r} "
                         f"({len(missing)} of its {len(adapter.modules)} modules missing)")
    for module, w in adapter.modules.items():
        mod = loaded[module]
        for what, saved, held in (("lora_A", w.A, mod.lora_A[name].weight), ("lora_B", w.B, mod.lora_B[name].weight)):
            if not _same(held, saved):
                raise ValueError(f"PEFT holds adapter {name!r} module {module!r} with a {what} that is not the "
                                 f"file's ({str(adapter.path)!r})")
        if not math.isclose(mod.scaling[name], w.scale, rel_tol=1e-12):
            raise ValueError(f"PEFT scales adapter {name!r} module {module!r} by {mod.scaling[name]}, the file's "
                             f"config gives {w.scale}")
    extra = sorted(n for n in set(loaded) - set(adapter.modules) if loaded[n].lora_B[name].weight.any())
    if extra:
        raise ValueError(f"PEFT adapts module {extra[0]!r} with adapter {name!r} beyond the file "
                         f"{str(adapter.path)!r}, with non-zero weights")


def _could_not_load(name: str, folder, e: Exception) -> ValueError:
    """PEFT's exception as one line naming the adapter and the folder the user gave."""
    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return ValueError(f"PEFT could not load adapter {name!r} from {str(folder)!r}: {first.strip()}")


def _load_offloaded(model: torch.nn.Module, folders: Mapping[str, str | Path], shown: Mapping[str, str | Path]):
    """PEFT 0.21's loader re-dispatches a model offloaded to CPU / disk and fails on it (KeyError on a module of
    the device map): the adapters are added as `get_peft_model` does (weights made on each module's execution
    device) and their tensors loaded with PEFT's own `set_peft_model_state_dict`. `shown`: the folders the user
    gave, named in errors (`folders` may be renamed copies in a temporary folder)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    peft_model = None
    for name, folder in folders.items():
        try:
            cfg = LoraConfig.from_pretrained(str(folder))
            cfg.inference_mode = True
            if peft_model is None:
                peft_model = get_peft_model(model, cfg, adapter_name=name)
            else:
                peft_model.add_adapter(name, cfg)
            _materialize(peft_model)
            res = set_peft_model_state_dict(peft_model, load_file(str(Path(folder) / "adapter_model.safetensors")),
                                            adapter_name=name)
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise _could_not_load(name, shown[name], e) from None
        missing = [k for k in res.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
        if res.unexpected_keys or missing:
            what = (res.unexpected_keys or missing)[0]
            raise ValueError(f"adapter {name!r} from {str(shown[name])!r} does not fit the model: tensor {what!r}")
    peft_model.eval()
    return peft_model
