"""index.html of a bench run: self-contained, plots as inline PNGs (harness.output.png_data_uri).

Plots: latency vs the case's x parameter per provider, % of roofline, speed-up over the reference's
provider (HF + PEFT). Each panel
is one case (and one model for end-to-end cases); its lines hold the other parameters at the base
combination (the one swept over the most x values), one line per (provider and variant, GPU), so a CSV
holding several GPUs draws one line per GPU instead of mixing them, and the LoRA kernel / eager /
grouping variants stand side by side. Tables: each kernel row against the memory limits (bytes, the us
they take at the profile's peak and at the copy bandwidth measured in the run, % of both), the noisy
points, the regressions, the rows without numbers.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from harness.bench import schema
from harness.bench.baseline import Comparison
from harness.bench.roofline import profile_for_device
from harness.output import PAGE, esc, png_data_uri
from runtime.providers import DEFAULT, PROVIDERS, REFERENCE, TWIN_PROVIDER

_OTHER = [c for c in schema.PARAM_COLUMNS if c not in ("model", "variant")]
_TAB10 = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan")


def _colors() -> dict[str, str]:
    """One colour per provider: the one it declares, else the first no provider claims (registry order)."""
    free = [c for c in _TAB10 if c not in {p.bench.color for p in PROVIDERS.values()}]
    out = {}
    for name, p in PROVIDERS.items():
        out[name] = p.bench.color or (free.pop(0) if free else None)
    return out


# one colour per provider; a provider's variants (what is timed) differ by line style, GPUs by marker
COLORS = _colors()
LINESTYLES = {"": "-", "kernel": "-", "eager": "--", "grouping": ":"}
GPU_MARKERS = ("o", "s", "^", "D")
# the headline: the runtime (its default provider; the twins where that was not timed) against each other
# provider, like for like (a kernel launch against a kernel launch, a public call against a public call): the
# runtime's variant each comparator's variant is held to
VERSUS = tuple(name for name, p in PROVIDERS.items() if p.bench.versus and name != DEFAULT)


def _label(r: dict) -> str:
    """A plot line's provider label: the provider, and the variant where the case has one."""
    return f"{r['provider']} {r['variant']}" if r.get("variant") else r["provider"]


def _num(s: str) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return math.nan


def _claimable(r: dict) -> bool:
    """A roofline is a claim about the GPU measured: rows of a device no profile matches (a CPU; a CSV
    written before the sweep refused such rows) are neither drawn nor tabled."""
    return r.get("metric") not in ("pct_roofline", "roof_us") or profile_for_device(r.get("gpu_name")) is not None


def _ok(rows, metric):
    return [r for r in rows if r.get("status") == "ok" and r.get("metric") == metric and _num(r.get("p50")) > 0
            and _claimable(r)]


def _x_of(case: str, cases: dict) -> str:
    c = cases.get(case)
    return c.x if c is not None else "T"


def _panels(rows: list[dict], cases: dict) -> dict[tuple[str, str], dict]:
    """(case, model) -> {"x", "series": {(provider, gpu): {x: row}}, "base"} at the base combination.

    The x axis is the case's own x parameter when it varies in the panel, else the parameter that varies
    most (e.g. n_adapters for a prefill sweep at one image count)."""
    by_panel: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_panel[(r["case"], r.get("model", ""))].append(r)
    out = {}
    for panel, prs in by_panel.items():
        def spread(c, prs=prs):
            return len({r.get(c, "") for r in prs if not math.isnan(_num(r.get(c)))})
        x = _x_of(panel[0], cases)
        if spread(x) < 2:
            x = max(_OTHER, key=lambda c: (spread(c), c == x))
        others = [c for c in _OTHER if c != x]
        xs_per_combo: dict[tuple, set] = defaultdict(set)
        for r in prs:
            xs_per_combo[tuple(r.get(c, "") for c in others)].add(r.get(x, ""))
        base = max(xs_per_combo, key=lambda k: (len(xs_per_combo[k]), k))
        series: dict[tuple[str, str], dict[float, dict]] = defaultdict(dict)
        for r in prs:
            if tuple(r.get(c, "") for c in others) == base and not math.isnan(_num(r.get(x))):
                series[(_label(r), r.get("gpu_name", ""))][_num(r[x])] = r
        base_desc = " ".join(f"{c}={v}" for c, v in zip(others, base) if v)
        out[panel] = {"x": x, "series": series, "base": base_desc}
    return out


def _grid(plt, n: int):
    cols = min(2, max(1, n))  # two panels a row, each with its legend to its right: ~1300 px at 90 dpi
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.2 * cols, 3.6 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.axis("off")
    return fig, flat


def _plot(panels: dict, ylabel: str, value, title: str, logy: bool, hline: float | None = None) -> str:
    keys = sorted(panels)
    gpus = sorted({g for p in panels.values() for (_, g) in p["series"]})
    marker = {g: GPU_MARKERS[i % len(GPU_MARKERS)] for i, g in enumerate(gpus)}

    def draw(plt):
        fig, axes = _grid(plt, len(keys))
        for ax, key in zip(axes, keys):
            p = panels[key]
            for (prov, gpu), pts in sorted(p["series"].items()):
                xs = sorted(pts)
                ys = [value(pts[x], x, prov, gpu) for x in xs]
                xy = [(a, b) for a, b in zip(xs, ys) if b is not None and b > 0]
                if not xy:
                    continue
                label = prov if len(gpus) == 1 else f"{prov} @ {gpu}"
                base, _, variant = prov.partition(" ")
                ax.plot([a for a, _ in xy], [b for _, b in xy], marker=marker[gpu], ms=4, lw=1.6,
                        linestyle=LINESTYLES.get(variant, "-."), label=label, color=COLORS.get(base))
            xs_all = [x for s in p["series"].values() for x in s]
            if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
                ax.set_xscale("log", base=2)
            ys_all = [y for line in ax.lines for y in line.get_ydata()]
            if logy and ys_all and max(ys_all) / min(ys_all) >= 10:
                ax.set_yscale("log")
            if hline is not None:
                ax.axhline(hline, color="grey", lw=0.8)
            case, model = key
            ax.set_title(f"{case}{' ' + model if model else ''}", fontsize=10)
            ax.set_xlabel(f"{p['x']}  ({p['base']})", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=9)
            if ax.lines:  # beside the axes, never over the data
                ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        return fig
    return png_data_uri(draw)


def _section(title: str, img: str | None, note: str = "") -> str:
    body = f"<img alt='{esc(title)}' src='{img}'>" if img else f"<p>{esc(note)}</p>"
    return f"<h2>{esc(title)}</h2>{body}"


def plots(rows: list[dict], cases: dict) -> list[str]:
    parts = []
    lat = _panels(_ok(rows, "latency_ms"), cases)
    parts.append(_section("Latency (p50) per provider", _plot(
        lat, "p50 latency (ms)", lambda r, x, p, g: _num(r["p50"]), "latency vs swept parameter", True)
        if lat else None, "no ok latency rows"))
    roof = _panels(_ok(rows, "pct_roofline"), cases)
    if roof:
        parts.append(_section("% of roofline", _plot(
            roof, "% of roofline (p50)", lambda r, x, p, g: _num(r["p50"]), "% of roofline (max of HBM and "
            "compute bound)", False)))
    else:  # no GPU profile applied (CPU, or a GPU without a profile): show what was achieved instead
        gbps = _panels(_ok(rows, "gbps"), cases)
        parts.append(_section("% of roofline", None, "no % of roofline rows: no GPU profile applied to this run "
                              "(CPU, or a GPU without a profile; see --gpu). Achieved GB/s instead:"))
        if gbps:
            parts.append(f"<img alt='achieved GB/s' src='{_plot(gbps, 'GB/s (p50)', lambda r, x, p, g: _num(r['p50']), 'achieved GB/s (bytes from each kernel spec)', True)}'>")
    ref_panels = {k: v for k, v in lat.items() if any(prov.split()[0] == REFERENCE for prov, _ in v["series"])}
    title = f"Speed-up over {REFERENCE}"
    if ref_panels:
        sp: dict = {}
        for key, p in ref_panels.items():
            series = {}
            for (prov, gpu), pts in p["series"].items():
                ref = next((v for (pv, g), v in p["series"].items() if pv.split()[0] == REFERENCE and g == gpu), {})
                if prov.split()[0] == REFERENCE:
                    continue
                series[(prov, gpu)] = {x: {"ratio": _num(ref[x]["p50"]) / _num(r["p50"])}
                                       for x, r in pts.items() if x in ref}
            sp[key] = {**p, "series": series}
        img = _plot(sp, f"speed-up over {REFERENCE} (x)", lambda r, x, p, g: r["ratio"], "speed-up over HF + PEFT "
                    f"({REFERENCE} p50 / provider p50)", True, hline=1.0)
        parts.append(_section(title, img))
    else:
        parts.append(_section(title, None, f"no {REFERENCE or 'reference'} rows in this run"))
    return parts


def _point_rows(rows: list[dict]) -> dict[tuple, dict]:
    """(point key without the metric) -> metric -> its ok row."""
    out: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        if r.get("status") == "ok" and _claimable(r):
            out[schema.row_key(r)[:-1]][r["metric"]] = r
    return out


def headline(rows: list[dict], cases: dict) -> list[dict]:
    """Per panel (case, model) and GPU, the largest point of its base combination: the runtime's p50, its
    speed-up over each other provider (their p50 / the runtime's, like for like: see VERSUS) and its % of
    roofline. The runtime is its default provider; the kernels' twins where that was not timed (e2e on a CPU)."""
    by_point = _point_rows(rows)
    out = []
    for (case, model), p in sorted(_panels(_ok(rows, "latency_ms"), cases).items()):
        for gpu in sorted({g for _, g in p["series"]}):
            series = {label: pts for (label, g), pts in p["series"].items() if g == gpu}
            runtime = DEFAULT if any(lb.split()[0] == DEFAULT for lb in series) else TWIN_PROVIDER
            mine = {lb: pts for lb, pts in series.items() if lb.split()[0] == runtime}
            if not mine:
                continue
            x = max(x for pts in mine.values() for x in pts)
            main = next((lb for lb in (f"{runtime} kernel", runtime) if x in mine.get(lb, {})),
                        next(lb for lb, pts in mine.items() if x in pts))
            lat = mine[main][x]
            pct = by_point.get(schema.row_key(lat)[:-1], {}).get("pct_roofline")
            versus = {}
            for other in VERSUS:
                if other == runtime:
                    continue
                for lb, pts in series.items():
                    base, _, variant = lb.partition(" ")
                    if base != other or x not in pts:
                        continue
                    ours = next((mine[c][x] for c in (f"{runtime} {variant}".strip(), runtime) if x in mine.get(c, {})),
                                None)
                    if ours is not None:
                        versus[other] = (_num(pts[x]["p50"]) / _num(ours["p50"]), variant or "")
            out.append({"case": case, "model": model, "gpu": gpu, "x": p["x"], "at": x, "base": p["base"],
                        "runtime": main, "p50_ms": _num(lat["p50"]), "versus": versus,
                        "pct_roofline": _num(pct["p50"]) if pct else None})
    return out


def _speedup(h: dict, other: str) -> str:
    if other not in h["versus"]:
        return "-"
    v, variant = h["versus"][other]
    return f"{v:.2f}x" + (f" ({variant})" if variant else "")


def _pct(h: dict) -> str:
    return "-" if h["pct_roofline"] is None else f"{h['pct_roofline']:.3g} %"


def _where(h: dict) -> str:
    return f"{h['x']}={h['at']:g}" + (f" {h['base']}" if h["base"] else "")


def headline_html(heads: list[dict]) -> str:
    if not heads:
        return "<p>no headline: no ok latency row of the runtime</p>"
    cols = ("case", "point", "runtime", "p50 ms", *(f"vs {o}" for o in VERSUS), "% of roofline")
    hdr = "".join(f"<th{' class=l' if c in ('case', 'point', 'runtime') else ''}>{esc(c)}</th>" for c in cols)
    body = "".join(
        f"<tr><td class='l'>{esc(h['case'])}{' ' + esc(h['model']) if h['model'] else ''}</td>"
        f"<td class='l'>{esc(_where(h))}</td><td class='l'>{esc(h['runtime'])}</td><td>{h['p50_ms']:.4g}</td>"
        + "".join(f"<td>{esc(_speedup(h, o))}</td>" for o in VERSUS)
        + f"<td>{esc(_pct(h))}</td></tr>"
        for h in heads)
    by_variant = {v: " / ".join(o for o in VERSUS if PROVIDERS[o].bench.variant == v) for v in ("kernel", "eager")}
    return ("<h2>Headline</h2><p>per case, its largest point: the runtime's p50 and its speed-up over each other "
            "provider (their p50 / the runtime's; &gt; 1: the runtime is faster), like for like: the runtime's "
            f"kernel launch against {esc(by_variant['kernel'])} kernels, its public call against "
            f"{esc(by_variant['eager'])} (eager). - : not timed at that point.</p>"
            f"<div class='scroll'><table><tr>{hdr}</tr>{body}</table></div>")


def headline_text(heads: list[dict]) -> list[str]:
    """The headline as the terminal's last lines: fixed-width columns."""
    table = [["case", "point", "runtime", "p50 ms", *(f"vs {o}" for o in VERSUS), "% roofline"]]
    for h in heads:
        table.append([h["case"] + (f" {h['model']}" if h["model"] else ""), _where(h), h["runtime"],
                      f"{h['p50_ms']:.4g}", *(_speedup(h, o) for o in VERSUS),
                      _pct(h)])
    width = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in table]


def print_headline(rows: list[dict], cases: dict) -> None:
    """`mmlora bench`'s last lines: the headline table, and the interpreter warning where it applies."""
    import sys

    lines = headline_text(headline(rows, cases))
    banner = interpreter_banner(rows)
    print("\n".join(["bench: headline (speed-up = other p50 / runtime p50)", *lines]
                    + ([f"bench: {banner}"] if banner else [])), file=sys.stderr)


def interpreter_banner(rows: list[dict]) -> str:
    """What a CPU run's Triton timings are, said once where a reader looks first; empty on a GPU."""
    cpu = [r for r in rows if (r.get("gpu_name") or "").startswith("cpu")]
    if not cpu:
        return ""
    triton = [n for n, p in PROVIDERS.items() if p.triton]
    return (f"CPU run: {_and(triton)} rows are Triton interpreter timings (tiny shapes; they check the plumbing, "
            f"not the kernels' speed); {_and([n for n in PROVIDERS if n not in triton])} rows are real CPU timings; "
            "no GPU profile applies, so no % of roofline")


def _and(names: list[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _status_text(status: Counter) -> str:
    return ", ".join(f"{k or 'none'} {v}" for k, v in sorted(status.items(), key=lambda kv: -kv[1]))


def _params(r: dict) -> str:
    return " ".join(f"{c}={r[c]}" for c in schema.PARAM_COLUMNS if r.get(c))


def _limits_table(rows: list[dict]) -> str:
    """Every ok kernel point that has byte counts: bytes, us at the profile's peak and at the run's copy
    bandwidth, measured p50 us, % of each, and the note (noisy points say so)."""
    by_point = _point_rows(rows)
    head = ("case", "provider", "params", "MB", "us @ peak", "us @ copy", "p50 us", "% peak", "% copy", "note")
    body = []
    for key, m in by_point.items():
        if "bytes_mb" not in m or key[0] == "copy":
            continue
        lat = m["latency_ms"]
        cells = [_num(m[k]["p50"]) if k in m else math.nan for k in ("bytes_mb", "roof_us", "copy_us")]
        cells.append(1e3 * _num(lat["p50"]))
        cells += [_num(m[k]["p50"]) if k in m else math.nan for k in ("pct_roofline", "pct_copy")]
        nums = "".join(f"<td>{'' if math.isnan(v) else f'{v:.4g}'}</td>" for v in cells)
        body.append(f"<tr><td class='l'>{esc(key[0])}</td><td class='l'>{esc(key[1])}</td>"
                    f"<td class='l'>{esc(_params(lat))}</td>{nums}<td class='l'>{esc(lat.get('note', ''))}</td></tr>")
    if not body:
        return ""
    copy = [r for r in rows if r.get("case") == "copy" and r.get("metric") == "gbps" and r.get("status") == "ok"]
    best = max((_num(r["p50"]) for r in copy), default=math.nan)
    hdr = "".join(f"<th{' class=l' if h in ('case', 'provider', 'params', 'note') else ''}>{h}</th>" for h in head)
    return (f"<details><summary>Kernel rows against the memory limits ({len(body)} points; copy bandwidth "
            f"measured in this run: {'none' if math.isnan(best) else f'{best:.4g} GB/s'})</summary>"
            f"<table><tr>{hdr}</tr>{''.join(body)}</table></details>")


def _noisy(rows: list[dict]) -> str:
    noisy = [r for r in rows if r.get("metric") == "latency_ms" and "noisy" in (r.get("note") or "")]
    if not noisy:
        return f"<p>No noisy points (p80 / p20 of the latency above {schema.NOISY_RATIO}).</p>"
    return (f"<h2>Noisy points</h2><p>{len(noisy)} points whose p80 / p20 exceeds {schema.NOISY_RATIO}: their "
            f"figures are less trustworthy.</p><ul>" + "".join(
                f"<li>{esc(r['case'])} {esc(r['provider'])} {esc(_params(r))}: {esc(r['note'])}</li>" for r in noisy)
            + "</ul>")


def _regression_table(comps: list[Comparison], baseline: str) -> str:
    n = sum(c.regression for c in comps)
    head = "".join(f"<th{' class=l' if h in ('verdict', 'point', 'gpu') else ''}>{h}</th>"
                   for h in ("verdict", "ratio", "baseline p50 ms", "p50 ms", "point", "gpu"))
    body = "".join(
        f"<tr class='{'first' if c.regression else ''}'><td class='l {'fail' if c.regression else 'ok'}'>"
        f"{'REGRESSION' if c.regression else 'ok'}</td><td>{c.ratio:.3f}</td><td>{c.base_p50:.4g}</td>"
        f"<td>{c.p50:.4g}</td><td class='l'>{esc(c.label())}</td><td class='l'>{esc(c.gpu)}</td></tr>"
        for c in comps)
    return (f"<h2>Regressions vs baseline</h2><p>baseline {esc(baseline)}: <b class='{'fail' if n else 'ok'}'>{n}"
            f"</b> of {len(comps)} latency rows slower by more than 5 % (p50)</p>"
            f"<table><tr>{head}</tr>{body}</table>")


_CSS = ("<style>.banner{font-size:16px;padding:.45em .7em;border-left:6px solid #b7791f;background:#fdf6e3}"
        ".scroll{overflow-x:auto;max-width:100%}</style>")


def render_html(rows: list[dict], cases: dict, meta: dict, comps: list[Comparison] | None = None,
                baseline: str | None = None, extra: str = "") -> str:
    """The page; `extra` is HTML (already escaped) placed under the header, e.g. bench-merge's runs table."""
    status = Counter(r.get("status", "") for r in rows)
    gpus = sorted({r.get("gpu_name", "") for r in rows})
    banner = interpreter_banner(rows)
    parts = [_CSS, "<h1>mmlora bench</h1>"]
    if banner:
        parts.append(f"<p class='banner'>{esc(banner)}</p>")
    parts += [headline_html(headline(rows, cases)),
              "<p>" + " &middot; ".join(f"{esc(k)}: {esc(v)}" for k, v in meta.items()) + "</p>",
              f"<p>{len(rows)} rows; status: {esc(_status_text(status))}; GPUs: {esc(', '.join(gpus))}</p>", extra]
    if comps is not None:
        parts.append(_regression_table(comps, baseline or ""))
    parts += plots(rows, cases)
    parts.append(_limits_table(rows))
    parts.append(_noisy(rows))
    bad = [r for r in rows if r.get("status") != "ok"]
    if bad:
        parts.append("<h2>Rows without numbers</h2><table><tr><th class=l>case</th><th class=l>provider</th>"
                     "<th class=l>params</th><th class=l>status</th><th class=l>note</th></tr>" + "".join(
                         f"<tr class='bad'><td class='l'>{esc(r['case'])}</td><td class='l'>{esc(r['provider'])}</td>"
                         f"<td class='l'>{esc(_params(r))}</td><td class='l'>{esc(r['status'])}</td>"
                         f"<td class='l'>{esc(r.get('note', ''))}</td></tr>" for r in bad) + "</table>")
    lat = [r for r in rows if r.get("metric") == "latency_ms" and r.get("status") == "ok"]
    parts.append(f"<details><summary>{len(lat)} latency rows (p50 / p20 / p80 ms, repro)</summary><table><tr>"
                 "<th class=l>case</th><th class=l>provider</th><th class=l>params</th><th>p50</th><th>p20</th>"
                 "<th>p80</th><th class=l>gpu</th><th class=l>repro</th></tr>" + "".join(
                     f"<tr><td class='l'>{esc(r['case'])}</td><td class='l'>{esc(r['provider'])}</td>"
                     f"<td class='l'>{esc(_params(r))}</td><td>{esc(r['p50'])}</td><td>{esc(r['p20'])}</td>"
                     f"<td>{esc(r['p80'])}</td><td class='l'>{esc(r.get('gpu_name', ''))}</td>"
                     f"<td class='l'><code>{esc(r.get('repro', ''))}</code></td></tr>" for r in lat)
                 + "</table></details>")
    return PAGE.format(title="mmlora bench", body="\n".join(parts))
