"""Every bench case by name: the kernel cases (one per kernel spec) and the end-to-end ones."""

from __future__ import annotations

from harness.bench.case import Case
from harness.bench.e2e import E2E_CASES
from harness.bench.kernel_cases import KERNEL_CASES


def all_cases() -> dict[str, Case]:
    return {**KERNEL_CASES, **E2E_CASES}
