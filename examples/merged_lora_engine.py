"""An example engine for `mmlora compare REF GOT`, written from docs/bundles.md and docs/rows.md alone.

It reads a reference bundle, loads the checkpoint with plain transformers, and for each request merges that
request's LoRA adapter into the base Linear weights (W + scale * B @ A), runs the request's recorded inputs
alone, captures every module the reference lists (plus the `@` boundaries) with forward hooks, and restores
the weights. It writes an output ("GOT") bundle the harness judges.

It imports nothing of the harness on purpose: it shows what an outside engine has to do. A place where the
spec left it to guess would be marked `SPEC GAP:`; none is left (each was closed by the spec saying it).

    python examples/merged_lora_engine.py REF OUT [--seeded-bug reuse-adapter|pool-by-count|ignore-alpha-pattern]

`--seeded-bug` runs a deliberately wrong engine, for the tests: `reuse-adapter` runs request 1 with request
0's adapter; `pool-by-count` divides a Gemma 4 partial bin by its own patch count instead of k^2 (a plausible
misreading of "average pooling" that bundles.md's "Reference fixes in force" rules out);
`ignore-alpha-pattern` scales every module by the config's lora_alpha, whatever its alpha_pattern says.
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
import types
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForImageTextToText

ENGINE_NAME = "merged-lora-example"
ENGINE_VERSION = "1"

# bundles.md: the reference manifest's `dtype` is the run dtype as `--dtype` spells it.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# bundles.md: the `what` of a boundary's `taken_at`.
INPUT, IMAGE_EMBEDS, OUTPUT_LOGITS = "input", "inputs_embeds at image placeholders", "output logits"


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


def source(folder: Path, path: str) -> Path:
    # bundles.md: the checkpoint's and the adapters' `path` is relative to the bundle where `record` copied
    # them in, or the absolute folder a user's own checkpoint / adapter was given as (their sha256 pins them)
    return Path(path) if Path(path).is_absolute() else inside(folder, path)


def load_model(ckpt: Path, dtype: torch.dtype, device: str, attn_implementation: str | None):
    config = AutoConfig.from_pretrained(ckpt, trust_remote_code=False)
    # bundles.md: the attention the reference ran is the manifest's `attn_implementation`; the same is asked
    # for, so the engine's attention kernel is not one more difference compare has to absorb.
    model = AutoModelForImageTextToText.from_pretrained(
        ckpt, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False,
        attn_implementation=attn_implementation,
    )
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
    # bundles.md, adapters: a rank_pattern / alpha_pattern key is a regex matched against the adapter file's
    # module name, anchored at the name's end and starting at its start or just after a dot; the first key in
    # the config's order that matches gives the value, none: the config's r / lora_alpha.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(folder: Path, modules: dict, convert, seeded_bug: str | None = None) -> dict[str, torch.Tensor]:
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
            # bundles.md: an adapter may carry transformers 4.x module names; a name that is not a module of
            # the loaded model is converted with the model's key conversion, as the harness does.
            name = convert(name + ".weight").removesuffix(".weight")
        if name not in modules:
            raise BundleError(f"{folder}: adapter module {peft_name!r} is not a module of the model")
        a, b = ab["lora_A"].double(), ab["lora_B"].double()
        # bundles.md: the patterns are matched against the module name as the file holds it (before conversion:
        # the names they were written for). The seeded bug ignores alpha_pattern.
        r = pattern_value(rank_pattern, peft_name, r_default)
        alpha = pattern_value({} if seeded_bug == "ignore-alpha-pattern" else alpha_pattern, peft_name,
                              alpha_default)
        if a.shape[0] != r:
            raise BundleError(f"{folder}: {peft_name} has rank {a.shape[0]}, the config says {r}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        deltas[name] = scale * (b @ a)
    return deltas


def _real_grid(positions: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    # bundles.md, Gemma 4 fixes: real patches are the rows whose x and y are both >= 0; Wp (Hp) is 1 + the
    # largest real x (y), 0 x 0 for an image with no real patch.
    real = (positions >= 0).all(dim=-1)
    if not bool(real.any()):
        return real, 0, 0
    xy = positions[real]
    return real, int(xy[:, 1].max()) + 1, int(xy[:, 0].max()) + 1


def gemma4_pooler_forward(pool_by_count: bool):
    """bundles.md `gemma4-pooler-ceil-stride`: Gemma4VisionPooler.forward with bins strided by ceil(Wp/k)."""

    def forward(self, hidden_states, pixel_position_ids, padding_positions, output_length=None):
        b, n, d = hidden_states.shape
        k = math.isqrt(n // output_length)
        pooled = torch.zeros(b, output_length, d, dtype=torch.float64, device=hidden_states.device)
        count = torch.zeros(b, output_length, dtype=torch.float64, device=hidden_states.device)
        for i in range(b):
            real, _, wp = _real_grid(pixel_position_ids[i])
            if wp == 0:
                continue
            x, y = pixel_position_ids[i][real].long().unbind(-1)
            bins = (y // k) * -(-wp // k) + x // k
            pooled[i].index_add_(0, bins, hidden_states[i][real].double())
            count[i].index_add_(0, bins, torch.ones_like(bins, dtype=torch.float64))
        valid = count > 0
        # the spec: / k^2 whatever the bin holds. The seeded bug divides by the bin's own patch count.
        divisor = count.clamp(min=1).unsqueeze(-1) if pool_by_count else k * k
        return (pooled / divisor * self.hidden_size**0.5).float(), valid

    return forward


def gemma4_image_features(self, pixel_values, image_position_ids=None, **kwargs):
    """bundles.md `gemma4-image-feature-split`: Gemma4Model.get_image_features split by valid bins per image."""
    vision = self.vision_tower(pixel_values=pixel_values, pixel_position_ids=image_position_ids, **kwargs)
    pooled = self.embed_vision(inputs_embeds=vision.last_hidden_state)
    k = self.config.vision_config.pooling_kernel_size
    sizes = []
    for positions in image_position_ids:
        _, hp, wp = _real_grid(positions)
        sizes.append(-(-hp // k) * -(-wp // k))
    vision.pooler_output = torch.split(pooled, sizes)
    return vision


def mistral3_projector_forward(self, *args, **kwargs):
    """bundles.md `mistral3-single-row-split`: a one-row 2-D projector output is handed back as [1, 1, D]."""
    out = type(self).forward(self, *args, **kwargs)
    if out.dim() == 2 and out.shape[0] == 1:
        return out[None]
    return out


# bundles.md "Reference fixes in force": each name the manifest's `fixes` may list -> (transformers class whose
# instances get it, attribute, replacement given the seeded bug).
FIXES = {
    "gemma4-pooler-ceil-stride": ("Gemma4VisionPooler", "forward",
                                  lambda bug: gemma4_pooler_forward(bug == "pool-by-count")),
    "gemma4-image-feature-split": ("Gemma4Model", "get_image_features", lambda bug: gemma4_image_features),
    "mistral3-single-row-split": ("Mistral3MultiModalProjector", "forward", lambda bug: mistral3_projector_forward),
}


def check_fixes(names: list[str]) -> None:
    for name in names:
        if name not in FIXES:
            raise BundleError(f"the reference ran with fix {name!r}, which this engine does not know")


def apply_fixes(model, names: list[str], seeded_bug: str | None) -> None:
    """Bind each listed fix to the model's own instances (the class itself stays transformers')."""
    for name in names:
        cls, attr, make = FIXES[name]
        found = [m for m in model.modules() if type(m).__name__ == cls]
        if not found:
            raise BundleError(f"fix {name!r}: the loaded model has no {cls}")
        for m in found:
            setattr(m, attr, types.MethodType(make(seeded_bug), m))


class Capture:
    """Forward hooks on the reference's modules and boundaries; `take()` hands one request's rows per module."""

    def __init__(self, model, manifest: dict):
        self.modules = dict(model.named_modules())
        self.calls: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        self.image_token_id = manifest.get("image_token_id")
        self.image_positions: torch.Tensor | None = None
        for entry in manifest["modules"]:
            name = entry["name"]
            if name.startswith("@"):
                self._boundary(name, entry)
                continue
            if name not in self.modules:
                raise BundleError(f"module {name!r} of the reference is not a module of the loaded model")
            module = self.modules[name]
            self.handles.append(module.register_forward_hook(self._out_hook(name)))
            # bundles.md: `kind: "lora"` modules are the ones the reference wrote `in.<i>` for, so their input
            # is written too (the LoRA delta is then judged through it).
            if entry.get("kind") == "lora":
                self.handles.append(module.register_forward_pre_hook(self._in_hook("in:" + name), with_kwargs=True))

    def _boundary(self, name: str, entry: dict):
        # bundles.md: each boundary's `taken_at` names the HF module ("" is the model itself) and what of it.
        at = entry.get("taken_at")
        if not isinstance(at, dict) or at.get("module") not in self.modules:
            raise BundleError(f"boundary {name!r}: taken_at {at!r} names no module of the loaded model")
        module, what = self.modules[at["module"]], at.get("what")
        if what == INPUT:
            self.handles.append(module.register_forward_pre_hook(self._in_hook(name), with_kwargs=True))
        elif what == IMAGE_EMBEDS:
            if self.image_token_id is None:
                raise BundleError(f"boundary {name!r}: the reference manifest gives no image_token_id")
            self.handles.append(module.register_forward_pre_hook(self._embeds_hook(name), with_kwargs=True))
        elif what == OUTPUT_LOGITS:
            self.handles.append(module.register_forward_hook(self._logits_hook(name)))
        else:
            raise BundleError(f"boundary {name!r}: taken_at's what {what!r} is not known to this engine")

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

    def _in_hook(self, key):
        def hook(module, args, kwargs):
            # bundles.md's "input": the keyword hidden_states, input or x, else the first positional tensor,
            # else the first tensor keyword (Gemma 4's `embed_vision(inputs_embeds=...)`).
            named = [kwargs[k] for k in ("hidden_states", "input", "x") if isinstance(kwargs.get(k), torch.Tensor)]
            tensors = named + [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
            if not tensors:
                raise BundleError(f"{key}: called without a tensor input to record")
            self._record(key, tensors[0])
            return None

        return hook

    def _embeds_hook(self, name):
        def hook(module, args, kwargs):
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                raise BundleError(f"{name}: the module was not called with inputs_embeds")
            # bundles.md: the rows at the positions where input_ids holds the manifest's image_token_id, in
            # prompt order. One request per forward, so batch row 0.
            rows = embeds[0][self.image_positions.to(embeds.device)]  # boolean indexing copies
            self.calls.setdefault(name, []).append(rows.detach().cpu())
            return None

        return hook

    def _logits_hook(self, name):
        def hook(module, args, output):
            logits = output.logits if hasattr(output, "logits") else output[0]
            self.calls.setdefault(name, []).append(logits[0].detach().reshape(-1, logits.shape[-1]).cpu())

        return hook

    def set_request(self, input_ids: torch.Tensor) -> None:
        if self.image_token_id is not None:
            self.image_positions = input_ids[0] == self.image_token_id

    def take(self) -> dict[str, torch.Tensor]:
        got = {name: torch.cat(parts) for name, parts in self.calls.items()}
        self.calls = {}
        return got

    def remove(self):
        for handle in self.handles:
            handle.remove()


def run(ref: Path, out: Path, seeded_bug: str | None) -> None:
    manifest_bytes = (ref / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    if manifest.get("format") != "mmlora-bundle" or manifest.get("kind") != "reference":
        raise BundleError(f"{ref} is not a reference bundle")
    dtype = DTYPES.get(manifest["dtype"])
    if dtype is None:
        raise BundleError(f"run dtype {manifest['dtype']!r} is not known to this engine")
    # bundles.md: an engine may run on any device; the manifest's `device` says where the reference ran. CUDA
    # is used when the reference ran there and it is available, else the CPU.
    device = "cuda" if str(manifest.get("device", "cpu")).startswith("cuda") and torch.cuda.is_available() else "cpu"
    fixes = list(manifest.get("fixes") or [])
    check_fixes(fixes)  # before the model loads: a bundle this engine cannot honour is refused at once
    ckpt = source(ref, manifest["checkpoint"]["path"])
    model = load_model(ckpt, dtype, device, manifest.get("attn_implementation"))
    apply_fixes(model, fixes, seeded_bug)
    modules = dict(model.named_modules())
    convert = key_converter(model)

    adapters: dict[str, dict[str, torch.Tensor]] = {}

    def adapter(name):
        if name not in adapters:
            entry = manifest["adapters"].get(name)
            if entry is None:
                raise BundleError(f"adapter {name!r} is not in the reference's adapters")
            adapters[name] = load_adapter(source(ref, entry["path"]), modules, convert, seeded_bug)
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
            capture.set_request(inputs["input_ids"])
            try:
                with torch.no_grad():
                    for mod_name, delta in deltas.items():
                        weight = modules[mod_name].weight
                        saved[mod_name] = weight.detach().clone()
                        # Merged in float64 and rounded once to the run dtype: the merged weight is the
                        # closest the run dtype holds to W + scale * B @ A.
                        weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
                    try:
                        model(**inputs, use_cache=False)
                    except RuntimeError as e:
                        # An HF failure this engine's fixes do not cover: said in one line, not worked around.
                        raise BundleError(
                            f"request {i}: the HF forward failed ({str(e).splitlines()[0]}); "
                            f"the reference's fixes: {', '.join(fixes) or 'none'}"
                        ) from e
            finally:
                with torch.no_grad():
                    for mod_name, weight in saved.items():
                        modules[mod_name].weight.copy_(weight)
            rows = capture.take()
            for entry in manifest["modules"]:
                mod = entry["name"]
                file = got.setdefault(mod, {})
                if mod in rows and rows[mod].shape[0]:
                    file[f"out.{i}"] = rows[mod].contiguous()
                    if f"in:{mod}" in rows:
                        file[f"in.{i}"] = rows[f"in:{mod}"].contiguous()
    finally:
        capture.remove()

    write_bundle(out, manifest, sha256_bytes(manifest_bytes), got)


def write_bundle(out: Path, manifest: dict, ref_sha: str, got: dict) -> None:
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
            else:
                # bundles.md: a module with no rows in any request has `features` 0 in the reference, and an
                # output bundle's must equal the reference's.
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
    parser.add_argument("--seeded-bug", choices=["reuse-adapter", "pool-by-count", "ignore-alpha-pattern"], help="run a deliberately wrong engine")
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
