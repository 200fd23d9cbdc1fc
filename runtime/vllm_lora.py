"""vLLM's own Triton multi-LoRA kernels (`lora_shrink` / `lora_expand`) as a LoRA provider of the runtime.

Imported, never copied: the system under test is the installed vLLM wheel (tested with vllm==0.32.0, installed
with `--no-deps`: only the kernels are needed, and vLLM's own requirements pin a CUDA torch and ~140 packages).
The calls are the ones vLLM's engine makes (`PunicaWrapperGPU.add_lora_linear`): one `LoRAKernelMeta` per
token mapping, prepared once per batch (here: once per module group per batch, through the runtime's grouping
hook), an fp32 buffer [slices, T, r] that `lora_shrink` fills (scale 1.0: alpha/r is folded into B at load,
as vLLM does), then `lora_expand(..., add_inputs=True)` adds into y in place.

Numerics that differ from the project's own kernels (measured figures in docs/vllm.md): vLLM's expand casts the fp32
intermediate to the weights' dtype before its dot, and rounds the delta to that dtype before adding it to y
(two roundings; PEFT at fp16 / bf16 rounds the same places). Its shrink accepts only fp16 / bf16 inputs.

On a machine without CUDA (checked here, not assumed):
- vLLM must see `CUDA_VISIBLE_DEVICES=""` before it is imported: with no active Triton driver and no such
  variable, `vllm.triton_utils` swaps Triton for a placeholder whose `@jit` returns the bare Python function.
  And `VLLM_TARGET_DEVICE=cpu`: vLLM's fallback platform claims pinned memory, which a CPU torch lacks, so
  a call with several slices (packed q/k/v) fails building its pointer table.
- the kernels run in the Triton interpreter (`TRITON_INTERPRET=1`, set by `runtime/__init__.py`). There its
  bf16 `tl.dot` returns garbage (max error ~1e11 on a 64-token case), fp16 is right: bf16 is refused on CPU.
- vLLM's default configs split K 64 ways below 128 tokens: 1-7 s per shrink call in the interpreter, whose cost
  is programs x loop trips. vLLM reads tuned configs from `VLLM_TUNED_CONFIG_FOLDER`, keyed by
  `torch.cuda.get_device_name()`, which raises on a CPU-only torch; so `_prime_interpreter_configs` answers
  that one question ("CPU_INTERPRETER") while vLLM's own loader reads the interpreter configs written here
  (large blocks, split-K 1), and vLLM's own lookup then picks from them per call. On CUDA nothing is touched.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch

from runtime.kernels._util import interpreted

VLLM_VERSION = "0.32.0"  # the release the project installs (noxfile) and whose numbers docs/vllm.md reports
INSTALL_HINT = (f"install vLLM's kernels with `nox -s vllm_kernels` (or: pip install --no-deps vllm=={VLLM_VERSION} "
                "numpy packaging regex psutil pyzmq urllib3, after a CPU torch)")
DEVICE_NAME = "CPU_INTERPRETER"  # what vLLM's config loader is told the device is called, under the interpreter


class VLLMUnavailable(ValueError):
    """vLLM's kernels cannot be imported here (not installed, import fails): bad input, exit 2."""


class VLLMGrouping(NamedTuple):
    """vLLM's kernel metadata for one slot vector (its `LoRAKernelMeta`, prepared), and its row count."""

    meta: object
    rows: int


class _Ops(NamedTuple):
    lora_shrink: object
    lora_expand: object
    LoRAKernelMeta: type
    version: str


def _interpreter_configs() -> dict[str, dict]:
    """vLLM's tuned-config layout, config[max_loras][num_slices][m][k][n], for the interpreter: one program
    spans up to 256 rows (512 / 1024 above), all of the rank and a 256-wide K step, no split-K; vLLM picks the
    nearest key at each level (num_slices must match exactly: 1 to 4 are given)."""
    rows = {16: 16, 32: 32, 64: 64, 128: 128, 256: 256, 1024: 512, 4096: 1024}
    ranks = (16, 32, 64, 128)
    common = {"num_warps": 4, "num_ctas": 1, "num_stages": 1}

    def nest(leaf):  # max_loras -> slices -> m -> k -> n
        return {"1": {str(s): {str(m): leaf(bm) for m, bm in rows.items()} for s in (1, 2, 3, 4)}}

    shrink = nest(lambda bm: {"256": {str(r): {"block_m": bm, "block_n": r, "block_k": 256, "split_k": 1,
                                                "group_size_m": 8, **common} for r in ranks}})
    expand = nest(lambda bm: {str(r): {str(n): {"block_m": bm, "block_n": n, "block_k": r, **common}
                                       for n in (64, 128, 256)} for r in (8, *ranks)})
    for k in expand["1"].values():  # tl.dot needs K >= 16: rank 8 is read as a masked 16-wide step
        for m in k.values():
            for n in m["8"].values():
                n["block_k"] = 16
    return {f"{DEVICE_NAME}_SHRINK.json": shrink, f"{DEVICE_NAME}_EXPAND_TRUE.json": expand}


def _prime_interpreter_configs(utils) -> None:
    """Have vLLM's own `load_lora_op_config` read the interpreter configs (its results are cached per
    (op, add_inputs), the positional key `get_lora_op_configs` uses)."""
    with tempfile.TemporaryDirectory(prefix="mmlora-vllm-configs-") as folder:
        for name, data in _interpreter_configs().items():
            (Path(folder) / name).write_text(json.dumps(data))
        with mock.patch.dict(os.environ, {"VLLM_TUNED_CONFIG_FOLDER": folder}), \
                mock.patch.object(torch.cuda, "get_device_name", lambda *a, **k: DEVICE_NAME):
            utils.load_lora_op_config.cache_clear()
            utils.get_lora_op_configs.cache_clear()
            for op, add_inputs in (("shrink", None), ("expand", True)):
                if not utils.load_lora_op_config(op, add_inputs):
                    raise RuntimeError(f"vLLM did not read the interpreter config for {op} from {folder}")


@functools.lru_cache(maxsize=1)
def load() -> _Ops:
    """Import vLLM's LoRA kernels (once), or raise VLLMUnavailable with one line saying why."""
    if not torch.cuda.is_available():
        # No GPU to hide: this only stops vLLM from replacing Triton with its placeholder (see module doc).
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        # vLLM's CPU platform; otherwise it resolves an "unspecified" platform that claims pinned memory, and
        # the pointer tables of a multi-slice call (async_tensor_h2d) fail: "pin_memory=True requires a CUDA ..."
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    # vLLM logs to stdout at INFO by default; the harness's stdout carries tables and JSON
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
        from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink
        from vllm.lora.ops.triton_ops import utils as vllm_utils
        from vllm.triton_utils import HAS_TRITON
    except ImportError as e:
        missing = f"module {e.name!r} is missing" if e.name else " ".join(str(e).split())
        if e.name == "vllm":
            raise VLLMUnavailable(f"vLLM is not installed; {INSTALL_HINT}") from None
        raise VLLMUnavailable(f"importing vLLM's LoRA kernels failed ({missing}); {INSTALL_HINT}") from None
    if not HAS_TRITON:
        raise VLLMUnavailable("vLLM disabled Triton (it was imported before CUDA_VISIBLE_DEVICES was set, or no "
                              "Triton driver is active)")
    if interpreted():
        _prime_interpreter_configs(vllm_utils)
    return _Ops(lora_shrink, lora_expand, LoRAKernelMeta, getattr(vllm, "__version__", "?"))


def unavailable_reason() -> str | None:
    """Why vLLM's kernels cannot run here (one line), or None when they can."""
    try:
        load()
    except VLLMUnavailable as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any failure to import vLLM means its kernels cannot run here
        return f"import vllm failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return None


def refusal(dtype: torch.dtype) -> str | None:
    """Why vLLM's kernels cannot run at `dtype` here (one line), or None."""
    if dtype not in (torch.float16, torch.bfloat16):
        return (f"dtype {str(dtype).removeprefix('torch.')} is not supported: vLLM's lora_shrink accepts only "
                f"fp16 / bf16 inputs (use --dtype {'fp16' if interpreted() else 'bf16'})")
    if dtype == torch.bfloat16 and interpreted():
        return ("bf16 cannot be judged in the Triton interpreter (its bf16 tl.dot returns garbage); on CPU use "
                "fp16, bf16 on a CUDA device")
    return None


def vllm_grouping(slot_ids: torch.Tensor, n_slots: int) -> VLLMGrouping:
    """vLLM's `LoRAKernelMeta` for these slots: stable sort by slot, active ids, counts and start offsets."""
    if slot_ids.dim() != 1:
        raise ValueError(f"slot_ids must be 1-D, got shape {tuple(slot_ids.shape)}")
    if slot_ids.dtype.is_floating_point or slot_ids.dtype == torch.bool:
        raise ValueError(f"slot_ids must be an integer tensor, got {slot_ids.dtype}")
    rows = slot_ids.shape[0]
    if rows:
        # vLLM's engine guarantees ids in range and does not check; an id past the slots would read other memory
        lo, hi = torch.stack(torch.aminmax(slot_ids.long())).tolist()
        if lo < -1 or hi >= n_slots:
            raise ValueError(f"slot_ids must lie in [-1, {n_slots - 1}], got min {lo} max {hi}")
    meta = load().LoRAKernelMeta.make(n_slots, max(rows, 1), slot_ids.device)
    meta.prepare_tensors(slot_ids.to(torch.int32))
    return VLLMGrouping(meta, rows)


def lora_apply_vllm(x: torch.Tensor, y: torch.Tensor, A_slices: Sequence[torch.Tensor],
                    B_slices: Sequence[torch.Tensor], slot_ids: torch.Tensor,
                    slice_offsets: Sequence[int] | None = None, grouping: VLLMGrouping | None = None) -> torch.Tensor:
    """y[t, off_i:off_i+O_i] += B_i[slot_t] A_i[slot_t] x[t] through vLLM's shrink + expand, in place; rows with
    slot -1 are untouched. Slices sit side by side from column 0, as vLLM lays packed q/k/v."""
    ops = load()
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x [T, H] and y [T, O] must share T, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not A_slices or len(A_slices) != len(B_slices):
        raise ValueError(f"{len(A_slices)} A slices and {len(B_slices)} B slices; expected the same, at least one")
    for name, t in (("x", x), ("y", y), *((f"A_slices[{i}]", a) for i, a in enumerate(A_slices)),
                    *((f"B_slices[{i}]", b) for i, b in enumerate(B_slices))):
        if t.dtype != x.dtype or t.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name} has dtype {t.dtype}; vLLM's kernels need one of fp16 / bf16 for x, y, A and B "
                             f"alike (x is {x.dtype})")
    widths = [b.shape[1] for b in B_slices]
    packed = [sum(widths[:i]) for i in range(len(widths))]
    if slice_offsets is not None and [int(o) for o in slice_offsets] != packed:
        raise ValueError(f"slice offsets {list(slice_offsets)}: vLLM's expand packs slices side by side ({packed})")
    if sum(widths) > y.shape[1]:
        raise ValueError(f"B slices are {sum(widths)} columns wide, y has {y.shape[1]}")
    T, R = x.shape[0], A_slices[0].shape[1]
    if grouping is None:
        grouping = vllm_grouping(slot_ids, A_slices[0].shape[0])
    elif grouping.rows != T:
        raise ValueError(f"grouping was computed for {grouping.rows} rows, x has {T}")
    if T == 0:
        return y
    margs = grouping.meta.meta_args(T, False)  # False: launch over every slot, as vLLM's default config does
    v = torch.zeros((len(A_slices), T, R), dtype=torch.float32, device=x.device)  # vLLM's fp32 buffer
    ops.lora_shrink(x.contiguous(), list(A_slices), v, *margs, 1.0)
    out = y if y.is_contiguous() else y.contiguous()  # vLLM asserts a contiguous output
    ops.lora_expand(v, list(B_slices), out, *margs, offset_start=0, add_inputs=True)
    if out is not y:
        y.copy_(out)
    return y
