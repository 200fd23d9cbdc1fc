"""The correctness report: index.html (self-contained, plots inline), beside layers.csv and summary.json."""

from __future__ import annotations

from harness.output import PAGE, esc, png_data_uri


def render_html(results, summary) -> str:
    parts = [f"<h1>mmlora correctness: <span class='{'ok' if summary['ok'] else 'fail'}'>"
             f"{'OK' if summary['ok'] else 'DIVERGENCE'}</span></h1>",
             f"<p>options: {esc(summary['options'])}</p>"]
    for r in results:
        s = r.summary
        parts.append(f"<h2>{esc(r.arch)} <span class='{'ok' if s['ok'] else 'fail'}'>{'ok' if s['ok'] else 'diverged'}"
                     f"</span> ({esc(s['seconds'])} s)</h2>")
        for mode, d in s.get("first_divergence", {}).items():
            parts.append(f"<p>{esc(mode)}: first divergence " + (esc(f"{d['module']} ({d['group']}, request "
                         f"{d['request']}, {d['status']}) {d['detail']}") if d else "none") + "</p>")
        if "fault" in s:
            parts.append(f"<p>fault: {esc(s['fault'])}</p>")
        if "quantization" in s:
            q = s["quantization"]
            drift = "".join(f"<tr><td class='l'>{esc(k)}</td><td>{v:.3g}</td></tr>"
                            for k, v in sorted(s["max_abs_by_group"].items()))
            parts.append(f"<p>quantization {esc(q['scheme'])}, projector quantized: {esc(q['projector_quantized'])}, "
                         f"{esc(q['quantized_modules'])} Linear layers; skip-list violations: "
                         f"<b>{esc(q['violations'] or 'none')}</b></p><table><tr><th class='l'>mode/group</th>"
                         f"<th>max abs drift</th></tr>{drift}</table>")
        parts.append(f"<img alt='error by depth' src='{_depth_plot(r)}'>")
        parts.append(_table(r))
    return PAGE.format(title="mmlora correctness", body="\n".join(parts))


def _depth_plot(r) -> str:
    def draw(plt):
        modes = [m for m in ("e2e", "replay") if any(row.mode == m for row in r.rows)] or ["e2e"]
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.2), sharey=True, squeeze=False)
        axes = axes[0]
        for ax, mode in zip(axes, modes):
            by_group: dict = {}
            for row in r.rows:
                if row.mode == mode and row.metrics.max_abs == row.metrics.max_abs:
                    cur = by_group.setdefault(row.group, {})
                    cur[row.order] = max(cur.get(row.order, 0.0), row.metrics.max_abs, 1e-12)
            for g, pts in sorted(by_group.items()):
                xs = sorted(pts)
                ax.semilogy(xs, [pts[x] for x in xs], marker=".", label=g)
            ax.set_title(f"{r.arch} {mode}: max |error| by module depth")
            ax.set_xlabel("module order (reference execution)")
            if by_group:
                ax.legend(fontsize=7)
        axes[0].set_ylabel("max abs error")
        return fig
    return png_data_uri(draw)


def _table(r) -> str:
    first = {m: (d or {}).get("module") for m, d in r.summary.get("first_divergence", {}).items()}
    bad = sorted((x for x in r.rows if not x.metrics.ok), key=lambda x: (x.mode, x.order, x.request))
    top = ""
    if bad:  # the rows a user needs first, before the full table
        top = "<h3>first divergent rows</h3>" + _rows_table(bad[:20], first)
    return top + (f"<details><summary>all {len(r.rows)} rows</summary>"
                  + _rows_table(sorted(r.rows, key=lambda x: (x.mode, x.order, x.request)), first) + "</details>")


def _rows_table(rows, first) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in ("mode", "request", "adapter", "module", "group", "status",
                                                 "max_abs", "max_rel", "mismatch", "cosine", "ref_norm"))
    body = []
    for row in rows:
        m = row.metrics
        cls = "first" if first.get(row.mode) == row.module and not m.ok else ("bad" if not m.ok else "")
        body.append(f"<tr class='{cls}'><td class='l'>{esc(row.mode)}</td><td>{row.request}</td>"
                    f"<td class='l'>{esc(row.adapter)}</td><td class='l'>{esc(row.module)}</td>"
                    f"<td class='l'>{esc(row.group)}</td><td class='l'>{esc(m.status)}</td><td>{m.max_abs:.3g}</td>"
                    f"<td>{m.max_rel:.3g}</td><td>{m.mismatch_frac:.3g}</td><td>{m.cosine:.6f}</td>"
                    f"<td>{m.ref_norm:.3g}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
