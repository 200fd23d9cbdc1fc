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


def need_vllm_models(*modules: str, before=None) -> None:
    """Skip unless vLLM's model modules `vllm.model_executor.models.<m>` import here (`nox -s vllm_towers` /
    `vllm_engine` install them); fail instead where MMLORA_REQUIRE_VLLM=1, as need_vllm. `before`: called first,
    inside the same check (runtime.vllm_towers.setup, which picks vLLM's platform before its first import)."""
    import importlib

    if not torch.cuda.is_available():  # what vLLM must see before its first import on CPU (runtime/vllm_lora.py)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    try:
        if before is not None:
            before()
        importlib.import_module("vllm")  # with no module named, vLLM itself
        for m in modules:
            importlib.import_module(f"vllm.model_executor.models.{m}")
    except Exception as e:  # noqa: BLE001 - whatever stops the import is the reason
        reason = f"vLLM's model modules do not import here: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if os.environ.get("MMLORA_REQUIRE_VLLM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
