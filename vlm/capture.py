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
        conn = arch.measure_points(base).get("connector")
        if conn is not None and prefix + conn in modules:
            self._handles.append(modules[prefix + conn].register_forward_pre_hook(
                self._pre(TOWER_OUT), with_kwargs=True))
        lm_root = prefix + arch.language_model[0].rstrip(".")
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

