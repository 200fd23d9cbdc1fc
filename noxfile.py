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


def _install(session: nox.Session, extras: str = "", torch: str = TORCH) -> None:
    if isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
        return  # --no-venv: the system python already holds the stack
    # --no-compile: pip byte-compiles every module it installs (torch, transformers, ... : ~70 of the ~140 s a
    # fresh CI venv took on 2 cores), while a run imports a fraction of them. Python compiles those on first
    # import into the venv instead, which it may do here even where the caller's environment forbids it.
    session.install("--no-compile", torch)
    session.install("--no-compile", "-e", f".[{extras}]" if extras else ".")
    session.env["PYTHONDONTWRITEBYTECODE"] = ""  # empty: unset for Python


def _cpu_env() -> dict:
    # Triton kernels run in the interpreter when there is no GPU; it must be set before triton imports.
    try:
        import torch  # noqa: F401 - only to ask for CUDA when nox itself runs in a torch env

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    return {} if has_cuda else {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}


# vLLM's Triton LoRA kernels as a system under test, installed WITHOUT vLLM's requirements: the full install pins
# its own CUDA torch and ~140 packages (serving stack, CUDA kernels); the kernels need only the wheel plus what
# the import of vllm.lora.ops.triton_ops reaches (numpy, packaging, regex and psutil also come with the project's
# stack; pyzmq and urllib3 do not). Torch stays the one installed first.
VLLM = os.environ.get("MMLORA_VLLM", "vllm==0.32.0")
VLLM_IMPORT_DEPS = ("numpy", "packaging", "regex", "psutil", "pyzmq", "urllib3")


# What `import vllm.model_executor.models.mllama4 / gemma4_mm` reaches beyond the kernels (measured by importing
# until nothing was missing), with vLLM 0.32's own version ranges where it states one. Only vllm_towers uses it;
# mistral_common: vLLM's llava / llava_next / mistral3 modules import it (via pixtral), for `mmlora audit-vllm`.
VLLM_MODEL_DEPS = ("cbor2", "aiohttp>=3.14.3", "requests>=2.33.0", "openai-harmony", "openai>=2.25.0", "pybase64",
                   "cachetools", "msgspec", "cloudpickle", "uvloop", "py-cpuinfo", "prometheus_client>=0.18.0",
                   "xgrammar==0.2.8", "fastapi>=0.133.0,<0.137.0", "partial-json-parser", "llguidance>=1.7.0,<1.8.0",
                   "einops", "mistral_common[image]>=1.11.6")


def _install_vllm_kernels(session: nox.Session) -> None:
    if isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
        return  # --no-venv: the system python brings its own vLLM (or none)
    session.install("--no-compile", "--no-deps", VLLM)  # --no-compile: see _install
    session.install("--no-compile", *VLLM_IMPORT_DEPS)


def _vllm_env() -> dict:
    # CPU: vLLM must see CUDA_VISIBLE_DEVICES="" and VLLM_TARGET_DEVICE=cpu before it is imported (else it swaps
    # Triton for a placeholder, or claims pinned memory); runtime/vllm_lora.py sets both too, for direct use.
    env = _cpu_env()
    if env:
        env.update(CUDA_VISIBLE_DEVICES="", VLLM_TARGET_DEVICE="cpu")
    return env


def _wants_vllm(args, *flags: str) -> bool:
    """True when the command line names vllm as the value of one of `flags` (`--provider vllm`, `--providers
    a,vllm`). The noxfile runs before the project is installed, so it cannot read the provider registry: the
    name is vLLM's, the package these sessions install."""
    args = list(args)
    values = [v for i, a in enumerate(args) for flag in flags for v in
              ([args[i + 1]] if a == flag and i + 1 < len(args) else [a.split("=", 1)[1]] if a.startswith(flag + "=")
               else [])]
    return any("vllm" in v.split(",") for v in values)


# One pytest worker per core (at most 4): the suites are CPU-bound and single-threaded, so on CI's 2 cores this
# halves the wall time. Whole files go to one worker (--dist loadfile): the costly module fixtures (the AOT
# compile, the prepared references of the detection-power table) are then built once, not once per worker.
XDIST = ("-n", "auto", "--maxprocesses", "4", "--dist", "loadfile")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Every suite (unit, properties, correctness, bench smoke) on CPU; pass pytest args after -- (they replace
    the parallel-worker flags XDIST). Without pytest args it then runs the vLLM-kernel tests too (what
    `vllm_kernels` runs), so CI checks vLLM's kernels: they are installed into this venv only after the main
    run, which must see no vLLM (the state the bench and the refusals must handle), and removed again at the
    end, so a reused venv starts without vLLM. One venv instead of a second one saves CI a torch and project
    install (~2 min of its 20)."""
    _install(session, "test")
    session.run("python", "-m", "pytest", "suites", "-q", *(session.posargs or XDIST), env=_cpu_env())
    if session.posargs:
        return
    try:
        _vllm_kernel_tests(session, [])
    finally:
        if not isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
            session.run("python", "-m", "pip", "uninstall", "-y", "-q", "vllm")


def _vllm_kernel_tests(session: nox.Session, args) -> None:
    _install_vllm_kernels(session)
    env = {**_vllm_env(), "MMLORA_REQUIRE_VLLM": "1"}
    session.run("python", "-m", "pytest", *(args or ["suites", "-m", "vllm", "-v"]), env=env)


@nox.session(python=PYTHON)
def vllm_kernels(session: nox.Session) -> None:
    """vLLM's own LoRA kernels: installs them (see VLLM above) and runs the tests that use them (provider vs a
    float64 loop, two archs through the correctness engine, the bench's vllm rows), vLLM required: a skip would
    hide a vLLM release that broke the import. Pass pytest args after --. `tests` runs the same in its venv."""
    _install(session, "test")
    _vllm_kernel_tests(session, session.posargs)


# vLLM's model modules import transformers' Llama 4 image processor, which imports torchvision, and PyPI builds
# torchvision only for its CUDA torch (with the CPU torch `import torchvision` fails: "operator torchvision::nms
# does not exist"). The sessions that import them therefore default to PyPI's pair: CUDA builds (~4 GB) that run
# fine without a GPU. 2.14.1 / 0.29.1 is the newest pair this machine's pip allows; vLLM 0.32 pins 2.13.0 / 0.28.0
# and 0.33 pins 2.14.0 / 0.29.0, and both ran their model modules, LoRA path and kernels with this pair.
# Override both with MMLORA_TORCH / MMLORA_TORCHVISION (e.g. 0.33's own: torch==2.14.0, torchvision==0.29.0).
VLLM_MODEL_TORCH = os.environ.get("MMLORA_TORCH", "torch==2.14.1")
VLLM_MODEL_TORCHVISION = os.environ.get("MMLORA_TORCHVISION", "torchvision==0.29.1")


def _install_vllm_models(session: nox.Session) -> dict:
    """The project, vLLM's kernels and what vLLM's model modules import (see VLLM_MODEL_DEPS), on the torch +
    torchvision pair above; returns the environment their runs need."""
    _install(session, "test", torch=VLLM_MODEL_TORCH)
    _install_vllm_kernels(session)
    if not isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
        session.install("--no-compile", "--no-deps", VLLM_MODEL_TORCHVISION)  # --no-deps: never let it swap torch
        session.install("--no-compile", *VLLM_MODEL_DEPS)
    return {**_vllm_env(), "MMLORA_REQUIRE_VLLM": "1"}


@nox.session(python=PYTHON)
def vllm_towers(session: nox.Session) -> None:
    """vLLM's own vision towers (Llama 4, Gemma 4) vs HF's, layer by layer (suites/unit/test_vllm_towers.py), and
    vLLM's tower/connector LoRA count helpers vs the registry (suites/unit/test_vllm_audit.py, `mmlora audit-vllm`).
    Not part of `tests`: it needs vLLM's model modules and a torch that can import torchvision (the CUDA pair
    above; on a GPU runner with vLLM installed: `nox --no-venv -s ...`)."""
    env = _install_vllm_models(session)
    session.run("python", "-m", "pytest", *(session.posargs or ["suites", "-m", "vllm_towers", "-v"]), env=env)


@nox.session(python=PYTHON)
def vllm_engine(session: nox.Session) -> None:
    """vLLM's own multimodal LoRA path under the judge (docs/vllm.md): `mmlora audit-vllm` (every vLLM count
    helper against the measured rows), then the survey (`python -m harness.vllm_engine.survey`: per arch, record
    a reference, run it through vLLM's model class + LoRA manager with tower/connector LoRA, `mmlora compare
    REF GOT`), then the engine's tests. Args after -- go to the survey (e.g. `-- --arch llama4 --out DIR`).
    It runs vLLM's CPU path on any machine (a GPU runner's too): the engine is built for it (docs/vllm.md).
    vLLM 0.33: MMLORA_VLLM=vllm==0.33.0 (torch pair: see VLLM_MODEL_TORCH). Not in `tests` (the CUDA torch pair
    is ~4 GB); nightly, or by hand."""
    import time

    start = time.monotonic()
    _install_vllm_models(session)
    # vLLM's CPU path on every machine, a GPU runner's too: the engine builds vLLM's CPU platform (gloo, its CPU
    # punica wrapper, or its Triton kernels in the interpreter with --punica gpu); vLLM must see no CUDA device
    env = {"CUDA_VISIBLE_DEVICES": "", "VLLM_TARGET_DEVICE": "cpu", "TRITON_INTERPRET": "1", "MMLORA_REQUIRE_VLLM": "1"}
    session.run("python", "-m", "harness.cli", "audit-vllm", env=env)
    session.run("python", "-m", "harness.vllm_engine.survey", *session.posargs, env=env)
    session.run("python", "-m", "pytest", "suites/unit/test_vllm_engine.py", "-q", "-p", "no:cacheprovider", env=env)
    session.log(f"vllm_engine: {time.monotonic() - start:.0f} s in all, installs included")


@nox.session(python=PYTHON)
def correctness(session: nox.Session) -> None:
    """Layer-by-layer comparison of the runtime against HF + PEFT on the built-in tiny models
    (`-- --provider vllm --dtype fp16` installs vLLM's kernels first and judges them instead)."""
    _install(session)
    vllm = _wants_vllm(session.posargs, "--provider", "--kernel")  # --kernel: --provider's old name
    if vllm:
        _install_vllm_kernels(session)
    session.run("python", "-m", "harness.cli", "correctness", *session.posargs,
                env=_vllm_env() if vllm else _cpu_env())


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Performance sweep, e.g. `nox -s bench -- --gpu h100` (CPU: `-- --preset smoke`); naming vllm in
    `--providers` installs vLLM's kernels first."""
    _install(session)
    vllm = _wants_vllm(session.posargs, "--providers")
    if vllm:
        _install_vllm_kernels(session)
    session.run("python", "-m", "harness.cli", "bench", *session.posargs, env=_vllm_env() if vllm else _cpu_env())


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    if not isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
        session.install("ruff>=0.6")
    session.run("ruff", "check", "vlm", "harness", "runtime", "reference", "suites", "examples", "noxfile.py")
