"""The checkpoint and adapters a reference bundle is recorded from: hashed (and, when generated in a work
folder, copied in) at recording, and checked against those hashes when the bundle is opened, so a bundle is
never judged against other weights than its own."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from harness.correctness.bundle.format import MANIFEST, BundleError, Kind, file_sha256
from harness.correctness.bundle.reader import Bundle
from vlm.adapter_files import read_adapter
from vlm.checkpoint import read_checkpoint_config


def _checkpoint_files(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir())
            if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".json"))}


def record_sources(folder: Path, opts, ckpt: Path, adapters: dict[str, Path]) -> tuple[dict, dict]:
    """The manifest's "checkpoint" and "adapters" entries; a generated checkpoint (`--model tiny`) and
    generated adapters (no `--adapter`) are copied into `folder`, the bundle being written."""
    if opts.model == "tiny":
        shutil.copytree(ckpt, folder / "checkpoint")
        ckpt_path = "checkpoint"
    else:
        ckpt_path = str(Path(ckpt).resolve())
    entries = {}
    for name, src in adapters.items():
        path = str(Path(src).resolve())
        if not opts.adapters:
            shutil.copytree(src, folder / "adapters" / name)
            path = f"adapters/{name}"
        entries[name] = {"path": path, "sha256": file_sha256(Path(src) / "adapter_model.safetensors")}
    return {"path": ckpt_path, "files": _checkpoint_files(Path(ckpt))}, entries


def _resolve(bundle: Bundle, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else bundle.folder / p


def open_reference(folder: str | Path, verify: bool = True):
    """A reference bundle, its checkpoint and adapters checked against the manifest (another checkpoint or
    adapter file is a BundleError): (bundle, checkpoint folder, arch, config, adapters).
    `verify=False` skips the sha256 of each file (a bundle this process has just recorded from those very
    files: hashing a real checkpoint again costs minutes); missing files are still refused."""
    b = Bundle.open(folder, verify)
    m, where = b.manifest, f"bundle {str(folder)!r}"
    if m.get("kind") != Kind.REFERENCE:
        raise BundleError(f"{where} holds outputs only (kind {m.get('kind')!r}): compare it as GOT against a "
                          f"reference bundle (mmlora compare REF GOT)")
    for key in ("arch", "dtype", "device", "checkpoint", "adapters", "geometries", "ratios", "warnings", "notes",
                "fixes"):
        if key not in m:
            raise BundleError(f"{where}: {MANIFEST} lacks {key!r}")
    ckpt = _resolve(b, m["checkpoint"]["path"])
    if not ckpt.is_dir():
        raise BundleError(f"{where}: checkpoint {str(ckpt)!r} does not exist")
    for fname, sha in m["checkpoint"]["files"].items():
        f = ckpt / fname
        if not f.is_file() or (verify and file_sha256(f) != sha):
            raise BundleError(f"{where}: checkpoint file {str(f)!r} is {'missing' if not f.is_file() else 'another file'}"
                              f" (sha256 differs from the one recorded)")
    arch, raw = read_checkpoint_config(ckpt)
    if arch.model_type != m["arch"]:
        raise BundleError(f"{where}: checkpoint is {arch.model_type!r}, the bundle {m['arch']!r}")
    config = arch.model_class().config_class.from_dict(raw)
    # adapters are read against the model's module names (old transformers-4.x names are converted by the
    # model class's own key conversion, as the recording did): an empty skeleton on the meta device is enough
    with torch.device("meta"):
        skeleton = arch.model_class()(config)
    adapters = {}
    for name, e in m["adapters"].items():
        path = _resolve(b, e["path"])
        st = path / "adapter_model.safetensors"
        if not st.is_file():
            raise BundleError(f"{where}: adapter {name!r}: {str(st)!r} is missing")
        sha = file_sha256(st) if verify else e["sha256"]
        if sha != e["sha256"]:
            raise BundleError(f"{where}: adapter {name!r}: {str(st)!r} is another file (sha256 {sha[:12]}..., "
                              f"recorded {e['sha256'][:12]}...)")
        adapters[name] = read_adapter(path, skeleton)
    return b, ckpt, arch, config, adapters
