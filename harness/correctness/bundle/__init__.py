"""Bundles: a run's module captures on disk (docs/bundles.md), written as the forward makes them and read
back one module at a time, so memory does not grow with the number of layers.

A reference bundle (`mmlora record`, and every `mmlora correctness` run through a temporary one) holds, per
module and request, what the verdict needs without the reference model: the reference's output and input
at the run dtype, the truth's output (float64 on CPU), the base Linear's output on each side's input, the
replay truth on the reference's input, and the base Linear's weights (for the runtime's delta). An output
bundle (an engine's own, or the runtime's captures during e2e) holds only `out.<i>` (and `in.<i>`).

One module per job: `format` (the format's name, version and module files at the byte level), `writer` and
`reader` (a bundle written and read back, checked before any work), `inputs` (each request's forward inputs,
as the reference ran them), `requests` (the recorded requests as the runtime runs them), `stage` (the capture
hooks' sink),
`sources` (the checkpoint and adapters a reference bundle is recorded from), `record` (a reference bundle
from the reference and its truth) and `outputs` (an output bundle from the runtime under test).
"""

from harness.correctness.bundle.format import HELD, BundleError, Key, Kind
from harness.correctness.bundle.inputs import InputRecord
from harness.correctness.bundle.outputs import stream_outputs
from harness.correctness.bundle.reader import (
    GROUPS,
    Bundle,
    answered_groups,
    check_outputs,
    engine_of,
    groups_left_out,
    judged_modules,
    not_produced,
)
from harness.correctness.bundle.record import finish_reference, write_reference
from harness.correctness.bundle.requests import recorded_requests
from harness.correctness.bundle.sources import open_reference
from harness.correctness.bundle.stage import Stage, captured

__all__ = ["answered_groups", "Bundle", "BundleError", "captured", "check_outputs", "engine_of",
           "finish_reference", "GROUPS", "groups_left_out", "HELD", "InputRecord", "judged_modules", "Key", "Kind",
           "not_produced", "open_reference", "recorded_requests", "Stage", "stream_outputs", "write_reference"]
