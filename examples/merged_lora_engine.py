"""An example engine for `mmlora compare REF GOT`, written from docs/bundles.md and docs/rows.md alone.

It reads a reference bundle, loads the checkpoint with plain transformers, and for each request merges that
request's LoRA adapter into the base Linear weights (W + scale * B @ A), runs the request's recorded inputs
alone, captures every module the reference lists (plus the `@` boundaries) with forward hooks, and restores
the weights. It writes an output ("GOT") bundle the harness judges.

It imports nothing of the harness on purpose: it shows what an outside engine has to do, and every place
where the spec left it to guess is marked `SPEC GAP:`.

    python examples/merged_lora_engine.py REF OUT [--seeded-bug reuse-adapter]

`--seeded-bug reuse-adapter` runs request 1 with request 0's adapter: a wrong engine, for the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForImageTextToText

ENGINE_NAME = "merged-lora-example"
ENGINE_VERSION = "1"

# SPEC GAP: bundles.md lists the reference manifest's `dtype` key but not its values; the recorded bundles
# say "fp32" / "bf16" and each module entry says "float32" / "bfloat16", so both spellings are accepted.
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp64": torch.float64, "float64": torch.float64,
}

# `@tower_out` is the input of the connector's first Linear (or first pooled module), per arch (rows.md).
# SPEC GAP: the reference manifest does not name that module; an engine has to carry rows.md's table keyed
# by the manifest's `arch` (which rows.md names by the registry's arch names, e.g. `llava`, `qwen2_vl`).
TOWER_OUT_MODULE = {
    "llava": "model.multi_modal_projector.linear_1",
    "llava_next": "model.multi_modal_projector.linear_1",
    "llama4": "vision_model.vision_adapter.mlp.fc1",
    "internvl": "model.multi_modal_projector.linear_1",
    "idefics3": "model.connector.modality_projection.proj",
    "gemma3": "model.multi_modal_projector.mm_soft_emb_norm",
    "qwen2_vl": "model.visual.merger.mlp.0",
    "qwen2_5_vl": "model.visual.merger.mlp.0",
    "qwen3_vl": "model.visual.merger.linear_fc1",
    "mistral3": "model.multi_modal_projector.patch_merger.merging_layer",
    "gemma4": "model.embed_vision",
    "paligemma": "model.multi_modal_projector.linear",
}


class BundleError(Exception):
    """A reference bundle or adapter this engine cannot replay: one line, exit 2."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inside(folder: Path, rel: str) -> Path:
    # bundles.md: files must lie inside the bundle folder; refuse anything that leaves it.
    path = (folder / rel).resolve()
    if folder.resolve() not in path.parents and path != folder.resolve():
        raise BundleError(f"{rel!r} lies outside the bundle {folder}")
    return path


def load_model(ckpt: Path, dtype: torch.dtype, device: str):
    config = AutoConfig.from_pretrained(ckpt, trust_remote_code=False)
    model = AutoModelForImageTextToText.from_pretrained(
        ckpt, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    # SPEC GAP: the spec does not say which attention implementation the reference ran (eager, sdpa);
    # transformers' default is kept, and compare's tolerances are trusted to cover the difference.
    return model.to(device).eval()


def key_converter(model):
    """Map a checkpoint-layout (4.x) tensor key to the loaded model's key, as rows.md says the harness does
    (transformers' `get_model_conversion_mapping`). Returns identity where transformers lacks the API."""
    try:
        from transformers.conversion_mapping import (
            WeightConverter,
            WeightRenaming,
            get_model_conversion_mapping,
        )
        from transformers.core_model_loading import rename_source_key
    except ImportError:  # an older transformers: names are taken as they are
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()

    def convert(key: str) -> str:
        return rename_source_key(key, renamings, converters, model.base_model_prefix, meta)[0]

    return convert


def pattern_value(pattern: dict, name: str, default):
    # PEFT's rule for rank_pattern / alpha_pattern: a key matches a module name that ends with it (at a dot
    # boundary), the key read as a regex.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(folder: Path, model, modules: dict, convert) -> dict[str, torch.Tensor]:
    """{module name: scale * B @ A} in float64, from a PEFT LoRA folder."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise BundleError(f"{folder}: peft_type {cfg.get('peft_type')!r}, this engine merges LoRA only")
    # Variants whose merge is not W + scale * B @ A: refused rather than merged wrongly.
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if cfg.get(flag):
            raise BundleError(f"{folder}: {flag} is set; this engine merges plain LoRA only")
    if cfg.get("target_parameters"):
        raise BundleError(f"{folder}: target_parameters (LoRA on parameters) is not merged by this engine")
    r_default, alpha_default = cfg["r"], cfg["lora_alpha"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    tensors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as f:
        for key in f.keys():
            m = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key)
            if m is None:
                raise BundleError(f"{folder}: tensor {key!r} is not a LoRA A/B weight")
            tensors.setdefault(m.group(1), {})[m.group(2)] = f.get_tensor(key)

    deltas = {}
    for peft_name, ab in tensors.items():
        name = peft_name
        if name not in modules:
            # SPEC GAP: rows.md says engines that load by tensor name apply the model's key conversion; it
            # does not say whether adapters may carry 4.x names, nor which name the pattern keys are
            # matched against. Converted here only when the name is not already a module, and patterns
            # are matched against the adapter's own (PEFT) name, as PEFT does when it loads it.
            name = convert(name + ".weight").removesuffix(".weight")
        if name not in modules:
            raise BundleError(f"{folder}: adapter module {peft_name!r} is not a module of the model")
        a, b = ab["lora_A"].double(), ab["lora_B"].double()
        r = pattern_value(rank_pattern, peft_name, r_default)
        alpha = pattern_value(alpha_pattern, peft_name, alpha_default)
        if a.shape[0] != r:
            raise BundleError(f"{folder}: {peft_name} has rank {a.shape[0]}, the config says {r}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        deltas[name] = scale * (b @ a)
    return deltas


class Capture:
    """Forward hooks on the reference's modules; `take()` hands one request's rows per module."""

    def __init__(self, model, manifest: dict):
        self.modules = dict(model.named_modules())
        self.calls: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        self.arch = manifest["arch"]
        self.image_positions: torch.Tensor | None = None
        for entry in manifest["modules"]:
            name = entry["name"]
            if name.startswith("@"):
                continue
            if name not in self.modules:
                raise BundleError(f"module {name!r} of the reference is not a module of the loaded model")
            module = self.modules[name]
            self.handles.append(module.register_forward_hook(self._out_hook(name)))
            # SPEC GAP: bundles.md leaves `kind` undefined; "lora" modules are the ones the reference wrote
            # `in.<i>` for, so their input is written too (the LoRA delta is then judged through it).
            if entry.get("kind") == "lora":
                self.handles.append(module.register_forward_pre_hook(self._in_hook(name), with_kwargs=True))
        names = {e["name"] for e in manifest["modules"]}
        if "@tower_out" in names:
            connector = TOWER_OUT_MODULE.get(self.arch)
            if connector is None or connector not in self.modules:
                raise BundleError(f"no @tower_out module known for arch {self.arch!r} (rows.md)")
            self.handles.append(self.modules[connector].register_forward_pre_hook(self._in_hook("@tower_out"), with_kwargs=True))
        if "@lm_image_embeds" in names:
            root = self.lm_root()
            self.handles.append(root.register_forward_pre_hook(self._embeds_hook, with_kwargs=True))

    def lm_root(self):
        # SPEC GAP: rows.md says "pre-hook on the LM root" but names no module; taken as the shallowest
        # module named `language_model` (`model.language_model` in 5.x classes, `language_model` on Llama 4),
        # which HF calls with `inputs_embeds` after scattering the image rows.
        candidates = sorted((n for n in self.modules if n.split(".")[-1] == "language_model"), key=len)
        if not candidates:
            raise BundleError("no language_model module to take @lm_image_embeds from")
        return self.modules[candidates[0]]

    def _record(self, name, tensor):
        if isinstance(tensor, (tuple, list)):
            tensor = tensor[0]
        if hasattr(tensor, "last_hidden_state"):
            tensor = tensor.last_hidden_state
        # bundles.md: all calls of a module concatenated, any leading shape flattened. Cloned: HF adds into
        # some outputs in place after the hook ran (Llama 4's MoE adds the routed experts into the shared
        # expert's down_proj output), so a view would record the sum.
        self.calls.setdefault(name, []).append(tensor.detach().reshape(-1, tensor.shape[-1]).clone().cpu())

    def _out_hook(self, name):
        def hook(module, args, output):
            self._record(name, output)

        return hook

    def _in_hook(self, name):
        key = name if name.startswith("@") else "in:" + name

        def hook(module, args, kwargs):
            if args:
                self._record(key, args[0])
                return None
            # Some HF modules are called by keyword (Gemma 4's `embed_vision(inputs_embeds=...)`).
            # SPEC GAP: "the module's input" is not defined for a keyword call; the first tensor keyword
            # is taken.
            tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
            if not tensors:
                raise BundleError(f"{name}: called without a tensor input to record")
            self._record(key, tensors[0])
            return None

        return hook

    def _embeds_hook(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise BundleError("the language model was not called with inputs_embeds")
        # rows.md: the rows at the image token's positions, in prompt order. One request per forward, so
        # batch row 0. SPEC GAP: the image token id is taken from the config (`image_token_id` or
        # `image_token_index`); the spec does not say which key, nor how video tokens count.
        rows = embeds[0][self.image_positions.to(embeds.device)]  # boolean indexing copies
        self.calls.setdefault("@lm_image_embeds", []).append(rows.detach().cpu())
        return None

    def take(self) -> dict[str, torch.Tensor]:
        got = {name: torch.cat(parts) for name, parts in self.calls.items()}
        self.calls = {}
        return got

    def remove(self):
        for handle in self.handles:
            handle.remove()


def image_token_id(config) -> int | None:
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None:
            return value
    return None


def run(ref: Path, out: Path, seeded_bug: str | None) -> None:
    manifest_bytes = (ref / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    if manifest.get("format") != "mmlora-bundle" or manifest.get("kind") != "reference":
        raise BundleError(f"{ref} is not a reference bundle")
    dtype = DTYPES.get(manifest["dtype"])
    if dtype is None:
        raise BundleError(f"run dtype {manifest['dtype']!r} is not known to this engine")
    # SPEC GAP: the manifest's `device` is where the reference ran; the spec does not say an engine must
    # match it. CUDA is used when the reference ran there and it is available, else the CPU.
    device = "cuda" if str(manifest.get("device", "cpu")).startswith("cuda") and torch.cuda.is_available() else "cpu"
    ckpt = inside(ref, manifest["checkpoint"]["path"])
    model = load_model(ckpt, dtype, device)
    modules = dict(model.named_modules())
    convert = key_converter(model)
    token_id = image_token_id(model.config)

    adapters: dict[str, dict[str, torch.Tensor]] = {}

    def adapter(name):
        if name not in adapters:
            entry = manifest["adapters"].get(name)
            if entry is None:
                raise BundleError(f"adapter {name!r} is not in the reference's adapters")
            adapters[name] = load_adapter(inside(ref, entry["path"]), model, modules, convert)
        return adapters[name]

    capture = Capture(model, manifest)
    requests = manifest["requests"]
    # Everything is held until the end: fine for the tiny models this example is for. A real engine would
    # write per module as the spec's memory note suggests.
    got: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for i, request in enumerate(requests):
            name = request["adapter"]
            if seeded_bug == "reuse-adapter" and i == 1:
                name = requests[0]["adapter"]  # the seeded bug: request 1 runs with request 0's adapter
            deltas = adapter(name) if name is not None else {}
            saved = {}
            inputs = {}
            with safe_open(inside(ref, request["file"]), framework="pt") as f:
                for key in f.keys():
                    inputs[key] = f.get_tensor(key).to(device)
            ids = inputs["input_ids"]
            capture.image_positions = (ids[0] == token_id) if token_id is not None else torch.zeros_like(ids[0], dtype=torch.bool)
            try:
                with torch.no_grad():
                    for mod_name, delta in deltas.items():
                        weight = modules[mod_name].weight
                        saved[mod_name] = weight.detach().clone()
                        # Merged in float64 and rounded once to the run dtype: the merged weight is the
                        # closest the run dtype holds to W + scale * B @ A.
                        weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
                    try:
                        output = model(**inputs, use_cache=False)
                    except RuntimeError as e:
                        # Plain HF can fail where the reference applied a fix (the manifest's `fixes`,
                        # docs/upstream-bugs.md): said in one line, not worked around.
                        fixes = ", ".join(manifest.get("fixes") or []) or "none"
                        raise BundleError(
                            f"request {i}: the HF forward failed ({str(e).splitlines()[0]}); "
                            f"the reference's fixes: {fixes}"
                        ) from e
            finally:
                with torch.no_grad():
                    for mod_name, weight in saved.items():
                        modules[mod_name].weight.copy_(weight)
            rows = capture.take()
            rows["@logits"] = output.logits[0].detach().reshape(-1, output.logits.shape[-1]).cpu()
            for entry in manifest["modules"]:
                mod = entry["name"]
                file = got.setdefault(mod, {})
                if mod in rows and rows[mod].shape[0]:
                    file[f"out.{i}"] = rows[mod].contiguous()
                    if f"in:{mod}" in rows:
                        file[f"in.{i}"] = rows[f"in:{mod}"].contiguous()
    finally:
        capture.remove()

    write_bundle(out, manifest, sha256_bytes(manifest_bytes), got, modules)


def write_bundle(out: Path, manifest: dict, ref_sha: str, got: dict, modules: dict) -> None:
    if out.exists():
        raise BundleError(f"{out} exists; this engine writes a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    # bundles.md: written into a temporary sibling and renamed when complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "modules").mkdir()
        entries = []
        n = len(manifest["requests"])
        for k, entry in enumerate(manifest["modules"]):
            name = entry["name"]
            tensors = got.get(name, {})
            rel = f"modules/{k:04d}.safetensors"
            save_file(tensors, str(tmp / rel))
            rows = [tensors[f"out.{i}"].shape[0] if f"out.{i}" in tensors else 0 for i in range(n)]
            if tensors:
                features = next(t for key, t in tensors.items() if key.startswith("out.")).shape[-1]
            elif hasattr(modules.get(name), "out_features"):
                features = modules[name].out_features
            else:
                # SPEC GAP: a module with no rows in any request has no measured last dimension; the spec
                # does not say what `features` should hold then, so the reference's value is copied.
                features = entry["features"]
            entries.append({"name": name, "file": rel, "rows": rows, "features": int(features)})
        got_manifest = {
            "format": "mmlora-bundle",
            "version": 3,
            "reference": ref_sha,
            "engine": {"name": ENGINE_NAME, "version": ENGINE_VERSION},
            "requests": manifest["requests"],
            "modules": entries,
        }
        (tmp / "manifest.json").write_text(json.dumps(got_manifest, indent=1))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", type=Path, help="reference bundle folder (mmlora record)")
    parser.add_argument("out", type=Path, help="output bundle folder to write (must not exist)")
    parser.add_argument("--seeded-bug", choices=["reuse-adapter"], help="run a deliberately wrong engine")
    args = parser.parse_args(argv)
    try:
        run(args.ref, args.out, args.seeded_bug)
    except BundleError as e:
        print(f"merged_lora_engine: {e}", file=sys.stderr)
        return 2
    print(f"merged_lora_engine: output bundle in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
