"""Reports: written into a temporary sibling folder and moved into place only when complete, so an
interrupted run never leaves a report that looks finished. Every string in HTML is escaped."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line for a report cell or an error row: its type, its message's words."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:limit]


def default_run_dir(kind: str) -> Path:
    import datetime

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("reports") / kind / stamp


def check_writable(out: Path) -> None:
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"output folder {str(out)!r} cannot be created: {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK):
        raise ValueError(f"output folder {str(out)!r} is not writable ({str(probe)!r} refuses writes)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {str(out)!r} exists and is not a folder")


# every report folder this tool writes holds this file, naming the kind of report: a folder without it is the
# user's, and is never written into or replaced
MARKER = ".mmlora-report"
KINDS = ("correctness", "bundle", "compare", "bench", "bench-merge", "power", "vllm-survey")


def report_kind(out: Path) -> str | None:
    """The kind of report of this tool `out` holds, or None (not a report of this tool)."""
    try:
        kind = (out / MARKER).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return kind if kind in KINDS else None


def check_out(out: Path, kind: str, overwrite: bool = False, resume: bool = False) -> None:
    """`--out` may be written when it is absent, empty, or an earlier report of this `kind` and the user said
    --overwrite (or, `resume`, a run that appends to its own folder: bench). A folder holding anything else
    (user files, a summary.json of unknown origin, a report of another kind) is refused whatever the flag:
    nothing there is ever deleted."""
    assert kind in KINDS, kind
    check_writable(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    found = report_kind(out)
    if found is None:
        raise ValueError(f"--out {str(out)!r} holds files that are not a report of mmlora (no {MARKER}): "
                         f"refusing to write into it; choose a new or empty folder")
    if found != kind:
        raise ValueError(f"--out {str(out)!r} holds a {found} report, which a {kind} report never replaces "
                         f"(even with --overwrite); choose another folder")
    if not (overwrite or resume):
        raise ValueError(f"--out {str(out)!r} holds an earlier {kind} report: pass --overwrite to replace it, "
                         f"or choose another folder")


def mark(folder: Path, kind: str) -> None:
    (folder / MARKER).write_text(kind + "\n")


@contextmanager
def atomic_dir(out: Path, kind: str, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces `out` (check_out's rule, checked again now: the
    folder may have changed during the run), on any exception or interrupt it is removed."""
    from harness.signals import deferred

    out = out.resolve()
    check_out(out, kind, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700: CI artifact uploaders and other users must read reports
        yield tmp
        mark(tmp, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with deferred():  # no interrupt between the renames: the path holds the old report or the new one
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _json_safe(obj):
    # NaN / Inf are not JSON: strict parsers (JavaScript, most CI tools) reject them; write null
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(_json_safe(obj), indent=2, default=str, allow_nan=False))


def png_data_uri(draw: Callable) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def esc(x) -> str:
    return html.escape(str(x), quote=True)


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} td.l,th.l{{text-align:left}}
tr.bad{{background:#fde2e2}} td.badcell{{background:#fde2e2}} tr.first{{background:#f8b4b4;font-weight:bold}} .ok{{color:#0a7a2f}}
.fail{{color:#b00020}} details{{margin:.5em 0}} img{{max-width:100%}}</style></head><body>{body}</body></html>"""
