"""The correctness report: index.html (self-contained, plots inline), beside layers.csv and summary.json.

It opens with the verdict, the run's options and rules as tables, the warnings, and an overview (arch x
group x mode: verdict and worst margin); then per arch the first divergences, the adapters' measured
delta / base ratios, and plots of each module's error against the truth drawn beside its bound.
"""

from __future__ import annotations

import math

from harness.output import PAGE, esc, png_data_uri

GROUPS = ("tower", "connector", "language_model")


def _verdict(ok: bool) -> str:
    return f"<span class='{'ok' if ok else 'fail'}'>{'ok' if ok else 'FAIL'}</span>"


def _kv_table(d: dict) -> str:
    return "<table>" + "".join(f"<tr><th class='l'>{esc(k)}</th><td class='l'>{esc(v)}</td></tr>"
                               for k, v in d.items()) + "</table>"


def _margin(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def _overview(results, modes) -> str:
    head = "".join(f"<th>{esc(g)} {esc(m)}</th>" for m in modes for g in GROUPS)
    body = []
    for r in results:
        cells = []
        for m in modes:
            for g in GROUPS:
                sel = [x for x in r.rows if x.mode == m and x.group == g]
                if not sel:
                    cells.append("<td>-</td>")
                    continue
                ok = all(x.metrics.ok for x in sel)
                worst = max(x.metrics.margin for x in sel)
                cells.append(f"<td class='{'' if ok else 'badcell'}'>{_verdict(ok)} {_margin(worst)}</td>")
        body.append(f"<tr><td class='l'><a href='#{esc(r.arch)}'>{esc(r.arch)}</a></td>{''.join(cells)}</tr>")
    return (f"<h2>Overview: verdict and worst margin (error / bound; &gt; 1 fails)</h2><table><tr><th class='l'>arch"
            f"</th>{head}</tr>{''.join(body)}</table>")


def _ratios(s: dict) -> str:
    ratios = s.get("adapter_ratios") or {}
    if not ratios:
        return ""
    rows = "".join(f"<tr><td class='l'>{esc(a)}</td>" + "".join(f"<td>{_margin(g.get(x))}</td>" for x in GROUPS)
                   + "</tr>" for a, g in sorted(ratios.items()))
    return ("<p>adapters, measured rms(delta) / rms(base output) (median over the modules each targets; "
            "- = not targeted):</p><table><tr><th class='l'>adapter</th>" + "".join(f"<th>{g}</th>" for g in GROUPS)
            + f"</tr>{rows}</table>")


def provenance_html(summary: dict, results) -> str:
    """The report's head: what produced it (code, libraries, device, date, command line), and for each failing
    (arch, mode) the command that reproduces its failing rows."""
    p = summary.get("provenance") or {}
    if not p:
        return ""
    versions = ", ".join(f"{k} {v or '(not installed)'}" for k, v in p["versions"].items())
    head = _kv_table({"command": p["command"], "git": p["git_sha"] + (" (uncommitted changes)" if p["git_dirty"]
                                                                       else ""),
                      "libraries": versions, "device": p["device"], "date": p["date"]})
    rows = []
    for r in results:
        for mode, cmd in (r.summary.get("repro") or {}).items():
            bad = [x for x in r.rows if x.mode == mode and not x.metrics.ok]
            rows.append(f"<tr><td class='l'>{esc(r.arch)}</td><td class='l'>{esc(mode)}</td><td>{len(bad)}</td>"
                        f"<td class='l'><code>{esc(cmd)}</code></td></tr>")
    repro = ("<h2 class='fail'>Reproduce the failing rows</h2><table><tr><th class='l'>arch</th><th class='l'>mode"
             "</th><th>failing rows</th><th class='l'>command</th></tr>" + "".join(rows) + "</table>") if rows else ""
    return "<h2>Provenance</h2>" + head + repro


def render_html(results, summary) -> str:
    modes = summary["options"]["modes"]
    parts = [f"<h1>mmlora correctness: {_verdict(summary['ok'])} (exit {summary['exit_code']})</h1>",
             provenance_html(summary, results),
             "<h2>Options</h2>", _kv_table(summary["options"]),
             "<h2>Rules</h2><p>a compared tensor passes when err(runtime, truth) &lt;= k &times; err(reference, truth) "
             "+ floor &times; size(truth), on its max and its rms; a LoRA module's delta too</p>",
             _kv_table({k: f"k_max {v['k_max']}, k_rms {v['k_rms']}, floor_max {v['floor_max']}, floor_rms "
                          f"{v['floor_rms']}: {v['why']}"
                        for k, v in summary["rules"].items()})]
    if summary.get("warnings"):
        parts.append("<h2 class='fail'>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in summary["warnings"])
                     + "</ul>")
    parts.append(_overview(results, modes))
    for r in results:
        s = r.summary
        parts.append(f"<h2 id='{esc(r.arch)}'>{esc(r.arch)} {_verdict(s['ok'])} ({esc(s['seconds'])} s)</h2>")
        for mode, d in s.get("first_divergence", {}).items():
            where = "none" if not d else esc(
                f"{d['module']} ({d['group']}), request {d['request']} (adapter {d['adapter']}), row {d['row']}"
                + (f", image {d['image']}" if d.get("image", -1) >= 0 else "")
                + f": {d['status']}, margin {_margin(d['margin'])} {d['detail']}")
            parts.append(f"<p>{esc(mode)}: first divergence {where}</p>")
        for note in s.get("notes", []):
            parts.append(f"<p>note: {esc(note)}</p>")
        if "fault" in s:
            parts.append("<p>fault:</p>" + _kv_table(s["fault"]))
        if "quantization" in s:
            q = s["quantization"]
            parts.append(f"<p>quantization {esc(q['scheme'])}, projector quantized: {esc(q['projector_quantized'])}, "
                         f"{esc(q['quantized_modules'])} Linear layers; skip-list violations: "
                         f"<b>{esc(q['violations'] or 'none')}</b>; drift (max err / max |truth|):</p>"
                         + _kv_table({k: f"{v:.3g}" for k, v in sorted(q["drift_by_group"].items())}))
        parts.append(_ratios(s))
        parts.append(f"<img alt='error and bound by depth' src='{_depth_plot(r, modes)}'>")
        parts.append(_table(r))
    return PAGE.format(title="mmlora correctness", body="\n".join(parts))


def _depth_plot(r, modes) -> str:
    """Per mode: each module's worst error against the truth (dots) beside its bound (line), by depth."""
    def draw(plt):
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 3.4), sharey=True, squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for g, color in zip(GROUPS, ("tab:blue", "tab:orange", "tab:green")):
                err: dict = {}
                bound: dict = {}
                for row in r.rows:
                    c = row.metrics.out
                    if row.mode != mode or row.group != g or c is None:
                        continue
                    if c.err / max(c.bound, 1e-300) >= err.get(row.order, (0, 0))[0]:
                        err[row.order] = (c.err / max(c.bound, 1e-300), max(c.err, 1e-12))
                        bound[row.order] = max(c.bound, 1e-12)
                xs = sorted(err)
                if xs:
                    ax.semilogy(xs, [err[x][1] for x in xs], ".", color=color, label=f"{g} error")
                    ax.semilogy(xs, [bound[x] for x in xs], "-", color=color, alpha=0.5, label=f"{g} bound")
            ax.set_title(f"{r.arch} {mode}: max |runtime - truth| and its bound")
            ax.set_xlabel("module order (reference execution)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        axes[0][0].set_ylabel("max abs error")
        return fig
    return png_data_uri(draw)


def _table(r) -> str:
    first = {m: (d or {}).get("module") for m, d in r.summary.get("first_divergence", {}).items()}
    bad = sorted((x for x in r.rows if not x.metrics.ok), key=lambda x: (x.mode, x.order, x.request))
    top = "<h3>first divergent rows</h3>" + _rows_table(bad[:20], first) if bad else ""
    return top + (f"<details><summary>all {len(r.rows)} rows</summary>"
                  + _rows_table(sorted(r.rows, key=lambda x: (x.mode, x.order, x.request)), first) + "</details>")


def _f(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _rows_table(rows, first) -> str:
    cols = ("mode", "request", "adapter", "module", "group", "status", "margin", "err", "ref err", "ratio", "bound",
            "delta err", "delta ref err", "delta bound", "row", "image", "cosine vs ref")
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for row in rows:
        m = row.metrics
        o, d = m.out, m.delta
        cls = "first" if first.get(row.mode) == row.module and not m.ok else ("bad" if not m.ok else "")
        body.append(f"<tr class='{cls}'><td class='l'>{esc(row.mode)}</td><td>{row.request}</td>"
                    f"<td class='l'>{esc(row.adapter)}</td><td class='l'>{esc(row.module)}</td>"
                    f"<td class='l'>{esc(row.group)}</td><td class='l'>{esc(m.status)}</td><td>{_margin(m.margin)}</td>"
                    f"<td>{_f(o and o.err)}</td><td>{_f(o and o.ref_err)}</td><td>{_f(o and o.ratio)}</td>"
                    f"<td>{_f(o and o.bound)}</td>"
                    f"<td>{_f(d and d.err)}</td><td>{_f(d and d.ref_err)}</td><td>{_f(d and d.bound)}</td>"
                    f"<td>{row.bad_row}</td><td>{row.bad_image}</td><td>{m.cosine:.6f}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
