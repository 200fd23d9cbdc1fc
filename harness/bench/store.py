"""results.csv in the final run folder, appended in place so an interrupted sweep can resume.

- Each point's rows go out in one `os.write` followed by `os.fsync`: a point is on disk whole or not at all.
- On open, an unterminated last line (a write torn by a crash) is dropped together with the rows of the
  last complete point (the one being written), and duplicate keys keep their first row; the file is
  rewritten atomically when anything was dropped.
- `.incomplete` exists from the start of a sweep until its index.html is written; index.html is only
  written when the sweep is complete (a stale one is removed when a sweep starts).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from harness.bench import schema


def _one_line(e: OSError) -> str:
    return " ".join(str(e).split())


class Store:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.csv = self.out / "results.csv"
        self.marker = self.out / ".incomplete"
        self.html = self.out / "index.html"

    # ------------------------------------------------------------------ open / resume
    def open(self) -> set[tuple[str, ...]]:
        """Create the folder (or validate an existing results.csv); return the keys of recorded points."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self.csv.exists():
                self._write_all([])
                return set()
            rows = self._load_repaired()
        except OSError as e:
            raise ValueError(f"--out {str(self.out)!r} is not writable: {_one_line(e)}") from None
        return {schema.row_key(r)[:-1] for r in rows}

    def _load_repaired(self) -> list[dict]:
        text = self.csv.read_text()
        torn = bool(text) and not text.endswith("\n")
        if torn:
            text = text[: text.rfind("\n") + 1]
        if not text:  # a crash before the header reached the disk: start afresh
            self._write_all([])
            return []
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
        if list(header) != list(schema.COLUMNS):
            missing = [c for c in schema.COLUMNS if c not in header]
            what = f"missing column {missing[0]!r}" if missing else "columns in another order or extra columns"
            raise ValueError(f"{str(self.csv)!r} was written with other columns ({what}); use another --out")
        rows = list(reader)
        kept, seen = [], set()
        for r in rows:
            k = schema.row_key(r)
            if k not in seen:
                seen.add(k)
                kept.append(r)
        if torn and kept:
            last = schema.row_key(kept[-1])[:-1]
            kept = [r for r in kept if schema.row_key(r)[:-1] != last]
        if torn or len(kept) != len(rows):
            self._write_all(kept)
        return kept

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _encode(rows: list[dict], header: bool) -> bytes:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(schema.COLUMNS), extrasaction="ignore", lineterminator="\n")
        if header:
            w.writeheader()
        for r in rows:
            w.writerow({k: " ".join(str(v).split()) if k in ("note",) else v for k, v in r.items()})
        return buf.getvalue().encode()

    def _write_all(self, rows: list[dict]) -> None:
        tmp = self.csv.with_name(f".{self.csv.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(self._encode(rows, header=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.csv)
        _fsync_dir(self.out)

    def append(self, rows: list[dict]) -> None:
        data = self._encode(rows, header=False)
        fd = os.open(self.csv, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def rows(self) -> list[dict]:
        with open(self.csv, newline="") as f:
            return list(csv.DictReader(f))

    # ------------------------------------------------------------------ markers and the report
    def begin(self) -> None:
        self.marker.write_text("a sweep is writing results.csv; index.html appears when it completes\n")
        if self.html.exists():
            self.html.unlink()
        _fsync_dir(self.out)

    def finish(self, files: dict[str, str]) -> None:
        """Write the report files atomically, then remove the marker."""
        for name, text in files.items():
            path = self.out / name
            tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
        if self.marker.exists():
            self.marker.unlink()
        _fsync_dir(self.out)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
