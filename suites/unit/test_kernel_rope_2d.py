"""rope_2d: Triton kernel vs torch twin vs HF `apply_multidimensional_rope` with HF's own cos / sin tables."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.gemma4 import modeling_gemma4 as hf
from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

from runtime.kernels import rope_2d, rope_2d_torch
from suites.helpers import DEV, assert_close_scaled, rel_tol

N_EX = settings.default.max_examples

REL = rel_tol("rope_2d")  # kernel and HF: justified beside the spec in runtime/kernels/rope_2d.py



def vision_config(head_dim, heads=2):
    return Gemma4VisionConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=heads,
                              head_dim=head_dim, num_hidden_layers=1, intermediate_size=16)


@settings(max_examples=N_EX)
@given(b=st.integers(1, 2), seq=st.integers(1, 16), heads=st.integers(1, 3), head_dim=st.sampled_from([4, 8, 12, 16, 32]),
       unsqueeze_dim=st.sampled_from([1, 2]), padded=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_rope_2d_equals_hf(b, seq, heads, head_dim, unsqueeze_dim, padded, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 40, (b, seq, 2), generator=gen)
    if padded:  # padding patches carry (-1, -1); HF rotates them with position -1, so must we
        pos[:, seq // 2:] = -1
    pos = pos.to(DEV)
    shape = (b, seq, heads, head_dim) if unsqueeze_dim == 2 else (b, heads, seq, head_dim)
    x = torch.randn(shape, generator=gen).to(DEV, dtype)
    cos, sin = hf.Gemma4VisionRotaryEmbedding(vision_config(head_dim)).to(DEV)(x, pos)
    ref = hf.apply_multidimensional_rope(x, cos, sin, pos, unsqueeze_dim=unsqueeze_dim)
    got = rope_2d(x, cos, sin, pos, unsqueeze_dim=unsqueeze_dim)
    twin = rope_2d_torch(x, cos, sin, pos, unsqueeze_dim=unsqueeze_dim)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert_close_scaled(got, ref, REL[dtype], "kernel vs HF")
    assert_close_scaled(twin, ref, REL[dtype], "twin vs HF")
    # kernel and twin both compute in fp32 and round once: equal up to one ulp of fp32 contraction
    assert_close_scaled(got, twin, 1e-6 if dtype == torch.float32 else REL[dtype] / 2, "kernel vs twin")


def test_rope_2d_strided_input():
    """q as HF builds it can be a view (e.g. a slice of a fused projection): strides are honoured."""
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 9, (2, 5, 2), generator=gen).to(DEV)
    fused = torch.randn(2, 5, 3, 16, generator=gen).to(DEV)
    q = fused[:, :, 1:]  # non-contiguous [2, 5, 2, 16]
    cos, sin = hf.Gemma4VisionRotaryEmbedding(vision_config(16)).to(DEV)(q, pos)
    assert_close_scaled(rope_2d(q, cos, sin, pos), hf.apply_multidimensional_rope(q, cos, sin, pos), 1e-6)


def test_rope_2d_rejects_head_dim_hf_cannot_split():
    x = torch.randn(1, 3, 2, 6, device=DEV)  # 6 channels do not split into 2 even halves of pairs
    pos = torch.zeros(1, 3, 2, dtype=torch.long, device=DEV)
    cos = sin = torch.ones(1, 3, 6, device=DEV)
    with pytest.raises(RuntimeError):
        hf.apply_multidimensional_rope(x, cos, sin, pos)
    with pytest.raises(ValueError, match="head_dim=6"):
        rope_2d(x, cos, sin, pos)


def test_substituted_rope_inside_tiny_gemma4_vision_attention(monkeypatch):
    """The documented substitution (replace the module global) reproduces HF's attention output."""
    cfg = vision_config(8)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = hf.Gemma4VisionAttention(cfg, layer_idx=0).eval().to(DEV)
    pos = torch.randint(0, 6, (2, 7, 2)).to(DEV)
    h = torch.randn(2, 7, cfg.hidden_size, device=DEV)
    cos, sin = hf.Gemma4VisionRotaryEmbedding(cfg).to(DEV)(h, pos)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return rope_2d(*args, **kwargs)

    with torch.no_grad():
        ref, _ = attn(h, position_embeddings=(cos, sin), position_ids=pos)
        monkeypatch.setattr(hf, "apply_multidimensional_rope", counted)
        got, _ = attn(h, position_embeddings=(cos, sin), position_ids=pos)
    assert len(calls) == 2, "the attention must reach the substituted function for q and k"
    assert_close_scaled(got, ref, 1e-5, "attention with substituted rope")  # softmax/matmul on top: 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rope_2d_cuda_bf16_siglip_sized():
    """4096 patches, 16 heads x 72 head dim (SigLIP-so400m-like), bf16: HF rounds 3 times in bf16, the
    kernel once; worst case ~1.5 bf16 ulp (2^-7) at the largest element: 2e-2."""
    gen = torch.Generator().manual_seed(0)
    pos = torch.stack(torch.meshgrid(torch.arange(64), torch.arange(64), indexing="xy"), -1).reshape(1, 4096, 2)
    pos = pos.expand(2, -1, -1).to(DEV)
    x = torch.randn(2, 4096, 16, 72, generator=gen).to(DEV, torch.bfloat16)
    cos, sin = hf.Gemma4VisionRotaryEmbedding(vision_config(72, 16)).to(DEV)(x, pos)
    ref = hf.apply_multidimensional_rope(x, cos, sin, pos)
    assert_close_scaled(rope_2d(x, cos, sin, pos), ref, 2e-2, "cuda bf16")
