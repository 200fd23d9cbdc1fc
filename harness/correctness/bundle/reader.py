"""Reading a bundle: the manifest and every module file checked before any work, then tensors read one at a
time; and the checks that an output bundle answers a reference's requests and modules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from harness.correctness.bundle.format import (
    FORMAT,
    MANIFEST,
    READS,
    ST_DTYPES,
    VERSION,
    BundleError,
    Key,
    Kind,
    inside,
    read_tensor,
    tensor_name,
)
from harness.correctness.bundle.inputs import check_inputs, read_inputs
from vlm.arch.base import GROUPS


class Bundle:
    """A validated bundle; tensors are read one at a time (`get`), never the whole bundle."""

    def __init__(self, folder: Path, manifest: dict, shapes: dict[str, dict[str, list[int]]], sha256: str):
        self.folder, self.manifest, self._shapes = folder, manifest, shapes
        self.sha256 = sha256  # of the manifest.json bytes: what an output bundle's "reference" names
        self.modules = {m["name"]: m for m in manifest["modules"]}
        self._reference = manifest.get("kind") == Kind.REFERENCE

    @classmethod
    def open(cls, folder: str | Path, verify: bool = True) -> Bundle:
        """`verify=False` skips the sha256 of each module file (a bundle this process has just written)."""
        folder = Path(folder)
        where = f"bundle {str(folder)!r}"
        path = folder / MANIFEST
        if not path.is_file():
            raise BundleError(f"{where}: no {MANIFEST} (not a bundle, or written incompletely)")
        data = path.read_bytes()
        try:
            m = json.loads(data.decode(), parse_constant=_no_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
            raise BundleError(f"{where}: {MANIFEST} is not valid JSON ({' '.join(str(e).split())})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise BundleError(f"{where}: {MANIFEST} has no \"format\": \"{FORMAT}\"")
        # an int, not a bool: `true == 1` would read a manifest saying "version": true as version 1
        if type(m.get("version")) is not int or m["version"] not in READS:
            raise BundleError(f"{where}: format version {m.get('version')!r}, this harness reads versions "
                              f"{', '.join(map(str, READS))} (a reference bundle: {VERSION})")
        if m.get("kind") == Kind.REFERENCE and m["version"] != VERSION:
            lacks = "checksums of its module files nor " if m["version"] < 2 else ""
            raise BundleError(f"{where}: a version {m['version']} reference bundle has no {lacks}inputs of its "
                              f"requests (this harness reads version {VERSION} references): re-record it with "
                              f"this harness (mmlora record)")
        for key, kind in (("requests", list), ("modules", list)):
            if not isinstance(m.get(key), kind):
                raise BundleError(f"{where}: {MANIFEST} lacks the list {key!r}")
        n = len(m["requests"])
        shapes: dict[str, dict[str, list[int]]] = {}
        for k, mod in enumerate(m["modules"]):
            if not isinstance(mod, dict) or not {"name", "file", "rows", "features"} <= set(mod):
                raise BundleError(f"{where}: module entry {k} lacks one of name, file, rows, features")
            name = mod["name"]
            if name in shapes:
                raise BundleError(f"{where}: module {name!r} is listed twice")
            if not isinstance(mod["rows"], list) or len(mod["rows"]) != n:
                raise BundleError(f"{where}: module {name!r} gives rows for {len(mod['rows'])} requests, the "
                                  f"manifest lists {n}")
            if m.get("kind") == Kind.REFERENCE and not isinstance(mod.get("sha256"), str):
                raise BundleError(f"{where}: module {name!r} has no sha256 in {MANIFEST}")
            # which modules an output bundle is judged on goes by group: a reference module of no known group
            # would be left out of every judgement, silently
            if m.get("kind") == Kind.REFERENCE and mod.get("group") not in GROUPS:
                raise BundleError(f"{where}: module {name!r} has group {mod.get('group')!r} in {MANIFEST}, "
                                  f"expected one of {', '.join(GROUPS)}")
            shapes[name] = _check_file(where, folder, mod, verify, m.get("kind") == Kind.REFERENCE)
        if m.get("kind") == Kind.REFERENCE:
            _check_unused(where, m)
            for i, entry in enumerate(m["requests"]):
                if not isinstance(entry, dict):
                    raise BundleError(f"{where}: request entry {i} is not an object")
                check_inputs(where, folder, i, entry, verify)
        return cls(folder, m, shapes, hashlib.sha256(data).hexdigest())

    @property
    def names(self) -> list[str]:
        return [m["name"] for m in self.manifest["modules"]]

    def has(self, i: int | None, name: str, key: str = Key.OUT) -> bool:
        return tensor_name(key, i) in self._shapes.get(name, ())

    def shape(self, i: int | None, name: str, key: str) -> list[int] | None:
        return self._shapes.get(name, {}).get(tensor_name(key, i))

    def inputs(self, i: int) -> dict[str, torch.Tensor]:
        """Request i's forward inputs by keyword, as the reference ran them (a reference bundle)."""
        return read_inputs(self.folder, self.manifest["requests"][i])

    def get(self, i: int | None, name: str, key: str) -> torch.Tensor | None:
        """One tensor (`key.i`, or `key` for per-module tensors with i None), read from its file alone. In a
        reference bundle a NaN / Inf the writer did not see is refused: a reference, truth or bound from it
        would be judged as if it were real."""
        full = tensor_name(key, i)
        if full not in self._shapes.get(name, ()):
            return None
        mod = self.modules[name]
        t = read_tensor(self.folder / mod["file"], full)
        if self._reference and t.is_floating_point() and full not in (mod.get("nonfinite") or ()) \
                and not torch.isfinite(t).all():
            raise _not_recorded(f"bundle {str(self.folder)!r}", name, full)
        return t


def _check_unused(where: str, m: dict) -> None:
    """A reference's optional "unused_modules" (absent in bundles recorded before it): distinct names of its
    LoRA modules (no @ boundary)."""
    u = m.get("unused_modules")
    if u is None:
        return
    names = {mod["name"] for mod in m["modules"]}
    if not isinstance(u, list) or len(set(map(str, u))) != len(u) \
            or not all(isinstance(x, str) and x in names and not x.startswith("@") for x in u):
        raise BundleError(f"{where}: \"unused_modules\" is {u!r}, expected a list of distinct LoRA module names "
                          f"of the bundle")


def _check_finite(where: str, name: str, mod: dict, data: bytes) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except SafetensorError:
        return  # named by the header check that follows
    for key, t in sorted(tensors.items()):
        if t.is_floating_point() and key not in (mod.get("nonfinite") or ()) and not torch.isfinite(t).all():
            raise _not_recorded(where, name, key)


def _not_recorded(where: str, name: str, key: str) -> BundleError:
    return BundleError(f"{where}: module {name!r}: {key} holds NaN or Inf that the recording did not produce: "
                       f"a corrupt bundle, re-record it")


def _no_constant(name: str):
    raise ValueError(f"holds {name}, which JSON does not allow")


def _check_file(where: str, folder: Path, mod: dict, verify: bool = True,
                reference: bool = False) -> dict[str, list[int]]:
    """The module file lies inside the folder, exists, has the manifest's sha256 (where given), is safetensors
    (header and length), and its out.<i> and in.<i> are floating, of the manifest's rows (out.<i>: and dtype).
    With `verify`, a reference bundle's file is also read whole (once, for its checksum too) and any NaN / Inf
    the recording did not see is refused here, before any work. Returns the file's tensor shapes by name."""
    from safetensors import SafetensorError, safe_open

    name, file = mod["name"], mod["file"]
    path = inside(where, folder, f"module {name!r}", file)
    if not path.is_file():
        raise BundleError(f"{where}: module {name!r}: file {file!r} is missing")
    sha = mod.get("sha256")
    data = path.read_bytes() if verify and (sha is not None or reference) else None
    if data is not None and sha is not None and hashlib.sha256(data).hexdigest() != sha:
        raise BundleError(f"{where}: module {name!r}: {file!r} is another file (sha256 differs from the one in "
                          f"{MANIFEST}): corrupt or edited")
    if data is not None and reference:
        _check_finite(where, name, mod, data)
        del data
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{where}: module {name!r}: {file!r} is not a readable safetensors file "
                          f"({' '.join(str(e).split())})") from None
    want_dtype = mod.get("dtype")
    for i, rows in enumerate(mod["rows"]):
        out, inp = tensor_name(Key.OUT, i), tensor_name(Key.IN, i)
        got = shapes.get(out)
        want = [rows, mod["features"]] if rows else None
        if got != want:
            raise BundleError(f"{where}: module {name!r} request {i}: {out} has shape "
                              f"{tuple(got) if got else 'none'}, the manifest says "
                              f"{tuple(want) if want else 'none (0 rows)'}")
        if inp in shapes:
            if len(shapes[inp]) != 2 or shapes[inp][0] != rows:
                raise BundleError(f"{where}: module {name!r} request {i}: {inp} has shape {tuple(shapes[inp])}, "
                                  f"expected ({rows}, in_features)")
            _check_float(where, name, inp, dtypes[inp], "input")
        if got is None:
            continue
        dt = _check_float(where, name, out, dtypes[out], "output")
        if want_dtype is not None and str(dt).removeprefix("torch.") != want_dtype:
            raise BundleError(f"{where}: module {name!r}: the manifest's dtype {want_dtype!r} is not {out}'s "
                              f"{str(dt).removeprefix('torch.')}")
    return shapes


def _check_float(where: str, name: str, key: str, st_dtype: str, what: str) -> torch.dtype:
    dt = ST_DTYPES.get(st_dtype)
    if dt is None or not dt.is_floating_point:
        raise BundleError(f"{where}: module {name!r}: {key} has dtype {st_dtype}; a module's {what} must be a "
                          f"floating tensor ({', '.join(k for k, v in ST_DTYPES.items() if v.is_floating_point)})")
    return dt


def answered_groups(got: Bundle) -> tuple[str, ...]:
    """The module groups an output bundle answers: its manifest's optional `"groups"` (a non-empty list of
    `GROUPS`), all of them without it. An engine that runs part of the model (vLLM's tower/connector path)
    names what it answers; the rest is reported as not judged, never passed."""
    g = got.manifest.get("groups")
    if g is None:
        return GROUPS
    if not isinstance(g, list) or not g or not all(isinstance(x, str) for x in g) or set(g) - set(GROUPS):
        raise BundleError(f"bundle {str(got.folder)!r}: \"groups\" is {g!r}, expected a non-empty list of "
                          f"{', '.join(GROUPS)}")
    return tuple(x for x in GROUPS if x in g)


def not_produced(got: Bundle) -> tuple[str, ...]:
    """The reference modules an output bundle says its engine's model does not have: its manifest's optional
    `"not_produced"`, a list of distinct module names (none without it). Which names it may list, and what
    the bundle must then supply, is `check_outputs`' to say."""
    n = got.manifest.get("not_produced")
    if n is None:
        return ()
    if not isinstance(n, list) or not all(isinstance(x, str) for x in n) or len(set(n)) != len(n):
        raise BundleError(f"bundle {str(got.folder)!r}: \"not_produced\" is {n!r}, expected a list of distinct "
                          f"module names of the reference")
    return tuple(n)


def judged_modules(ref: Bundle, got: Bundle) -> list[str]:
    """The reference's modules an output bundle is judged on, in the reference's order: those of the groups it
    answers (`answered_groups`; a reference module's group is checked when the reference is opened) but the
    ones it says its engine's model does not have (`not_produced`)."""
    groups, omitted = answered_groups(got), set(not_produced(got))
    return [name for name, m in ref.modules.items() if m["group"] in groups and name not in omitted]


def groups_left_out(ref: Bundle, got: Bundle) -> list[str]:
    """The reference's groups (those it has modules of) that the output bundle does not answer."""
    groups = answered_groups(got)
    return [g for g in GROUPS if g not in groups and any(m["group"] == g for m in ref.modules.values())]


def _check_not_produced(ref: Bundle, got: Bundle, groups: tuple[str, ...], omitted: tuple[str, ...]) -> None:
    """Each name a module of the reference, in a group the bundle answers, not an `@` boundary, not also in its
    `modules`, and one the reference records as unused (its "unused_modules": the model never reads its
    output); and every boundary of an answered group that runs after it in the reference is there (at least
    one): a module left out that fed anything shows at the next boundary, judged."""
    where = f"bundle {str(got.folder)!r}"
    order = list(ref.modules)  # a reference manifest lists its modules in execution order
    unused = ref.manifest.get("unused_modules")
    if omitted and unused is None:
        raise BundleError(f"{where} lists modules as \"not_produced\", and the reference {str(ref.folder)!r} "
                          f"records no \"unused_modules\" to check them against (recorded by an older harness): "
                          f"re-record it with this harness (mmlora record)")
    for name in omitted:
        m = ref.modules.get(name)
        why = ("is not a module of the reference" if m is None
               else "is an @ boundary (an engine takes every boundary)" if name.startswith("@")
               else f"is in group {m['group']!r}, which the bundle does not answer (its \"groups\")"
               if m["group"] not in groups
               else "is also in its \"modules\"" if name in got.modules
               else "is used by the model: an engine must produce it (only the reference's \"unused_modules\", "
                    "whose output the model never reads, may be left out)" if name not in unused else None)
        if why is not None:
            raise BundleError(f"{where}: \"not_produced\" lists {name!r}, which {why}")
        after = [b for b in order[order.index(name) + 1:] if b.startswith("@")]
        judged = [b for b in after if ref.modules[b]["group"] in groups]
        lacking = [b for b in judged if b not in got.modules]
        if lacking:
            what = f"supply boundary {lacking[0]!r}"
        elif not judged and after:
            what = f"supply boundary {after[0]!r} (answer group {ref.modules[after[0]].get('group')!r} in \"groups\")"
        elif not judged:
            what = "be followed by a boundary, and the reference has none after it"
        else:
            continue
        raise BundleError(f"{where} leaves out {name!r} (\"not_produced\"), so it must {what}: a module left out "
                          f"is judged only through the boundaries after it")


def check_outputs(ref: Bundle, got: Bundle) -> list[str]:
    """An output bundle answers the reference's requests module by module: the reference it names (if it
    names one), same requests (geometry, tokens, adapters), every module of the reference in the groups it
    answers (`answered_groups`) but those it lists as not produced (`not_produced`, with the boundaries after
    them), the same rows and features per request. Returns a warning per module the reference lacks (not
    judged), one per group left out and one for the modules not produced."""
    where = f"bundle {str(got.folder)!r}"
    groups = answered_groups(got)
    omitted = not_produced(got)
    _check_not_produced(ref, got, groups, omitted)
    named = got.manifest.get("reference")
    if named is not None and named != ref.sha256:
        raise BundleError(f"{where} answers the reference whose manifest.json has sha256 {named!r}, not "
                          f"{str(ref.folder)!r} (sha256 {ref.sha256!r})")
    rq, gq = ref.manifest["requests"], got.manifest["requests"]
    if len(gq) != len(rq):
        raise BundleError(f"{where} holds {len(gq)} requests, the reference {len(rq)}")
    for i, (a, b) in enumerate(zip(rq, gq)):
        for key in ("geometry", "tokens", "adapter"):
            if key not in b:
                raise BundleError(f"{where}: request {i} lacks {key!r}")
            if b[key] != a[key]:
                raise BundleError(f"{where}: request {i} {key} {b[key]!r} differs from the reference's {a[key]!r}")
    for name in judged_modules(ref, got):
        m, g = ref.modules[name], got.modules.get(name)
        if g is None:
            raise BundleError(f"{where} lacks module {name!r} (the reference bundle has it)")
        if g["features"] != m["features"]:
            raise BundleError(f"{where}: module {name!r} has {g['features']} features, the reference {m['features']}")
        for i, (a, b) in enumerate(zip(m["rows"], g["rows"])):
            if a != b:
                raise BundleError(f"{where}: module {name!r} request {i} has {b} rows, the reference {a}")
            # an input the reference's base Linear will be applied to must have its in_features
            g_in, r_in = got.shape(i, name, Key.IN), ref.shape(i, name, Key.IN)
            if g_in is not None and r_in is not None and g_in[-1] != r_in[-1]:
                raise BundleError(f"{where}: module {name!r} request {i}: {tensor_name(Key.IN, i)} has {g_in[-1]} "
                                  f"features, the reference's {r_in[-1]}")
    left = groups_left_out(ref, got)
    return [f"output bundle {str(got.folder)!r}: module {name!r} is not in the reference bundle (not judged)"
            for name in got.modules if name not in ref.modules] + [
        f"NOT JUDGED: group {g!r} ({sum(m['group'] == g for m in ref.modules.values())} reference modules): the "
        f"output bundle answers groups {list(groups)} only (its manifest's \"groups\")" for g in left] + ([
        f"NOT JUDGED: {len(omitted)} reference module{'s' if len(omitted) > 1 else ''} the engine's model does not "
        f"have (its manifest's \"not_produced\"; judged only through the boundaries after them), first "
        f"{omitted[0]!r}; every name in summary.json modules_not_produced"] if omitted else [])


def engine_of(got: Bundle) -> str:
    """What wrote an output bundle, for the report: its manifest's optional `"engine": {"name", "version"}`,
    else the bundle's folder."""
    e = got.manifest.get("engine")
    if e is None:
        return f"output bundle {str(got.folder)}"
    if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"] \
            or not isinstance(e.get("version", ""), str):
        raise BundleError(f"bundle {str(got.folder)!r}: \"engine\" is {e!r}, expected "
                          f"{{\"name\": str, \"version\": str}} (version optional)")
    return f"{e['name']} {e['version']}" if e.get("version") else e["name"]
