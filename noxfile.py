"""The front doors: tests, correctness, bench, lint.

CPU machines: each session installs torch pinned FIRST (a local CPU wheel here; an unpinned torch would
pull several GB of CUDA packages), then the project. GPU runners with a ready stack: `nox --no-venv -s ...`
uses the system python and installs nothing.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

# Override on machines with another stack, e.g. MMLORA_TORCH="torch==2.11.0".
TORCH = os.environ.get("MMLORA_TORCH", "torch==2.13.0")
PYTHON = os.environ.get("MMLORA_PYTHON", "3.11")


def _install(session: nox.Session, extras: str = "") -> None:
    if isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
        return  # --no-venv: the system python already holds the stack
    session.install(TORCH)
    session.install("-e", f".[{extras}]" if extras else ".")


def _cpu_env() -> dict:
    # Triton kernels run in the interpreter when there is no GPU; it must be set before triton imports.
    try:
        import torch  # noqa: F401 - only to ask for CUDA when nox itself runs in a torch env

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    return {} if has_cuda else {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Every suite (unit, properties, correctness, bench smoke) on CPU; pass pytest args after --."""
    _install(session, "test")
    session.run("python", "-m", "pytest", "suites", "-q", *session.posargs, env=_cpu_env())


@nox.session(python=PYTHON)
def correctness(session: nox.Session) -> None:
    """Layer-by-layer comparison of the runtime against HF + PEFT on the built-in tiny models."""
    _install(session)
    session.run("python", "-m", "harness.cli", "correctness", *session.posargs, env=_cpu_env())


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Performance sweep, e.g. `nox -s bench -- --gpu h100` (CPU: `-- --preset smoke`)."""
    _install(session)
    session.run("python", "-m", "harness.cli", "bench", *session.posargs, env=_cpu_env())


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    if not isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
        session.install("ruff>=0.6")
    session.run("ruff", "check", "vlm", "harness", "runtime", "reference", "suites", "noxfile.py")
