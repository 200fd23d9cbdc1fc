"""Per-module comparison of the runtime against the reference and the high-precision truth.

Every compared tensor is [rows, features] for one request. `judge_tensor` applies the rule of `rules.py` to the
output and, for a LoRA module, to its delta (output minus the base Linear's output on the same input, so a
delta that is 5% of the output is still checked to a fraction of itself), and names the first row whose
error breaks the bound. Figures against the reference itself (max abs, cosine) are kept for reading.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from harness.correctness.rules import Rule


@dataclass
class Check:
    """One statistic pair of one tensor against the truth."""

    err: float        # runtime max |got - truth|
    ref_err: float    # reference max |ref - truth| (+ the held-adapter allowance, element by element)
    rms: float        # runtime rms error
    ref_rms: float    # reference rms error (likewise)
    scale: float      # max |truth|
    bound: float      # k_max * ref_err + floor_max * scale
    rms_bound: float  # k_rms * ref_rms + floor_rms * rms |truth|
    first_bad: int    # first row breaking a bound, -1 if none
    held_err: float = 0.0  # max of the allowance for an adapter held at the run dtype (see `held_adapter`)

    @property
    def ratio(self) -> float:
        """The runtime's max error over the reference's own (both against the truth)."""
        return _over(self.err, self.ref_err)

    @property
    def margin(self) -> float:
        """Error over bound, the worse of the two statistics: > 1 fails."""
        return max(_over(self.err, self.bound), _over(self.rms, self.rms_bound))

    @property
    def ok(self) -> bool:
        return self.margin <= 1.0


def _over(err: float, bound: float) -> float:
    if bound > 0:
        return err / bound
    return 0.0 if err == 0 else float("inf")


def _sizes(t: torch.Tensor) -> tuple[float, float]:
    """(max |t|, rms |t|)."""
    if not t.numel():
        return 0.0, 0.0
    return float(t.abs().max()), float(t.pow(2).mean()) ** 0.5


def held_adapter(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """|delta with A and scale * B rounded to `dtype` - delta with them as given|, per element, in float64:
    what holding the adapter at the run dtype (the scale folded into B, as serving engines load it) costs
    on this input. PEFT keeps adapter weights in fp32 whatever the
    model's dtype (autocast_adapter_dtype), so the reference never pays it; a serving runtime holds them at
    the run dtype (vLLM does), an error the size of one rounding of the delta: at an adapter scale of 1 (a
    delta the size of the output) as large as the output's own rounding, and absent from the reference's."""
    xd = x.double().reshape(-1, x.shape[-1])
    exact = (xd @ A.double().T) @ (B.double().T * scale)
    held = (xd @ A.to(dtype).double().T) @ (B.double() * scale).to(dtype).double().T
    return (held - exact).abs().reshape(*x.shape[:-1], B.shape[0])


def check(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, rule: Rule,
          floor_of: tuple[float, float] | None = None, held: torch.Tensor | None = None) -> Check:
    """`floor_of`: the (max, rms) size the floor is taken of; the truth's own by default. A delta takes the
    output's: it is the difference of two quantities each resolved only to the output's precision.
    `held`: `held_adapter`'s allowance, added to the reference's error element by element (the reference's
    error had it held its adapter at the run dtype, by the triangle inequality at most that sum)."""
    g, r, t = got.double(), ref.double(), truth.double()
    e_got, e_ref = (g - t).abs(), (r - t).abs()
    held_err = 0.0
    if held is not None:
        e_ref = e_ref + held.double().reshape(e_ref.shape)
        held_err = float(held.abs().max()) if held.numel() else 0.0
    scale, t_rms = _sizes(t)
    f_max, f_rms = floor_of or (scale, t_rms)
    (err, rms), (ref_err, ref_rms) = _sizes(e_got), _sizes(e_ref)
    bound = rule.k_max * ref_err + rule.floor_max * f_max
    rms_bound = rule.k_rms * ref_rms + rule.floor_rms * f_rms
    first_bad = -1
    if e_got.numel() and (err > bound or rms > rms_bound):
        rows_got = e_got.reshape(e_got.shape[0], -1) if e_got.dim() else e_got.reshape(1, 1)
        rows_ref = e_ref.reshape(rows_got.shape)
        over = (rows_got.max(dim=1).values > bound).nonzero()
        if over.numel():  # the first row holding an element past the max bound
            first_bad = int(over[0])
        else:  # a spread fault (only the rms fails): the row whose error most exceeds the reference's there
            rms_row = lambda e: e.pow(2).mean(dim=1).sqrt()  # noqa: E731
            first_bad = int((rms_row(rows_got) / (rms_row(rows_ref) + rule.floor_rms * f_rms + 1e-300)).argmax())
    return Check(err, ref_err, rms, ref_rms, scale, bound, rms_bound, first_bad, held_err)


@dataclass
class Metrics:
    status: str  # ok | mismatch | nonfinite | shape | error
    out: Check | None = None
    delta: Check | None = None
    max_abs: float = float("nan")  # against the reference (for reading; the verdict uses the truth)
    cosine: float = float("nan")
    ref_norm: float = float("nan")
    nonfinite_ref: int = 0
    nonfinite_got: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def margin(self) -> float:
        """Error over bound (> 1 fails); infinite for a tensor that could not be judged (error, NaN, shape)."""
        if self.status in ("error", "nonfinite", "shape"):
            return float("inf")
        ms = [c.margin for c in (self.out, self.delta) if c is not None]
        return max(ms) if ms else float("nan")

    @property
    def first_bad(self) -> int:
        for c in (self.out, self.delta):
            if c is not None and not c.ok:
                return c.first_bad
        return -1


def judge_tensor(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, rule: Rule,
                 bases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 held: torch.Tensor | None = None) -> Metrics:
    """Compare one [rows, F] tensor; `bases` = the base Linear's output on (got's, ref's, truth's) inputs;
    `held` = the held-adapter allowance on this tensor (`held_adapter`), None where no adapter acts."""
    if got.shape != ref.shape or truth.shape != ref.shape:
        return Metrics("shape", ref_norm=float(ref.float().norm()))
    nf_r, nf_g = int((~torch.isfinite(ref)).sum()), int((~torch.isfinite(got)).sum())
    if nf_r or nf_g or not bool(torch.isfinite(truth).all()):
        # NaN/Inf is reported as such, never as a tolerance failure with a NaN error figure
        return Metrics("nonfinite", nonfinite_ref=nf_r, nonfinite_got=nf_g)
    out = check(got, ref, truth, rule, held=held)
    delta = None
    if bases is not None:
        bg, br, bt = (b.double() for b in bases)
        delta = check(got.double() - bg, ref.double() - br, truth.double() - bt, rule, _sizes(truth.double()),
                      held)
    r, g = ref.double(), got.double()
    rn, gn = r.norm(), g.norm()
    cos = float((r.flatten() @ g.flatten()) / (rn * gn)) if rn > 0 and gn > 0 else float(rn == gn)
    ok = out.ok and (delta is None or delta.ok)
    return Metrics("ok" if ok else "mismatch", out, delta, float((g - r).abs().max()) if g.numel() else 0.0,
                   cos, float(rn))


def error_metrics() -> Metrics:
    """A module that could not be compared (mapping error, runtime exception, missing capture): the row's
    detail says why."""
    return Metrics("error")


@dataclass
class Row:
    arch: str
    mode: str
    request: int
    adapter: str
    order: int
    module: str
    group: str
    kind: str  # lora | boundary
    dtype: str
    rule: Rule
    metrics: Metrics
    detail: str = ""
    # where the first failing row lies: its index in the request's rows, and the image it belongs to
    # (tower / connector rows), -1 when none or not applicable
    bad_row: int = -1
    bad_image: int = -1
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        m = self.metrics
        d = {"arch": self.arch, "mode": self.mode, "request": self.request, "adapter": self.adapter,
             "order": self.order, "module": self.module, "group": self.group, "kind": self.kind, "dtype": self.dtype,
             "status": m.status, "ok": m.ok, "margin": m.margin, "bad_row": self.bad_row,
             "bad_image": self.bad_image, "k_max": self.rule.k_max, "k_rms": self.rule.k_rms,
             "floor_max": self.rule.floor_max, "floor_rms": self.rule.floor_rms, "max_abs": m.max_abs, "cosine": m.cosine, "ref_norm": m.ref_norm,
             "nonfinite_ref": m.nonfinite_ref, "nonfinite_got": m.nonfinite_got, "detail": self.detail}
        for prefix, c in (("", m.out), ("delta_", m.delta)):
            for k, v in (asdict(c) if c is not None else {}).items():
                d[f"{prefix}{k}"] = v
            if c is not None:
                d[f"{prefix}ratio"] = c.ratio
        return d


_CHECK_FIELDS = ["err", "ref_err", "ratio", "bound", "rms", "ref_rms", "rms_bound", "scale", "first_bad",
                 "held_err"]
CSV_COLUMNS = (["arch", "mode", "request", "adapter", "order", "module", "group", "kind", "dtype", "status", "ok",
                "margin", "bad_row", "bad_image"] + _CHECK_FIELDS + [f"delta_{f}" for f in _CHECK_FIELDS]
               + ["k_max", "k_rms", "floor_max", "floor_rms", "max_abs", "cosine", "ref_norm", "nonfinite_ref", "nonfinite_got",
                  "detail"])


def first_divergence(rows: list[Row]) -> Row | None:
    """The earliest module (reference execution order) that fails in any request."""
    bad = [r for r in rows if not r.metrics.ok]
    return min(bad, key=lambda r: (r.order, r.request)) if bad else None
