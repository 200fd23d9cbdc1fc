"""`mmlora bench --shard I/N`: which of the planned points shard I of N runs.

Split rule: a point belongs to shard 1 + (the first 8 bytes of sha256 of its key) mod N. The shard is a
function of the point's own key (case, provider, parameters) and of N, never of the rest of the plan, so:
- every machine that plans a point puts it in the same shard, even where the plans differ (vLLM installed
  on one runner and not on another, CUDA or not, other --cases / --filter): nothing is run twice or lost
  by a shift, as a round-robin over the plan would do;
- a row's repro command, which filters the plan down to its one point and keeps `--shard I/N`, selects
  that point again;
- adding a case or a sweep value to a preset moves no other point.
Python's hash() is salted per process, hence sha256. The counts are balanced only statistically (about
1/N of the points each, binomial spread); `--list` prints the shard's count.

Shared cases (`copy`) run in every shard: their best GB/s is the yardstick of every kernel row's copy_us
and pct_copy, and each shard holds its rows against a copy measured in the same process on the same GPU.
The merge (harness.bench.merge) keeps one copy point and does not report the others as conflicts.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

# cases every shard runs: the copy bandwidth must be measured where the rows it is the yardstick of are
SHARED_CASES: tuple[str, ...] = ("copy",)

_FORM = re.compile(r"([0-9]+)/([0-9]+)")  # [0-9], not \d: \d also matches other scripts' digits


@dataclass(frozen=True)
class Shard:
    index: int  # 1 .. count
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse(text: str) -> Shard:
    """'I/N' with 1 <= I <= N; anything else is a ValueError naming the value (the CLI's exit 2)."""
    m = _FORM.fullmatch(text)
    if not m:
        raise ValueError(f"--shard {text!r}: expected I/N, shard I of N (e.g. 2/3)")
    index, count = int(m[1]), int(m[2])
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f"--shard {text!r}: shards count from 1: I must be between 1 and N (e.g. 2/3)")
    return Shard(index, count)


def shard_of(key: Sequence[str], count: int) -> int:
    """The shard (1 .. count) a point with this key belongs to. The unit separator cannot occur in a
    parameter value, so different keys never join into the same text."""
    digest = hashlib.sha256("\x1f".join(key).encode()).digest()
    return 1 + int.from_bytes(digest[:8], "big") % count


def select(points: Sequence, shard: Shard) -> list:
    """The points of `points` (sweep.Point, in plan order) that `shard` runs: its own and every shared one."""
    return [p for p in points if p.case in SHARED_CASES or shard_of(p.key(), shard.count) == shard.index]


def recorded(rows: Sequence[dict]) -> set[str | None]:
    """The --shard values ("I/N", or None for an unsharded run) in rows' repro commands."""
    out: set[str | None] = set()
    for r in rows:
        try:
            argv = shlex.split(r.get("repro") or "")
        except ValueError:
            continue
        out.add(argv[argv.index("--shard") + 1] if "--shard" in argv[:-1] else None)
    return out
