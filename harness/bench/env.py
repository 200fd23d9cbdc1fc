"""Environment columns recorded with every row: GPU, driver, CUDA, library versions, git sha."""

from __future__ import annotations

import torch

# one copy of these, shared with the correctness reports' provenance; importable from here as before
from harness.provenance import REPO, _run, git_sha, gpu_name  # noqa: F401
from harness.provenance import version as _version


def driver() -> str:
    if not torch.cuda.is_available():
        return ""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else ""


def collect(device: torch.device) -> dict[str, str]:
    import triton

    return {
        "gpu_name": gpu_name(device),
        "driver": driver(),
        "cuda": torch.version.cuda or "",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "git_sha": git_sha(),
    }
