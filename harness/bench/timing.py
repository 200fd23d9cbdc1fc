"""p50 / p20 / p80 latency of a callable, and its peak memory.

CUDA: `triton.testing.do_bench(fn, warmup, rep, quantiles=[0.5, 0.2, 0.8])`: it runs fn once before
timing (compilation / autotuning excluded), flushes L2 before every timed call and times with CUDA
events. Peak memory comes from one separate call between `reset_peak_memory_stats` and
`max_memory_allocated` (do_bench's own 256 MB L2-flush buffer would otherwise count).
CPU: the first call is excluded, then calls run for `warmup_ms`, then every call is timed with
`time.perf_counter` until `rep_ms` has passed and at least `min_reps` calls were made; the same quantiles
(torch.quantile, linear interpolation, as do_bench). Peak memory is not measured on CPU: torch's CPU
allocator is invisible to tracemalloc, so the row is left out rather than reported wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    peak_bytes: int | None = None


def measure(fn: Callable[[], object], device: torch.device, rep_ms: float, warmup_ms: float,
            min_reps: int = 3) -> Timing:
    if device.type == "cuda":
        return _measure_cuda(fn, device, rep_ms, warmup_ms)
    return _measure_cpu(fn, rep_ms, warmup_ms, min_reps)


def _measure_cuda(fn, device, rep_ms, warmup_ms) -> Timing:
    from triton.testing import do_bench

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    q = do_bench(fn, warmup=max(1, int(warmup_ms)), rep=max(1, int(rep_ms)), quantiles=list(QUANTILES))
    p50, p20, p80 = (float(v) for v in q)
    return Timing(p50, p20, p80, -1, peak)


def _measure_cpu(fn, rep_ms, warmup_ms, min_reps) -> Timing:
    fn()  # first call excluded (lazy init, interpreter caches), as do_bench does
    t_end = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < t_end:
        fn()
    samples: list[float] = []
    spent = 0.0
    while (spent * 1e3 < rep_ms or len(samples) < min_reps) and len(samples) < 100_000:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        samples.append(dt * 1e3)
        spent += dt
    q = torch.quantile(torch.tensor(samples, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    p50, p20, p80 = (float(v) for v in q)
    return Timing(p50, p20, p80, len(samples), None)
