"""A reference bundle's request inputs: per request, every tensor the HF model's forward was called with when
the reference ran that request alone, under the forward's keyword (`requests/<i>.safetensors`), so that an
engine replays the reference's batch from the bundle alone. Written as the reference runs, checked (path,
sha256, header) when the bundle is opened."""

from __future__ import annotations

from pathlib import Path

import torch

from harness.correctness.bundle.format import ST_DTYPES, BundleError, file_sha256, inside, read_tensors, save

FOLDER = "requests"
# every request feeds these two ([1, tokens]); the rest are its images' (pixel_values and the arch's own)
TOKEN_KEYS = ("input_ids", "attention_mask")


class InputRecord:
    """The reference's forward inputs, one file per request as each request runs (reference.run's `fed`)."""

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / FOLDER).mkdir(parents=True, exist_ok=True)
        self._entries: dict[int, dict] = {}

    def put(self, i: int, inputs: dict[str, torch.Tensor]) -> None:
        if i in self._entries:
            raise ValueError(f"request {i}'s forward ran twice: its inputs are recorded once")
        file = f"{FOLDER}/{i:04d}.safetensors"
        save(inputs, self.folder / file)
        self._entries[i] = {"file": file, "sha256": file_sha256(self.folder / file)}

    def entries(self, n: int) -> list[dict]:
        """Per request, its manifest fields `file` and `sha256`; every one of the n requests must have run."""
        if sorted(self._entries) != list(range(n)):
            raise ValueError(f"inputs recorded for requests {sorted(self._entries)}, expected 0..{n - 1}")
        return [self._entries[i] for i in range(n)]


def check_inputs(where: str, folder: Path, i: int, entry: dict, verify: bool) -> None:
    """Request i's input file lies inside the folder, exists, has the manifest's sha256 (with `verify`), is
    safetensors of the format's dtypes, and holds input_ids and attention_mask of [1, tokens]."""
    from safetensors import SafetensorError, safe_open

    what = f"request {i}"
    path = inside(where, folder, what, entry.get("file"))
    file = entry["file"]
    if not path.is_file():
        raise BundleError(f"{where}: {what}: inputs file {file!r} is missing")
    if not isinstance(entry.get("sha256"), str):
        raise BundleError(f"{where}: {what} has no sha256 of its inputs file")
    if verify and file_sha256(path) != entry["sha256"]:
        raise BundleError(f"{where}: {what}: {file!r} is another file (sha256 differs from the one in the "
                          f"manifest): corrupt or edited")
    try:
        with safe_open(str(path), "pt") as f:
            heads = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{where}: {what}: {file!r} is not a readable safetensors file "
                          f"({' '.join(str(e).split())})") from None
    for key, (dtype, _) in sorted(heads.items()):
        if dtype not in ST_DTYPES:
            raise BundleError(f"{where}: {what}: {key} has dtype {dtype}; a bundle holds {', '.join(ST_DTYPES)}")
    for key in TOKEN_KEYS:
        shape = heads.get(key, (None, None))[1]
        if shape != [1, entry.get("tokens")]:
            raise BundleError(f"{where}: {what}: {key} has shape {tuple(shape) if shape else 'none'}, the manifest "
                              f"says (1, {entry.get('tokens')})")


def read_inputs(folder: Path, entry: dict) -> dict[str, torch.Tensor]:
    """A request's forward inputs, by keyword (the entry checked by `check_inputs`)."""
    return read_tensors(folder / entry["file"])
