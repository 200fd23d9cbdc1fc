"""A row-count mismatch is pinned on the request(s) and image(s) whose rows differ and the first boundary whose
count disagrees with the registry's formula, not on request 0 of the batch (issue: every request was marked and
request 0, whose image the bug left right, was named).

- Llama 4, CLS counted once per image instead of once per tile: only tiled images are short, by (tiles - 1) rows;
  the run must name a request holding a tiled image, that image, and the tower mapping.
- Gemma 4, the position pooler's bin row stride floor(Wp / k) instead of ceil: an image whose patch width is not
  a multiple of k loses bins; the run must name @tower_out (the pooler's output, the connector's input) at an
  image of that shape, and say its per-image counts cannot be told from the flat output.
The expected figures are worked out here from the tiny configs' geometry, not read from the code under test."""

from __future__ import annotations

import math
import re

from harness.correctness.engine import Options, judge, prepare
from harness.correctness.faults import get_fault


def _run(arch: str, fault: str, tmp_path):
    opts = Options(archs=[arch], modes=("e2e", "replay"))
    p = prepare(arch, opts, tmp_path)
    return p, judge(p, opts, get_fault(fault))


def test_cls_counted_once_per_image_is_named_at_the_tiled_image(tmp_path):
    p, res = _run("llama4", "cls-once-per-image", tmp_path)
    assert not res.summary["ok"]
    cfg = p.config.vision_config
    per_tile = (cfg.image_size // cfg.patch_size) ** 2 + 1  # patches + the tile's CLS row
    for mode in ("e2e", "replay"):
        d = res.summary["first_divergence"][mode]
        req = p.reqs[d["request"]]
        g = req.images[d["image"]]
        tiles = (g.tiles or 1) + (1 if (g.tiles or 1) > 1 else 0)  # a tiled image adds its global tile
        assert tiles > 1, (mode, d, [x.describe() for x in req.images])  # not the one-tile image the bug leaves right
        want = f"rows: expected {tiles * per_tile} got {tiles * per_tile - (tiles - 1)} for image {d['image']} of " \
               f"request {d['request']} at {d['module']} (tower mapping)"
        assert want in d["detail"], (want, d["detail"])
        # the earliest request holding a tiled image is the one named
        first_tiled = min(i for i, r in enumerate(p.reqs) if any((x.tiles or 1) > 1 for x in r.images))
        assert d["request"] == first_tiled, (d, first_tiled)
    assert res.summary["fault"]["named"], res.summary["fault"]


def test_a_pooler_that_drops_a_bin_is_named_at_its_boundary_with_the_image(tmp_path):
    p, res = _run("gemma4", "pool-floor-stride", tmp_path)
    assert not res.summary["ok"]
    d = res.summary["first_divergence"]["e2e"]
    assert d["module"] == "@tower_out", d
    k = p.config.vision_config.pooling_kernel_size
    req = p.reqs[d["request"]]
    g = req.images[d["image"]]
    # that image's patch grid has a width the kernel does not divide (its bins straddle rows under floor)
    wp = g.patches[1] if g.patches else None
    assert wp is not None and wp % k != 0, (g.describe(), k)
    # no earlier image has such a width: the first image whose rows differ is the one named
    for i, r in enumerate(p.reqs):
        for j, x in enumerate(r.images):
            if (i, j) < (d["request"], d["image"]):
                assert x.patches is None or x.patches[1] % k == 0, (i, j, x.describe())
    expected = sum(math.ceil(x.patches[0] / k) * math.ceil(x.patches[1] / k) for r in p.reqs for x in r.images)
    m = re.search(r"rows: expected (\d+) got (\d+) at @tower_out", d["detail"])
    assert m and int(m.group(1)) == expected and int(m.group(2)) < expected, d["detail"]
    assert f"image {d['image']}'s of request {d['request']}" in d["detail"]
    assert "cannot be told from its flat output" in d["detail"]
    assert res.summary["fault"]["named"], res.summary["fault"]
