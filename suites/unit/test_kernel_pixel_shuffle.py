"""pixel_shuffle: Triton kernel vs torch twin vs HF's Llama 4 and InternVL functions (bitwise: a permutation)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.internvl.modeling_internvl import InternVLModel
from transformers.models.llama4.modeling_llama4 import pixel_shuffle as hf_llama4_pixel_shuffle

from runtime.kernels import pixel_shuffle, pixel_shuffle_torch
from suites.helpers import DEV

N_EX = settings.default.max_examples
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def hf_internvl(x, ratio):
    return InternVLModel.pixel_shuffle(None, x, scale_factor=ratio)  # uses no state of self


def data(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


@settings(max_examples=N_EX)
@given(n=st.sampled_from([1, 2, 4]), side=st.integers(1, 4), b=st.integers(1, 2), c=st.integers(1, 8),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_llama4_pixel_shuffle_equals_hf_bitwise(n, side, b, c, dtype, seed):
    p = n * side
    x = data((b, p * p, c), dtype, seed)
    ref = hf_llama4_pixel_shuffle(x, 1 / n)
    got = pixel_shuffle(x, 1 / n, variant="tokens")
    assert got.shape == ref.shape == (b, side * side, c * n * n)
    assert torch.equal(got, ref) and torch.equal(pixel_shuffle_torch(x, 1 / n, variant="tokens"), ref)


@settings(max_examples=N_EX)
@given(n=st.sampled_from([1, 2, 4]), w=st.integers(1, 4), h=st.integers(1, 4), b=st.integers(1, 2),
       c=st.integers(1, 8), transposed=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_internvl_pixel_shuffle_equals_hf_bitwise(n, w, h, b, c, transposed, dtype, seed):
    """Non-square grids are fine for InternVL's method; a transposed (strided) input checks the strides."""
    x = data((b, h * n, w * n, c), dtype, seed).transpose(1, 2) if transposed else data((b, w * n, h * n, c), dtype, seed)
    ref = hf_internvl(x.contiguous(), 1 / n)  # HF views its input: its caller passes a contiguous tensor
    got = pixel_shuffle(x, 1 / n, variant="grid")
    assert got.shape == ref.shape == (b, w, h, c * n * n)
    assert torch.equal(got, ref) and torch.equal(pixel_shuffle_torch(x, 1 / n, variant="grid"), ref)


def test_both_variants_are_the_same_permutation():
    """Only the rank differs: InternVL on [B, P, P, C] flattened equals Llama 4 on [B, P*P, C]."""
    x = data((2, 36, 5), torch.float32, 0)
    assert torch.equal(pixel_shuffle(x, 0.5, "tokens"), pixel_shuffle(x.view(2, 6, 6, 5), 0.5, "grid").view(2, 9, 20))


@pytest.mark.parametrize("variant, shape, match", [
    ("tokens", (1, 9, 4), "P=3"),            # odd square grid
    ("tokens", (1, 12, 4), "N=12"),          # non-square patch count
    ("grid", (1, 3, 4, 4), "width=3"),   # odd width
    ("grid", (1, 4, 5, 4), "height=5"),  # odd height
])
def test_invalid_grids_raise_valueerror_where_hf_fails(variant, shape, match):
    x = torch.randn(shape, device=DEV)
    hf_fn = hf_llama4_pixel_shuffle if variant == "tokens" else hf_internvl
    with pytest.raises(RuntimeError):  # HF itself cannot handle these (fails inside .view)
        hf_fn(x, 0.5)
    for fn in (pixel_shuffle, pixel_shuffle_torch):
        with pytest.raises(ValueError, match=match):
            fn(x, 0.5, variant=variant)


def test_bad_ratio_and_variant_raise():
    x = torch.randn(1, 16, 4, device=DEV)
    with pytest.raises(ValueError, match="ratio=0.3"):
        pixel_shuffle(x, 0.3)
    with pytest.raises(ValueError, match="variant='qwen'"):
        pixel_shuffle(x, 0.5, variant="qwen")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pixel_shuffle_cuda_bf16_llama4_sized():
    """Llama 4 tower output (24x24 patches, 1408 channels), bf16: a permutation, so tolerance 0 (bitwise)."""
    x = data((3, 576, 1408), torch.bfloat16, 0)
    assert torch.equal(pixel_shuffle(x, 0.5, "tokens"), hf_llama4_pixel_shuffle(x, 0.5))
    y = data((3, 32, 32, 1024), torch.bfloat16, 1)
    assert torch.equal(pixel_shuffle(y, 0.5, "grid"), hf_internvl(y, 0.5))
