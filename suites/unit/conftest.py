"""Fixtures the unit suites share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """A tiny llama4 checkpoint and its three default PEFT adapters, saved through the real code; tests copy
    before they modify."""
    from reference.adapters import DEFAULT_SPECS, add_adapters, save_adapters
    from vlm.arch import get_arch
    from vlm.checkpoint import build_tiny, save_checkpoint

    root = tmp_path_factory.mktemp("saved")
    arch = get_arch("llama4")
    _, model = build_tiny(arch)
    save_checkpoint(model, root / "ckpt")
    folders = save_adapters(add_adapters(build_tiny(arch)[1], arch, DEFAULT_SPECS), root / "adapters")
    return root, folders
