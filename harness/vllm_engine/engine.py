"""The vLLM engine: a reference bundle's requests through vLLM's own tower/connector LoRA path, written as an
output bundle (docs/bundles.md) answering the groups `tower` and `connector` (manifest "groups").

Built by vLLM's code (build.py): the model class (`--mm-encoder-only`), its weights, the worker LoRA manager with
`enable_tower_connector_lora`, the adapters (`LoRAModel.from_local_checkpoint`, the model's `hf_to_vllm_mapper`).
Run by vLLM's code (runner.py): `get_mm_lora_token_counts`, the TOWER / CONNECTOR mappings set through
`set_active_adapters`, `group_and_batch_mm_kwargs`, `embed_multimodal`. This module only watches: forward hooks
on vLLM's LoRA layers (input and output, cloned: vLLM adds the LoRA in place), fused outputs split into the HF
modules' slices (docs/rows.md), rows split per image by the inputs' own units, and the boundaries `@tower_out`
(the input of the module the reference names in `taken_at`) and `@lm_image_embeds` (what `embed_multimodal`
returns per image: what vLLM scatters into the placeholders)."""

from __future__ import annotations

from pathlib import Path

import torch

from harness.vllm_engine import archs, build
from harness.vllm_engine.runner import Image, VllmCannotRun, run_images

NAME = "vLLM tower/connector LoRA (mmlora vllm-engine)"
GROUPS = ["tower", "connector"]
NOTES = [
    "vLLM's code: the model class built with --mm-encoder-only through initialize_model + its load_weights; "
    "LRUCacheWorkerLoRAManager / LoRAModelManager with enable_tower_connector_lora (one punica wrapper per group: "
    "see the punica note); "
    "adapters through LoRAModel.from_local_checkpoint with hf_to_vllm_mapper; get_mm_lora_token_counts; "
    "set_active_adapters; group_and_batch_mm_kwargs; embed_multimodal",
    "reproduced: the tower/connector mapping block of GPUModelRunner._execute_mm_encoder "
    "(harness/vllm_engine/runner.py mm_lora_mappings); BaseModelLoader.load_model without its online-quantization "
    "log; MultiModalBudget stood in for (buffer sizes only: the batch's largest image where vLLM asks its processor, "
    "then vLLM's compute_mm_encoder_budget)",
    "the adapters' language-model tensors are skipped with vLLM's lora_skip_prefixes (set to the LM prefix: the LM "
    "is not built); --lora-target-modules names the adapters' tower/connector modules (lora_target_modules)",
    "torch.ops._C ops vLLM binds but never calls on x86 CPU (gelu_quick), absent from the CUDA wheel, are defined "
    "as ops that raise (build.stub_uncalled_c_ops)",
    "not run: the language model (--mm-encoder-only leaves it a StageMissingLayer; vLLM's CPU attention needs "
    "vllm._C, which the CUDA wheel does not carry)",
]


class EngineError(ValueError):
    """A reference this engine cannot run (one line, exit 2)."""


def _reference(folder: Path):
    from harness.correctness.bundle import Bundle, Kind

    b = Bundle.open(folder)
    m = b.manifest
    if m.get("kind") != Kind.REFERENCE:
        raise EngineError(f"{folder}: not a reference bundle (kind {m.get('kind')!r})")
    for key in ("arch", "dtype", "checkpoint", "adapters", "image_token_id"):
        if key not in m:
            raise EngineError(f"{folder}: manifest lacks {key!r} (re-record it with mmlora record)")
    ckpt = Path(m["checkpoint"]["path"])
    return b, (ckpt if ckpt.is_absolute() else b.folder / ckpt)


def _lm_tokens(arch, config, geoms: list[str], prompt: torch.Tensor, image_token_id: int) -> list[int]:
    """Each image's placeholder embeddings (vLLM's `pos_info.get_num_embeds()`): the registry's lm_tokens per
    image, held to the prompt's count of image tokens."""
    from harness.geometry_flags import parse_geometry

    per = [arch.counts(config, parse_geometry(g)).lm_tokens for g in geoms]
    have = int((prompt == image_token_id).sum())
    if sum(per) != have:
        raise EngineError(f"the prompt holds {have} image tokens, its images' lm_tokens sum to {sum(per)} ({per})")
    return per


PUNICA_NOTES = {
    "cpu": "punica wrapper: PunicaWrapperCPU (vLLM's CPU platform's, its torch ops), as vLLM's get_punica_wrapper "
           "picks it on CPU",
    "gpu": "punica wrapper: PunicaWrapperGPU (vLLM's CUDA platform's: its Triton lora_shrink / lora_expand reading "
           "each row's adapter from LoRAKernelMeta), chosen by vLLM's own get_punica_wrapper with the one lookup it "
           "makes, current_platform.get_punica_wrapper(), answered as vLLM's CUDA platform answers it while the "
           "LoRA manager is built (harness/vllm_engine/build.py lora_manager); without CUDA the kernels run in the "
           "Triton interpreter (fp16 only) with runtime/vllm_lora.py's interpreter configs handed to vLLM's config "
           "loader",
}


class MappingMismatch(VllmCannotRun):
    """A LoRA layer receives another number of rows than its group's mapping holds entries: on CPU, vLLM's torch
    punica ops cannot run it (an einsum shape error). vLLM's Triton kernels (PunicaWrapperGPU) run more rows than
    entries (each row past the mapping's length gets no LoRA: LoRAKernelMeta groups only the mapping's entries),
    and fewer rows than entries by indexing rows past the layer's tensors (out-of-bounds reads and writes): refused."""


class UnwrappableTarget(VllmCannotRun):
    """vLLM's LoRA manager refuses a module the adapters hold a LoRA for: no LoRA layer of vLLM's wraps its class
    (PaliGemma's connector, a torch nn.Linear)."""


def _unwrappable(model, err: str) -> str:
    import re

    m = re.search(r"LoRA target module (\S+) \((\w+)\)", err)
    if m is None:
        return err.split(" target_modules=")[0]
    name, cls = m.groups()
    mm = model.get_mm_mapping()
    group = _group(mm, name)
    return (f"vLLM's LoRAModelManager refuses to wrap {name} ({type(model.get_submodule(name)).__module__}."
            f"{cls}), which the adapters hold a LoRA for: no vLLM LoRA layer takes that class, though the model "
            f"declares tower/connector LoRA and names {name.split('.')[0]} its {group}; with vLLM's default "
            f"(every supported module, --all-modules) the manager skips it with a warning and then refuses to load "
            f"any adapter holding it")


def _measured(rows: int, ims: list, units: dict | None, group: str | None) -> list[int] | None:
    """A layer's rows split into the step's images in proportion to their units (None where they do not split)."""
    if units is None or group not in ("tower", "connector"):
        return None
    u = [units[id(im)][group] for im in ims]
    if not sum(u) or any(x * rows % sum(u) for x in u):
        return None
    return [x * rows // sum(u) for x in u]


def check_rows(modules: dict[str, torch.nn.Module], step: list, seen: list | None = None,
               groups: dict[str, str] | None = None, units: dict | None = None):
    """Forward pre-hooks on vLLM's LoRA layers: the rows each receives against the entries of its punica wrapper's
    mapping (`indices_len[0]`). `seen` None (vLLM's CPU ops, which cannot run it): raise MappingMismatch that names
    the layer, both numbers and the count helper's values per image of the step (`step[0]`: (images, counts)),
    before vLLM's own shape error. Else (vLLM's Triton kernels) a layer with more rows than entries runs, each
    such mismatch appended to `seen` as a dict; fewer rows than entries raise MappingMismatch (the kernels would
    write past the layer's tensors)."""
    def hook(name):
        def pre(m, args):
            x = args[0]
            rows, entries = x.reshape(-1, x.shape[-1]).shape[0], m.punica_wrapper.indices_len[0]
            if entries is not None and rows != entries and not m.punica_wrapper.no_lora:
                if seen is not None and rows > entries:
                    seen.append({"module": name, "rows": rows, "mapping_entries": entries})
                    return
                ims, counts = step[0]
                group = (groups or {}).get(name)
                rows_per = _measured(rows, ims, units, group) or [None] * len(ims)
                per = "; ".join(f"request {im.request}: tower {t}, connector {c}"
                                + (f" (its {group} rows here: {r})" if r is not None else "")
                                for im, (t, c), r in zip(ims, counts, rows_per))
                if seen is not None:
                    raise MappingMismatch(
                        f"{name} receives {rows} rows under a mapping of {entries} entries: vLLM's Triton kernels "
                        f"index rows up to {entries - 1}, so lora_shrink / lora_expand read and write {entries - rows} "
                        f"rows past the layer's input, its fp32 buffer and its output (on a GPU: writes into "
                        f"neighbouring memory, or an illegal-address fault); not run here, where the interpreter "
                        f"would write into this process's heap (vLLM's get_mm_lora_token_counts per image: {per})")
                raise MappingMismatch(f"{name} receives {rows} rows, its mapping has {entries} entries "
                                      f"(vLLM's get_mm_lora_token_counts per image: {per})")
        return pre
    return [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]


class Capture:
    """Forward hooks on vLLM's LoRA layers (and the boundary's module): every call's input and output, cloned."""

    def __init__(self, model, modules: dict[str, torch.nn.Module], boundary: str | None):
        self.ins: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.outs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.tower_out: list[torch.Tensor] = []
        self.hooks = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]
        if boundary is not None:
            self.hooks.append(model.get_submodule(boundary).register_forward_pre_hook(self._pre, with_kwargs=True))

    def _pre(self, _m, args, kwargs):
        # the module's main input: its first positional tensor, else its first tensor keyword (Gemma 4's
        # embed_vision(inputs_embeds=...)), as docs/bundles.md says of "input"
        t = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        self.tower_out.append(t.detach().clone())

    def _hook(self, name: str):
        def hook(_m, args, out):
            self.ins[name].append(args[0].detach().clone())
            self.outs[name].append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _rows(calls: list[torch.Tensor]) -> torch.Tensor | None:
    if not calls:
        return None
    return torch.cat([c.reshape(-1, c.shape[-1]) for c in calls])


def _per_image(t: torch.Tensor, units: list[int], what: str) -> list[torch.Tensor]:
    """A group's rows split into images, each image's share proportional to its units (a tile's rows, a patch's
    or a merge block's: rows per unit may be a fraction, as Qwen2-VL's merger has one row per 4 patches)."""
    total = sum(units)
    if total == 0 and t.shape[0] == 0:
        return [t] * len(units)
    sizes = [u * t.shape[0] // total if total else -1 for u in units]
    if total == 0 or any(u * t.shape[0] % total for u in units):
        raise VllmCannotRun(f"{what}: vLLM's {t.shape[0]} rows do not split into images in proportion to their units "
                            f"{units}")
    return list(t.split(sizes))


def _per_request(parts: list[torch.Tensor], images: list[Image], n: int) -> dict[int, torch.Tensor]:
    by: dict[int, list[torch.Tensor]] = {}
    for p, im in zip(parts, images):
        by.setdefault(im.request, []).append(p)
    return {i: t for i, t in ((i, torch.cat(v)) for i, v in by.items() if i < n) if t.shape[0]}  # no rows: no key


def _in_lm(key: str, lm: tuple[str, ...]) -> bool:
    """A PEFT adapter tensor of the language model: its module under one of the registry arch's LM prefixes
    (Idefics3's LM is model.text_model., not *.language_model.)."""
    return key.removeprefix("base_model.model.").startswith(lm)


def _lm_only(adapter: Path, lm: tuple[str, ...]) -> bool:
    """An adapter all of whose tensors lie in the language model. vLLM's --mm-encoder-only cannot load it (nothing
    is left after `lora_skip_prefixes`: an empty LoRAModel stops `_create_merged_loras_inplace` with
    StopIteration); the full model would load it and zero its slot in every tower / connector layer
    (`reset_lora`), so its images run with no adapter (id 0), which adds nothing, as the zeroed slot would."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        return all(_in_lm(k, lm) for k in f.keys())


def target_modules(model, folders: list[Path], lm: tuple[str, ...]) -> list[str]:
    """What a user passes as --lora-target-modules for these adapters' tower and connector: each module they hold
    a LoRA for outside the language model, under vLLM's name (the model's `hf_to_vllm_mapper`, as vLLM's adapter
    loading renames it), given whole (vLLM takes a full module name), or by its suffix where it is a packed part
    (q_proj of qkv_proj: vLLM matches packed parts by suffix only). Suffixes alone would not do: on Gemma 4 an LM
    suffix (q_proj, ...) also names the tower's Gemma4ClippableLinear wrappers, on Qwen2-VL `proj` also the
    patch embedder's Conv3d, and vLLM refuses both ("matched the deployment configuration but could not be
    wrapped"). The LM's are left out: the LM is not built."""
    from safetensors import safe_open

    mapper = getattr(model, "hf_to_vllm_mapper", None)
    parts = {p for children in model.packed_modules_mapping.values() for p in children}
    out = set()
    for f in folders:
        with safe_open(str(f / "adapter_model.safetensors"), framework="pt") as st:
            for k in st.keys():
                if ".lora_" not in k or _in_lm(k, lm):
                    continue
                name = k.split(".lora_")[0].removeprefix("base_model.model.")
                vname = (mapper._map_name(name) if mapper is not None else name) or name
                suffix = vname.rsplit(".", 1)[-1]
                out.add(suffix if suffix in parts else vname)
    return sorted(out)


def _images(b, s, arch, config, ids: dict) -> tuple[list[Image], list[dict]]:
    """Every image of the reference's requests, in request order, as the runner sees it, and its units per group."""
    m = b.manifest
    images: list[Image] = []
    units: list[dict] = []
    for i, r in enumerate(m["requests"]):
        if not r["geometry"]:
            continue
        inputs = b.inputs(i)
        embeds = _lm_tokens(arch, config, r["geometry"], inputs["input_ids"], m["image_token_id"])
        for (item, u), e in zip(archs.request_items(s, config, inputs, r["geometry"], embeds), embeds):
            images.append(Image(i, ids[r["adapter"]] if r["adapter"] else 0, item, e))
            units.append(u)
    return images, units


def _group(mm, vname: str) -> str:
    """vLLM's own split of the model (`get_mm_mapping()`), connector prefixes first (Llama 4's vision_adapter lies
    under the tower's prefix)."""
    if any(vname.startswith(p) for p in mm.connector):
        return "connector"
    if any(vname.startswith(p) for p in mm.tower_model):
        return "tower"
    return "language_model"


def _packed_owners(model, vname: str) -> list[tuple[str, list[str]]]:
    """The packed modules of vLLM's model that hold `vname` (HF's name in vLLM's layout) as a part (q_proj inside
    qkv_proj: the model's `packed_modules_mapping`), each as (its full name, its parts' full names)."""
    parent, _, leaf = vname.rpartition(".")
    packed = getattr(model, "packed_modules_mapping", None) or {}

    def full(n: str) -> str:
        return f"{parent}.{n}" if parent else n
    return [(full(fused), [full(p) for p in parts]) for fused, parts in packed.items() if leaf in parts]


def _submodule(model, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _built(model, vname: str) -> bool:
    """Whether vLLM's model has the module `vname` (HF's name in vLLM's layout), itself or as a part of one of its
    packed modules."""
    return any(_submodule(model, n) is not None for n in [vname] + [o for o, _ in _packed_owners(model, vname)])


def max_lora_rank(folders: list[Path]) -> int:
    """vLLM's --max-lora-rank for these adapters: the largest rank any of their lora_A tensors holds (a
    `rank_pattern` may raise it above the config's `r`), rounded up to the ranks vLLM's LoRAConfig accepts (as a
    vLLM user must pick one of them)."""
    from typing import get_args

    from safetensors import safe_open
    from vllm.config.lora import MaxLoRARanks

    need = 1
    for folder in folders:
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            for key in f.keys():
                if ".lora_A." in key or key.endswith(".lora_A.weight"):
                    need = max(need, int(f.get_slice(key).get_shape()[0]))
    allowed = sorted(get_args(MaxLoRARanks))
    fit = [r for r in allowed if r >= need]
    if not fit:
        raise EngineError(f"an adapter has rank {need}, above the largest rank vLLM accepts ({allowed[-1]})")
    return fit[0]


def _unwrapped(model, mgr, vnames: list[str]) -> dict[str, tuple[torch.nn.Module, list[str] | None]]:
    """Of these modules (vLLM's names), the ones vLLM's model builds but its LoRA manager did not wrap: vLLM module
    name -> (the module, the full names of its packed parts, or None). A packed part (q_proj) is found through its
    packed module (qkv_proj, `_packed_owners`)."""
    out: dict = {}
    for vname in vnames:
        owners = _packed_owners(model, vname)
        owner, parts = owners[0] if owners else (vname, None)
        if vname in mgr.modules or owner in mgr.modules or owner in out:
            continue
        for name, p in ((vname, None), (owner, parts)):
            if (module := _submodule(model, name)) is not None:
                out[name] = (module, p)
                break
    return out


def _write_modules(writer, s, model, mgr, cap: Capture, images: list[Image], units: list[dict],
                   embeds: list[torch.Tensor], n: int, unwrapped: dict) -> dict[str, list[int]]:
    """Each LoRA layer's captures (and each unwrapped module's, see _unwrapped) under the HF names (packed outputs
    split into their parts' slices), per request, and the boundaries; returns each group's measured rows per image
    (its first LoRA layer's input)."""
    measured: dict[str, list[int]] = {}
    for vname, module in {**mgr.modules, **{v: mod for v, (mod, _) in unwrapped.items()}}.items():
        x, y = _rows(cap.ins[vname]), _rows(cap.outs[vname])
        group = _group(model.get_mm_mapping(), vname)
        subs = mgr.packed_modules.get(vname) if vname in mgr.modules else unwrapped[vname][1]
        slices = list(getattr(module, "output_slices", None) or getattr(module, "output_sizes", None)
                      or (y.shape[-1] if y is not None else 0,))
        names_out = list(subs) if subs else [vname]  # vLLM keeps the packed parts under their full names
        ys = list(y.split(slices, dim=-1)) if y is not None and len(names_out) > 1 else [y]
        gu = [u[group] for u in units]
        xs_img = _per_image(x, gu, vname) if x is not None else None
        if xs_img is not None:
            measured.setdefault(group, [p.shape[0] for p in xs_img])
        for hname, yk in zip(names_out, ys):
            tensors = {}
            if yk is not None:
                for i, t in _per_request(_per_image(yk, gu, vname), images, n).items():
                    tensors[f"out.{i}"] = t
                for i, t in _per_request(xs_img, images, n).items():
                    tensors[f"in.{i}"] = t
            writer.add(archs.hf_name(s, hname), group, tensors)
    if cap.tower_out:
        t = _per_request(_per_image(_rows(cap.tower_out), [u["connector"] for u in units], "@tower_out"), images, n)
        writer.add("@tower_out", "connector", {f"out.{i}": v for i, v in t.items()})
    writer.add("@lm_image_embeds", "connector",
               {f"out.{i}": v for i, v in _per_request(embeds, images, n).items()})
    return measured


def rows_as_run(images: list[Image], counts: list, measured: list[int | None], group: str, per_image: bool,
                names: dict[int, str]) -> list[dict]:
    """Which adapter each row of an image runs under with vLLM's Triton kernels (PunicaWrapperGPU), for each image
    whose rows do not all run under its own mapping entries (its count is off, or an earlier image's was). The
    mapping vLLM set is the helper's count per image of the step, each repeated as the image's LoRA id
    (runner.mm_lora_mappings); the layer's rows are the images' measured rows back to back; `LoRAKernelMeta`
    groups the mapping's entries only, so row r runs under entry r, and a row past the mapping's end under none.
    Per such image: ranges of its rows (image-local, end exclusive) with the adapter (None: no adapter, or no LoRA
    where `counted_for_request` is None too) and the request whose image that entry was counted for."""
    k = 0 if group == "tower" else 1
    steps = [[j] for j in range(len(images))] if per_image else [list(range(len(images)))]
    out = []
    for step in steps:
        owner = [j for j in step for _ in range(counts[j][k] or 0)]  # the image each mapping entry was counted for
        start = 0
        for j in step:
            rows = measured[j]
            if rows is None or counts[j][k] is None:
                continue
            who = [owner[start + r] if start + r < len(owner) else None for r in range(rows)]
            if rows != counts[j][k] or any(o != j for o in who):
                runs: list[dict] = []
                for r, o in enumerate(who):
                    key = (None if o is None else names.get(images[o].lora_id),
                           None if o is None else images[o].request)
                    if runs and (runs[-1]["adapter"], runs[-1]["counted_for_request"]) == key:
                        runs[-1]["rows"][1] = r + 1
                    else:
                        runs.append({"rows": [r, r + 1], "adapter": key[0], "counted_for_request": key[1]})
                out.append({"group": group, "request": images[j].request, "image": j, "rows": rows,
                            "helper_count": counts[j][k], "own_adapter": names.get(images[j].lora_id),
                            "runs": runs})
            start += rows
    return out


def _first_per_module(seen: list[dict]) -> list[dict]:
    """Each LoRA layer's first mismatch (a layer called once per image group may repeat it)."""
    out: dict[str, dict] = {}
    for x in seen:
        out.setdefault(x["module"], x)
    return list(out.values())


def run(ref: Path, out: Path, all_modules: bool = False, max_loras: int | None = None,
        per_image: bool = False, rename_adapters: bool = True, punica: str = "cpu") -> dict:
    """Runs the reference's requests and writes the output bundle at `out`; returns its manifest.
    `all_modules`: vLLM's default deployment (no --lora-target-modules: every supported module of the tower and
    connector wrapped); else --lora-target-modules names the modules the adapters target. `max_loras`: vLLM's
    --max-loras (default: the adapters the batch uses, each its own slot). `per_image`: one encoder step per
    image (runner.run_images). `rename_adapters`: layout.py's rename applied to the adapters too (where the arch
    has one). `punica`: the punica wrapper vLLM's selector builds, "cpu" (`PunicaWrapperCPU`) or "gpu"
    (`PunicaWrapperGPU`, build.lora_manager)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmlora-vllm-") as work:
        return _run(ref, out, all_modules, max_loras, per_image, rename_adapters, punica, Path(work))


def _run(ref: Path, out: Path, all_modules: bool, max_loras: int | None, per_image: bool, rename_adapters: bool,
         punica: str, work: Path) -> dict:
    import vllm

    from harness.correctness.bundle.writer import BundleWriter
    from harness.vllm_engine import layout
    from vlm.checkpoint import read_checkpoint_config

    b, ckpt = _reference(ref)
    m = b.manifest
    refused = build.punica_refusal(punica, m["dtype"])
    if refused:
        raise EngineError(refused)
    s = archs.spec(m["arch"])
    arch, raw = read_checkpoint_config(ckpt)
    config = arch.model_class().config_class.from_dict(raw)
    ckpt, folders, layout_notes = layout.for_vllm(m["arch"], ckpt, {n: b.folder / a["path"] for n, a in
                                                                     m["adapters"].items()}, work, rename_adapters)
    lm_only = [n for n in sorted(m["adapters"]) if _lm_only(folders[n], arch.language_model)]
    names = [n for n in sorted(m["adapters"]) if n not in lm_only]
    ids = {name: k + 1 for k, name in enumerate(names)} | {name: 0 for name in lm_only}
    reqs = m["requests"]
    images, units = _images(b, s, arch, config, ids)
    rank = max_lora_rank([folders[n] for n in names])
    slots = max(1, len(names)) if max_loras is None else max_loras
    if slots < len(names):
        raise EngineError(f"--max-loras {slots}: the batch uses {len(names)} adapters, each needs a slot")
    try:
        vc = build.vllm_config(ckpt, m["dtype"], slots, rank,
                               s.processor_kwargs(config) if s.processor_kwargs else None, None,
                               s.hf_overrides(config) if s.hf_overrides else None)
    except ValueError as e:  # vLLM's config validation (pydantic): e.g. Gemma 3 refuses float16
        import re

        why = re.search(r"Value error, (.*?) \[type=", " ".join(str(e).split()))
        raise EngineError(f"vLLM's ModelConfig refuses this {m['arch']} {m['dtype']} reference: "
                          f"{why.group(1) if why else ' '.join(str(e).split())}") from None
    with build.vllm_context(vc):
        from vllm.lora.request import LoRARequest

        model = build.load_model(vc)
        # --lora-target-modules, read by the LoRA manager only (built next): named from the model's own mapper
        targets = None if all_modules else target_modules(model, list(folders.values()), arch.language_model)
        vc.lora_config.target_modules = targets
        # the LM is not built (--mm-encoder-only), so vLLM's adapter check would refuse an adapter's LM tensors;
        # vLLM's own model-defined skip list (`lora_skip_prefixes`, read by `_load_adapter`) leaves them out
        model.lora_skip_prefixes = [f"{p.rstrip('.')}." for p in model.get_mm_mapping().language_model]
        try:
            wm = build.lora_manager(model, vc, per_item=max([1] + [im.num_mm_embeds for im in images]),
                                    limit=max(r["images"] for r in reqs), punica=punica)
        except ValueError as e:
            if "could not be wrapped" not in str(e):
                raise
            raise UnwrappableTarget(_unwrappable(model, str(e))) from None
        mgr = wm._adapter_manager
        lora_requests = {ids[n]: LoRARequest(n, ids[n], str(folders[n].resolve()))
                         for n in names}
        taken = next((x["taken_at"]["module"] for x in m["modules"] if x["name"] == "@tower_out"), None)
        # reference modules vLLM builds but did not wrap (no adapter names them as vLLM reads its names): their
        # plain outputs are captured too, so compare judges them (a LoRA vLLM dropped is a divergence there)
        unwrapped = _unwrapped(model, mgr, [archs.vllm_name(s, x["name"]) for x in m["modules"]
                                            if x.get("group") in GROUPS and not x["name"].startswith("@")])
        cap = Capture(model, {**mgr.modules, **{v: mod for v, (mod, _) in unwrapped.items()}},
                      archs.vllm_name(s, taken) if taken else None)
        step: list = [None]
        mismatches: list | None = [] if punica == "gpu" else None
        checks = check_rows(mgr.modules, step, mismatches, {n: _group(model.get_mm_mapping(), n) for n in mgr.modules},
                            {id(im): u for im, u in zip(images, units)})
        try:
            embeds, counts = run_images(model, wm, images, lora_requests, per_image,
                                        on_counts=lambda ims, cs: step.__setitem__(0, (ims, cs)))
        except ValueError as e:  # vLLM's adapter loading (LoRAModel.from_local_checkpoint), in set_active_adapters
            if "expected target modules" not in str(e):
                raise
            raise UnwrappableTarget(f"vLLM refuses an adapter: {' '.join(str(e).split())} (a module vLLM's "
                                    f"LoRAModelManager did not wrap: --all-modules without it)") from None
        finally:
            cap.remove()
            for h in checks:
                h.remove()
    writer = BundleWriter(out, len(reqs))
    # what vLLM's LM takes from embed_multimodal's output as the placeholders' embeddings, where it is not all of it
    # (Qwen3-VL: DeepStack features ride along as extra columns; archs.Spec.lm_embeds)
    lm_embeds = s.lm_embeds(model, embeds) if s.lm_embeds else embeds
    lm_note = [] if not s.lm_embeds else [
        "@lm_image_embeds: the part of embed_multimodal's output vLLM's LM scatters into the placeholders, split off "
        "by the model's own method (Qwen3-VL: _compute_deepstack_embeds, called as embed_input_ids calls it, on a "
        "zero text embedding; the DeepStack columns it splits off are the deepstack mergers' outputs)"]
    measured = _write_modules(writer, s, model, mgr, cap, images, units, lm_embeds, len(reqs), unwrapped)
    helper = [{"request": im.request, "num_mm_embeds": im.num_mm_embeds, "embeddings": int(embeds[k].shape[0]),
               "tower": t, "connector": c,
               "measured_tower": measured.get("tower", [None] * len(images))[k],
               "measured_connector": measured.get("connector", [None] * len(images))[k]}
              for k, (im, (t, c)) in enumerate(zip(images, counts))]
    as_run = []
    if punica == "gpu":
        names_by_id = {i: n for n, i in ids.items() if i > 0}
        for g in GROUPS:
            as_run += rows_as_run(images, counts, measured.get(g, [None] * len(images)), g, per_image, names_by_id)
    produced = {x["name"] for x in writer.modules}
    left = [x["name"] for x in m["modules"] if x.get("group") in GROUPS and x["name"] not in produced]
    # reference modules of the answered groups that vLLM's model does not build (LLaVA-NeXT: vLLM's CLIP tower stops
    # at vision_feature_layer; HF runs the layers after it too, whose output nothing reads): only those may be
    # listed; one vLLM builds but this engine did not capture is this engine's bug, not a module to leave out
    missing = [name for name in left if not name.startswith("@") and not _built(model, archs.vllm_name(s, name))]
    if uncaptured := [name for name in left if name not in missing]:
        raise RuntimeError(f"the engine captured no output for {len(uncaptured)} reference boundaries or modules "
                           f"vLLM's model builds, first {uncaptured[0]!r}: a bug of this engine's capture (nothing "
                           f"written)")
    manifest = {"kind": "outputs", "reference": b.sha256, "groups": GROUPS,
                "engine": {"name": NAME, "version": f"vllm {vllm.__version__}", "notes": NOTES + [PUNICA_NOTES[punica]] + layout_notes + lm_note},
                "requests": reqs, "mm_lora_counts": helper, "lora_target_modules": targets, "max_loras": slots,
                "per_image": per_image, "punica": punica,
                "punica_wrappers": sorted({type(w).__name__ for w in mgr.punica_wrapper_mapping.values()}),
                "not_produced": missing,
                "rows_beyond_mapping": _first_per_module(mismatches or []), "rows_as_run": as_run,
                "adapters_run_as_none": {n: "language-model tensors only: run with no adapter (see _lm_only)"
                                         for n in lm_only}}
    writer.finish(manifest)
    return manifest
