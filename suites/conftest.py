"""Suite-wide setup: Triton interpreter on CPU machines, hypothesis profiles, seeded torch."""

from __future__ import annotations

import os

import torch

# Triton must see TRITON_INTERPRET before it is imported anywhere: on a machine without CUDA every
# kernel runs in the interpreter (slow, so CPU shapes stay tiny).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`nox -s tests` runs one worker per core) each worker gets one intra-op thread: the
# tiny models gain nothing from more, and N workers x N threads oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from hypothesis import HealthCheck, settings  # noqa: E402

# default: >= 50 examples per property (the acceptance bar); nightly: 10x more, for GPU runners / cron.
settings.register_profile(
    "default", max_examples=50, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "nightly", max_examples=500, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "quick", max_examples=10, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
