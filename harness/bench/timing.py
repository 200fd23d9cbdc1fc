"""p50 / p20 / p80 latency of a callable, and its peak memory.

CUDA: `triton.testing.do_bench(fn, warmup, rep, quantiles=[0.5, 0.2, 0.8])`: it runs fn once before
timing (compilation / autotuning excluded), flushes L2 before every timed call and times with CUDA
events. Peak memory comes from one separate call between `reset_peak_memory_stats` and
`max_memory_allocated` (do_bench's own 256 MB L2-flush buffer would otherwise count).
`graph=True` on CUDA (a call whose per-batch preparation was done outside it, e.g. the LoRA `kernel`
variant): the call is warmed up on a side stream, captured once into a CUDA graph, and do_bench times
`graph.replay()` (L2 still flushed before each replay), so no host work is left in the figure; a call that
cannot be captured is timed as is and the row's note says so.
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
    note: str = ""

    @property
    def spread(self) -> float:
        """p80 / p20 of the latency: above schema.NOISY_RATIO the point is flagged noisy."""
        return self.p80_ms / self.p20_ms if self.p20_ms > 0 else float("inf")


def measure(fn: Callable[[], object], device: torch.device, rep_ms: float, warmup_ms: float,
            min_reps: int = 3, graph: bool = False) -> Timing:
    if device.type == "cuda":
        return _measure_cuda(fn, device, rep_ms, warmup_ms, graph)
    return _measure_cpu(fn, rep_ms, warmup_ms, min_reps)


def capture(fn: Callable[[], object], device: torch.device, warmup: int = 3):
    """A CUDA graph of one call of fn (warmed up on a side stream first, as torch's graph docs ask)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize(device)
    return g


def _measure_cuda(fn, device, rep_ms, warmup_ms, graph: bool = False) -> Timing:
    from triton.testing import do_bench

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    note, timed = "", fn
    if graph:
        try:
            timed = capture(fn, device).replay
            note = "CUDA graph replay"
        except Exception as e:  # noqa: BLE001 - a call that cannot be captured is still timed, and says so
            torch.cuda.synchronize(device)
            note = f"not capturable in a CUDA graph ({type(e).__name__}); timed as called"
    q = do_bench(timed, warmup=max(1, int(warmup_ms)), rep=max(1, int(rep_ms)), quantiles=list(QUANTILES))
    p50, p20, p80 = (float(v) for v in q)
    return Timing(p50, p20, p80, -1, peak, note)


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
