"""Launch configurations of the multi-LoRA kernels, per shape bucket, stored as data.

A config is the block shape, the split of the work over programs, the warps and the software-pipelining
depth of one launch. On CUDA it comes from `configs/<gpu>.json` (one file per GPU kind, e.g. `h200.json`;
`MMLORA_LORA_CONFIGS=FILE` points at another, e.g. the one the tuning script `harness/bench/tune.py`
writes): an ordered list of rules per op, the first rule whose `when` matches the call wins; a call that
no rule matches (or a GPU without a file) gets `fallback_*`, a deterministic formula. Under the Triton
interpreter the cost is programs x loop trips, so one block spans all rows and all of H / O
(`interpreter_*`), unless a test forces a config with `forced(...)` to run the K loop, split-K partials,
column tiling and partial tiles.

`when` keys (all optional): `T_max` (tokens), `W_max` (H for shrink, the widest slice's O for expand),
`rank_max` (r_max of the slot tables), `slices`, `dtype` ("bf16" | "fp16" | "fp32"): a call matches when
T <= T_max, W <= W_max, rank <= rank_max and slices / dtype are equal.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from runtime.kernels._util import clamp_pow2, interpreted

CONFIG_DIR = Path(__file__).with_name("configs")
ENV_FILE = "MMLORA_LORA_CONFIGS"
# torch.cuda.get_device_name() substring -> config file stem (the roofline profiles use the same names)
GPU_KINDS = {"H200": "h200", "H100": "h100", "A100": "a100"}
# Programs that fill an H100 / H200 twice over (132 SMs): enough waves that the tail of the last one is
# short, few enough that each program streams a useful amount. The fallback formulas aim at this.
TARGET_PROGRAMS = 264
WHEN_KEYS = ("T_max", "W_max", "rank_max", "slices", "dtype")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class ShrinkConfig:
    """v = x A^T: BLOCK_M-row tiles of one slot's tokens, BLOCK_K-wide steps over H, the H range split over
    `split_k` programs (each writes an fp32 partial; the partials are summed in a fixed order)."""

    block_m: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class ExpandConfig:
    """y += v B^T: BLOCK_M-row tiles, BLOCK_N-wide column tiles, the column tiles of a slice shared out
    over `col_split` programs (each keeps its v tile in registers while it walks its columns)."""

    block_m: int
    block_n: int
    col_split: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _check(cfg, where: str):
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {f.name} must be an integer >= 1, got {v!r}")
    for name in ("block_m", "block_k", "block_n"):
        v = getattr(cfg, name, 16)
        if v < 16 or v & (v - 1):  # tl.arange needs powers of two, tl.dot needs >= 16
            raise ValueError(f"{where}: {name} must be a power of two >= 16, got {v}")
    return cfg


# ----------------------------------------------------------------------------- deterministic fallback
def fallback_shrink(T: int, H: int, rank: int, slices: int) -> ShrinkConfig:
    """Row tiles grow with T (64 rows once T > 2048: fewer re-reads of A, still >= 64 tiles); K steps of 128
    (64 at rank > 32, keeping the A tile and accumulator small); then split H until about TARGET_PROGRAMS
    programs run, keeping at least two K steps per program so each still streams x."""
    block_r = clamp_pow2(rank, 16, 1 << 16)
    block_m = 16 if T <= 128 else 32 if T <= 2048 else 64
    block_k = 128 if block_r <= 32 else 64
    tiles = -(-T // block_m) * slices
    max_split = max(1, H // (2 * block_k))
    split = 1
    while split * 2 <= max_split and tiles * split * 2 <= TARGET_PROGRAMS:
        split *= 2
    return ShrinkConfig(block_m, block_k, split, num_warps=4, num_stages=4)


def fallback_expand(T: int, width: int, rank: int, slices: int) -> ExpandConfig:
    """64-row tiles (16 for small T: fewer masked rows); 128 columns at rank <= 32, 64 above (the bf16 B tile
    is rank x BLOCK_N); the column tiles shared out so about TARGET_PROGRAMS programs run, each walking
    several tiles with its v tile kept in registers; 8 warps at rank >= 64 (larger v / B tiles)."""
    block_r = clamp_pow2(rank, 16, 1 << 16)
    block_m = 16 if T <= 128 else 64
    block_n = 128 if block_r <= 32 else 64
    col_tiles = -(-width // block_n)
    row_tiles = -(-T // block_m) * slices
    col_split = max(1, min(col_tiles, -(-TARGET_PROGRAMS // row_tiles)))
    return ExpandConfig(block_m, block_n, col_split, num_warps=8 if block_r >= 64 else 4, num_stages=3)


def interpreter_shrink(T: int, H: int) -> ShrinkConfig:
    return ShrinkConfig(clamp_pow2(T, 16, 256), clamp_pow2(H, 16, 4096), 1, 1, 1)


def interpreter_expand(T: int, width: int) -> ExpandConfig:
    return ExpandConfig(clamp_pow2(T, 16, 256), clamp_pow2(width, 16, 4096), 1, 1, 1)


# ----------------------------------------------------------------------------- stored tables
@dataclass(frozen=True)
class Rule:
    when: dict
    config: ShrinkConfig | ExpandConfig

    def matches(self, T: int, W: int, rank: int, slices: int, dtype: str) -> bool:
        w = self.when
        return (T <= w.get("T_max", T) and W <= w.get("W_max", W) and rank <= w.get("rank_max", rank)
                and slices == w.get("slices", slices) and dtype == w.get("dtype", dtype))


@dataclass(frozen=True)
class Table:
    path: str
    shrink: tuple[Rule, ...]
    expand: tuple[Rule, ...]


def parse_table(data: dict, path: str = "<data>") -> Table:
    """Validate a config file's content (a wrong file must fail loudly, not launch a bad kernel)."""
    out = {}
    for op, cls in (("shrink", ShrinkConfig), ("expand", ExpandConfig)):
        rules = []
        for i, r in enumerate(data.get(op, [])):
            where = f"{path}: {op}[{i}]"
            unknown = set(r.get("when", {})) - set(WHEN_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown 'when' keys {sorted(unknown)}; expected {WHEN_KEYS}")
            try:
                cfg = cls(**r["config"])
            except (KeyError, TypeError) as e:
                raise ValueError(f"{where}: bad config {r.get('config')!r}: {e}") from None
            rules.append(Rule(dict(r.get("when", {})), _check(cfg, where)))
        out[op] = tuple(rules)
    return Table(path, out["shrink"], out["expand"])


def load_table(path: str | Path) -> Table:
    path = Path(path)
    return parse_table(json.loads(path.read_text()), str(path))


_TABLES: dict[str, Table | None] = {}


def table_for(device_name: str | None) -> Table | None:
    """The stored table for this GPU (or MMLORA_LORA_CONFIGS); None when there is none."""
    env = os.environ.get(ENV_FILE)
    if env:
        key = f"file:{env}"
        if key not in _TABLES:
            _TABLES[key] = load_table(env)
        return _TABLES[key]
    kind = next((k for m, k in GPU_KINDS.items() if device_name and m in device_name), None)
    if kind is None:
        return None
    if kind not in _TABLES:
        path = CONFIG_DIR / f"{kind}.json"
        _TABLES[kind] = load_table(path) if path.is_file() else None
    return _TABLES[kind]


def _device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


# ----------------------------------------------------------------------------- forcing (tests, tuning)
_FORCED: dict[str, ShrinkConfig | ExpandConfig] = {}


@contextlib.contextmanager
def forced(shrink: ShrinkConfig | None = None, expand: ExpandConfig | None = None) -> Iterator[None]:
    """Every call inside uses these configs (tests: small blocks under the interpreter; the tuner: each
    candidate)."""
    old = dict(_FORCED)
    if shrink is not None:
        _FORCED["shrink"] = _check(shrink, "forced shrink")
    if expand is not None:
        _FORCED["expand"] = _check(expand, "forced expand")
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(old)


def is_forced() -> bool:
    """A `forced` block is in effect (the kernels then launch as on a GPU, see lora_grouping.tile_grid)."""
    return bool(_FORCED)


def select(table: Table | None, op: str, T: int, W: int, rank: int, slices: int, dtype: str
           ) -> ShrinkConfig | ExpandConfig | None:
    """The first rule of `table` for `op` that matches the call, or None."""
    for rule in getattr(table, op, ()) if table is not None else ():
        if rule.matches(T, W, rank, slices, dtype):
            return rule.config
    return None


def _lookup(op: str, T: int, W: int, rank: int, slices: int, dtype: torch.dtype, device: torch.device):
    if op in _FORCED:
        return _FORCED[op], "forced"
    if interpreted():
        return (interpreter_shrink(T, W) if op == "shrink" else interpreter_expand(T, W)), "interpreter"
    table = table_for(_device_name(device))
    cfg = select(table, op, T, W, rank, slices, _DTYPE_NAMES.get(dtype, str(dtype)))
    if cfg is not None:
        return cfg, table.path
    fb = fallback_shrink(T, W, rank, slices) if op == "shrink" else fallback_expand(T, W, rank, slices)
    return fb, "fallback"


def shrink_config(T: int, H: int, rank: int, slices: int, dtype: torch.dtype, device: torch.device
                  ) -> ShrinkConfig:
    return _lookup("shrink", T, H, rank, slices, dtype, device)[0]


def expand_config(T: int, width: int, rank: int, slices: int, dtype: torch.dtype, device: torch.device
                  ) -> ExpandConfig:
    return _lookup("expand", T, width, rank, slices, dtype, device)[0]


def describe(op: str, T: int, W: int, rank: int, slices: int, dtype: torch.dtype, device: torch.device) -> str:
    """Which config a call gets and where it came from (the bench and the tuner log it)."""
    cfg, source = _lookup(op, T, W, rank, slices, dtype, device)
    return f"{op} {asdict(cfg)} from {source}"
