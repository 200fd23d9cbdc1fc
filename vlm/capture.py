"""Forward hooks recording every LoRA-carrying module's input and output plus the group boundaries, keyed by
the HF module name (PEFT's `base_model.model.` prefix removed), moved to CPU; shared by both sides."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from vlm.arch import ArchSpec
from vlm.rows import LM_IMAGE_EMBEDS, LOGITS, TOWER_OUT, module_rows_per_request

Captures = list[dict[str, dict[str, torch.Tensor]]]  # per request: module -> {"in", "out"} [rows, features]


def first_tensor(args, kwargs, *names) -> torch.Tensor | None:
    """A module's main input: a named keyword first, then the first positional tensor, then any tensor
    keyword (e.g. Llama 4's vision layers take `hidden_state=`)."""
    for n in names:
        if isinstance(kwargs.get(n), torch.Tensor):
            return kwargs[n]
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _out_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    return out[0]  # ModelOutput


# Where each boundary is taken, in the words the reference manifest's `taken_at` uses (docs/bundles.md): the
# hooks below and the manifest's entries both come from `boundary_points`, so the spec cannot drift from the
# capture. INPUT: the module's main input (`first_tensor`'s rule: the keyword `hidden_states`, `input` or `x`,
# else the first positional tensor, else the first tensor keyword); IMAGE_EMBEDS: the `inputs_embeds` keyword
# the module is called with, at the positions where `input_ids` holds the image token id; LOGITS: the `logits`
# of the module's output.
INPUT, IMAGE_EMBEDS, OUTPUT_LOGITS = "input", "inputs_embeds at image placeholders", "output logits"


def boundary_points(arch: ArchSpec, model: torch.nn.Module) -> dict[str, dict[str, str]]:
    """{boundary: {"module": HF module name in `model` ("" is the model itself), "what": one of the above}};
    a boundary the arch has no place for (no connector) is left out."""
    points = {}
    conn = arch.measure_points(model).get("connector")
    if conn is not None:
        points[TOWER_OUT] = {"module": conn, "what": INPUT}
    points[LM_IMAGE_EMBEDS] = {"module": arch.language_model[0].rstrip("."), "what": IMAGE_EMBEDS}
    # the model's own output (Llama 4's forward_logits takes the same tensor from its LM's output: upstream bug)
    points[LOGITS] = {"module": "", "what": OUTPUT_LOGITS}
    return points


Sink = Callable[[str, str, torch.Tensor], None]  # (module name, "in" | "out", tensor): writes, keeps nothing


class Recorder:
    """Collects {name: {"in": [tensors], "out": [tensors]}} over one forward; several calls are kept in
    order (a module can run once per image). With a `sink`, each tensor goes to the sink as soon as the
    hook sees it (streaming to disk: harness/correctness/bundle/stage.py) and nothing is kept."""

    def __init__(self, root: torch.nn.Module, names: Iterable[str], arch: ArchSpec, prefix: str = "",
                 sink: Sink | None = None):
        self.records: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.arch, self._sink = arch, sink
        self._handles = []
        modules = dict(root.named_modules())
        for name in names:
            mod = modules[prefix + name]
            self._handles.append(mod.register_forward_hook(self._hook(name), with_kwargs=True))
        base = root.get_submodule(prefix.rstrip(".")) if prefix else root
        points = boundary_points(arch, base)
        conn = points.get(TOWER_OUT, {}).get("module")
        if conn is not None and prefix + conn in modules:
            self._handles.append(modules[prefix + conn].register_forward_pre_hook(
                self._pre(TOWER_OUT), with_kwargs=True))
        lm_root = prefix + points[LM_IMAGE_EMBEDS]["module"]
        self._image_token = None
        if lm_root in modules:
            self._handles.append(modules[lm_root].register_forward_pre_hook(self._lm_pre, with_kwargs=True))

    def _put(self, name, key, t):
        if self._sink is not None:
            self._sink(name, key, t.detach())
            return
        self.records.setdefault(name, {"in": [], "out": []})[key].append(t.detach().to("cpu", copy=True))

    def _hook(self, name):
        def hook(_mod, args, kwargs, out):
            x = first_tensor(args, kwargs, "hidden_states", "input", "x")
            if x is not None:
                self._put(name, "in", x)
            self._put(name, "out", _out_tensor(out))
        return hook

    def _pre(self, name):
        def hook(_mod, args, kwargs):
            x = first_tensor(args, kwargs, "hidden_states", "input", "x")
            if x is not None:
                self._put(name, "out", x)
        return hook

    def set_image_positions(self, mask: torch.Tensor) -> None:
        self._image_token = mask

    def _lm_pre(self, _mod, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if isinstance(emb, torch.Tensor) and self._image_token is not None:
            self._put(LM_IMAGE_EMBEDS, "out", emb[self._image_token.to(emb.device)])

    def captures(self, config, batch, logits: torch.Tensor) -> Captures:
        """After the forward: per-request captures with the logits; with a sink, the logits go there too
        (everything else already did) and the captures are empty."""
        if self._sink is not None:
            self._sink(LOGITS, "out", logits.detach())
            return [{} for _ in batch.requests]
        return captures_per_request(self.records, self.arch, config, batch, logits)

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()


def captures_per_request(records: dict, arch: ArchSpec, config, batch, logits: torch.Tensor) -> Captures:
    """Per-request captures from one batched forward, rows split with the registry's formulas."""
    records = dict(records)
    records[LOGITS] = {"in": [], "out": [logits.detach().cpu()]}
    l_max = batch.input_ids.shape[1]
    out: Captures = [{} for _ in batch.requests]
    for name, io in records.items():
        for key, pieces in io.items():
            if not pieces:
                continue
            for i, t in enumerate(module_rows_per_request(arch, config, batch.requests, batch.lengths, l_max, name, pieces)):
                if t.shape[0]:  # a request without images has no tower / connector rows
                    out[i].setdefault(name, {})[key] = t
    return out

