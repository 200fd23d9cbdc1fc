"""Inline SVG of one group's modules in one mode: each module's worst margin (error / bound over every request
and both statistics: the verdict's own number, > 1 fails) on a log axis, with the line at 1.

SVG rather than a PNG: module names sit under the points (shortened) and in full in each point's hover
title, the first divergence links to its table row, and the page stays self-contained (no script).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.output import esc

OK_COLOR, FAIL_COLOR, BOUND_COLOR = "#2b6cb0", "#c81e1e", "#c81e1e"
HEIGHT, TOP, BOTTOM, LEFT, RIGHT = 320, 30, 122, 52, 14
ROW_WIDTH, GAP, WIDTH_MIN, LABEL_CHARS = 1240, 10, 300, 18  # one mode's panels share a ~1300 px row


def widths(counts: list[int]) -> list[int]:
    """Panel widths for one row of groups with these module counts: WIDTH_MIN each, the rest of the row
    shared in proportion to the modules (a 2-module connector still reads; a 200-module LM gets the room)."""
    extra = max(0, ROW_WIDTH - len(counts) * (WIDTH_MIN + GAP))
    total = sum(counts) or 1
    return [WIDTH_MIN + int(extra * c / total) for c in counts]


@dataclass
class Point:
    module: str
    margin: float   # the worst over the module's requests; inf when a tensor could not be judged
    ok: bool
    status: str     # of the worst request
    request: int    # the worst request
    link: str | None = None  # the table row of the first divergence, when this module is it


def short_names(names: list[str]) -> dict[str, str]:
    """Tick labels: the group's common dotted prefix dropped, then the layer numbers and the last part kept
    (model.language_model.layers.3.self_attn.q_proj -> 3.q_proj); a boundary capture (@...) stays as is."""
    plain = [n.split(".") for n in names if not n.startswith("@")]
    common = 0
    if len(plain) > 1:
        while all(len(p) > common + 1 and p[common] == plain[0][common] for p in plain):
            common += 1
    out = {}
    for n in names:
        if n.startswith("@"):
            out[n] = n
            continue
        rest = n.split(".")[common:] if len(plain) > 1 else n.split(".")[-1:]
        out[n] = ".".join([p for p in rest[:-1] if p.isdigit()] + rest[-1:])
    return out


def _decades(points: list[Point]) -> tuple[int, int]:
    finite = [p.margin for p in points if math.isfinite(p.margin) and p.margin > 0]
    lo = math.floor(math.log10(min(finite))) if finite else -2
    hi = math.ceil(math.log10(max(finite))) if finite else 1
    return min(lo, -1), max(hi, 1)  # the line at 1 always inside, with a decade either side


def svg(title: str, points: list[Point], width: int) -> str:
    n = len(points)
    plot_w, plot_h = width - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    lo, hi = _decades(points)

    def y(m: float) -> float:
        if not math.isfinite(m):
            return TOP  # could not be judged: pinned to the top
        v = min(max(math.log10(m) if m > 0 else lo, lo), hi)
        return TOP + plot_h * (hi - v) / (hi - lo)

    def x(i: int) -> float:
        return LEFT + plot_w * (i + 0.5) / max(n, 1)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{HEIGHT}' class='margins' "
             f"font-family='system-ui,sans-serif' font-size='11'>",
             f"<text x='4' y='16' font-size='12.5' font-weight='600'>{esc(title)}</text>",
             f"<rect x='{LEFT}' y='{TOP}' width='{plot_w}' height='{plot_h}' fill='#fafafa' stroke='#bbb'/>"]
    for d in range(lo, hi + 1):
        yy = y(10.0 ** d)
        label = f"{10.0 ** d:g}" if -3 <= d <= 3 else f"1e{d}"
        parts.append(f"<line x1='{LEFT}' x2='{LEFT + plot_w}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='#e4e4e4'/>"
                     f"<text x='{LEFT - 4}' y='{yy + 4:.1f}' text-anchor='end'>{label}</text>")
    y1 = y(1.0)
    parts.append(f"<line x1='{LEFT}' x2='{LEFT + plot_w}' y1='{y1:.1f}' y2='{y1:.1f}' stroke='{BOUND_COLOR}' "
                 f"stroke-dasharray='6 3'><title>the bound: error / bound = 1 (above fails)</title></line>")
    parts.append(f"<text x='12' y='{TOP + plot_h / 2:.0f}' transform='rotate(-90 12 {TOP + plot_h / 2:.0f})' "
                 f"text-anchor='middle'>error / bound (log)</text>")
    labels = short_names([p.module for p in points])
    every = max(1, math.ceil(n * 11 / plot_w))  # one label per 11 px at most: thinned on big models
    for i, p in enumerate(points):
        xx, yy = x(i), y(p.margin)
        fig = "not judged: " + p.status if not math.isfinite(p.margin) else f"margin {p.margin:.3g}"
        tip = f"{p.module}: {fig} (worst request {p.request}){'' if p.ok else ', FAILS'}"
        shape = (f"<circle cx='{xx:.1f}' cy='{yy:.1f}' r='{5 if not p.ok else 3.5}' "
                 f"fill='{OK_COLOR if p.ok else FAIL_COLOR}'><title>{esc(tip)}</title></circle>")
        if p.link:  # the first divergence: ringed, and a link to its table row
            shape = (f"<a href='#{esc(p.link)}'><circle cx='{xx:.1f}' cy='{yy:.1f}' r='9' fill='none' "
                     f"stroke='{FAIL_COLOR}' stroke-width='2'/>{shape}</a>")
        parts.append(shape)
        if i % every == 0:
            ty = TOP + plot_h + 8
            color = "#222" if p.ok else FAIL_COLOR
            parts.append(f"<text x='{xx:.1f}' y='{ty}' transform='rotate(-60 {xx:.1f} {ty})' text-anchor='end' "
                         f"fill='{color}'>{esc(_clip(labels[p.module]))}<title>{esc(p.module)}</title></text>")
    parts.append("</svg>")
    return "".join(parts)


def _clip(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "\u2026"


def worst_per_module(rows, link_of) -> list[Point]:
    """One point per module (in execution order) from its rows: the worst request's margin."""
    by: dict[str, Point] = {}
    order: dict[str, int] = {}
    for r in sorted(rows, key=lambda r: (r.order, r.request)):
        m = r.metrics
        margin = m.margin if not math.isnan(m.margin) else 0.0
        cur = by.get(r.module)
        if cur is None or margin > cur.margin:
            by[r.module] = Point(r.module, margin, m.ok and (cur is None or cur.ok), m.status, r.request,
                                 link_of(r.module))
        elif not m.ok:
            cur.ok = False
        order.setdefault(r.module, r.order)
    return [by[k] for k in sorted(by, key=order.get)]
