"""Helpers every suite shares: the test device, scale-aware closeness, and the kernels' tolerances."""

from __future__ import annotations

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
