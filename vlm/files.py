"""What a file the harness reads is, judged by its structure, and JSON read strictly.

A safetensors file starts with its header's length as a little-endian u64, so its first bytes are any
value: 1 header length in 32 starts with 0x80 (a pickle's protocol marker) and one of 65536 with `PK` (a
zip's). A file is safetensors when that length fits the file and the header parses as a JSON object of
tensor entries; only a file that is not is then named a pickle (a protocol marker followed by a valid opcode
stream up to STOP, walked by `pickletools` without building any object) or a zip (an end-of-central-directory
record, what `torch.save` writes). Nothing here unpickles.

JSON: Python's json accepts NaN / Infinity, and a deeply nested array raises RecursionError; `read_json`
refuses both with one line naming the file (and the key of a non-finite number).
"""

from __future__ import annotations

import io
import json
import math
import pickletools
from pathlib import Path
from typing import Any

_EOCD = b"PK\x05\x06"  # zip end of central directory: 22 bytes + a comment of at most 65535 bytes
_HEADER_MAX = 100 << 20  # the safetensors library's own limit on a header


def safetensors_header(path: Path) -> dict | None:
    """The header of a safetensors file, or None when `path` is not one (length past the end, not JSON,
    not an object of tensor entries)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _HEADER_MAX):
            return None
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            return None
    return header


def is_pickle(path: Path) -> bool:
    """A protocol-2+ pickle: 0x80, a protocol byte, then opcodes that parse up to STOP (never executed)."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    if len(data) < 3 or data[0] != 0x80 or not 2 <= data[1] <= 5:
        return False
    try:
        for op, _, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "STOP":
                return True
    except Exception:  # any parse failure of untrusted bytes: not a pickle
        return False
    return False  # no STOP in the first MiB: undecided, so not claimed a pickle


def is_zip(path: Path) -> bool:
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - (22 + 65535)))
        tail = f.read()
    at = tail.rfind(_EOCD)
    return at >= 0 and len(tail) - at >= 22


def check_safetensors(path: Path, what: str = "") -> None:
    """ValueError (one line naming `path`) unless it is a safetensors file whose tensors lie inside it;
    a pickle or zip posing as one is named as such, never loaded."""
    label = f"{what} {str(path)!r}".strip()
    header = safetensors_header(path)
    if header is None:
        if is_pickle(path) or is_zip(path):
            kind = "a pickle" if is_pickle(path) else "a zip archive (torch.save)"
            raise ValueError(f"{label} is {kind}, not safetensors: refused, never unpickled")
        raise ValueError(f"{label} is not a valid safetensors file (no readable header: empty, cut short or "
                         f"another format)")
    data = path.stat().st_size - 8 - int.from_bytes(path.open("rb").read(8), "little")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offs = entry["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1] <= data):
            raise ValueError(f"{label} is not a valid safetensors file (tensor {key!r} lies outside the file: "
                             f"cut short?)")


def nonfinite_key(value: Any) -> str | None:
    """The dotted key of the first NaN / Infinity in a parsed JSON value (iterative: any depth)."""
    stack = [("", value)]
    while stack:
        key, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return key or "(top level)"
        if isinstance(v, dict):
            stack.extend((f"{key}.{k}" if key else str(k), x) for k, x in reversed(list(v.items())))
        elif isinstance(v, list):
            stack.extend((f"{key}[{i}]", x) for i, x in reversed(list(enumerate(v))))
    return None


def read_json(path: Path, what: str) -> Any:
    """`path` parsed as JSON, refusing (ValueError, one line naming the file) invalid text, nesting too deep
    for the parser and any NaN / Infinity (the key named)."""
    label = f"{what} {str(path)!r}"
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{label} is not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{label} is not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise ValueError(f"{label} is nested too deeply to be a config") from None
    except OSError as e:
        raise ValueError(f"{label} cannot be read ({e.strerror or type(e).__name__})") from None
    bad = nonfinite_key(value)
    if bad is not None:
        raise ValueError(f"{label}: {bad} is not a finite number (NaN / Infinity)")
    return value
