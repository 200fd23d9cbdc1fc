"""The requests of a reference bundle as the project's runtime runs them: rebuilt from the manifest (adapter,
geometry text, pixel seed) and the recorded `input_ids`, and held to the recorded inputs, so the runtime is
fed exactly what the reference ran."""

from __future__ import annotations

import json

import torch

from harness.correctness.bundle.format import BundleError
from harness.correctness.bundle.reader import Bundle
from harness.correctness.bundle.writer import prompt_sha256
from harness.geometry_flags import geometry_text, parse_geometry
from vlm.arch import ImageGeometry
from vlm.requests import Request, build_batch


def recorded_requests(b: Bundle, arch, config, run_dtype: torch.dtype) -> list[Request]:
    """One Request per recorded request; its batch (pixels from its seed, rounded to the run dtype as the
    reference's were) must equal the recorded inputs key by key where both have the key (the forward's own
    derived inputs, e.g. token type ids, are the recording's alone). A BundleError otherwise."""
    where = f"bundle {str(b.folder)!r}"
    adapters = b.manifest.get("adapters") or {}
    reqs = []
    for i, entry in enumerate(b.manifest["requests"]):
        fed = b.inputs(i)
        adapter, seed, geometry = entry.get("adapter"), entry.get("seed"), entry.get("geometry")
        # the manifest's own words checked first: a bad value is the bundle's fault (exit 2), not a runtime
        # divergence (an adapter the runtime never loaded would fail its mapping) nor a bare Python error
        if adapter is not None and adapter not in adapters:
            raise BundleError(f"{where}: request {i}: adapter {adapter!r} is not one of the bundle's adapters "
                              f"({', '.join(map(repr, adapters)) or 'none'})")
        if type(seed) is not int:
            raise BundleError(f"{where}: request {i}: seed {seed!r} is not an integer")
        if not isinstance(geometry, list) or not all(isinstance(g, str) for g in geometry):
            raise BundleError(f"{where}: request {i}: geometry {geometry!r} is not a list of --geometry items")
        try:
            images = tuple(parse_geometry(g) for g in geometry)
            req = Request(images, tuple(fed["input_ids"][0].tolist()), adapter, seed)
            rebuilt = build_batch(arch, config, [req]).to("cpu", run_dtype).model_inputs()
            sha = prompt_sha256(req.prompt_ids)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: request {i} cannot be rebuilt ({' '.join(str(e).split())})") from None
        if entry.get("prompt_sha256") != sha:
            raise BundleError(f"{where}: request {i}: input_ids are not the prompt whose sha256 the manifest gives")
        for key in sorted(rebuilt.keys() & fed.keys()):
            a, r = fed[key], rebuilt[key]
            if a.dtype != r.dtype or a.shape != r.shape or not _same(a, r):
                raise BundleError(f"{where}: request {i}: {key} recorded ({tuple(a.shape)}, {a.dtype}) is not the "
                                  f"one its seed {entry['seed']} and geometry rebuild ({tuple(r.shape)}, {r.dtype})")
        if missing := sorted(rebuilt.keys() - fed.keys()):
            raise BundleError(f"{where}: request {i} lacks the recorded input(s) {', '.join(missing)}")
        reqs.append(req)
    _check_geometries(b.manifest.get("geometries"), reqs, where)
    return reqs


def _check_geometries(listed, reqs: list[Request], where: str) -> None:
    """The manifest's `geometries` (the --geometry items the recording took in turn; [] for the arch's own mix,
    which a later harness may change, so not checked) must be what the requests' images are, in turn: a list
    that says otherwise misstates the bundle."""
    if not isinstance(listed, list):
        raise BundleError(f"{where}: geometries {listed!r} is not a list")
    images = [g for r in reqs for g in r.images]
    # compared as geometries, not as the dicts a harness wrote: a field ImageGeometry gains later is absent
    # from older bundles (its default then) and does not make them bad
    parsed = [_geometry(where, item) for item in listed]
    if parsed and images != [parsed[k % len(parsed)] for k in range(len(images))]:
        raise BundleError(f"{where}: geometries {json.dumps(listed)} are not the ones the requests' images take "
                          f"in turn ({', '.join(geometry_text(g) for g in images)})")


def _geometry(where: str, item) -> ImageGeometry:
    """One `geometries` item (dataclasses.asdict through JSON: tuples became lists) as an ImageGeometry."""
    try:
        if not isinstance(item, dict):
            raise TypeError("not an object")
        return ImageGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in item.items()})
    except TypeError as e:
        raise BundleError(f"{where}: geometries item {json.dumps(item)} is not an image geometry "
                          f"({' '.join(str(e).split())})") from None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal value for value, a NaN where the other has one (pixels may hold NaN: a hostile input, judged)."""
    if a.is_floating_point():
        return torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    return torch.equal(a, b)
