"""Writing a bundle: one module file at a time as the modules come, the manifest last."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from harness import provenance
from harness.correctness.bundle.format import FORMAT, MANIFEST, VERSION, Key, file_sha256, save, tensor_name
from harness.geometry_flags import geometry_text
from harness.output import write_json


class BundleWriter:
    def __init__(self, folder: Path, n_requests: int):
        self.folder, self.n = folder, n_requests
        (folder / "modules").mkdir(parents=True, exist_ok=True)
        self.modules: list[dict] = []

    def add(self, name: str, group: str, tensors: dict[str, torch.Tensor]) -> None:
        rows, features, dtype = [0] * self.n, 0, None
        for i in range(self.n):
            t = tensors.get(tensor_name(Key.OUT, i))
            if t is not None:
                rows[i], features, dtype = t.shape[0], t.shape[-1], str(t.dtype).removeprefix("torch.")
        file = f"modules/{len(self.modules):04d}.safetensors"
        save(tensors, self.folder / file)
        # what the forward really gives as NaN / Inf (a NaN weight): judged as non-finite; any other non-finite
        # value a reader meets is not what the writer wrote (a flipped bit) and makes a bad bundle
        nonfinite = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
        self.modules.append({"name": name, "file": file, "group": group,
                             "kind": "boundary" if name.startswith("@") else "lora", "rows": rows,
                             "features": features, "dtype": dtype, "sha256": file_sha256(self.folder / file),
                             "nonfinite": nonfinite})

    def finish(self, manifest: dict) -> None:
        manifest = {"format": FORMAT, "version": VERSION, **manifest, "provenance": provenance.writer(),
                    "modules": self.modules}
        # NaN / Inf (the ratios of a model with NaN weights) as null: JSON has no such constants, and a reader
        # refuses them (they would stand for an edited manifest)
        write_json(self.folder / MANIFEST, manifest)


def prompt_sha256(prompt_ids) -> str:
    return hashlib.sha256(",".join(str(int(t)) for t in prompt_ids).encode()).hexdigest()


def request_entry(r) -> dict:
    """A request as every bundle's manifest lists it (an output bundle copies the reference's)."""
    return {"adapter": r.adapter, "images": len(r.images), "geometry": [geometry_text(g) for g in r.images],
            "tokens": len(r.prompt_ids), "prompt_sha256": prompt_sha256(r.prompt_ids)}
