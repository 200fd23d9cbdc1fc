"""Environment columns recorded with every row: GPU, driver, CUDA, library versions, git sha."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_sha() -> str:
    """HEAD's sha (+ "-dirty" with uncommitted changes to tracked files); CI's GITHUB_SHA without git."""
    sha = _run(["git", "rev-parse", "--short=12", "HEAD"], REPO)
    if not sha:
        return os.environ.get("GITHUB_SHA", "")[:12]
    if _run(["git", "status", "--porcelain", "--untracked-files=no"], REPO):
        sha += "-dirty"
    return sha


def gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = " ".join(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return f"cpu ({model or platform.processor() or platform.machine()})"


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
