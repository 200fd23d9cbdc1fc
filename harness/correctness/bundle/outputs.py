"""An output bundle from the runtime under test: its forward's captures streamed into the bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from harness.correctness.bundle.format import Key, Kind, tensor_name
from harness.correctness.bundle.reader import Bundle
from harness.correctness.bundle.stage import Stage, split
from harness.correctness.bundle.writer import BundleWriter, request_entry
from vlm.rows import BOUNDARY_GROUP


def stream_outputs(rt, reqs, folder: Path, step=lambda: None, reference: str | None = None) -> Bundle:
    """The runtime's one mixed-batch forward, captured into an output bundle module by module (the e2e
    side of a comparison). Raises what the runtime raises, including a row count the formulas disagree with.
    `step()` after each module output the forward captures (progress); `reference`: the sha256 of the
    reference manifest the bundle answers (its "reference" key)."""
    stage = Stage(folder / ".stage")
    sink = stage.sink("got")

    def put(name: str, key: str, t: torch.Tensor) -> None:
        sink(name, key, t)
        if key == Key.OUT:
            step()
    rt.run(reqs, sink=put)
    l_max = max(len(r.prompt_ids) for r in reqs)
    batch = {"arch": rt.arch, "config": rt.config, "reqs": reqs, "l_max": l_max}
    writer = BundleWriter(folder, len(reqs))
    for name in stage.seen.get("got", []):
        tensors = {}
        for key in (Key.OUT, Key.IN):
            for i, t in enumerate(split(stage, "got", name, key, **batch)):
                if t is not None:
                    tensors[tensor_name(key, i)] = t
        stage.drop("got", name)
        writer.add(name, BOUNDARY_GROUP.get(name) or rt.arch.group_of(name), tensors)
        del tensors
    shutil.rmtree(stage.folder)
    named = {} if reference is None else {"reference": reference}
    writer.finish({"kind": Kind.OUTPUTS, **named, "requests": [request_entry(r) for r in reqs]})
    return Bundle.open(folder, verify=False)  # written by this very process a moment ago
