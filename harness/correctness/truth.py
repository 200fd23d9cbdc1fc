"""The high-precision truth both sides are judged against, and what the adapters measurably do.

The truth is the reference itself (HF + PEFT, the same adapter folders) with every floating tensor upcast:
float64 on CPU, fp32 with IEEE matmuls (no TF32) on CUDA. Its weights are the run-dtype weights upcast
(so the truth and both sides share the same weights; only the arithmetic differs), its adapter weights
those of the adapter files, and its pixel inputs the run-dtype pixels upcast.

No second copy of the model is made: `high_precision` runs the reference's own PeftModel with its tensors
upcast in place for the length of a `with` block. Linear and Embedding weights are never upcast whole (above
`BIG` bytes, 0 by default: all of them but adapters' and Linear subclasses with their own forward): a Linear
computes its output in column chunks from its weight upcast a chunk at a time, an Embedding looks up the rows
it is asked for and upcasts only those; meanwhile the weight holds an 8-byte stand-in of the truth dtype.
Every value the truth computes is the one a fully upcast copy computes (the same products and sums at the
same precision; a Linear wider than a chunk may sum in another blocking, a difference at float64 rounding),
and memory stays one model plus a chunk plus the small tensors (norms, biases, buffers) upcast.
"""

from __future__ import annotations

import contextlib

import torch

from reference.run import run_reference


def truth_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


@contextlib.contextmanager
def ieee_matmuls():
    """fp32 matmuls without TF32 for the truth on CUDA (a no-op on CPU)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# bytes at the truth dtype: a Linear / Embedding weight above this is upcast piecewise. 0: every one, so the
# truth's extra memory is one chunk whatever the layer count (upcast whole, a CLIP-L tower layer alone would hold
# 100 MB of float64 for the truth's whole forward)
BIG = 0
CHUNK = 16 << 20  # bytes at the truth dtype of one upcast piece of a large Linear weight


class ChunkBuffer:
    """One buffer per device (at most a chunk) that every piece of every Linear weight is upcast into. Not a
    new tensor per piece: a fresh 16 MiB tensor, freed a moment later between the forward's smaller tensors,
    fragments the C heap (glibc raises its mmap threshold to the size of a freed block, so later pieces land on
    the heap, between live activations), enough for a 4-layer LLaVA-7B truth to hold 1.1 GB more than its
    1-layer twin. A piece always starts at the buffer's start (the same alignment every time)."""

    def __init__(self, dtype: torch.dtype, chunk: int):
        self.dtype, self.chunk, self._flat = dtype, chunk, {}

    def rows(self, w: torch.Tensor) -> int:
        """How many rows of `w` one piece holds."""
        return max(1, self.chunk // (max(1, w.shape[1]) * self.dtype.itemsize))

    def upcast(self, w: torch.Tensor) -> torch.Tensor:
        """`w` (at most `rows(w)` rows) upcast into the buffer (valid until the next call). The buffer grows to
        the largest piece asked for (at most a chunk, or one row wider than a chunk): a few sizes, once each."""
        flat = self._flat.get(w.device)
        if flat is None or flat.numel() < w.numel():
            flat = self._flat[w.device] = torch.empty(w.numel(), dtype=self.dtype, device=w.device)
        return flat[: w.numel()].view(w.shape).copy_(w)


def _linear_in_chunks(mod: torch.nn.Linear, dtype: torch.dtype, chunk: int, weight=None,
                      buffer: ChunkBuffer | None = None):
    """`mod`'s forward at `dtype` from its weight (`weight()`, default `mod.weight`) upcast `chunk` bytes at a
    time (output columns), each piece into `buffer` (shared by every Linear of a `high_precision` block)."""
    buf = buffer or ChunkBuffer(dtype, chunk)

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = mod.weight if weight is None else weight(), mod.bias
        n = buf.rows(w)
        outs = [torch.nn.functional.linear(x, buf.upcast(w[i:i + n]), None if b is None else b[i:i + n].to(dtype))
                for i in range(0, max(w.shape[0], 1), n)]  # (a Linear with no output column: one empty piece)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return forward


def _embedding_rows(mod: torch.nn.Embedding, dtype: torch.dtype, forward, weight):
    """`forward` (the Embedding's) looking up its rows in a table of only the rows asked for of `weight()`,
    upcast (a lookup is exact: the same values as a lookup in the whole table upcast)."""
    def call(*args, **kwargs):
        key = None if args else next(iter(kwargs))
        ids = args[0] if args else kwargs[key]
        rows, where = torch.unique(ids, return_inverse=True)
        where = where.reshape(ids.shape)
        saved = mod.weight.data, mod.padding_idx
        mod.weight.data = weight()[rows].to(dtype)
        mod.padding_idx = None  # only gradients and a range check read it; the table is renumbered
        try:
            return forward(where, *args[1:], **kwargs) if key is None else forward(*args, **{**kwargs, key: where})
        finally:
            mod.weight.data, mod.padding_idx = saved
    return call


def _upcast_on_call(mod: torch.nn.Module, dtype: torch.dtype, skip: str | None, forward):
    """`forward` with `mod`'s own floating tensors upcast for the call: for a module accelerate offloads, whose
    tensors exist only while its hook has loaded them (at the run dtype), around the forward it wraps."""
    def call(*args, **kwargs):
        saved = []
        for t in _direct(mod):
            if t[1] != skip and t[2].is_floating_point() and t[2].dtype != dtype:
                saved.append((t[2], t[2].data))
                t[2].data = t[2].data.to(dtype)
        try:
            return forward(*args, **kwargs)
        finally:
            for t, data in saved:
                t.data = data
    return call


def _direct(mod: torch.nn.Module):
    return [("p", n, t) for n, t in mod._parameters.items() if t is not None] + \
        [("b", n, t) for n, t in mod._buffers.items() if t is not None]


def _offloaded(mod: torch.nn.Module) -> bool:
    """accelerate loads this module's tensors for each call (disk / CPU offload) and puts them back after."""
    hook = getattr(mod, "_hf_hook", None)
    return any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,)))


def _set_forward(mod: torch.nn.Module, make) -> tuple:
    """Replace the forward `mod` runs (under accelerate's hooks: the one they wrap) by `make(current)`; returns
    how to undo it."""
    attr = "_old_forward" if hasattr(mod, "_hf_hook") else "forward"
    had = mod.__dict__.get(attr)
    object.__setattr__(mod, attr, make(getattr(mod, attr)))
    return mod, attr, had


@contextlib.contextmanager
def high_precision(model: torch.nn.Module, dtype: torch.dtype, big: int = BIG, chunk: int = CHUNK):
    """Run `model` (the reference PeftModel) as the truth inside the block: every floating parameter and buffer
    at `dtype` (float64 on CPU), IEEE fp32 matmuls on CUDA. Tensors are upcast in place and given back
    their very storage afterwards; Linear / Embedding weights above `big` bytes are never upcast whole (see
    the module docstring), so no second copy of the model exists. Modules accelerate offloads (device maps)
    are upcast for each call, once its hook has loaded them. `big=0` puts every Linear and Embedding on the
    piecewise path (tests hold it to a fully upcast copy)."""
    size = torch.empty((), dtype=dtype).element_size()
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    forwards: list[tuple] = []
    seen: set[int] = set()
    # adapter Linears are small (rank r) and PEFT casts their input to their weight's dtype: always upcast whole
    adapter = {id(m) for m in model.modules() if type(m).__module__.startswith("peft.")
               for d in (getattr(m, "lora_A", None), getattr(m, "lora_B", None)) if isinstance(d, torch.nn.ModuleDict)
               for m in d.values()}
    reals: dict[int, torch.Tensor] = {}  # piecewise weights: their run-dtype data, while they hold a stand-in
    placeholders: list[tuple[torch.nn.Module, str, torch.dtype]] = []  # offloaded tensors' run dtypes
    pieces = ChunkBuffer(dtype, chunk)
    try:
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            offloaded = _offloaded(mod)
            real = reals.get(id(w), w.data if isinstance(w, torch.Tensor) else None)
            # a Linear subclass with its own forward (Llama 4's router) keeps it: upcast whole
            piecewise = ((isinstance(mod, torch.nn.Embedding) or (isinstance(mod, torch.nn.Linear)
                                                                  and type(mod).forward is torch.nn.Linear.forward))
                         and id(mod) not in adapter
                         and real is not None and real.is_floating_point() and real.dtype != dtype
                         and real.numel() * size > big)
            if piecewise:
                seen.add(id(w))
                if not offloaded and id(w) not in reals:
                    # a stand-in of the truth dtype (code that reads its dtype / device / shape sees what a full
                    # upcast shows; one that read its values outside the module would get NaN, loudly), 8 bytes
                    reals[id(w)] = real
                    saved.append((w, real))
                    w.data = torch.full((), float("nan"), dtype=dtype, device=real.device).expand(real.shape)
                weight = (lambda mod=mod: mod.weight) if offloaded else (lambda real=real: real)
                if isinstance(mod, torch.nn.Linear):
                    forwards.append(_set_forward(mod, lambda _f, mod=mod, weight=weight:
                                                 _linear_in_chunks(mod, dtype, chunk, weight, pieces)))
                else:
                    forwards.append(_set_forward(mod, lambda f, mod=mod, weight=weight:
                                                 _embedding_rows(mod, dtype, f, weight)))
            if offloaded:
                # accelerate loads an offloaded tensor at its placeholder's dtype, and HF reads that dtype
                # outside the module (CLIP casts the pixels to patch_embedding.weight.dtype before calling it):
                # placeholders of the truth dtype make every load and every such read the truth's. The cost: an
                # offloaded module's tensors at the truth dtype while it runs (one module at a time)
                placeholders.extend(_truth_placeholders(mod, dtype))
                forwards.append(_set_forward(mod, lambda f, mod=mod, skip="weight" if piecewise else None:
                                             _upcast_on_call(mod, dtype, skip, f)))
                continue
            for _, _, t in _direct(mod):
                if id(t) in seen or not t.is_floating_point():
                    continue
                seen.add(id(t))
                saved.append((t, t.data))
                t.data = t.data.to(dtype)
        with ieee_matmuls():
            yield model
    finally:
        for mod, attr, had in reversed(forwards):
            if had is None:
                del mod.__dict__[attr]
            else:
                object.__setattr__(mod, attr, had)
        for t, data in saved:
            t.data = data
        for mod, name, run in placeholders:
            _restore_placeholder(mod, name, run)


def _truth_placeholders(mod: torch.nn.Module, dtype: torch.dtype) -> list[tuple[torch.nn.Module, str, torch.dtype]]:
    """`mod`'s offloaded (meta) floating tensors given `dtype`; returns what `_restore_placeholder` undoes."""
    changed = []
    for _, name, t in _direct(mod):
        if t.device.type == "meta" and t.is_floating_point() and t.dtype != dtype:
            changed.append((mod, name, t.dtype))
            t.data = torch.empty_like(t.data, dtype=dtype)
    return changed


def _restore_placeholder(mod: torch.nn.Module, name: str, run: torch.dtype) -> None:
    # accelerate replaces the Parameter object at each load and offload: restore whatever the module holds now
    # (still loaded, at the truth dtype, if a forward raised before accelerate offloaded it again)
    t = mod._parameters.get(name) if name in mod._parameters else mod._buffers.get(name)
    if t is not None and t.dtype != run:
        t.data = torch.empty_like(t.data, dtype=run) if t.device.type == "meta" else t.data.to(run)


def _upcast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    # floating tensors only: Module.to(dtype) would also cast complex buffers (Llama 4's RoPE table) to real
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(dtype)


def run_truth(pm, arch, config, reqs, device: torch.device, run_dtype: torch.dtype, sink=None):
    """The truth's captures per request: the reference PeftModel `pm` run inside `high_precision` (`sink`:
    streamed to disk as they are made, see reference.run)."""
    with high_precision(pm, truth_dtype(device)):
        return run_reference(pm, arch, config, reqs, "single", device, run_dtype,
                             compute_dtype=truth_dtype(device), sink=sink).captures


def trivial_warnings(ratios: dict[str, dict[str, float]], targets: dict[str, set[str]], arch,
                     negligible: float) -> list[str]:
    """One warning per (adapter, group) the adapter targets but leaves (almost) unchanged."""
    out = []
    for adapter, modules in targets.items():
        for group in sorted({arch.group_of(m) for m in modules}):
            r = ratios.get(adapter, {}).get(group)
            if r is not None and r < negligible:
                out.append(f"adapter {adapter!r} changes nothing on the {group} (delta / base = {r:.2g} < "
                           f"{negligible:g}): comparison is trivial")
    return out
