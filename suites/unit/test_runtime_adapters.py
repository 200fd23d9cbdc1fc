"""Slot tables: scale folded into B, ranks zero-padded, replace in place, unload frees the slot and
restores the base model's output. Checked against the adapter file itself (independent of the kernels)."""

from __future__ import annotations

import math

import pytest
import torch

from reference.adapters import DEFAULT_SPECS, add_adapters, save_adapters
from runtime.model import RuntimeModel
from vlm.adapter_files import read_adapter
from vlm.arch import get_arch
from vlm.checkpoint import build_tiny, save_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("slots")
    arch = get_arch("llama4")
    save_checkpoint(build_tiny(arch)[1], root / "ckpt")
    folders = save_adapters(add_adapters(build_tiny(arch)[1], arch, DEFAULT_SPECS), root / "ad")
    return root, folders


def test_scale_folded_and_rank_padded(setup):
    root, folders = setup
    rt = RuntimeModel.from_checkpoint(root / "ckpt", r_max=16)
    slot = rt.load_adapter("tower", folders["tower"])  # rsLoRA r=16, alpha=16
    ad = read_adapter(folders["tower"])
    name, w = next(iter(ad.modules.items()))
    r = w.A.shape[0]
    assert math.isclose(w.scale, ad.config["lora_alpha"] / math.sqrt(ad.config["r"]))
    torch.testing.assert_close(rt.tables.A[name][slot, :r], w.A)
    torch.testing.assert_close(rt.tables.B[name][slot, :, :r], w.B * w.scale)
    slot_lm = rt.load_adapter("lm", folders["lm"])  # r=4 padded to 16 with zeros
    name_lm = next(iter(read_adapter(folders["lm"]).modules))
    assert torch.count_nonzero(rt.tables.A[name_lm][slot_lm, 4:]) == 0
    assert torch.count_nonzero(rt.tables.B[name_lm][slot_lm, :, 4:]) == 0


def test_replace_keeps_the_slot_and_unload_frees_it(setup):
    root, folders = setup
    rt = RuntimeModel.from_checkpoint(root / "ckpt")
    s = rt.load_adapter("x", folders["all"])
    assert rt.load_adapter("x", folders["lm"]) == s  # replaced in place
    name_tower = next(n for n in read_adapter(folders["all"]).modules if n.startswith("vision_model."))
    assert torch.count_nonzero(rt.tables.A[name_tower][s]) == 0  # the old adapter's tower weights are gone
    rt.unload_adapter("x")
    assert all(torch.count_nonzero(t[s]) == 0 for t in rt.tables.B.values())
    assert rt.load_adapter("y", folders["all"]) == s  # the freed slot is reused
    with pytest.raises(ValueError, match="'x' is not loaded"):
        rt.unload_adapter("x")


def test_mapping_checks_slot_ids_on_the_host_and_groups_without_reading_the_device(setup):
    """The runtime validates slot ids where it builds the mapping (python ints), so its per-group grouping
    is built on the device with nothing read back: what lets a batch's LoRA calls run in a CUDA graph."""
    from runtime.mapping import build_mapping
    from suites.unit.test_kernel_lora_paths import no_host_reads
    from vlm.requests import make_request

    root, folders = setup
    rt = RuntimeModel.from_checkpoint(root / "ckpt")
    rt.load_adapter("all", folders["all"])
    arch, cfg = rt.arch, rt.config
    reqs = [make_request(arch, cfg, [arch.default_geometry(cfg)], a, seed=i) for i, a in enumerate(["all", None])]
    with pytest.raises(ValueError, match=r"slot ids must lie in \[-1, 7\], got \[8\]"):
        build_mapping(arch, cfg, reqs, [0, 8], 40, n_slots=rt.tables.max_slots)
    mapping = rt.make_mapping(reqs, 40)
    with no_host_reads():
        groupings = {g: mapping.grouping(s) for g, s in mapping.slots.items()}
    for g, s in mapping.slots.items():
        assert groupings[g].counts.tolist()[:2] == [int((s == -1).sum()), int((s == 0).sum())]
