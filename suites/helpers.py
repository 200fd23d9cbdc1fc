"""Helpers every suite shares: the test device, scale-aware closeness, and the kernels' tolerances."""

from __future__ import annotations

import os

import pytest
import torch

from runtime.kernels import KERNELS

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close_scaled(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str = "") -> None:
    """max |got - ref| <= rel * max |ref| (a scale-aware bound: the error relative to the tensor's size)."""
    err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    assert err <= rel * max(scale, 1e-30), f"{what}: max abs err {err:.3g} > {rel} x max|ref| {scale:.3g}"


def rel_tol(kernel: str) -> dict:
    """The kernel spec's tolerance by dtype (justified beside the spec in runtime/kernels)."""
    return dict(KERNELS[kernel].rel_tol)


def need_vllm() -> None:
    """Skip when vLLM's kernels cannot run here; fail instead where MMLORA_REQUIRE_VLLM=1 (the `vllm_kernels`
    nox session, which installed them: there a skip would hide a vLLM release that broke the import)."""
    from runtime.vllm_lora import unavailable_reason

    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("MMLORA_REQUIRE_VLLM") == "1":
        pytest.fail(f"MMLORA_REQUIRE_VLLM=1 but vLLM's kernels cannot run: {reason}")
    pytest.skip(reason)
