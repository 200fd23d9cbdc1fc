"""The correctness report: index.html (self-contained, plots inline), beside layers.csv and summary.json.

It opens with the verdict and, per arch, one line a person reads at a glance: a seeded fault's sentence
(headline.py), each mode's first divergence (a link to its table row) or the worst margin of a passing run;
then the warnings, an overview (arch x group x mode: verdict and worst margin), the options and rules
(folded). Per arch: the fault as the catalog states it, the adapters' measured delta / base ratios, one panel
per mode and group of each module's margin (error / bound, log, the line at 1; margin_plot.py), and the
failing rows.
"""

from __future__ import annotations

import math

from harness.correctness.headline import divergence, not_judged, verdict
from harness.output import PAGE, esc
from vlm.arch.base import GROUPS


def _verdict(ok: bool, partial: bool = False) -> str:
    """`partial`: something was not judged (an output bundle's groups or modules left out): not a plain "ok"."""
    word = "FAIL" if not ok else "ok on what was judged" if partial else "ok"
    return f"<span class='{'ok' if ok else 'fail'}'>{word}</span>"


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


def _power(r) -> str:
    """Detection power beside the measured margins: per adapter, group and mode, the margin a runtime that
    dropped the adapter would get on this batch (resolution.py) and the largest margin the runtime under test
    got at the adapter's LoRA modules. A dropped-adapter margin at or below 1 is a blind spot (red)."""
    power = r.summary.get("detection_power") or {}
    if not power:
        return ""
    measured: dict = {}
    for x in r.rows:
        if x.adapter != "-" and x.kind == "lora":
            key = (x.adapter, x.group, x.mode)
            measured[key] = max(measured.get(key, 0.0), x.metrics.margin)
    rows = []
    for adapter, groups in sorted(power.items()):
        for group, by_mode in sorted(groups.items()):
            for mode, d in sorted(by_mode.items()):
                blind = d["margin"] <= 1.0
                cell = f"<td class='{'fail' if blind else 'ok'}'>{_margin(d['margin'])}{' (blind)' if blind else ''}</td>"
                rows.append(f"<tr><td class='l'>{esc(adapter)}</td><td class='l'>{esc(group)}</td>"
                            f"<td class='l'>{esc(mode)}</td>{cell}<td>{_margin(measured.get((adapter, group, mode)))}"
                            f"</td><td class='l'>{esc(d['module'])}, request {esc(d['request'])}</td></tr>")
    return ("<p>detection power: the margin a runtime that <b>dropped</b> each adapter would get on this very batch "
            "(above 1: this run tells the adapter from none; at or below 1 it could not have seen it), beside the "
            "largest margin the runtime under test got at that adapter's modules:</p><table><tr><th class='l'>"
            "adapter</th><th class='l'>group</th><th class='l'>mode</th><th>dropped-adapter margin</th><th>measured "
            "margin</th><th class='l'>where the adapter shows most</th></tr>" + "".join(rows) + "</table>")


def provenance_html(summary: dict, results) -> str:
    """The report's head: what produced it (code, libraries, device, date, command line), and for each failing
    (arch, mode) the command that reproduces its failing rows."""
    p = summary.get("provenance") or {}
    if not p:
        return ""
    versions = ", ".join(f"{k} {v or '(not installed)'}" for k, v in p["versions"].items())
    head = _kv_table({"engine judged": summary.get("engine", ""), "command": p["command"], "git": p["git_sha"] + (" (uncommitted changes)" if p["git_dirty"]
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


_CSS = """<style>
.headline{font-size:17px;margin:.3em 0;padding:.45em .7em;border-left:6px solid #b00020;background:#fdf0f0}
.headline.good{border-color:#0a7a2f;background:#eef8f1} .headline a{color:inherit}
.scroll{overflow-x:auto;max-width:100%} .panels{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.legend{font-size:12px;color:#444} .legend b{font-size:14px} :target{outline:3px solid #b00020}
</style>"""


def _text(v) -> str:
    """An option's value as a person reads it, not as Python prints it."""
    if v is None or v == [] or v == {}:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list | tuple):
        return ", ".join(_text(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_text(x)}" for k, x in v.items())
    return str(v)


def _row_id(arch: str, mode: str) -> str:
    return f"first-{arch}-{mode}"


def _headlines(results) -> list[str]:
    """The lines at the top of the page: per arch and mode, where it first diverged (a link to that row);
    a seeded fault's own sentence first."""
    from harness.correctness.headline import fault_headline

    out = []
    for r in results:
        line, f = fault_headline(r.arch, r.summary), r.summary.get("fault") or {}
        if line is not None:
            good = f.get("passed") if f.get("control") else (f.get("caught") and f.get("named"))
            out.append(f"<p class='headline{' good' if good else ''}'>{esc(line)}</p>")
        if r.summary["ok"] and not f:
            worst = max(r.rows, key=lambda x: x.metrics.margin, default=None)
            left = not_judged(r.summary)
            if worst is not None:
                what = f"every judged module within its bound (NOT JUDGED: {left})" if left else \
                    "every module within its bound"
                out.append(f"<p class='headline good'>{esc(r.arch)}: {esc(what)}; worst margin "
                           f"{_margin(worst.metrics.margin)} at {esc(worst.module)} ({esc(worst.mode)}, "
                           f"{esc(worst.group)})</p>")
        for mode, d in r.summary.get("first_divergence", {}).items():
            if d:
                # the terminal's words, the module in bold
                rest = divergence(d).removeprefix(d["module"])
                out.append(f"<p class='headline'><a href='#{esc(_row_id(r.arch, mode))}'>{esc(r.arch)} {esc(mode)}: "
                           f"first divergence at <b>{esc(d['module'])}</b>{esc(rest)}</a></p>")
    return out


def render_html(results, summary, who: str = "mmlora correctness") -> str:
    """`who`: the command that judged, as its terminal lines name it."""
    modes = summary["options"]["modes"]
    left = summary.get("not_judged", "")
    words = summary.get("verdict") or verdict(summary["ok"], left)
    parts = [_CSS, f"<h1>{esc(who)}: {_verdict(summary['ok'], bool(left))} &mdash; {esc(words)} "
             f"(exit {summary['exit_code']})</h1>"]
    parts += _headlines(results)
    parts.append(provenance_html(summary, results))
    if summary.get("warnings"):
        parts.append("<h2 class='fail'>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in summary["warnings"])
                     + "</ul>")
    parts.append(_overview(results, modes))
    parts.append("<details><summary>options and rules</summary>" + _kv_table(
        {k: _text(v) for k, v in summary["options"].items()})
        + "<p>a compared tensor passes when err(runtime, truth) &lt;= k &times; err(reference, truth) "
        "+ floor &times; size(truth), on its max and its rms; a LoRA module's delta too</p>"
        + _kv_table({k: f"k_max {v['k_max']}, k_rms {v['k_rms']}, floor_max {v['floor_max']}, floor_rms "
                        f"{v['floor_rms']}: {v['why']}" for k, v in summary["rules"].items()}) + "</details>")
    for r in results:
        s = r.summary
        parts.append(f"<h2 id='{esc(r.arch)}'>{esc(r.arch)} {_verdict(s['ok'], bool(not_judged(s)))} ({esc(s['seconds'])} s)</h2>")
        for note in s.get("notes", []):
            parts.append(f"<p>note: {esc(note)}</p>")
        if s.get("modules_not_produced"):
            parts.append(f"<p class='fail'>NOT JUDGED: {len(s['modules_not_produced'])} reference modules the engine's "
                         f"model does not have (its output manifest's \"not_produced\"), judged only through the "
                         f"boundaries after them:</p><ul>"
                         + "".join(f"<li>{esc(n)}</li>" for n in s["modules_not_produced"]) + "</ul>")
        if "fault" in s:
            parts.append(_fault(s["fault"]))
        if "quantization" in s:
            q = s["quantization"]
            parts.append(f"<p>quantization {esc(q['scheme'])}, projector quantized: {_text(q['projector_quantized'])}, "
                         f"{esc(q['quantized_modules'])} Linear layers; skip-list violations: "
                         f"<b>{esc(_text(q['violations']) if q['violations'] else 'none')}</b>; drift (max err / "
                         f"max |truth|):</p>" + _kv_table({k: f"{v:.3g}" for k, v in sorted(q["drift_by_group"].items())}))
        parts.append(_ratios(s))
        parts.append(_power(r))
        parts.append(_margin_plots(r, modes))
        parts.append(_table(r))
    return PAGE.format(title=esc(who), body="\n".join(parts))


def _fault(f: dict) -> str:
    """What the catalog says the fault must show, beside what the run found (the headline above says it)."""
    if f["control"]:
        return (f"<p>seeded control <b>{esc(f['name'])}</b> ({esc(f['breaks'])}), judged in {esc(f['mode'])}: "
                f"a legitimate variation, must pass; largest margin anywhere {_margin(f['margin'])}</p>")
    return (f"<p>seeded fault <b>{esc(f['name'])}</b>: {esc(f['breaks'])}. The catalog expects the first "
            f"divergence in {esc(f['mode'])} mode at <b>{esc(f['expected_first'] or 'none (no such module)')}</b>; "
            f"the run's first divergence there: <b>{esc(f['first'] or 'none')}</b>. Largest margin at the expected "
            f"module: {_margin(f['margin'])}.</p>")


def _margin_plots(r, modes) -> str:
    """Per mode, one panel per group: each module's worst margin (error / bound, log) and the line at 1."""
    from harness.correctness import margin_plot

    first = {m: (d or {}).get("module") for m, d in r.summary.get("first_divergence", {}).items()}
    out = ["<p class='legend'><b style='color:#2b6cb0'>&#9679;</b> within its bound &nbsp; "
           "<b style='color:#c81e1e'>&#9679;</b> over its bound (fails) &nbsp; <b style='color:#c81e1e'>&#9711;</b>"
           " first divergence (click: its row) &nbsp; <b style='color:#c81e1e'>- - -</b> error / bound = 1. Each "
           "point is a module's worst request; hover a point or a name for the full module name.</p>"]
    for mode in modes:
        groups = {}
        for g in GROUPS:
            rows = [x for x in r.rows if x.mode == mode and x.group == g]
            if rows:
                groups[g] = margin_plot.worst_per_module(
                    rows, lambda m, mode=mode: _row_id(r.arch, mode) if m == first.get(mode) else None)
        panels = []
        for (g, pts), width in zip(groups.items(), margin_plot.widths([len(p) for p in groups.values()])):
            bad = sum(not p.ok for p in pts)
            title = f"{g} ({mode}): {len(pts)} modules, " + (f"{bad} FAIL" if bad else "all ok")
            panels.append(margin_plot.svg(title, pts, width))
        if panels:
            out.append(f"<div class='panels'>{''.join(panels)}</div>")
    return "".join(out)


def _table(r) -> str:
    first = {m: (d or {}).get("module") for m, d in r.summary.get("first_divergence", {}).items()}
    bad = sorted((x for x in r.rows if not x.metrics.ok), key=lambda x: (x.mode, x.order, x.request))
    top = ("<h3>first divergent rows</h3><div class='scroll'>" + _rows_table(bad[:20], first, r.arch) + "</div>"
           if bad else "")
    return top + (f"<details><summary>all {len(r.rows)} rows</summary><div class='scroll'>"
                  + _rows_table(sorted(r.rows, key=lambda x: (x.mode, x.order, x.request)), first) + "</div></details>")


def _index(i) -> str:
    return "-" if i is None or i < 0 else str(i)


def _f(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _rows_table(rows, first, arch: str | None = None) -> str:
    """`arch`: the table the headline links to; its first divergence row of each mode carries the anchor."""
    cols = ("mode", "request", "adapter", "module", "group", "status", "margin", "err", "ref err", "ratio", "bound",
            "delta err", "delta ref err", "delta bound", "row", "image", "cosine vs ref")
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    anchored: set[str] = set()
    for row in rows:
        m = row.metrics
        o, d = m.out, m.delta
        cls = "first" if first.get(row.mode) == row.module and not m.ok else ("bad" if not m.ok else "")
        anchor = ""
        if arch is not None and cls == "first" and row.mode not in anchored:
            anchored.add(row.mode)
            anchor = f" id='{esc(_row_id(arch, row.mode))}'"
        body.append(f"<tr class='{cls}'{anchor}><td class='l'>{esc(row.mode)}</td><td>{row.request}</td>"
                    f"<td class='l'>{esc(row.adapter)}</td><td class='l'>{esc(row.module)}</td>"
                    f"<td class='l'>{esc(row.group)}</td><td class='l'>{esc(m.status)}</td><td>{_margin(m.margin)}</td>"
                    f"<td>{_f(o and o.err)}</td><td>{_f(o and o.ref_err)}</td><td>{_f(o and o.ratio)}</td>"
                    f"<td>{_f(o and o.bound)}</td>"
                    f"<td>{_f(d and d.err)}</td><td>{_f(d and d.ref_err)}</td><td>{_f(d and d.bound)}</td>"
                    f"<td>{_index(row.bad_row)}</td><td>{_index(row.bad_image)}</td><td>{m.cosine:.6f}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
