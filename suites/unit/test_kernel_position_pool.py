"""position_pool: Triton kernel vs torch twin vs python loop, and vs HF's real Gemma4VisionPooler."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.gemma4 import modeling_gemma4 as hf
from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

from runtime.kernels import (
    position_pool,
    position_pool_bruteforce,
    position_pool_torch,
)
from suites.helpers import DEV, assert_close_scaled, rel_tol
from vlm.arch import get_arch

N_EX = settings.default.max_examples
D = 8

REL = rel_tol("position_pool")  # justified beside the spec in runtime/kernels/position_pool.py
# the arch file's binding of the kernel into HF's Gemma4VisionPooler.forward, as the runtime installs it
gemma4_pooler_forward = next(s for s in get_arch("gemma4").kernel_sites() if s.kernel == "position_pool").bind(position_pool)



def hf_pooler(hidden_size=D):
    return hf.Gemma4VisionPooler(Gemma4VisionConfig(hidden_size=hidden_size))


def grid_positions(hp, wp):
    """(col, row) per patch in row-major order, as Gemma4's processor lays them out (x first)."""
    rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    return torch.stack([cols.flatten(), rows.flatten()], dim=-1)


def batch(grids, n, gen, shuffle):
    """Pad each (hp, wp) grid with (-1, -1) rows to n patches; optionally permute the sequence order."""
    pos = []
    for hp, wp in grids:
        p = torch.cat([grid_positions(hp, wp), torch.full((n - hp * wp, 2), -1)])
        pos.append(p[torch.randperm(n, generator=gen)] if shuffle else p)
    return torch.stack(pos).to(DEV)


@st.composite
def hf_valid_cases(draw):
    """Grids HF handles: Hp and Wp multiples of k; L = the largest image's bins plus spare, N = k^2 L."""
    k = draw(st.integers(2, 3))
    blocks = draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), min_size=1, max_size=3))
    L = max(h * w for h, w in blocks) + draw(st.integers(0, 2))
    return dict(k=k, grids=[(h * k, w * k) for h, w in blocks], L=L, shuffle=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=N_EX)
@given(hf_valid_cases())
def test_position_pool_equals_hf_on_valid_grids(case):
    gen = torch.Generator().manual_seed(case["seed"])
    k, L, dtype = case["k"], case["L"], case["dtype"]
    pos = batch(case["grids"], k * k * L, gen, case["shuffle"])
    pad = (pos == -1).all(-1)
    hidden = torch.randn(len(case["grids"]), k * k * L, D, generator=gen).to(DEV, dtype)
    pooler = hf_pooler()

    # The raw pooling step (HF expects padding already zeroed; ours ignores padding whatever it holds).
    ref, ref_mask = pooler._avg_pool_by_positions(hidden.masked_fill(pad[..., None], 0.0), pos, L)
    got, mask = position_pool(hidden, pos, k, L)
    assert got.dtype == ref.dtype and torch.equal(mask, ref_mask)
    assert_close_scaled(got, ref, REL[dtype], "position_pool vs HF")

    # The substituted forward: same outputs, dtype (float32) and mask as HF's forward.
    ref_out, ref_valid = pooler(hidden_states=hidden, pixel_position_ids=pos, padding_positions=pad, output_length=L)
    out, valid = gemma4_pooler_forward(pooler, hidden, pos, pad, L)
    assert out.dtype == ref_out.dtype == torch.float32 and torch.equal(valid, ref_valid)
    assert_close_scaled(out, ref_out, REL[dtype], "pooler forward vs HF")


@st.composite
def any_grid_cases(draw):
    """Any grid (Wp % k != 0 too), any order, spare bins; N independent of L (ours does not need N = k^2 L)."""
    k = draw(st.integers(1, 3))
    grids = draw(st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=3))
    need = max(-(-h // k) * -(-w // k) for h, w in grids)
    return dict(k=k, grids=grids, L=need + draw(st.integers(0, 2)), pad=draw(st.integers(0, 5)),
                shuffle=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
                dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])))


@settings(max_examples=N_EX)
@given(any_grid_cases())
def test_position_pool_kernel_twin_and_loop_agree(case):
    gen = torch.Generator().manual_seed(case["seed"])
    n = max(h * w for h, w in case["grids"]) + case["pad"]
    pos = batch(case["grids"], n, gen, case["shuffle"])
    hidden = torch.randn(len(case["grids"]), n, D, generator=gen).to(DEV, case["dtype"])  # padding holds garbage
    args = (hidden, pos, case["k"], case["L"])
    got, mask = position_pool(*args)
    twin, twin_mask = position_pool_torch(*args)
    loop, loop_mask = position_pool_bruteforce(*args)
    rel = REL[case["dtype"]]
    assert torch.equal(mask, twin_mask) and torch.equal(mask.cpu(), loop_mask)
    assert_close_scaled(got, twin, rel, "kernel vs twin")
    assert_close_scaled(twin.cpu(), loop, rel, "twin vs python loop")
    assert torch.count_nonzero(got[~mask]) == 0, "invalid bins must be zero"


@st.composite
def hf_misassigned_cases(draw):
    """Wp % k != 0 and more than one block row: HF's floor(Wp/k) row stride puts patches in the wrong bin."""
    k = draw(st.integers(2, 3))
    wp = draw(st.integers(1, 8).filter(lambda w: w % k))
    hp = draw(st.integers(k + 1, 8))
    L = -(-hp // k) * -(-wp // k)
    return dict(k=k, hp=hp, wp=wp, L=L, seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=N_EX)
@given(hf_misassigned_cases())
def test_hf_pooler_misassigns_when_width_not_multiple_of_k(case):
    """EXPECTED DIFFERENCE (transformers <= 5.24, documented upstream bug): HF's bin index uses row stride
    floor(Wp/k) instead of ceil(Wp/k), so the first bin of every block row after the first aliases the last
    bin of the row before. HF either crashes in one_hot or returns a result that disagrees with the
    python-loop oracle; ours equals the oracle."""
    gen = torch.Generator().manual_seed(case["seed"])
    k, L = case["k"], case["L"]
    pos = batch([(case["hp"], case["wp"])], k * k * L, gen, shuffle=False)
    hidden = torch.randn(1, k * k * L, D, generator=gen).to(DEV)
    hidden = hidden.masked_fill((pos == -1).all(-1)[..., None], 0.0)
    loop, loop_mask = position_pool_bruteforce(hidden, pos, k, L)
    try:
        hf_out, hf_mask = hf_pooler()._avg_pool_by_positions(hidden, pos, L)
    except RuntimeError:  # one_hot: class values must be smaller than num_classes
        pass
    else:
        assert not (torch.allclose(hf_out.cpu(), loop.float(), atol=1e-5) and torch.equal(hf_mask.cpu(), loop_mask)), \
            "HF now pools Wp % k != 0 correctly: the floor(Wp/k) bug is fixed upstream, update the docs"
    got, mask = position_pool(hidden, pos, k, L)
    assert torch.equal(mask.cpu(), loop_mask)
    assert_close_scaled(got.cpu(), loop, REL[torch.float32], "ours vs loop on Wp % k != 0")


def test_hf_marks_bin0_valid_for_all_padding_row():
    """EXPECTED DIFFERENCE: HF clamps padding to (0, 0), so an all-padding batch row yields pooled token 0
    marked valid; ours marks no bin valid (a bin needs a real patch)."""
    pos = batch([(2, 2), (0, 0)], 8, torch.Generator().manual_seed(0), shuffle=False)
    hidden = torch.randn(2, 8, D, device=DEV).masked_fill((pos == -1).all(-1)[..., None], 0.0)
    _, hf_mask = hf_pooler()._avg_pool_by_positions(hidden, pos, 2)
    _, mask = position_pool(hidden, pos, 2, 2)
    assert hf_mask[1].tolist() == [True, False] and mask[1].tolist() == [False, False]


def test_hf_unpooled_forward_returns_padding_mask_not_valid_mask():
    """EXPECTED DIFFERENCE: when N == output_length (k = 1) HF's forward skips pooling and returns
    `padding_positions` (True = padding), while `Gemma4VisionModel.forward` indexes with it as True = valid;
    ours returns the valid mask and the same (masked, scaled) hidden states."""
    pos = batch([(2, 3)], 8, torch.Generator().manual_seed(0), shuffle=False)
    pad = (pos == -1).all(-1)
    hidden = torch.randn(1, 8, D, device=DEV)
    pooler = hf_pooler()
    ref, ref_mask = pooler(hidden, pos, pad, 8)
    out, valid = gemma4_pooler_forward(pooler, hidden, pos, pad, 8)
    assert torch.equal(ref_mask, pad) and torch.equal(valid, ~pad)
    assert torch.equal(out, ref)


def test_position_pool_rejects_grid_larger_than_output():
    pos = grid_positions(4, 4)[None].to(DEV)
    with pytest.raises(ValueError, match="output_length=3"):
        position_pool(torch.zeros(1, 16, D, device=DEV), pos, 2, 3)


def test_substituted_pooler_inside_tiny_gemma4_vision_model():
    """The arch file's substitution (its pooler forward bound to the model's pooler) reproduces HF's vision
    tower output on a padded two-image batch."""
    cfg = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, head_dim=8, patch_size=2, position_embedding_size=16,
                             pooling_kernel_size=2)
    torch.manual_seed(0)
    model = hf.Gemma4VisionModel(cfg).eval().to(DEV)
    L = 6
    pos = batch([(4, 6), (2, 4)], 4 * L, torch.Generator().manual_seed(1), shuffle=False)
    pixels = torch.rand(2, 4 * L, 3 * 2 * 2, device=DEV)
    with torch.no_grad():
        ref = model(pixel_values=pixels, pixel_position_ids=pos).last_hidden_state
        model.pooler.forward = types.MethodType(gemma4_pooler_forward, model.pooler)
        got = model(pixel_values=pixels, pixel_position_ids=pos).last_hidden_state
    assert got.shape == ref.shape == (6 + 2, 16)
    assert_close_scaled(got, ref, 1e-5, "vision model with substituted pooler")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_position_pool_cuda_bf16_gemma_sized():
    """SigLIP-sized tower (D=1152), 48x48 patches -> 16x16 tokens, padded batch, bf16. The kernel and HF
    both sum in fp32 and round once to bf16; an order difference can flip one bf16 ulp (2^-7): 1e-2."""
    k, L = 3, 280
    gen = torch.Generator().manual_seed(0)
    pos = batch([(48, 48), (30, 45)], k * k * L, gen, shuffle=True)
    pad = (pos == -1).all(-1)
    hidden = torch.randn(2, k * k * L, 1152, generator=gen).to(DEV, torch.bfloat16)
    ref, ref_mask = hf_pooler(1152)._avg_pool_by_positions(hidden.masked_fill(pad[..., None], 0), pos, L)
    got, mask = position_pool(hidden, pos, k, L)
    assert torch.equal(mask, ref_mask)
    assert_close_scaled(got, ref, 1e-2, "cuda bf16")
