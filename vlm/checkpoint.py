"""Model sources shared by reference and runtime: a tiny random model from the registry's config, or a local checkpoint folder.

Checkpoints load offline, from safetensors only, never with remote code; a missing or mis-shaped tensor
is an error (transformers would otherwise leave it randomly initialised with a warning).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import torch

from vlm.arch import ArchSpec, apply_overrides, get_arch
from vlm.files import check_safetensors, read_json

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(device: str) -> torch.device:
    dev = torch.device(device) if device in ("cpu", "cuda") or device.startswith("cuda:") else None
    if dev is None:
        raise ValueError(f"unknown device {device!r}; expected cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return dev


DEVICE_MAPS = ("auto", "balanced")
_SIZE = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)


def parse_device_map(value: str | None) -> str | dict | None:
    """`--device-map`: `auto` / `balanced` (accelerate places the model over the GPUs, then CPU, then disk) or a
    JSON file mapping module names to a device (`0`, `"cuda:1"`, `"cpu"`, `"disk"`)."""
    if value is None or value in DEVICE_MAPS:
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--device-map {value!r}: neither {' nor '.join(DEVICE_MAPS)} nor a readable file")
    try:
        dm = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--device-map {value!r}: not a JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(dm, dict) or not dm or not all(
            isinstance(k, str) and (isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)))
            for k, v in dm.items()):
        raise ValueError(f"--device-map {value!r}: expected a JSON object of module name -> device")
    return dm


def parse_max_memory(value: str | None) -> dict | None:
    """`--max-memory 0=70GiB,1=70GiB,cpu=100GiB`: the most accelerate may place on each device."""
    if value is None:
        return None
    out: dict = {}
    for part in value.split(","):
        dev, sep, size = (s.strip() for s in part.partition("="))
        if not sep or not _SIZE.fullmatch(size) or not (dev.isdigit() or dev in ("cpu", "disk", "mps")):
            raise ValueError(f"--max-memory {value!r}: expected DEVICE=SIZE[,DEVICE=SIZE...] with DEVICE a GPU index, "
                             f"cpu or disk and SIZE like 70GiB, not {part.strip()!r}")
        out[int(dev) if dev.isdigit() else dev] = size.replace(" ", "")
    return out


def build_tiny(arch: ArchSpec | str, overrides: dict | None = None, seed: int = 0) -> tuple[Any, torch.nn.Module]:
    """Random-init model from the registry's tiny config; the seed makes the weights reproducible."""
    arch = get_arch(arch) if isinstance(arch, str) else arch
    cfg = apply_overrides(arch.tiny_config(), overrides or {})
    torch.manual_seed(seed)
    model = arch.model_class()(cfg).eval()
    arch.randomize_tiny(model)
    return cfg, model


def save_checkpoint(model: torch.nn.Module, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def read_checkpoint_config(folder: str | Path) -> tuple[ArchSpec, dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"checkpoint folder {str(folder)!r} has no config.json")
    raw = read_json(cfg_path, "checkpoint config")
    if not isinstance(raw, dict):
        raise ValueError(f"{str(cfg_path)!r} is a JSON {type(raw).__name__}, not an object of config keys")
    model_type = raw.get("model_type")
    if model_type is None:
        raise ValueError(f"{str(cfg_path)!r} has no model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{str(cfg_path)!r}: model_type={model_type!r} is not a string")
    arch = get_arch(model_type)
    if not isinstance(raw.get("vision_config"), dict):
        raise ValueError(f"{str(cfg_path)!r} (model_type {model_type!r}) has no vision_config: not a vision-language model")
    return arch, raw


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", device_map: str | dict | None = None,
                    max_memory: dict | None = None,
                    offload_folder: str | Path | None = None) -> tuple[ArchSpec, Any, torch.nn.Module]:
    """With `device_map` (or `max_memory`, which implies `auto`) accelerate dispatches the model over the devices
    of this machine, disk included (`offload_folder`), instead of moving it to `device`."""
    folder = Path(folder)
    if max_memory is not None and device_map is None:
        device_map = "auto"
    dispatch = {} if device_map is None else {
        "device_map": device_map, "max_memory": max_memory,
        "offload_folder": None if offload_folder is None else str(offload_folder)}
    arch, _ = read_checkpoint_config(folder)
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.glob("*.bin")]
        what = f"only {pickled[0]} (a pickle, refused)" if pickled else "no *.safetensors file"
        raise ValueError(f"checkpoint folder {str(folder)!r} has {what}")
    for f in sorted(folder.glob("*.safetensors")):
        # transformers' error for an empty or cut-short file names neither the file nor the folder
        check_safetensors(f, "checkpoint file")
    try:
        model, info = arch.model_class().from_pretrained(
            folder, dtype=dtype, local_files_only=True, use_safetensors=True, trust_remote_code=False,
            output_loading_info=True,
            # let transformers report a mis-shaped tensor by name (we refuse it below) instead of its
            # generic "look at the above report" error
            ignore_mismatched_sizes=True, **dispatch,
        )
    except (RuntimeError, OSError, ValueError) as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ValueError(f"checkpoint {str(folder)!r} does not load: {first.strip()}") from None
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if mismatched:
        first = mismatched[0]
        detail = f"{first[0]!r} has shape {tuple(first[1])}, the model needs {tuple(first[2])}" \
            if isinstance(first, tuple | list) and len(first) == 3 else f"{first!r} has the wrong shape"
        raise ValueError(f"checkpoint {str(folder)!r}: tensor {detail}")
    if missing:
        raise ValueError(f"checkpoint {str(folder)!r} is missing tensor {sorted(missing)[0]!r} ({len(missing)} missing)")
    return arch, model.config, (model if dispatch else model.to(device)).eval()


def shared_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree of `model` over the very same parameter and buffer tensors (no copy): the runtime
    swaps its own modules into the twin while the reference wraps the original, and both read one set of
    weights. Anything that must change a weight (quantization) replaces that Parameter in its own tree."""
    import copy

    memo = {id(t): t for _, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                                 model.named_buffers(remove_duplicate=False))}
    return copy.deepcopy(model, memo)
