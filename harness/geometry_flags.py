"""Image-geometry flags shared by `mmlora tokens` (one flag per field) and `mmlora correctness --geometry
NAME=VALUE` (the same names and value formats), and the user-error type both raise."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


def _ints(text: str, sep: str, n: int, flag: str) -> tuple[int, ...]:
    want = "an integer" if n == 1 else f"{n} integers separated by {sep!r}"
    try:
        vals = tuple(int(p) for p in text.lower().split(sep))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected {want}") from None
    if len(vals) != n:
        raise UsageError(f"{flag} {text!r}: expected {want}")
    return vals


def geometry_from_args(args) -> dict:
    geom = {}
    if args.tiles is not None:
        geom["tiles"] = args.tiles
    if args.grid is not None:
        geom["grid"] = _ints(args.grid, ",", 3, "--grid")
    if args.patches is not None:
        geom["patches"] = _ints(args.patches, "x", 2, "--patches")
    if args.image_size is not None:
        geom["size"] = _ints(args.image_size, "x", 2, "--image-size")
    if args.split is not None:
        geom["split"] = _ints(args.split, "x", 2, "--split")
    return geom


# geometry flag -> (ImageGeometry field, separator, count of integers); `--geometry NAME=VALUE` takes the same
# names, and `geometry_text` writes them back
_GEOMETRY = {
    "tiles": ("tiles", ",", 1),
    "grid": ("grid", ",", 3),
    "patches": ("patches", "x", 2),
    "image-size": ("size", "x", 2),
    "split": ("split", "x", 2),
}


def parse_geometry(item: str):
    """'tiles=2', 'grid=1,4,6', 'patches=3x5', 'image-size=56x84', 'split=1x2' -> ImageGeometry."""
    from vlm.arch import ImageGeometry

    name, sep, value = item.partition("=")
    if not sep or name not in _GEOMETRY:
        raise UsageError(f"--geometry {item!r}: expected NAME=VALUE with NAME one of {', '.join(_GEOMETRY)}")
    field, between, n = _GEOMETRY[name]
    vals = _ints(value, between, n, f"--geometry {name}")
    return ImageGeometry(**{field: vals[0] if n == 1 else vals})


def geometry_text(geom) -> str:
    """An ImageGeometry as the one `--geometry NAME=VALUE` item `parse_geometry` reads back to it (the bundle
    manifest's form): every arch's geometry sets exactly one field."""
    items = [(name, getattr(geom, field), between) for name, (field, between, _) in _GEOMETRY.items()
             if getattr(geom, field) is not None]
    if len(items) != 1:
        raise ValueError(f"geometry {geom.describe()} sets {len(items)} fields; --geometry NAME=VALUE gives one")
    name, value, between = items[0]
    return f"{name}={between.join(str(v) for v in (value if isinstance(value, tuple) else (value,)))}"


def add_geometry_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image geometry (after preprocessing); each arch takes the flags `mmlora archs` lists")
    # what N counts differs by processor; the arch files' docstrings hold the measured rows behind each
    g.add_argument("--tiles", type=int, metavar="N",
                   help="tiled towers, N as each processor counts it: llama4 N local S x S tiles (with N > 1 the "
                        "processor adds one global tile, so N + 1 tiles run through the tower); internvl every "
                        "tile fed to the tower, the thumbnail included; gemma3 the images through the tower "
                        "(pan-and-scan crops plus the whole image; 1 without pan-and-scan)")
    g.add_argument("--grid", help="qwen-style T,H,W in patches (image_grid_thw)")
    g.add_argument("--patches", help="gemma4 real patch grid HpxWp")
    g.add_argument("--image-size", help="pixel size HxW for any-resolution towers (mistral3)")
    g.add_argument("--split", help="idefics3/smolvlm sub-image grid ROWSxCOLS (0x0: global image only)")
