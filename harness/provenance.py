"""Where a result came from: the code (git sha, dirty), the libraries, the device, the date and the command
line. Bench rows record it per row (harness.bench.env), correctness and compare reports in summary.json and
the report's head, so a report read months later says what produced it."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the libraries whose version changes a figure (vllm: an optional LoRA provider, "" when not installed)
LIBRARIES = ("torch", "triton", "transformers", "peft", "vllm")


def version(dist: str) -> str:
    """An installed distribution's version, "" when it is not installed."""
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


def gpu_name(device) -> str:
    """The GPU's name, or "cpu (its model name)"."""
    import torch

    if torch.device(device).type == "cuda":
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


def command_line(argv: Sequence[str]) -> str:
    """`mmlora ...` as a shell would take it back (quoted where needed)."""
    return shlex.join(["mmlora", *argv])


def provenance(device, argv: Sequence[str] | None) -> dict:
    """The provenance block of a correctness / compare summary."""
    sha = git_sha()
    return {"git_sha": sha.removesuffix("-dirty"), "git_dirty": sha.endswith("-dirty"),
            "versions": {lib: version(lib) for lib in LIBRARIES}, "device": gpu_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "argv": list(argv or ()), "command": command_line(argv or ())}


# flags of correctness / compare that a repro command sets itself (value-taking)
_REPLACED = ("--arch", "--mode", "--out")


def repro_command(argv: Sequence[str], arch: str | None, mode: str) -> str:
    """The run's own command line narrowed to one arch and mode, without --out: it reproduces every failing row
    of that (arch, mode) (the tiny models, adapters and requests are seeded)."""
    kept: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _REPLACED:
            skip = True
            continue
        if a.startswith(tuple(f"{f}=" for f in _REPLACED)):
            continue
        kept.append(a)
    extra = (["--arch", arch] if arch else []) + ["--mode", mode]
    return command_line([*kept, *extra])


def writer() -> dict:
    """What wrote a bundle: {"git_commit", "versions"} ("" where unknown), recorded in its manifest."""
    return {"git_commit": git_sha(),
            "versions": {lib: version(lib) for lib in ("mmlora-harness", *LIBRARIES, "safetensors", "accelerate")}}
