"""Correctness: the engine (reference vs runtime, e2e and replay), compare and verdict rules, seeded
faults, the quantization scenario, and the report."""

from harness.correctness.engine import MODES, ArchResult, Options, run, run_arch

__all__ = ["MODES", "ArchResult", "Options", "run", "run_arch"]
