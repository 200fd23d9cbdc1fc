"""LoRA launch configs as data: rule matching (first match wins), the deterministic fallback, the file
override the tuner's output goes through, forcing (tests, tuning), and loud failures on a bad file."""

from __future__ import annotations

import json

import pytest
import torch

from runtime.kernels import lora_config as lc


def _table(shrink=(), expand=()):
    return lc.parse_table({"shrink": list(shrink), "expand": list(expand)}, "test.json")


S16 = {"block_m": 16, "block_k": 128, "split_k": 8, "num_warps": 4, "num_stages": 4}
S64 = {"block_m": 64, "block_k": 64, "split_k": 1, "num_warps": 8, "num_stages": 3}


def test_first_matching_rule_wins_and_every_key_bounds():
    t = _table([{"when": {"T_max": 64, "rank_max": 32, "slices": 1, "dtype": "bf16", "W_max": 4096}, "config": S16},
                {"when": {}, "config": S64}])
    assert lc.select(t, "shrink", 64, 4096, 32, 1, "bf16") == lc.ShrinkConfig(**S16)
    for miss in ((65, 4096, 32, 1, "bf16"), (64, 8192, 32, 1, "bf16"), (64, 4096, 64, 1, "bf16"),
                 (64, 4096, 32, 3, "bf16"), (64, 4096, 32, 1, "fp16")):
        assert lc.select(t, "shrink", *miss) == lc.ShrinkConfig(**S64), miss
    assert lc.select(t, "expand", 64, 4096, 32, 1, "bf16") is None  # no expand rules: the fallback applies


def test_stored_h200_table_is_found_by_device_name():
    t = lc.table_for("NVIDIA H200")
    assert t is not None and t.path.endswith("h200.json")
    assert lc.table_for("NVIDIA L4") is None and lc.table_for(None) is None
    cfg = lc.select(t, "shrink", 4096, 4096, 16, 1, "bf16")
    assert cfg.split_k > 1, "T = 4096 must split H to fill 132 SMs (64 row tiles only)"


def test_env_file_overrides_the_stored_table(tmp_path, monkeypatch):
    f = tmp_path / "tuned.json"
    f.write_text(json.dumps({"shrink": [{"when": {}, "config": S64}], "expand": []}))
    monkeypatch.setenv(lc.ENV_FILE, str(f))
    t = lc.table_for("NVIDIA H200")
    assert t.path == str(f) and lc.select(t, "shrink", 1, 1, 1, 1, "bf16") == lc.ShrinkConfig(**S64)


@pytest.mark.parametrize("T,rank", [(1, 8), (64, 16), (1024, 64), (4096, 16), (16384, 128)])
def test_fallback_is_deterministic_and_sane(T, rank):
    a, b = lc.fallback_shrink(T, 4096, rank, 1), lc.fallback_shrink(T, 4096, rank, 1)
    assert a == b and a.block_m in (16, 32, 64) and a.split_k >= 1
    tiles = -(-T // a.block_m)
    assert tiles * a.split_k <= max(lc.TARGET_PROGRAMS, tiles)  # splits only add programs up to the target
    assert 4096 // (a.block_k * a.split_k) >= 2 or a.split_k == 1  # each split still walks >= 2 K steps
    e = lc.fallback_expand(T, 4096, rank, 1)
    assert e == lc.fallback_expand(T, 4096, rank, 1) and 1 <= e.col_split <= -(-4096 // e.block_n)


def test_forced_configs_apply_inside_and_restore_after():
    dev = torch.device("cpu")
    before = lc.shrink_config(100, 64, 8, 1, torch.float32, dev)
    with lc.forced(shrink=lc.ShrinkConfig(16, 16, 3)):
        assert lc.shrink_config(100, 64, 8, 1, torch.float32, dev) == lc.ShrinkConfig(16, 16, 3)
        assert "forced" in lc.describe("shrink", 100, 64, 8, 1, torch.float32, dev)
    assert lc.shrink_config(100, 64, 8, 1, torch.float32, dev) == before


@pytest.mark.parametrize("bad,match", [
    ({"shrink": [{"when": {"tokens": 5}, "config": S16}]}, "unknown 'when' keys"),
    ({"shrink": [{"when": {}, "config": {**S16, "block_m": 24}}]}, "power of two"),
    ({"shrink": [{"when": {}, "config": {**S16, "split_k": 0}}]}, "integer >= 1"),
    ({"expand": [{"when": {}}]}, "bad config"),
    ({"expand": [{"when": {}, "config": {"block_m": 16, "block_n": 64, "split_k": 2}}]}, "bad config"),
])
def test_a_bad_file_fails_loudly(bad, match):
    with pytest.raises(ValueError, match=match):
        lc.parse_table(bad, "bad.json")
