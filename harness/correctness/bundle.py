"""Bundles: a run's module captures on disk (docs/bundles.md), written as the forward makes them and read
back one module at a time, so memory does not grow with the number of layers.

A reference bundle (`mmlora record`, and every `mmlora correctness` run through a temporary one) holds, per
module and request, what the verdict needs without the reference model: the reference's output and input
at the run dtype, the truth's output (float64 on CPU), the base Linear's output on each side's input, the
replay truth on the reference's input, and the base Linear's weights (for the runtime's delta). An output
bundle (an engine's own, or the runtime's captures during e2e) holds only `out.<i>` (and `in.<i>`).

Layout: `manifest.json` + `modules/<k>.safetensors`, one file per module in the reference's execution
order, tensor `<key>.<request>` each [rows, features]. Loads never unpickle (safetensors only); every
defect of a bundle is a `BundleError` (one line, exit 2) raised before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import weakref
from pathlib import Path

import torch

from harness import provenance
from harness.correctness.truth import high_precision, truth_dtype
from harness.output import write_json
from reference.run import BASE_PREFIX, base_output, module_outputs
from vlm.adapter_files import read_adapter
from vlm.arch import ImageGeometry
from vlm.capture import Sink
from vlm.checkpoint import read_checkpoint_config
from vlm.rows import BOUNDARY_GROUP, module_rows_per_request

# 2: every module file's sha256 in the manifest, the non-finite tensors the writer saw, and provenance. A
# reference bundle must be version 2 (its checksums are what `compare` trusts); an output bundle an engine
# writes may stay at 1 (its own sha256 fields, if any, are verified too)
FORMAT, VERSION = "mmlora-bundle", 2
READS = (1, 2)
MANIFEST = "manifest.json"
# tensor keys of a reference bundle's module file (suffixed ".<request>"); an output bundle has out / in only
REF_KEYS = ("out", "in", "base", "truth.out", "truth.base", "replay.truth_out", "replay.truth_base")


class BundleError(ValueError):
    """A bundle that is missing, corrupt or does not match what it is compared with (exit 2)."""


# ---------------------------------------------------------------------------- capture bytes held
class Held:
    """Bytes of tensors loaded from bundles and stage files that are still alive, and their peak: the
    streaming's measure (a comparison holds one module's captures at a time)."""

    def __init__(self):
        self.now = self.peak = 0

    def reset(self) -> None:
        self.now = self.peak = 0

    def add(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._sub, n)
        return t

    def _sub(self, n: int) -> None:
        self.now -= n


HELD = Held()


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file read straight into memory of its own: the format's 8-byte header
    length, JSON header, then raw little-endian data. Its own allocation, because a tensor inside a file's
    buffer may sit at any byte offset and BLAS (MKL) results depend on the alignment of their operands in the
    last bit: torch's allocator aligns as the in-memory captures were aligned, so the comparison's figures
    match them bit for bit. Not through a memory map: the pages of a mapped file count in the process's RSS
    while it is mapped, on top of the copy (at LLaVA-7B widths the largest base weight, 180 MB, was held twice
    while the judge read it)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(n))[key]
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in _ST_DTYPES:
            raise BundleError(f"{str(path)!r}: tensor {key!r} has dtype {entry['dtype']}; a bundle holds "
                              f"{', '.join(_ST_DTYPES)}")
        t = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])
        buf = t.view(-1).view(torch.uint8).numpy()
        f.seek(8 + n + begin)
        if buf.nbytes != end - begin or (buf.nbytes and f.readinto(buf) != buf.nbytes):
            raise BundleError(f"{str(path)!r}: tensor {key!r} is cut short")
    return HELD.add(t)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


# ---------------------------------------------------------------------------- staging (the hooks' sink)
class Stage:
    """Each tensor a capture hook sees goes to its own file at once (nothing kept in memory); the pieces
    of one module are read back, split per request and written into the module's file afterwards."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[tuple, list[tuple[Path, tuple[int, ...]]]] = {}
        self.seen: dict[object, list[str]] = {}  # per forward (tag): module names in first-capture order
        self._n = 0

    def sink(self, tag) -> Sink:
        seen = self.seen.setdefault(tag, [])

        def put(name: str, key: str, t: torch.Tensor) -> None:
            if name not in seen:
                seen.append(name)
            path = self.folder / f"{self._n}.safetensors"
            self._n += 1
            _save({"t": t}, path)
            self.index.setdefault((tag, name, key), []).append((path, tuple(t.shape)))
        return put

    def rows(self, tag, name: str) -> int:
        """Rows the forward captured for this module (0: none, e.g. a tower on a text-only request)."""
        return max((sum(math.prod(s[:-1]) for _, s in self.index.get((tag, name, k), []))
                    for k in ("in", "out")), default=0)

    def pieces(self, tag, name: str, key: str) -> list[torch.Tensor]:
        return [_read_tensor(p, "t") for p, _ in self.index.get((tag, name, key), [])]

    def drop(self, tag, name: str) -> None:
        for k in ("in", "out"):
            for p, _ in self.index.pop((tag, name, k), []):
                p.unlink(missing_ok=True)


def _split(stage: Stage, tag, name: str, key: str, arch, config, reqs, l_max: int) -> list[torch.Tensor | None]:
    """Per request [rows, features] (None where a request has no rows), the registry's row formulas."""
    pieces = stage.pieces(tag, name, key)
    if not pieces:
        return [None] * len(reqs)
    per = module_rows_per_request(arch, config, reqs, [len(r.prompt_ids) for r in reqs], l_max, name, pieces)
    return [t if t.shape[0] else None for t in per]


# ---------------------------------------------------------------------------- writing
class BundleWriter:
    def __init__(self, folder: Path, n_requests: int):
        self.folder, self.n = folder, n_requests
        (folder / "modules").mkdir(parents=True, exist_ok=True)
        self.modules: list[dict] = []

    def add(self, name: str, group: str, tensors: dict[str, torch.Tensor]) -> None:
        rows, features, dtype = [0] * self.n, 0, None
        for i in range(self.n):
            t = tensors.get(f"out.{i}")
            if t is not None:
                rows[i], features, dtype = t.shape[0], t.shape[-1], str(t.dtype).removeprefix("torch.")
        file = f"modules/{len(self.modules):04d}.safetensors"
        _save(tensors, self.folder / file)
        # what the forward really gave as NaN / Inf (a NaN weight): judged as non-finite; any other non-finite
        # value a reader meets was not written so (a flipped bit) and is a bad bundle
        nonfinite = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
        self.modules.append({"name": name, "file": file, "group": group,
                             "kind": "boundary" if name.startswith("@") else "lora", "rows": rows,
                             "features": features, "dtype": dtype, "sha256": _sha256(self.folder / file),
                             "nonfinite": nonfinite})

    def finish(self, manifest: dict) -> None:
        manifest = {"format": FORMAT, "version": VERSION, **manifest, "provenance": provenance.writer(),
                    "modules": self.modules}
        # NaN / Inf (the ratios of a model with NaN weights) as null: JSON has no such constants, and a reader
        # refuses them (they would stand for an edited manifest)
        write_json(self.folder / MANIFEST, manifest)


def request_entry(r) -> dict:
    ids = ",".join(str(int(t)) for t in r.prompt_ids)
    return {"adapter": r.adapter, "images": len(r.images), "geometry": [g.describe() for g in r.images],
            "tokens": len(r.prompt_ids), "prompt_sha256": hashlib.sha256(ids.encode()).hexdigest()}


def _checkpoint_files(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.iterdir())
            if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".json"))}


def captured(stage: Stage, side: str, n_requests: int) -> list[list[str]]:
    """Per request, the modules a single-request forward captured rows for, in first-capture order."""
    return [[n for n in stage.seen.get((side, i), []) if stage.rows((side, i), n)] for i in range(n_requests)]


def write_reference(tmp: Path, stage: Stage, order: list[str], arch, config, reqs, pm, device,
                    targets: dict[str, set[str]], step=lambda: None) -> tuple[BundleWriter, dict[str, dict[str, float]]]:
    """Every module's file, in the reference's order, from the staged reference and truth captures; returns
    the writer (manifest still to finish) and the adapters' measured rms(delta) / rms(base) per group.
    `step()` after each module (progress)."""
    tdt = truth_dtype(device)
    per_ratio: dict[str, dict[str, list[float]]] = {}
    writer = BundleWriter(tmp, len(reqs))
    for name in order:
        tensors = _module_tensors(stage, name, arch, config, reqs, pm, device, tdt, targets, per_ratio)
        writer.add(name, BOUNDARY_GROUP.get(name) or arch.group_of(name), tensors)
        del tensors
        step()
    shutil.rmtree(stage.folder)
    return writer, {a: {g: statistics.median(v) for g, v in groups.items()} for a, groups in per_ratio.items()}


def finish_reference(writer: BundleWriter, opts, arch, reqs, ckpt: Path, folders: dict[str, Path], device,
                     **fields) -> None:
    """The manifest; a generated checkpoint and generated adapters (in a work folder) are copied in."""
    tmp = writer.folder
    if opts.model == "tiny":
        shutil.copytree(ckpt, tmp / "checkpoint")
        ckpt_path = "checkpoint"
    else:
        ckpt_path = str(Path(ckpt).resolve())
    entries = {}
    for name, folder in folders.items():
        path = str(Path(folder).resolve())
        if not opts.adapters:
            shutil.copytree(folder, tmp / "adapters" / name)
            path = f"adapters/{name}"
        entries[name] = {"path": path, "sha256": _sha256(Path(folder) / "adapter_model.safetensors")}
    writer.finish({
        "kind": "reference", "arch": arch.model_type, "dtype": opts.dtype, "device": str(device),
        "truth_dtype": str(truth_dtype(device)).removeprefix("torch."), "seed": opts.seed,
        "options": {"model": opts.model, "n_adapters": opts.n_adapters, "adapter_scale": opts.adapter_scale},
        "checkpoint": {"path": ckpt_path, "files": _checkpoint_files(Path(ckpt))}, "adapters": entries,
        "geometries": [dataclasses.asdict(g) for g in opts.geometries],
        "requests": [request_entry(r) for r in reqs], **fields})


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def _module_tensors(stage, name, arch, config, reqs, pm, device, tdt, targets, per_ratio) -> dict:
    """One module's tensors for every request (what the judge reads), computed as the engine judged them:
    base outputs through the reference's own base Linear at the run dtype, then, with the same model inside
    `high_precision` (the truth: no second copy), the replay truth through the PEFT module on the
    reference's input and the truth's base outputs."""
    lora = not name.startswith("@")
    out: dict[str, torch.Tensor] = {}
    truth_work = []  # (request, the reference's input, the truth's input, the truth's output)
    for i, req in enumerate(reqs):
        n = len(req.prompt_ids)
        one = [req]
        ref_out = _split(stage, ("ref", i), name, "out", arch, config, one, n)[0]
        ref_in = _split(stage, ("ref", i), name, "in", arch, config, one, n)[0]
        if ref_out is None and ref_in is None:
            continue
        tru_out = _split(stage, ("truth", i), name, "out", arch, config, one, n)[0]
        tru_in = _split(stage, ("truth", i), name, "in", arch, config, one, n)[0]
        stage.drop(("ref", i), name)
        stage.drop(("truth", i), name)
        out[f"out.{i}"] = ref_out
        if tru_out is not None:
            out[f"truth.out.{i}"] = tru_out
        if not lora:
            continue
        if ref_in is not None:
            out[f"in.{i}"] = ref_in
            out[f"base.{i}"] = base_output(pm, name, ref_in.to(device)).cpu()
        truth_work.append((i, req, ref_in, tru_in, tru_out))
    if truth_work:
        with high_precision(pm, tdt):
            for i, req, ref_in, tru_in, tru_out in truth_work:
                if ref_in is not None:
                    t_out, t_base = module_outputs(pm, name, ref_in.to(device, tdt), req.adapter)
                    out[f"replay.truth_out.{i}"], out[f"replay.truth_base.{i}"] = t_out.cpu(), t_base.cpu()
                if tru_in is not None:
                    t_base = base_output(pm, name, tru_in.to(device)).cpu()
                    out[f"truth.base.{i}"] = t_base
                    if req.adapter is not None and name in targets.get(req.adapter, ()) and tru_out is not None:
                        r = _rms(tru_out - t_base) / max(_rms(t_base), 1e-300)
                        per_ratio.setdefault(req.adapter, {}).setdefault(arch.group_of(name), []).append(r)
    if lora:
        from accelerate.utils import align_module_device

        base = pm.get_submodule(BASE_PREFIX + name).get_base_layer()
        # a module accelerate offloads (device maps) holds meta tensors until its hook loads them
        with align_module_device(base, torch.device("cpu")):
            # no copy: on the CPU this is the model's own tensor, which safetensors reads as it writes the file
            out["weight"] = base.weight.detach().cpu()
            if base.bias is not None:
                out["bias"] = base.bias.detach().cpu()
    return out


def stream_outputs(rt, reqs, folder: Path, step=lambda: None) -> Bundle:
    """The runtime's one mixed-batch forward, captured into an output bundle module by module (the e2e
    side of a comparison). Raises what the runtime raises, including a row count the formulas disagree with.
    `step()` after each module output the forward captures (progress)."""
    stage = Stage(folder / ".stage")
    sink = stage.sink("got")

    def put(name: str, key: str, t: torch.Tensor) -> None:
        sink(name, key, t)
        if key == "out":
            step()
    rt.run(reqs, sink=put)
    l_max = max(len(r.prompt_ids) for r in reqs)
    writer = BundleWriter(folder, len(reqs))
    for name in stage.seen.get("got", []):
        tensors = {}
        for key in ("out", "in"):
            for i, t in enumerate(_split(stage, "got", name, key, rt.arch, rt.config, reqs, l_max)):
                if t is not None:
                    tensors[f"{key}.{i}"] = t
        stage.drop("got", name)
        writer.add(name, BOUNDARY_GROUP.get(name) or rt.arch.group_of(name), tensors)
        del tensors
    shutil.rmtree(stage.folder)
    writer.finish({"kind": "outputs", "requests": [request_entry(r) for r in reqs]})
    return Bundle.open(folder, verify=False)  # written by this very process a moment ago


# ---------------------------------------------------------------------------- reading
class Bundle:
    """A validated bundle; tensors are read one at a time (`get`), never the whole bundle."""

    def __init__(self, folder: Path, manifest: dict, keys: dict[str, set[str]]):
        self.folder, self.manifest, self._keys = folder, manifest, keys
        self.modules = {m["name"]: m for m in manifest["modules"]}
        self._reference = manifest.get("kind") == "reference"

    @classmethod
    def open(cls, folder: str | Path, verify: bool = True) -> Bundle:
        """`verify=False` skips the sha256 of each module file (a bundle this process has just written)."""
        folder = Path(folder)
        where = f"bundle {str(folder)!r}"
        path = folder / MANIFEST
        if not path.is_file():
            raise BundleError(f"{where}: no {MANIFEST} (not a bundle, or written incompletely)")
        try:
            m = json.loads(path.read_text(), parse_constant=_no_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
            raise BundleError(f"{where}: {MANIFEST} is not valid JSON ({' '.join(str(e).split())})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise BundleError(f"{where}: {MANIFEST} has no \"format\": \"{FORMAT}\"")
        if m.get("version") not in READS:
            raise BundleError(f"{where}: format version {m.get('version')!r}, this harness reads "
                              f"{', '.join(map(str, READS))}")
        if m.get("kind") == "reference" and m["version"] != VERSION:
            raise BundleError(f"{where}: a version {m['version']} reference bundle has no checksums of its "
                              f"module files: re-record it with this harness (mmlora record)")
        for key, kind in (("requests", list), ("modules", list)):
            if not isinstance(m.get(key), kind):
                raise BundleError(f"{where}: {MANIFEST} lacks the list {key!r}")
        n = len(m["requests"])
        keys: dict[str, set[str]] = {}
        for k, mod in enumerate(m["modules"]):
            if not isinstance(mod, dict) or not {"name", "file", "rows", "features"} <= set(mod):
                raise BundleError(f"{where}: module entry {k} lacks one of name, file, rows, features")
            name = mod["name"]
            if name in keys:
                raise BundleError(f"{where}: module {name!r} is listed twice")
            if not isinstance(mod["rows"], list) or len(mod["rows"]) != n:
                raise BundleError(f"{where}: module {name!r} gives rows for {len(mod['rows'])} requests, the "
                                  f"manifest lists {n}")
            if m.get("kind") == "reference" and not isinstance(mod.get("sha256"), str):
                raise BundleError(f"{where}: module {name!r} has no sha256 in {MANIFEST}")
            keys[name] = _check_file(where, folder, mod, verify, m.get("kind") == "reference")
        return cls(folder, m, keys)

    @property
    def names(self) -> list[str]:
        return [m["name"] for m in self.manifest["modules"]]

    def has(self, i: int | None, name: str, key: str = "out") -> bool:
        return (key if i is None else f"{key}.{i}") in self._keys.get(name, ())

    def get(self, i: int | None, name: str, key: str) -> torch.Tensor | None:
        """One tensor (`key.i`, or `key` for per-module tensors with i None), read from its file alone. In a
        reference bundle a NaN / Inf the writer did not see is refused: a reference, truth or bound from it
        would be judged as if it were real."""
        full = key if i is None else f"{key}.{i}"
        if full not in self._keys.get(name, ()):
            return None
        mod = self.modules[name]
        t = _read_tensor(self.folder / mod["file"], full)
        if self._reference and t.is_floating_point() and full not in (mod.get("nonfinite") or ()) \
                and not torch.isfinite(t).all():
            raise _not_recorded(f"bundle {str(self.folder)!r}", name, full)
        return t


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


def _check_file(where: str, folder: Path, mod: dict, verify: bool = True, reference: bool = False) -> set[str]:
    """The module file exists, has the manifest's sha256 (where given), is safetensors (header and length),
    and its out.<i> are floating, of the manifest's rows and dtype. With `verify`, a reference bundle's file
    is also read whole (once, for its checksum too) and any NaN / Inf the recording did not see is refused
    here, before any work."""
    from safetensors import SafetensorError, safe_open

    name, file = mod["name"], mod["file"]
    path = folder / str(file)
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
        got = shapes.get(f"out.{i}")
        want = [rows, mod["features"]] if rows else None
        if got != want:
            raise BundleError(f"{where}: module {name!r} request {i}: out.{i} has shape "
                              f"{tuple(got) if got else 'none'}, the manifest says "
                              f"{tuple(want) if want else 'none (0 rows)'}")
        if f"in.{i}" in shapes and shapes[f"in.{i}"][0] != rows:
            raise BundleError(f"{where}: module {name!r} request {i}: in.{i} has {shapes[f'in.{i}'][0]} rows, "
                              f"out.{i} {rows}")
        if got is None:
            continue
        dt = _ST_DTYPES.get(dtypes[f"out.{i}"])
        if dt is None or not dt.is_floating_point:
            raise BundleError(f"{where}: module {name!r}: out.{i} has dtype {dtypes[f'out.{i}']}; a module's "
                              f"output must be a floating tensor")
        if want_dtype is not None and str(dt).removeprefix("torch.") != want_dtype:
            raise BundleError(f"{where}: module {name!r}: the manifest's dtype {want_dtype!r} is not out.{i}'s "
                              f"{str(dt).removeprefix('torch.')}")
    return set(shapes)


def check_outputs(ref: Bundle, got: Bundle) -> None:
    """An output bundle answers the reference's requests module by module: same requests (geometry,
    tokens, adapters), every module of the reference, the same rows and features per request."""
    where = f"bundle {str(got.folder)!r}"
    rq, gq = ref.manifest["requests"], got.manifest["requests"]
    if len(gq) != len(rq):
        raise BundleError(f"{where} holds {len(gq)} requests, the reference {len(rq)}")
    for i, (a, b) in enumerate(zip(rq, gq)):
        for key in ("geometry", "tokens", "adapter"):
            if key not in b:
                raise BundleError(f"{where}: request {i} lacks {key!r}")
            if b[key] != a[key]:
                raise BundleError(f"{where}: request {i} {key} {b[key]!r} differs from the reference's {a[key]!r}")
    for name, m in ref.modules.items():
        g = got.modules.get(name)
        if g is None:
            raise BundleError(f"{where} lacks module {name!r} (the reference bundle has it)")
        if g["features"] != m["features"]:
            raise BundleError(f"{where}: module {name!r} has {g['features']} features, the reference {m['features']}")
        for i, (a, b) in enumerate(zip(m["rows"], g["rows"])):
            if a != b:
                raise BundleError(f"{where}: module {name!r} request {i} has {b} rows, the reference {a}")


def _resolve(bundle: Bundle, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else bundle.folder / p


def open_reference(folder: str | Path, verify: bool = True):
    """A reference bundle, its checkpoint and adapters checked against the manifest (another checkpoint or
    adapter file is a BundleError): (bundle, checkpoint folder, arch, config, adapters, geometries).
    `verify=False` skips the sha256 of each file (a bundle this process has just recorded from those very
    files: hashing a real checkpoint again costs minutes); missing files are still refused."""
    b = Bundle.open(folder, verify)
    m, where = b.manifest, f"bundle {str(folder)!r}"
    if m.get("kind") != "reference":
        raise BundleError(f"{where} holds outputs only (kind {m.get('kind')!r}): compare it as GOT against a "
                          f"reference bundle (mmlora compare REF GOT)")
    for key in ("arch", "dtype", "device", "checkpoint", "adapters", "geometries", "ratios", "warnings", "notes",
                "fixes"):
        if key not in m:
            raise BundleError(f"{where}: {MANIFEST} lacks {key!r}")
    ckpt = _resolve(b, m["checkpoint"]["path"])
    if not ckpt.is_dir():
        raise BundleError(f"{where}: checkpoint {str(ckpt)!r} does not exist")
    for fname, sha in m["checkpoint"]["files"].items():
        f = ckpt / fname
        if not f.is_file() or (verify and _sha256(f) != sha):
            raise BundleError(f"{where}: checkpoint file {str(f)!r} is {'missing' if not f.is_file() else 'another file'}"
                              f" (sha256 differs from the one recorded)")
    arch, raw = read_checkpoint_config(ckpt)
    if arch.model_type != m["arch"]:
        raise BundleError(f"{where}: checkpoint is {arch.model_type!r}, the bundle {m['arch']!r}")
    config = arch.model_class().config_class.from_dict(raw)
    # adapters are read against the model's module names (old transformers-4.x names are converted by the
    # model class's own key conversion, as the recording did): an empty skeleton on the meta device is enough
    with torch.device("meta"):
        skeleton = arch.model_class()(config)
    adapters = {}
    for name, e in m["adapters"].items():
        path = _resolve(b, e["path"])
        st = path / "adapter_model.safetensors"
        if not st.is_file():
            raise BundleError(f"{where}: adapter {name!r}: {str(st)!r} is missing")
        sha = _sha256(st) if verify else e["sha256"]
        if sha != e["sha256"]:
            raise BundleError(f"{where}: adapter {name!r}: {str(st)!r} is another file (sha256 {sha[:12]}..., "
                              f"recorded {e['sha256'][:12]}...)")
        adapters[name] = read_adapter(path, skeleton)
    geoms = [ImageGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()})
             for g in m["geometries"]]
    return b, ckpt, arch, config, adapters, geoms


def check_requests(b: Bundle, reqs) -> None:
    """The requests rebuilt from the recorded options are the recorded ones."""
    where, recorded = f"bundle {str(b.folder)!r}", b.manifest["requests"]
    rebuilt = [request_entry(r) for r in reqs]
    if len(rebuilt) != len(recorded):
        raise BundleError(f"{where}: {len(recorded)} requests recorded, {len(rebuilt)} rebuilt")
    for i, (a, r) in enumerate(zip(recorded, rebuilt)):
        for key in ("adapter", "geometry", "tokens", "prompt_sha256"):
            if a.get(key) != r[key]:
                raise BundleError(f"{where}: request {i} {key} {a.get(key)!r} recorded, {r[key]!r} rebuilt")
