"""Audit of vLLM's tower/connector LoRA token-count helpers against this registry's measured rows (issue #23).

vLLM's `--enable-tower-connector-lora` builds, per image, a tower mapping of `tower` copies of the request's
adapter id and a connector mapping of `connector` copies, from the model class's own count helper. A count
that is short shifts each image's last rows onto the next image's adapter and leaves the step's last rows with
no LoRA (measured with vLLM's kernels by `mmlora vllm-engine --punica gpu`); one that is long runs indices past
the rows and shifts every later image of the batch. The registry's `counts()` is held to the rows hooks measure on the real HF
models (suites/properties), so it is the truth the helpers are compared with here.

The helpers are called on a minimal instance, not a built model: `object.__new__(cls)` plus the attributes the
helpers read (`config`: the HF config, as vLLM's `self.config`; `multimodal_config`: the processor kwargs the
run would pass). A helper that reads anything else fails with that attribute's name in the table.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from harness.geometry_flags import geometry_text

NOX_SESSION = "nox -s vllm_towers --install-only (see its docstring for the torch/torchvision pair)"
DRAWS = 4  # drawn geometries per config on top of the arch's mixed ones


class VllmMissing(RuntimeError):
    pass


@dataclass
class AuditRow:
    model_type: str
    vllm_class: str
    helper: str
    tried: int = 0
    configs: int = 0
    # group -> the first disagreement in that group: config, geometry, vllm, measured, lm_tokens
    disagreements: dict[str, dict] = field(default_factory=dict)
    note: str = ""
    latent: tuple[str, ...] = ()  # groups the registry has no LoRA target in: a wrong count there acts on nothing

    @property
    def agree(self) -> bool:
        return not self.note and not self.disagreements

    @property
    def result(self) -> str:
        if self.note:
            return self.note
        if not self.disagreements:
            return "agree"
        return "; ".join(f"{g} DISAGREES at {d['config']} {d['geometry']} (lm_tokens {d['lm_tokens']}): vLLM "
                         f"{d['vllm']}, measured {d['measured']}" for g, d in self.disagreements.items())

    @property
    def run_time(self) -> str:
        return "; ".join(effect(g, d["vllm"], d["measured"]) + (" (latent: the registry has no LoRA target in the "
                                                                 f"{g})" if g in self.latent else "")
                         for g, d in self.disagreements.items())


def import_vllm():
    """vLLM's model registry, or VllmMissing naming why it does not import."""
    try:
        import vllm
        from vllm.model_executor.models import registry
    except Exception as e:  # noqa: BLE001 - whatever stops the import is the reason to print
        raise VllmMissing(f"vLLM's model modules do not import: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]}; install them with {NOX_SESSION}") from e
    return vllm, registry


def vllm_class(registry, hf_class_name: str):
    """The vLLM class serving an HF architecture name, or None. `_VLLM_MODELS` (arch -> (module, class)) is
    the table vLLM's own ModelRegistry is built from; importing the module is what vLLM does lazily."""
    entry = registry._VLLM_MODELS.get(hf_class_name)
    if entry is None:
        return None
    module, cls_name = entry[0], entry[1]
    return getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), cls_name)


def support(cls) -> tuple[bool, str]:
    """(declares tower/connector LoRA, which helper and how it was decided). vLLM with the class flag: the
    flag decides. Before it, a mixin gave every class the helpers, so `hasattr` says nothing: such a version is
    audited on every class that has them, and the table says so."""
    if hasattr(cls, "supports_tower_connector_lora"):
        if not cls.supports_tower_connector_lora:
            return False, "flag False"
        if hasattr(cls, "get_mm_lora_token_counts"):
            return True, "get_mm_lora_token_counts (flag)"
        return True, "get_num_mm_encoder/connector_tokens (flag)"
    if hasattr(cls, "get_num_mm_encoder_tokens"):
        return True, "get_num_mm_encoder/connector_tokens (no flag in this vLLM)"
    return False, "no flag, no helpers"


def minimal_instance(cls, arch, config):
    config = vllm_config_fields(arch, config)
    obj = object.__new__(cls)
    # set in __dict__ directly: nn.Module.__setattr__ needs the module state __init__ would have made
    obj.__dict__["config"] = config
    obj.__dict__["multimodal_config"] = SimpleNamespace(mm_processor_kwargs=processor_kwargs(arch, config))
    return obj


def vllm_config_fields(arch, config):
    """Config fields vLLM's helper reads that the installed transformers' config class no longer defines.
    Gemma 4: `vision_config.default_output_length` (a real checkpoint's config.json carries it; transformers 5.25's
    config class does not define it). The tiny config's image budget is the harness's `max_soft_tokens`: set to that,
    on a copy (the registry's config is left as it is)."""
    if arch.model_type == "gemma4" and not hasattr(config.vision_config, "default_output_length"):
        import copy

        config = copy.deepcopy(config)
        config.vision_config.default_output_length = arch.max_soft_tokens(config)
    return config


def processor_kwargs(arch, config) -> dict | None:
    # Gemma 4: the image budget is a processor setting (the harness keeps it on vision_config); a run that
    # is not on vLLM's default passes it as --mm-processor-kwargs, which the helper reads
    if arch.model_type == "gemma4":
        return {"max_soft_tokens": arch.max_soft_tokens(config)}
    return None


def mm_kwargs_item(arch, config, geom):
    """The per-image kwargs vLLM's processor would hand the helper, from the harness's one-image request: each
    pixel input under its HF key. For one image these are the item's own tensors (llava_next: its tiles,
    tiles x 3 x S x S, as vLLM's flat per-image `pixel_values`)."""
    from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem, MultiModalKwargsItem

    from vlm.requests import build_batch, make_request

    batch = build_batch(arch, config, [make_request(arch, config, [geom], None, seed=0)])
    return MultiModalKwargsItem({k: MultiModalFieldElem(data=v, field=MultiModalBatchedField())
                                 for k, v in batch.pixel_inputs.items()})


def vllm_counts(obj, helper: str, arch, config, geom, lm_tokens: int) -> tuple[Any, Any]:
    if helper.startswith("get_mm_lora_token_counts"):
        return obj.get_mm_lora_token_counts(modality="image", mm_kwargs=mm_kwargs_item(arch, config, geom),
                                            num_mm_embeds=lm_tokens)
    tower = obj.get_num_mm_encoder_tokens(lm_tokens)
    return tower, obj.get_num_mm_connector_tokens(tower)


def effect(group: str, got, want: int) -> str:
    if got is None:
        return f"{group}: None, the runner sets no {group} mapping: the {group} runs on the previous (stale) one"
    if got < want:
        return (f"{group}: {want - got} of {want} rows per image get no entry of their own: each image's last rows run "
                f"under the next image's adapter (every later image shifts by {want - got}), the step's last rows past "
                f"the mapping get no LoRA (vLLM's Triton kernels, `mmlora vllm-engine --punica gpu`; its CPU ops raise)")
    return (f"{group}: {got - want} entries past the image's {want} rows: later images' rows take this image's "
            f"adapter, the batch's last entries index past the rows (buffer)")


def configs(arch) -> list[tuple[str, Any]]:
    """The tiny config and the arch's registered variants (other pool ratios, budgets, patch sizes)."""
    from vlm.arch import apply_overrides

    out = [("tiny", arch.tiny_config())]
    for v in arch.config_variants():
        if v:
            out.append((f"tiny+{','.join(f'{k}={x}' for k, x in v.items())}", apply_overrides(arch.tiny_config(), v)))
    return out


def geometries(arch, config, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = list(arch.mixed_geometries(config))
    for _ in range(DRAWS):
        out.append(arch.draw_geometry(config, lambda name, lo, hi: rng.randint(lo, hi)))
    return out


def audit_arch(registry, arch) -> AuditRow:
    try:
        cls = vllm_class(registry, arch.model_class_name)
    except Exception as e:  # noqa: BLE001 - one model module missing a dependency must not hide the others
        return AuditRow(arch.model_type, "-", "-", note=f"vLLM's module does not import: {type(e).__name__}: {e}")
    if cls is None:
        return AuditRow(arch.model_type, "-", "-", note=f"no vLLM class for {arch.model_class_name}")
    declared, helper = support(cls)
    row = AuditRow(arch.model_type, f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}", helper,
                   latent=tuple(g for g in ("tower", "connector") if arch.lora_targets.get(g) is None))
    if not declared:
        row.note = f"not audited: no tower/connector LoRA ({helper})"
        return row
    for cfg_name, config in configs(arch):
        obj = minimal_instance(cls, arch, config)
        row.configs += 1
        for geom in geometries(arch, config):
            want = arch.counts(config, geom)
            try:
                tower, conn = vllm_counts(obj, helper, arch, config, geom, want.lm_tokens)
            except Exception as e:  # noqa: BLE001 - a helper that needs more than config is a finding too
                row.note = f"helper raised at {cfg_name} {geometry_text(geom)}: {type(e).__name__}: {e}"
                return row
            row.tried += 1
            for group, got in (("tower", tower), ("connector", conn)):
                if got != want.rows(group) and group not in row.disagreements:
                    row.disagreements[group] = dict(config=cfg_name, geometry=geometry_text(geom), vllm=got,
                                                    measured=want.rows(group), lm_tokens=want.lm_tokens)
    return row


def run_audit(model_types: list[str] | None = None) -> tuple[str, list[AuditRow]]:
    """(vLLM version, one row per registry arch); raises VllmMissing."""
    vllm, registry = import_vllm()
    from vlm.arch import all_archs

    return vllm.__version__, [audit_arch(registry, a) for a in all_archs()
                              if model_types is None or a.model_type in model_types]


def markdown(version: str, rows: list[AuditRow]) -> str:
    head = (f"vLLM {version}: tower/connector LoRA count helpers vs the registry's measured rows "
            f"(tiny configs and their variants; num_mm_embeds = lm_tokens)\n\n"
            "| model type | vLLM class | helper | geometries (configs) | result | at run time |\n"
            "|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r.model_type} | {r.vllm_class} | {r.helper} | {r.tried} ({r.configs}) | {r.result} | "
                          f"{r.run_time} |\n" for r in rows)
