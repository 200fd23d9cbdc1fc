"""End-to-end cases: the vision tower + connector (`tower_connector`) and a whole prefill forward
(`prefill`: tower + connector + LM) of a registry model with random weights, with and without LoRA.

Models come from the registry's tiny config with overrides: `<arch>/tiny` as is, or real-size towers
(`llama4/scout`: hidden 1408, MLP 5632, 34 layers, 336 px tiles, pixel-shuffle adapter 5632 -> 4096 ->
4096, projector -> 5120; `gemma3/so400m`: SigLIP-so400m, hidden 1152, MLP 4304, 27 layers, 896 px,
4096 patches -> 256 tokens, projector -> 2560). Real-size models keep the tiny 2-layer language model
with the real hidden size, so `prefill` there is tower + connector + a 2-layer LM stub.

One image per request, adapters a0..a{n-1} assigned round-robin (n_adapters = 0: no LoRA at all).
  triton / torch  the runtime (RuntimeModel, slot tables filled with random A / B) on one mixed batch
  peft            HF + PEFT (random non-zero adapters from the registry's recipes): requests grouped by
                  adapter, each group run with set_adapter (the no-adapter group inside disable_adapter);
                  PEFT's adapter_names cannot reach a tower (FACTS.md)
  vllm            not implemented end to end (it needs the whole engine): always a row marked unavailable
Requests, batches, mappings and groups are built outside the timed call.
"""

from __future__ import annotations

import contextlib
import gc
import warnings

import torch

from harness.bench.cases import Case, Unavailable, Work, vllm_unavailable
from harness.checkpoint import DTYPES

SCOUT = {
    "vision_config.hidden_size": 1408, "vision_config.intermediate_size": 5632,
    "vision_config.num_hidden_layers": 34, "vision_config.num_attention_heads": 16,
    "vision_config.image_size": 336, "vision_config.patch_size": 14, "vision_config.vision_output_dim": 4096,
    "vision_config.projector_input_dim": 4096, "vision_config.projector_output_dim": 4096,
    "text_config.hidden_size": 5120,
}
SO400M = {
    "vision_config.hidden_size": 1152, "vision_config.intermediate_size": 4304,
    "vision_config.num_hidden_layers": 27, "vision_config.num_attention_heads": 16,
    "vision_config.image_size": 896, "vision_config.patch_size": 14, "mm_tokens_per_image": 256,
    "text_config.hidden_size": 2560,
}
MODELS: dict[str, tuple[str, dict]] = {
    "llama4/tiny": ("llama4", {}),
    "gemma3/tiny": ("gemma3", {}),
    "llama4/scout": ("llama4", SCOUT),
    "gemma3/so400m": ("gemma3", SO400M),
}
GROUPS = {"tower_connector": ("tower", "connector"), "prefill": ("tower", "connector", "language_model")}

# one live model at a time (real-size towers are GBs): key -> (model objects)
_CACHE: dict = {}


def release() -> None:
    _CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _build(model_name: str, dtype: torch.dtype, device: torch.device):
    from harness.arch import apply_overrides, get_arch

    if model_name not in MODELS:
        raise ValueError(f"unknown bench model {model_name!r}; known: {', '.join(MODELS)}")
    arch_name, overrides = MODELS[model_name]
    arch = get_arch(arch_name)
    cfg = apply_overrides(arch.tiny_config(), overrides)
    torch.manual_seed(0)
    with torch.device(device):
        # _from_config builds in `dtype` directly; .to(dtype) would also cast Llama 4's complex rope table
        model = arch.model_class()._from_config(cfg, dtype=dtype)
    return arch, cfg, model.eval()


def _cached(key: tuple, make):
    if _CACHE.get("key") != key:
        release()
        _CACHE["obj"] = make()
        _CACHE["key"] = key
    return _CACHE["obj"]


def _vision(arch, model, pixel_inputs: dict):
    """Tower + connector output, as the HF forward computes it before merging into the prompt."""
    if arch.model_type == "llama4":
        out = model.vision_model(pixel_inputs["pixel_values"])
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return model.multi_modal_projector(h.reshape(-1, h.shape[-1]))
    if arch.model_type == "gemma3":
        r = model.model.get_image_features(pixel_values=pixel_inputs["pixel_values"])
        return getattr(r, "pooler_output", r)
    raise ValueError(f"tower_connector has no vision path for {arch.model_type}")


def _requests(arch, cfg, images: int, n: int):
    from harness.requests import make_request

    g = arch.default_geometry(cfg)
    return [make_request(arch, cfg, [g], f"a{i % n}" if n else None, seed=i) for i in range(images)]


def _bucket(n: int) -> int:
    """Adapters / slots a built model holds for n requested: a power of two >= max(n, 4), so points with
    different n share one build (only the active adapters' slots or PEFT adapters are ever used)."""
    return max(4, 1 << max(0, n - 1).bit_length())


def _runtime(case: str, p: dict, provider: str, device: torch.device):
    from harness.requests import build_batch
    from runtime.model import RuntimeModel

    n, r, dt = p["n_adapters"], p["rank"], DTYPES[p["dtype"]]
    k = _bucket(n)

    def make():
        arch, cfg, model = _build(p["model"], dt, device)
        rt = RuntimeModel(arch, cfg, model, max_slots=k + 1, r_max=r, kernel=provider)  # last slot unused
        torch.manual_seed(1)
        with torch.no_grad():
            for name in rt.lora_names:
                A, B = rt.tables.A[name], rt.tables.B[name]
                A[:k].normal_(0.0, A.shape[2] ** -0.5)
                B[:k].normal_(0.0, 0.25 * r ** -0.5)
        for s in range(k):
            rt.tables.slot_of[f"a{s}"] = s
        return rt

    rt = _cached(("runtime", p["model"], p["dtype"], provider, r, k, str(device)), make)
    arch, cfg = rt.arch, rt.config
    reqs = _requests(arch, cfg, p["images"], n)
    batch = build_batch(arch, cfg, reqs).to(device, dt)
    rt.mapping = rt.make_mapping(reqs, batch.lengths, batch.input_ids.shape[1])
    inputs = batch.model_inputs()

    def fn():
        with torch.no_grad():
            if case == "tower_connector":
                return _vision(arch, rt.model, batch.pixel_inputs)
            return arch.forward_logits(rt.model, **inputs)
    return fn, _work(case, arch, cfg, reqs, batch)


def _peft(case: str, p: dict, device: torch.device):
    from harness.requests import build_batch
    from reference.adapters import AdapterSpec, add_adapters

    n, r, dt = p["n_adapters"], p["rank"], DTYPES[p["dtype"]]
    k = _bucket(n)

    def make():
        arch, cfg, model = _build(p["model"], dt, device)
        specs = [AdapterSpec(f"a{i}", GROUPS[case], rank=r, alpha=2 * r, seed=10 + i) for i in range(k)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = add_adapters(model, arch, specs)
        return arch, cfg, pm

    arch, cfg, pm = _cached(("peft", p["model"], p["dtype"], case, r, k, str(device)), make)
    reqs = _requests(arch, cfg, p["images"], n)
    by_adapter: dict = {}
    for q in reqs:
        by_adapter.setdefault(q.adapter, []).append(q)
    groups = [(a, build_batch(arch, cfg, qs).to(device, dt)) for a, qs in by_adapter.items()]
    hf = pm.base_model.model

    def fn():
        with torch.no_grad():
            for adapter, b in groups:
                if adapter is None:
                    ctx = pm.disable_adapter()
                else:
                    pm.set_adapter(adapter)
                    ctx = contextlib.nullcontext()
                with ctx:
                    if case == "tower_connector":
                        _vision(arch, hf, b.pixel_inputs)
                    else:
                        arch.forward_logits(pm, **b.model_inputs())
    return fn, _work(case, arch, cfg, reqs, build_batch(arch, cfg, reqs))


def _work(case, arch, cfg, reqs, batch) -> Work:
    images = sum(len(q.images) for q in reqs)
    if case == "tower_connector":
        tokens = sum(arch.encoder_rows(cfg, g) for q in reqs for g in q.images)
    else:
        tokens = sum(batch.lengths)
    return Work(tokens=float(tokens), images=float(images))


def _e2e(case: str):
    def build(p: dict, provider: str, device: torch.device):
        if p["images"] < 1 or p["n_adapters"] < 0 or p["rank"] < 1:
            raise ValueError(f"{case} needs images >= 1, n_adapters >= 0, rank >= 1, got {p}")
        if provider in ("triton", "torch"):
            return _runtime(case, p, provider, device)
        if provider == "peft":
            return _peft(case, p, device)
        if provider == "vllm":
            raise Unavailable(vllm_unavailable() or "vllm end-to-end tower benchmarks are not implemented "
                                                    "(they need the vLLM engine)")
        raise ValueError(f"unknown provider {provider!r} for {case}")
    return build


E2E_CASES: dict[str, Case] = {
    "tower_connector": Case("tower_connector", "e2e", ("triton", "torch", "peft", "vllm"), "images",
                            _e2e("tower_connector")),
    "prefill": Case("prefill", "e2e", ("triton", "torch", "peft", "vllm"), "images", _e2e("prefill")),
}
