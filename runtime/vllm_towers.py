"""vLLM's own vision-tower modules (vllm 0.32), built from an HF model's weights, world size 1, to compare them
with HF's module by module (suites/unit/test_vllm_towers.py). Imported, never copied.

- Llama 4: `vllm.model_executor.models.mllama4.Llama4VisionModel` (vLLM's own code: fused qkv_proj, its
  linear layers, its pixel-shuffle adapter), weights through vLLM's own weight loaders (q/k/v shards into
  qkv_proj), then each layer's `process_weights_after_loading` (on CPU that picks vLLM's GEMM).
- Gemma 4: vLLM builds HF's tower itself (`AutoModel.from_config`) and swaps every nn.Linear for its
  ReplicatedLinear (`recursive_replace_linear`); the connector is vLLM's `Gemma4MultimodalEmbedder`.

What running them needs, beyond vLLM's kernels (measured on a CPU-only machine): a vLLM config context and a
world-size-1 process group (gloo on CPU) before any vLLM layer is built; VLLM_TARGET_DEVICE=cpu; vLLM's import
closure for its model modules (18 more packages than the kernels: see noxfile VLLM_MODEL_DEPS); and a
torchvision built for the installed torch, because vLLM's mllama4 module imports transformers' Llama 4 image
processor, which imports torchvision. PyPI has torchvision only for its CUDA torch builds: with a CPU torch
`import torchvision` fails ("operator torchvision::nms does not exist"), so a CPU machine runs this with PyPI's
torch + torchvision pair (CUDA builds, ~4 GB, no GPU needed) and a GPU runner with its own stack.
"""

from __future__ import annotations

import copy
import functools
import os

import torch

_CONTEXT = None


@functools.lru_cache(maxsize=1)
def setup(device: str = "cpu") -> object:
    """vLLM's config context and a world-size-1 process group, once per process; returns the VllmConfig."""
    if device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    config = VllmConfig()
    # entered for the rest of the process (vLLM's layers read the current config when built and when run); the
    # context object is kept, or its collection would exit the context
    global _CONTEXT
    _CONTEXT = set_current_vllm_config(config)
    _CONTEXT.__enter__()
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo" if device == "cpu" else "nccl",
                                 distributed_init_method=f"file://{os.path.join(os.environ.get('TMPDIR', '/tmp'), f'mmlora-vllm-{os.getpid()}')}")
    initialize_model_parallel(1, 1)
    return config


def _finish(module: torch.nn.Module) -> torch.nn.Module:
    """What vLLM's model loader does after loading: each quantization method post-processes its layer."""
    for m in module.modules():
        qm = getattr(m, "quant_method", None)
        if qm is not None and hasattr(qm, "process_weights_after_loading"):
            qm.process_weights_after_loading(m)
    return module.eval()


def llama4_tower(hf_vision_model: torch.nn.Module, vision_config) -> torch.nn.Module:
    """vLLM's Llama4VisionModel holding the weights of HF's `model.vision_model` (names under it)."""
    setup()
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader
    from vllm.model_executor.models.mllama4 import Llama4VisionModel

    p = next(hf_vision_model.parameters())
    # built in the weights' dtype, as vLLM's loader does (a .to(dtype) afterwards would make its complex RoPE
    # buffer real)
    held = torch.get_default_dtype()
    torch.set_default_dtype(p.dtype)
    try:
        with torch.device(p.device):
            tower = Llama4VisionModel(config=vision_config, quant_config=None, prefix="vision_model")
    finally:
        torch.set_default_dtype(held)
    params = dict(tower.named_parameters())
    loaded = set()
    for name, t in hf_vision_model.state_dict().items():
        shard = next((s for s in "qkv" if f".self_attn.{s}_proj." in name), None)
        target = name.replace(f".self_attn.{shard}_proj.", ".self_attn.qkv_proj.") if shard else name
        if target not in params:
            raise ValueError(f"HF tensor {name!r} has no place in vLLM's Llama4VisionModel")
        loader = getattr(params[target], "weight_loader", default_weight_loader)
        loader(params[target], t, shard) if shard else loader(params[target], t)
        loaded.add(target)
    if set(params) - loaded:
        raise ValueError(f"vLLM's Llama4VisionModel parameters left unloaded: {sorted(set(params) - loaded)}")
    return _finish(tower)


def gemma4_tower(hf_vision_tower: torch.nn.Module) -> torch.nn.Module:
    """HF's Gemma 4 tower as vLLM 0.32 runs it: every nn.Linear swapped for vLLM's ReplicatedLinear."""
    setup()
    from vllm.model_executor.models.transformers.utils import recursive_replace_linear

    tower = copy.deepcopy(hf_vision_tower)
    state = tower.state_dict()
    recursive_replace_linear(tower, None, prefix="vision_tower")
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"vLLM's Gemma 4 tower: missing {missing}, unexpected {unexpected}")
    return _finish(tower)


def gemma4_embedder(hf_embed_vision: torch.nn.Module, vision_config, text_config) -> torch.nn.Module:
    """vLLM's Gemma4MultimodalEmbedder (its RMSNorm without weight + ReplicatedLinear) with HF's projection."""
    setup()
    from vllm.model_executor.models.gemma4_mm import Gemma4MultimodalEmbedder

    w = hf_embed_vision.embedding_projection.weight
    with torch.device(w.device):
        emb = Gemma4MultimodalEmbedder(vision_config, text_config, quant_config=None, prefix="embed_vision").to(w.dtype)
    emb.embedding_projection.weight.data.copy_(w.data)
    return _finish(emb)
