"""Staging: the capture hooks' sink, on disk, so that a forward keeps no capture in memory."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from harness.correctness.bundle.format import Key, read_tensor, save
from vlm.capture import Sink
from vlm.rows import module_rows_per_request


class Stage:
    """Each tensor a capture hook sees goes to its own file at once (nothing kept in memory); the pieces
    of one module are read back, split per request and written into the module's file afterwards."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[tuple, list[tuple[Path, tuple[int, ...]]]] = {}
        self.seen: dict[object, list[str]] = {}  # per forward (tag): module names in first-capture order
        self._n = 0

    def sink(self, tag) -> Sink:
        seen = self.seen.setdefault(tag, [])

        def put(name: str, key: str, t: torch.Tensor) -> None:
            if name not in seen:
                seen.append(name)
            path = self.folder / f"{self._n}.safetensors"
            self._n += 1
            save({"t": t}, path)
            self.index.setdefault((tag, name, key), []).append((path, tuple(t.shape)))
        return put

    def rows(self, tag, name: str) -> int:
        """Rows the forward captured for this module (0: none, e.g. a tower on a text-only request)."""
        return max((sum(math.prod(s[:-1]) for _, s in self.index.get((tag, name, k), []))
                    for k in (Key.IN, Key.OUT)), default=0)

    def pieces(self, tag, name: str, key: str) -> list[torch.Tensor]:
        return [read_tensor(p, "t") for p, _ in self.index.get((tag, name, key), [])]

    def drop(self, tag, name: str) -> None:
        for k in (Key.IN, Key.OUT):
            for p, _ in self.index.pop((tag, name, k), []):
                p.unlink(missing_ok=True)


def split(stage: Stage, tag, name: str, key: str, *, arch, config, reqs,
          l_max: int) -> list[torch.Tensor | None]:
    """Per request [rows, features] (None where a request has no rows), the registry's row formulas."""
    pieces = stage.pieces(tag, name, key)
    if not pieces:
        return [None] * len(reqs)
    per = module_rows_per_request(arch, config, reqs, [len(r.prompt_ids) for r in reqs], l_max, name, pieces)
    return [t if t.shape[0] else None for t in per]


def captured(stage: Stage, side: str, n_requests: int) -> list[list[str]]:
    """Per request, the modules a single-request forward captured rows for, in first-capture order."""
    return [[n for n in stage.seen.get((side, i), []) if stage.rows((side, i), n)] for i in range(n_requests)]
