"""End-to-end cases: the vision tower + connector (`tower_connector`) and a whole prefill forward
(`prefill`: tower + connector + LM) of a registry model with random weights, with and without LoRA.

Models come from the registry's tiny config with overrides: `<arch>/tiny` as is, or a real-size variant an
arch file declares in `bench_models` (e.g. `llama4/scout`, `gemma3/so400m`). Real-size variants keep the
tiny 2-layer language model at the real hidden size, so `prefill` there is tower + connector + an LM stub.

One image per request, adapters a0..a{n-1} assigned round-robin (n_adapters = 0: no LoRA at all). The LoRA
providers of runtime/providers, each as it declares:
  a provider the runtime runs: the runtime (RuntimeModel with it, slot tables filled with random A / B) on
    one mixed batch
  the reference's (HF + PEFT): random non-zero adapters from the registry's recipes, requests grouped by
    adapter, each group run with set_adapter (the no-adapter group inside disable_adapter); PEFT 0.21's
    adapter_names cannot reach a tower (tower rows are not requests)
  one that declares `e2e_unavailable` (e.g. it needs a whole engine): a row marked unavailable
Requests, batches, mappings and groups are built outside the timed call.
"""

from __future__ import annotations

import contextlib
import gc
import warnings

import torch

from harness.bench.case import Case, Work
from runtime.providers import PROVIDERS, LoRAProvider, Unavailable
from vlm.checkpoint import DTYPES
from vlm.rows import group_row_counts

GROUPS = {"tower_connector": ("tower", "connector"), "prefill": ("tower", "connector", "language_model")}

# one live model at a time (real-size towers are GBs): key -> (model objects)
_CACHE: dict = {}


def release() -> None:
    _CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_models() -> dict[str, tuple[str, dict]]:
    """`<arch>/tiny` for every registered arch, and `<arch>/<name>` for each real-size variant an arch file
    declares in `bench_models`."""
    from vlm.arch import all_archs

    out: dict[str, tuple[str, dict]] = {}
    for arch in all_archs():
        out[f"{arch.model_type}/tiny"] = (arch.model_type, {})
        for name, overrides in arch.bench_models.items():
            out[f"{arch.model_type}/{name}"] = (arch.model_type, dict(overrides))
    return out


def _build(model_name: str, dtype: torch.dtype, device: torch.device):
    from vlm.arch import apply_overrides, get_arch

    models = bench_models()
    if model_name not in models:
        raise ValueError(f"unknown bench model {model_name!r}; known: {', '.join(models)}")
    arch_name, overrides = models[model_name]
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


def _requests(arch, cfg, images: int, n: int):
    from vlm.requests import make_request

    g = arch.default_geometry(cfg)
    return [make_request(arch, cfg, [g], f"a{i % n}" if n else None, seed=i) for i in range(images)]


def _bucket(n: int) -> int:
    """Adapters / slots a built model holds for n requested: a power of two >= max(n, 4), so points with
    different n share one build (only the active adapters' slots or PEFT adapters are ever used)."""
    return max(4, 1 << max(0, n - 1).bit_length())


def _runtime(case: str, p: dict, provider: str, device: torch.device):
    from runtime.model import RuntimeModel
    from vlm.requests import build_batch

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
    rt.mapping = rt.make_mapping(reqs, batch.input_ids.shape[1])
    inputs = batch.model_inputs()

    def fn():
        with torch.no_grad():
            if case == "tower_connector":
                return arch.vision_features(rt.model, batch.pixel_inputs)
            return arch.forward_logits(rt.model, **inputs)
    return fn, _work(case, arch, cfg, reqs, batch)


def _reference(case: str, p: dict, device: torch.device):
    from reference.adapters import AdapterSpec, add_adapters
    from vlm.requests import build_batch

    n, r, dt = p["n_adapters"], p["rank"], DTYPES[p["dtype"]]
    k = _bucket(n)

    def make():
        arch, cfg, model = _build(p["model"], dt, device)
        specs = [AdapterSpec(f"a{i}", GROUPS[case], rank=r, alpha=2 * r, seed=10 + i) for i in range(k)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = add_adapters(model, arch, specs)
        return arch, cfg, pm

    arch, cfg, pm = _cached(("reference", p["model"], p["dtype"], case, r, k, str(device)), make)
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
                        arch.vision_features(hf, b.pixel_inputs)
                    else:
                        arch.forward_logits(pm, **b.model_inputs())
    return fn, _work(case, arch, cfg, reqs, build_batch(arch, cfg, reqs))


def _work(case, arch, cfg, reqs, batch) -> Work:
    images = sum(len(q.images) for q in reqs)
    if case == "tower_connector":
        tokens = sum(group_row_counts(arch, cfg, reqs, "tower"))
    else:
        tokens = sum(batch.lengths)
    return Work(tokens=float(tokens), images=float(images))


def _e2e(case: str):
    def build(p: dict, provider: str, device: torch.device):
        if p["images"] < 1 or p["n_adapters"] < 0 or p["rank"] < 1:
            raise ValueError(f"{case} needs images >= 1, n_adapters >= 0, rank >= 1, got {p}")
        if provider not in E2E_PROVIDERS:
            raise ValueError(f"unknown provider {provider!r} for {case}")
        reason = _unavailable(provider)
        if reason:
            raise Unavailable(reason)
        if PROVIDERS[provider].reference:
            return _reference(case, p, device)
        return _runtime(case, p, provider, device)
    return build


def _listed(p: LoRAProvider) -> bool:
    return p.reference or p.runtime or p.bench.e2e_unavailable is not None


# the providers end-to-end cases list, in the registry's order
E2E_PROVIDERS: tuple[str, ...] = tuple(name for name, p in PROVIDERS.items() if _listed(p))


def _unavailable(provider: str) -> str | None:
    p = PROVIDERS[provider]
    return p.unavailable(None, None) or p.bench.e2e_unavailable


E2E_CASES: dict[str, Case] = {
    "tower_connector": Case("tower_connector", "e2e", E2E_PROVIDERS, "images", _e2e("tower_connector"),
                            unavailable=_unavailable),
    "prefill": Case("prefill", "e2e", E2E_PROVIDERS, "images", _e2e("prefill"), unavailable=_unavailable),
}
