"""Checkpoint and adapter tensor names as vLLM 0.32 reads them, where transformers 5 saves another layout.

LLaVA-NeXT, LLaVA, PaliGemma and Gemma 3 (SigLIP): transformers 5's CLIP vision model has no `vision_model.` level, and its save keeps that (the
checkpoint holds `vision_tower.embeddings...`, a PEFT adapter `model.vision_tower.encoder...`); vLLM 0.32's
CLIPVisionModel, like the published llava-hf checkpoints (saved by transformers 4), has `vision_model.`. Without
the rename vLLM refuses the checkpoint ("no module or parameter named 'vision_tower.embeddings'") and loads such an
adapter without an error while applying none of its tower LoRA (its names match no vLLM module; vLLM checks only
the suffixes). This module writes renamed copies (the project's rename, not vLLM's) in a work folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

# model_type -> (checkpoint key prefix, renamed), (adapter module prefix after base_model.model., renamed)
_CLIP = (("vision_tower.", "vision_tower.vision_model."), ("model.vision_tower.", "model.vision_tower.vision_model."))
# PaliGemma's and Gemma 3's SigLIP towers: the same missing `vision_model.` level (vLLM's SiglipVisionModel has it)
RENAMES = {"llava_next": _CLIP, "llava": _CLIP, "paligemma": _CLIP, "gemma3": _CLIP}


def _rename(d: dict, old: str, new: str, strip: str = "") -> dict:
    out = {}
    for k, v in d.items():
        body = k[len(strip):] if k.startswith(strip) else None
        if body is not None and body.startswith(old) and not body.startswith(new):
            k = strip + new + body[len(old):]
        out[k] = v
    return out


def renamed_copy(folder: Path, work: Path, old: str, new: str, strip: str = "") -> Path:
    """`folder` (a checkpoint or a PEFT adapter) copied to `work` with every *.safetensors key renamed."""
    work.mkdir(parents=True)
    for p in folder.iterdir():
        if p.suffix == ".safetensors":
            save_file(_rename(load_file(str(p)), old, new, strip), str(work / p.name), metadata={"format": "pt"})
        elif p.is_file():
            shutil.copy(p, work / p.name)
    return work


def for_vllm(model_type: str, ckpt: Path, adapters: dict[str, Path], work: Path,
             rename_adapters: bool = True) -> tuple[Path, dict[str, Path], list[str]]:
    """(checkpoint, adapters, notes) as vLLM reads them; unchanged for an arch without renames."""
    if model_type not in RENAMES:
        return ckpt, adapters, []
    (c_old, c_new), (a_old, a_new) = RENAMES[model_type]
    notes = [f"checkpoint keys {c_old}* renamed {c_new}* (transformers 5's layout -> vLLM's / transformers 4's)"]
    ckpt = renamed_copy(ckpt, work / "checkpoint", c_old, c_new)
    if rename_adapters:
        adapters = {n: renamed_copy(p, work / "adapters" / n, a_old, a_new, "base_model.model.")
                    for n, p in adapters.items()}
        notes.append(f"adapter modules {a_old}* renamed {a_new}*")
    else:
        notes.append(f"adapters as saved: their {a_old}* modules match no vLLM module (vLLM applies none of them)")
    return ckpt, adapters, notes
