"""The long-form results.csv: one row per (case, provider, params, metric); a fixed column set.

Parameter columns are the same for every case and empty where a case has no such parameter; the key of
a row is (case, provider, every parameter column, metric). Values are stored as text exactly as
`fmt` writes them, so a key read back from the CSV equals the key of a planned point.
"""

from __future__ import annotations

from collections.abc import Mapping

from runtime.kernels import KERNELS
from runtime.providers import PROVIDERS as _REGISTRY

# case parameters (docs/bench.md documents each), in the order stored CSVs hold them
_DOCUMENTED: tuple[str, ...] = (
    "model",       # e2e: registry arch / size, e.g. llama4/scout, gemma3/tiny
    "dtype",       # fp32 | fp16 | bf16
    "T",           # rows: LoRA tokens, patches per image (position_pool, pixel_shuffle), sequence (rope_2d)
    "H",           # input width: LoRA hidden (A is [r, H]), channels (vision kernels)
    "O",           # LoRA output width per slice
    "n_adapters",  # distinct adapters in the batch (e2e: 0 = no LoRA)
    "rank",        # LoRA rank
    "slices",      # LoRA slices in one launch (e.g. 3 for packed q/k/v)
    "batch",       # vision kernels: images in the batch
    "heads",       # rope_2d: attention heads
    "head_dim",    # rope_2d: head dim
    "pool_k",      # position_pool: pooling kernel k (k x k patches per token)
    "images",      # e2e: images per batch (one image per request)
    "variant",     # LoRA kernels: what is timed: kernel (grouping precomputed; CUDA graph on GPU) | eager (the
                   # public call) | grouping (the token grouping alone); empty for every other case
)
# every parameter a kernel spec declares (runtime/kernels) is a column too: a kernel added with a parameter of
# its own keys its rows by it, placed before `variant`, instead of having it dropped from the key
_DECLARED = tuple(dict.fromkeys(p for spec in KERNELS.values() for p in spec.params if p not in _DOCUMENTED))
PARAM_COLUMNS: tuple[str, ...] = (*_DOCUMENTED[:-1], *_DECLARED, _DOCUMENTED[-1])
ENV_COLUMNS: tuple[str, ...] = ("gpu_name", "driver", "cuda", "torch", "triton", "transformers", "peft", "git_sha",
                                "timestamp")
KEY_COLUMNS: tuple[str, ...] = ("case", "provider", *PARAM_COLUMNS)
COLUMNS: tuple[str, ...] = (*KEY_COLUMNS, "metric", "unit", "p50", "p20", "p80", "status", "note", *ENV_COLUMNS,
                            "repro")
STATUSES: tuple[str, ...] = ("ok", "oom", "unavailable", "error")
# the `provider` column's values: the LoRA providers of runtime/providers, in their order
PROVIDERS: tuple[str, ...] = tuple(_REGISTRY)

# metric -> unit; latency is the measured one, the others are derived from it
UNITS: dict[str, str] = {
    "latency_ms": "ms",
    "tokens_per_s": "tok/s",
    "images_per_s": "img/s",
    "gbps": "GB/s",
    "tflops": "TFLOP/s",
    "pct_roofline": "%",
    "bytes_mb": "MB",       # bytes one call must move (the kernel spec's model), 1e6
    "roof_us": "us",        # the time those bytes (and flops) take at the GPU profile's peak
    "copy_us": "us",        # the time those bytes take at the copy bandwidth measured in the same run
    "pct_copy": "%",        # copy_us over the measured time: % of the achievable memory roofline
    "peak_mem_mib": "MiB",
}
# a point whose p80 / p20 latency exceeds this is flagged noisy in its rows' note
NOISY_RATIO = 1.2


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def point_key(case: str, provider: str, params: Mapping) -> tuple[str, ...]:
    unknown = [k for k in params if k not in PARAM_COLUMNS]
    if unknown:  # a parameter no column holds would vanish from the key: two points would share one row
        raise ValueError(f"{case}: parameter(s) {', '.join(unknown)} are no column of results.csv; declare them "
                         f"in the kernel spec's params (runtime/kernels) or in harness/bench/schema.py")
    return (case, provider, *(fmt(params.get(c)) for c in PARAM_COLUMNS))


def row_key(row: Mapping) -> tuple[str, ...]:
    """Key of a CSV row: the point key plus the metric."""
    return (*(row.get(c, "") or "" for c in KEY_COLUMNS), row.get("metric", "") or "")


def describe(params: Mapping) -> str:
    return " ".join(f"{c}={fmt(params[c])}" for c in PARAM_COLUMNS if params.get(c) is not None)
