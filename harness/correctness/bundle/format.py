"""The bundle format (docs/bundles.md): its name and version, and module files at the byte level.

Layout: `manifest.json` + `modules/<k>.safetensors`, one file per module in the reference's execution order,
tensor `<key>.<request>` each [rows, features]. Loads never unpickle (safetensors only); every defect of a
bundle is a `BundleError` (one line, exit 2). Nothing here knows the reference or the truth: a bundle is read
and written without either.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import torch

# version 3 adds each request's forward inputs (a reference bundle's `requests/<i>.safetensors`) and an output
# bundle's `reference`; version 2 gives every module file's sha256 in the manifest, the non-finite tensors the
# writer saw, and provenance; version 1 has none of them. A reference bundle must be version 3 (its checksums
# are what `compare` trusts, its inputs what it replays); an output bundle an engine writes may be version 1 or
# 2 (its own sha256 fields, if any, are verified too)
FORMAT, VERSION = "mmlora-bundle", 3
READS = (1, 2, 3)
MANIFEST = "manifest.json"


class Kind:
    """The manifest's "kind": what a bundle holds."""

    REFERENCE = "reference"  # `mmlora record`: the reference, its truth and the base Linears (every Key)
    OUTPUTS = "outputs"  # an engine's (or the runtime's) module outputs: OUT and IN only


class Key:
    """The tensors of a module file, each named by `tensor_name`: per request i `<key>.<i>` [rows, features],
    WEIGHT and BIAS once per LoRA module. OUT and IN are also the keys the capture hooks give (vlm.capture),
    so a capture goes into the bundle under its own key."""

    OUT = "out"  # the module's output at the run dtype: the reference's, or the runtime's in an output bundle
    IN = "in"  # the module's input
    BASE = "base"  # the base Linear on IN, at the run dtype
    TRUTH_OUT = "truth.out"  # the truth's output (the whole reference at high precision: e2e)
    TRUTH_BASE = "truth.base"  # the base Linear at high precision on the truth's own input
    REPLAY_TRUTH_OUT = "replay.truth_out"  # the PEFT module at high precision on IN (replay)
    REPLAY_TRUTH_BASE = "replay.truth_base"  # its base Linear at high precision on IN
    WEIGHT = "weight"  # the base Linear's weight, for the runtime's delta
    BIAS = "bias"  # and its bias, where it has one


def tensor_name(key: str, i: int | None) -> str:
    """`key.i` for request i; `key` alone (i None) for a per-module tensor."""
    return key if i is None else f"{key}.{i}"


class BundleError(ValueError):
    """A bundle that is missing, corrupt or does not match what it is compared with (exit 2)."""


class Held:
    """Bytes of tensors loaded from bundles and stage files that are still alive, and their peak: the
    streaming's measure (a comparison holds one module's captures at a time)."""

    def __init__(self):
        self.now = self.peak = 0

    def reset(self) -> None:
        self.now = self.peak = 0

    def add(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._sub, n)
        return t

    def _sub(self, n: int) -> None:
        self.now -= n


HELD = Held()


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file read straight into memory of its own: the format's 8-byte header
    length, JSON header, then raw little-endian data. Its own allocation, because a tensor inside a file's
    buffer may sit at any byte offset and BLAS (MKL) results depend on the alignment of their operands in the
    last bit: torch's allocator aligns it as it aligns the in-memory captures, so the comparison's figures
    match theirs bit for bit. Not through a memory map: the pages of a mapped file count in the process's RSS
    while it is mapped, on top of the copy (at LLaVA-7B widths the largest base weight, 180 MB, would be held
    twice while the judge reads it)."""
    return read_tensors(path, [key])[key]


def read_tensors(path: Path, keys=None) -> dict[str, torch.Tensor]:
    """`keys` of a safetensors file (all of its tensors by default), each read as `read_tensor` reads one,
    the header parsed once."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        out = {}
        for key in (sorted(k for k in header if k != "__metadata__") if keys is None else keys):
            entry = header[key]
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in ST_DTYPES:
                raise BundleError(f"{str(path)!r}: tensor {key!r} has dtype {entry['dtype']}; a bundle holds "
                                  f"{', '.join(ST_DTYPES)}")
            t = torch.empty(entry["shape"], dtype=ST_DTYPES[entry["dtype"]])
            buf = t.view(-1).view(torch.uint8).numpy()
            f.seek(8 + n + begin)
            if buf.nbytes != end - begin or (buf.nbytes and f.readinto(buf) != buf.nbytes):
                raise BundleError(f"{str(path)!r}: tensor {key!r} is cut short")
            out[key] = HELD.add(t)
    return out


def inside(where: str, folder: Path, what: str, file) -> Path:
    """`file`'s path, which must lie inside the bundle folder once symlinks are followed: a manifest is the only
    thing that names the files `compare` reads, and it may come from anyone (an engine's bundle). `what`
    names the manifest entry (a module, a request) in the error."""
    if not isinstance(file, str) or not file:
        raise BundleError(f"{where}: {what}: file {file!r} is not a path relative to the bundle folder")
    if Path(file).is_absolute():
        raise BundleError(f"{where}: {what}: file {file!r} is an absolute path; a bundle's file lies inside the "
                          f"bundle folder")
    path = folder / file
    try:
        within = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise BundleError(f"{where}: {what}: file {file!r} cannot be resolved ({' '.join(str(e).split())})") from None
    if not within:
        raise BundleError(f"{where}: {what}: file {file!r} leads outside the bundle folder")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
