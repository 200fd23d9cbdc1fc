"""vLLM's model class and its worker LoRA manager, built from a reference bundle's checkpoint on CPU.

vLLM's own code, imported: `ModelConfig` / `VllmConfig` / `LoRAConfig` (with `mm_encoder_only=True`, vLLM's
`--mm-encoder-only`: the model class builds its tower and connector and leaves the language model a
`StageMissingLayer`, so no LM attention is built), the model class through `initialize_model`, its
`load_weights` through the default (safetensors) loader, `process_weights_after_loading`, and
`LRUCacheWorkerLoRAManager` / `create_lora_manager` / `LoRAModelManager` with
`enable_tower_connector_lora=True` exactly as `lora_model_runner_mixin.load_lora_model` creates them
(on CPU the platform's punica wrapper is vLLM's `PunicaWrapperCPU`; `punica="gpu"`: vLLM's `PunicaWrapperGPU`, its
Triton kernels in the Triton interpreter, see `lora_manager`).

Reproduced (two steps of vLLM's own loader / manager skipped, said where): `BaseModelLoader.load_model`'s body
minus `log_online_quantization` (its import needs `compressed_tensors`, which the vllm_towers venv lacks; it only
logs); and `MultiModalBudget` in `LoRAModelManager._maybe_init_mm`, which builds vLLM's HF processor and so
needs a tokenizer the tiny checkpoint has not got: `_Budget` below stands in for it, with the batch's largest
image (placeholders) where vLLM asks its processor for the largest it can make, and vLLM's own budget function
from there (the `num_mm_embeds` the manager asks the count helper about to size the tower / connector punica
wrappers). It sizes buffers only; every mapping is vLLM's."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class _Budget:
    """Stand-in for vLLM's MultiModalBudget (see the module docstring): one image modality, `limit` images per
    prompt, at most `per_item` placeholder embeddings per image (vLLM asks its processor for the largest; here the
    batch's largest). The encoder budget is vLLM's own `compute_mm_encoder_budget` from the scheduler config,
    as MultiModalBudget computes it."""

    def __init__(self, vc, per_item: int, limit: int):
        from vllm.v1.core.encoder_cache_manager import compute_mm_encoder_budget

        self.mm_max_items_per_prompt = {"image": limit}
        self.mm_max_toks_per_item = {"image": per_item}
        self.encoder_compute_budget, self.encoder_cache_size = compute_mm_encoder_budget(
            vc.scheduler_config, self.mm_max_toks_per_item)

    def get_encoder_budget(self) -> int:  # MultiModalBudget.get_encoder_budget
        return min(self.encoder_compute_budget, self.encoder_cache_size)


def vllm_config(ckpt: Path, dtype: str, max_loras: int, max_rank: int, processor_kwargs: dict | None = None,
                target_modules: list[str] | None = None, hf_overrides: dict | None = None):
    """`target_modules`: vLLM's `--lora-target-modules` (module name suffixes to wrap); None: every supported
    module, vLLM's default."""
    from vllm.config import LoadConfig, LoRAConfig, ModelConfig, VllmConfig

    mc = ModelConfig(model=str(ckpt), skip_tokenizer_init=True, dtype=DTYPES[dtype], mm_encoder_only=True,
                     enforce_eager=True, mm_processor_kwargs=processor_kwargs,
                     hf_overrides=hf_overrides or {})
    lc = LoRAConfig(max_lora_rank=max_rank, max_loras=max_loras, max_cpu_loras=max_loras,
                    enable_tower_connector_lora=True, target_modules=target_modules)
    return VllmConfig(model_config=mc, lora_config=lc,
                      load_config=LoadConfig(load_format="safetensors", use_tqdm_on_load=False))


# vLLM ops whose module binds `torch.ops._C.<op>` when built on CPU but, on x86, runs its torch-native forward
# (`forward_cpu` -> `forward_native`): vLLM's CPU extension (vllm._C) is not in the CUDA wheel the vllm_towers
# session installs, so the binding fails though the op is never called. Defined here as ops that raise if called.
_UNCALLED_C_OPS = {"gelu_quick": "(Tensor(a!) out, Tensor x) -> ()"}
_LIB = None


def stub_uncalled_c_ops() -> list[str]:
    """Define each of `_UNCALLED_C_OPS` vLLM's `_C` lacks here, as an op that raises; returns those defined."""
    global _LIB
    missing = [n for n in _UNCALLED_C_OPS if not hasattr(torch.ops._C, n)]
    if not missing:
        return []
    if _LIB is None:
        _LIB = torch.library.Library("_C", "FRAGMENT")
    for name in missing:
        _LIB.define(f"{name}{_UNCALLED_C_OPS[name]}")

        def never(*_a, name=name):
            raise RuntimeError(f"torch.ops._C.{name} called: vLLM's CPU extension (vllm._C) is not installed")
        _LIB.impl(name, never, "CompositeExplicitAutograd")
    return missing


def setup_distributed() -> None:
    """A world-size-1 gloo group, once per process (runtime/vllm_towers.py's)."""
    from runtime import vllm_towers

    vllm_towers.setup()


def load_model(vc):
    """`BaseModelLoader.load_model` (vllm/model_executor/model_loader/base_loader.py) without its online-quantization
    log: `initialize_model` in the model dtype on CPU, the loader's `load_weights` (the class's own), then
    `process_weights_after_loading`."""
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    mc, device = vc.model_config, torch.device("cpu")
    loader = get_model_loader(vc.load_config)
    with set_default_torch_dtype(mc.dtype), device:
        model = initialize_model(vllm_config=vc, model_config=mc)
    loader.load_weights(model, mc)
    process_weights_after_loading(model, mc, device)
    return model.eval()


PUNICA = {"cpu": "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU",  # vLLM's CPU platform's answer
          "gpu": "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"}  # its CUDA / ROCm platforms' answer


class PunicaRefused(ValueError):
    """`--punica gpu` cannot run here (one line, exit 2)."""


def punica_refusal(punica: str, dtype: str) -> str | None:
    """Why vLLM's Triton LoRA kernels cannot run at `dtype` here (one line), or None. The engine builds vLLM's
    model on CPU (`load_model`), where Triton kernels run only in the Triton interpreter, which must be on before
    triton is imported (runtime/__init__.py sets TRITON_INTERPRET when torch sees no CUDA); there vLLM's shrink
    asserts fp16 / bf16 and the interpreter's bf16 `tl.dot` is wrong: fp16 only."""
    from runtime.kernels._util import interpreted

    if punica != "gpu":
        return None
    if not interpreted():
        return ("--punica gpu: the engine builds vLLM's model on CPU, where vLLM's Triton kernels run only in the "
                "Triton interpreter: set TRITON_INTERPRET=1 before anything imports triton")
    if dtype != "fp16":
        return (f"--punica gpu runs vLLM's Triton LoRA kernels in the Triton interpreter here, which needs an "
                f"fp16 reference (the bundle is {dtype}: vLLM's lora_shrink asserts fp16 / bf16, and the "
                f"interpreter's bf16 tl.dot is wrong); record one with mmlora record --dtype fp16")
    return None


def lora_manager(model, vc, per_item: int, limit: int, punica: str = "cpu"):
    """vLLM's worker LoRA manager for `model` (`lora_model_runner_mixin.load_lora_model`), with `_Budget` for
    MultiModalBudget. Returns the worker manager; its `_adapter_manager` is the LRUCacheLoRAModelManager.

    `punica`: which punica wrapper vLLM's own selector (`get_punica_wrapper` in
    vllm/lora/punica_wrapper/punica_selector.py) builds for every group. It asks the platform,
    `current_platform.get_punica_wrapper()`; "cpu" leaves that alone (the CPU platform: `PunicaWrapperCPU`),
    "gpu" answers that one question as vLLM's CUDA platform does (`PunicaWrapperGPU`) while the manager is built,
    nothing else of the platform changed. Its Triton kernels (`lora_shrink` / `lora_expand`) then run in the
    Triton interpreter, with the interpreter configs runtime/vllm_lora.py hands vLLM's own config loader."""
    import vllm.lora.model_manager as mm
    import vllm.lora.punica_wrapper.punica_selector as selector
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    if punica not in PUNICA:
        raise PunicaRefused(f"--punica {punica!r}: one of {', '.join(PUNICA)}")
    patch = contextlib.nullcontext()
    if punica == "gpu":
        from runtime import vllm_lora

        try:
            vllm_lora.load()  # vLLM's kernels importable, Triton live; the interpreter's configs primed
        except vllm_lora.VLLMUnavailable as e:
            raise PunicaRefused(f"--punica gpu: {e}") from None
        from unittest import mock

        patch = mock.patch.object(selector.current_platform, "get_punica_wrapper", lambda: PUNICA["gpu"])
    held = mm.MultiModalBudget
    mm.MultiModalBudget = lambda *_a, **_k: _Budget(vc, per_item, limit)
    try:
        with patch:
            wm = LRUCacheWorkerLoRAManager(vc, torch.device("cpu"), model.embedding_modules)
            wm.create_lora_manager(model, vc)
    finally:
        mm.MultiModalBudget = held
    return wm


@contextlib.contextmanager
def vllm_context(vc):
    from vllm.config import set_current_vllm_config

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    setup_distributed()
    stub_uncalled_c_ops()
    with set_current_vllm_config(vc):
        yield
