"""`mmlora compare REF GOT` against what an engine may hand in (docs/bundles.md): inputs and outputs at any float
dtype are judged, not crashed; module files that lead outside their bundle folder and unknown format versions
are one line, exit 2, for the reference as for the output bundle; compare speaks as itself, times itself,
refuses the runtime's flags and names the engine it judged."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.cli import main

ARCH = "llava"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A bf16 reference: a run dtype below float32, so an engine's float32 / float64 tensors are another dtype."""
    root = tmp_path_factory.mktemp("compare-got")
    assert main(["record", "--arch", ARCH, "--adapters", "1", "--dtype", "bf16", "--out", str(root / "ref")]) == 0
    return root / "ref"


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, m: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(m))


def _got(ref: Path, folder: Path, dtype: torch.dtype | None = None, **extra) -> Path:
    """An honest engine's output bundle (the spec alone, version 1): the reference's own out.<i> and in.<i>,
    stored at `dtype` (the run dtype when None)."""
    m = _manifest(ref)
    folder.mkdir()
    modules = []
    for k, x in enumerate(m["modules"]):
        t = {key: v if dtype is None else v.to(dtype) for key, v in load_file(str(ref / x["file"])).items()
             if key.startswith(("out.", "in."))}
        save_file(t, str(folder / f"m{k}.safetensors"))
        modules.append({"name": x["name"], "file": f"m{k}.safetensors", "rows": x["rows"], "features": x["features"]})
    _write_manifest(folder, {"format": "mmlora-bundle", "version": 1, "requests": m["requests"], "modules": modules,
                             **extra})
    return folder


def _pair(ref: Path, tmp_path: Path, which: str) -> tuple[Path, Path, Path]:
    """A copy of the reference and an honest output bundle: (ref, got, the one of them `which` names)."""
    r = tmp_path / "ref"
    shutil.copytree(ref, r)
    got = _got(ref, tmp_path / "got")
    return r, got, r if which == "ref" else got


def _lora(m: dict) -> dict:
    return next(x for x in m["modules"] if not x["name"].startswith("@") and x["rows"][0])


def _refused(argv, tmp_path, capsys, *needles: str) -> str:
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
    assert not (tmp_path / "o").exists()
    return err


def _csv(folder: Path) -> list[str]:
    return (folder / "layers.csv").read_text().splitlines()


# --- dtypes ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inputs_and_outputs_at_another_float_dtype_are_judged_as_at_the_run_dtype(ref, tmp_path, dtype):
    native = _got(ref, tmp_path / "native")
    wide = _got(ref, tmp_path / "wide", dtype)
    stored = load_file(str(wide / _lora(_manifest(wide))["file"]))
    assert {t.dtype for t in stored.values()} == {dtype} and "in.0" in stored
    assert main(["compare", str(ref), str(native), "--out", str(tmp_path / "a")]) == 0
    assert main(["compare", str(ref), str(wide), "--out", str(tmp_path / "b")]) == 0
    rows = _csv(tmp_path / "b")
    # the bf16 values widened exactly: the same figures, the LoRA deltas judged through the reference's weights
    assert rows == _csv(tmp_path / "a")
    head = rows[0].split(",")
    deltas = [r for r in rows[1:] if r.split(",")[head.index("kind")] == "lora"
              and r.split(",")[head.index("delta_err")] not in ("", "nan")]
    assert deltas, "no LoRA delta was judged"


def test_an_input_that_is_not_a_float_is_a_bad_bundle(ref, tmp_path, capsys):
    got = _got(ref, tmp_path / "got")
    entry = _lora(_manifest(got))
    path = got / entry["file"]
    t = load_file(str(path))
    save_file({**t, "in.0": (t["in.0"].float() * 100).to(torch.int32)}, str(path))
    _refused(["compare", str(ref), str(got)], tmp_path, capsys, entry["name"], "in.0 has dtype I32")


# --- module files outside the bundle folder -------------------------------------------------------------------

def _outside(folder: Path, entry: dict) -> Path:
    """A valid copy of the module's file next to the bundle folder (same bytes, so its sha256 still matches)."""
    copy = folder.parent / f"outside-{folder.name}.safetensors"
    shutil.copyfile(folder / entry["file"], copy)
    return copy


def _dotdot(folder: Path, entry: dict) -> None:
    entry["file"] = f"../{_outside(folder, entry).name}"


def _absolute(folder: Path, entry: dict) -> None:
    entry["file"] = str(_outside(folder, entry).resolve())


def _symlink(folder: Path, entry: dict) -> None:
    target = _outside(folder, entry)
    (folder / entry["file"]).unlink()
    os.symlink(target.resolve(), folder / entry["file"])


LEAKS = {"dotdot": (_dotdot, "leads outside the bundle folder"), "absolute": (_absolute, "is an absolute path"),
         "symlink": (_symlink, "leads outside the bundle folder")}


@pytest.mark.parametrize("which", ["ref", "got"])
@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_a_module_file_outside_the_bundle_folder_is_refused_naming_it(ref, tmp_path, capsys, which, leak):
    r, got, folder = _pair(ref, tmp_path, which)
    m = _manifest(folder)
    entry = _lora(m)
    spoil, needle = LEAKS[leak]
    spoil(folder, entry)
    _write_manifest(folder, m)
    _refused(["compare", str(r), str(got)], tmp_path, capsys, f"bundle {str(folder)!r}", entry["name"],
             repr(entry["file"]), needle)


def test_a_symlink_to_a_file_inside_the_folder_is_read(ref, tmp_path):
    got = _got(ref, tmp_path / "got")
    m = _manifest(got)
    entry = _lora(m)
    (got / "inner").mkdir()
    (got / entry["file"]).rename(got / "inner" / "x.safetensors")
    os.symlink(Path("inner") / "x.safetensors", got / entry["file"])
    assert main(["compare", str(ref), str(got), "--out", str(tmp_path / "o")]) == 0


# --- format versions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["ref", "got"])
@pytest.mark.parametrize("version", [4, 0, True, "2"])
def test_an_unknown_format_version_is_refused_naming_it(ref, tmp_path, capsys, which, version):
    r, got, folder = _pair(ref, tmp_path, which)
    m = _manifest(folder)
    m["version"] = version
    _write_manifest(folder, m)
    _refused(["compare", str(r), str(got)], tmp_path, capsys, f"bundle {str(folder)!r}",
             f"format version {version!r}", "this harness reads versions 1, 2, 3")


# --- compare speaks as itself ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", [["--provider", "triton"], ["--kernel", "torch"]])
def test_a_runtime_flag_with_an_output_bundle_is_refused(ref, tmp_path, capsys, flag):
    got = _got(ref, tmp_path / "got")
    _refused(["compare", str(ref), str(got), *flag], tmp_path, capsys, "mmlora compare REF GOT runs no runtime",
             "--provider / --kernel")


def test_compare_speaks_as_itself_times_itself_and_names_the_engine(ref, tmp_path, capsys):
    r = tmp_path / "ref"
    shutil.copytree(ref, r)
    m = _manifest(r)
    m["seconds"] = 10_000.0  # what the recording took is not what the comparison takes
    _write_manifest(r, m)
    named = _got(ref, tmp_path / "named", engine={"name": "some-engine", "version": "1.2.3"})
    plain = _got(ref, tmp_path / "plain")
    summaries = {}
    for name, argv in (("named", [str(named)]), ("plain", [str(plain)]), ("runtime", ["--mode", "e2e"])):
        capsys.readouterr()
        t0 = time.time()
        assert main(["compare", str(r), *argv, "--out", str(tmp_path / f"o-{name}")]) == 0
        wall = time.time() - t0
        err = capsys.readouterr().err
        assert "mmlora compare: every module within the rule" in err and "mmlora correctness" not in err, err
        s = summaries[name] = json.loads((tmp_path / f"o-{name}" / "summary.json").read_text())
        assert 0 < s["archs"][ARCH]["seconds"] <= wall
        assert "<h1>mmlora compare: " in (tmp_path / f"o-{name}" / "index.html").read_text()
    assert summaries["named"]["engine"] == "some-engine 1.2.3"
    assert summaries["plain"]["engine"] == f"output bundle {plain}"
    assert summaries["runtime"]["engine"] == "mmlora runtime, LoRA provider triton"
    # no provider ran for an output bundle; the runtime's stays in its options
    assert summaries["named"]["options"]["kernel"] is None and summaries["runtime"]["options"]["kernel"] == "triton"
    assert set(summaries["named"]) == set(summaries["plain"]) == set(summaries["runtime"])
    assert set(summaries["named"]["options"]) == set(summaries["runtime"]["options"])


@pytest.mark.parametrize("engine", ["vllm", {"version": "1"}, {"name": "x", "version": 2}])
def test_a_malformed_engine_entry_is_refused(ref, tmp_path, capsys, engine):
    got = _got(ref, tmp_path / "got", engine=engine)
    _refused(["compare", str(ref), str(got)], tmp_path, capsys, '"engine" is')


# --- an output bundle answering some groups only ("groups") ---------------------------------------------------

def _without_lm(ref: Path, folder: Path, **extra) -> Path:
    """An honest output bundle of the tower and connector only: every language-model module left out."""
    got = _got(ref, folder, **extra)
    m = _manifest(got)
    groups = {x["name"]: x["group"] for x in _manifest(ref)["modules"]}
    m["modules"] = [x for x in m["modules"] if groups[x["name"]] != "language_model"]
    _write_manifest(got, m)
    return got


def test_groups_judges_those_groups_and_says_loudly_which_were_not(ref, tmp_path, capsys):
    got = _without_lm(ref, tmp_path / "got", groups=["tower", "connector"])
    capsys.readouterr()
    assert main(["compare", str(ref), str(got), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "NOT JUDGED: group 'language_model'" in err, err
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    arch = s["archs"][ARCH]
    assert arch["groups_not_judged"] == ["language_model"]
    assert any("NOT JUDGED: group 'language_model'" in w for w in s["warnings"])
    assert "NOT JUDGED: group &#x27;language_model&#x27;" in (tmp_path / "o" / "index.html").read_text() \
        or "NOT JUDGED: group 'language_model'" in (tmp_path / "o" / "index.html").read_text()
    judged = {r.split(",")[_csv(tmp_path / "o")[0].split(",").index("group")] for r in _csv(tmp_path / "o")[1:]}
    assert judged == {"tower", "connector"}, judged
    # --strict turns the groups left out into exit 1, as any warning
    assert main(["compare", str(ref), str(got), "--strict", "--out", str(tmp_path / "s")]) == 1


def test_a_bundle_missing_a_language_model_module_without_groups_is_refused(ref, tmp_path, capsys):
    got = _without_lm(ref, tmp_path / "got")
    _refused(["compare", str(ref), str(got)], tmp_path, capsys, "lacks module", "language_model")


@pytest.mark.parametrize("groups", [["tower", "vision"], [], "tower"])
def test_groups_naming_an_unknown_group_is_refused(ref, tmp_path, capsys, groups):
    got = _without_lm(ref, tmp_path / "got", groups=groups)
    _refused(["compare", str(ref), str(got)], tmp_path, capsys, '"groups" is')


# --- an output bundle listing reference modules its engine's model does not have ("not_produced") --------------

def _last_tower_layer(ref: Path) -> list[str]:
    """The modules of the CLIP tower's last layer: LLaVA selects `vision_feature_layer` -2, so HF runs that layer
    and nothing reads its output (vLLM does not build it)."""
    tower = [x["name"] for x in _manifest(ref)["modules"] if x["group"] == "tower"]
    last = max(int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n in tower)
    return [n for n in tower if f".layers.{last}." in n]


def _not_built(ref: Path, folder: Path, left_out: list[str], listed: list[str] | None = None, **extra) -> Path:
    """An honest output bundle without the modules `left_out`, its manifest's "not_produced" `listed` (those
    left out when None)."""
    got = _got(ref, folder, not_produced=left_out if listed is None else listed, **extra)
    m = _manifest(got)
    m["modules"] = [x for x in m["modules"] if x["name"] not in left_out]
    _write_manifest(got, m)
    return got


def test_not_produced_modules_are_not_judged_and_said_loudly(ref, tmp_path, capsys):
    gone = _last_tower_layer(ref)
    assert len(gone) > 1, gone
    got = _not_built(ref, tmp_path / "got", gone)
    capsys.readouterr()
    assert main(["compare", str(ref), str(got), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    # one warning, on one line (printed where it is found and again with the run's warnings at the end, as any),
    # and the verdict line itself says it
    loud = {line.split("NOT JUDGED", 1)[1] for line in err.splitlines() if "WARNING" in line and "NOT JUDGED" in line}
    assert len(loud) == 1, err
    assert f"mmlora compare: every judged module within the rule; NOT JUDGED: {len(gone)} modules not produced" in err
    assert f"{len(gone)} reference modules" in next(iter(loud)) and repr(gone[0]) in next(iter(loud)), err
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["archs"][ARCH]["modules_not_produced"] == gone
    assert [w for w in s["warnings"] if "NOT JUDGED" in w] == [f"{ARCH}: NOT JUDGED{next(iter(loud))}"]
    html = (tmp_path / "o" / "index.html").read_text()
    assert all(f"<li>{n}</li>" in html for n in gone), "the report must name every module not produced"
    rows = _csv(tmp_path / "o")
    col = rows[0].split(",").index("module")
    judged = {r.split(",")[col] for r in rows[1:]}
    assert not judged & set(gone) and "@tower_out" in judged
    # --strict turns it into exit 1, as any warning; a bundle answering everything has an empty list
    assert main(["compare", str(ref), str(got), "--strict", "--out", str(tmp_path / "s")]) == 1
    assert main(["compare", str(ref), str(_got(ref, tmp_path / "all")), "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["archs"][ARCH]["modules_not_produced"] == []


def _lm_module(ref: Path) -> str:
    return next(x["name"] for x in _manifest(ref)["modules"] if x["group"] == "language_model"
                and not x["name"].startswith("@"))


# each: (modules left out, "not_produced", extra manifest keys) from the reference, and what the line must say
LISTS = {
    "still-present": (lambda r: [], lambda r: _last_tower_layer(r)[:1], {}, 'also in its "modules"'),
    "boundary": (lambda r: [], lambda r: ["@tower_out"], {}, "an @ boundary"),
    "unknown": (lambda r: [], lambda r: ["model.vision_tower.no_such_module"], {}, "not a module of the reference"),
    "group-not-answered": (lambda r: [], lambda r: [_lm_module(r)], {"groups": ["tower", "connector"]},
                           "which the bundle does not answer"),
    "twice": (_last_tower_layer, lambda r: _last_tower_layer(r)[:1] * 2, {}, '"not_produced" is'),
}


@pytest.mark.parametrize("case", sorted(LISTS))
def test_a_not_produced_list_naming_what_it_may_not_is_refused(ref, tmp_path, capsys, case):
    left_out, listed, extra, needle = LISTS[case]
    got = _not_built(ref, tmp_path / "got", left_out(ref), listed(ref), **extra)
    _refused(["compare", str(ref), str(got)], tmp_path, capsys, '"not_produced"', repr(listed(ref)[0]), needle)


@pytest.mark.parametrize("groups", [None, ["tower"]])
def test_a_module_left_out_without_the_boundaries_after_it_is_refused(ref, tmp_path, capsys, groups):
    """Without the key every boundary is required and the bundle drops the connector's two; with groups
    ["tower"] no boundary after the tower is judged at all."""
    gone = _last_tower_layer(ref)
    got = _not_built(ref, tmp_path / "got", gone, **({} if groups is None else {"groups": groups}))
    if groups is None:
        m = _manifest(got)
        m["modules"] = [x for x in m["modules"] if x["name"] not in ("@tower_out", "@lm_image_embeds")]
        _write_manifest(got, m)
    _refused(["compare", str(ref), str(got)], tmp_path, capsys, f"leaves out {gone[0]!r}", '"not_produced"',
             "must supply boundary '@tower_out'", *([] if groups is None else ["answer group 'connector'"]))


def test_not_produced_hides_no_failure_after_it(ref, tmp_path, capsys):
    gone = _last_tower_layer(ref)
    got = _not_built(ref, tmp_path / "got", gone)
    entry = next(x for x in _manifest(got)["modules"] if x["name"] == "@tower_out")
    t = load_file(str(got / entry["file"]))
    save_file({**t, "out.0": t["out.0"] * 1.5}, str(got / entry["file"]))
    assert main(["compare", str(ref), str(got), "--out", str(tmp_path / "o")]) == 1
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["archs"][ARCH]["first_divergence"]["e2e"]["module"] == "@tower_out"
    assert s["archs"][ARCH]["modules_not_produced"] == gone


# --- "not_produced" is checked against the reference's "unused_modules" ---------------------------------------

def test_record_lists_the_modules_whose_output_the_model_does_not_use(ref):
    """LLaVA reads the tower's hidden state vision_feature_layer (-2): its last layer runs for nothing."""
    assert _manifest(ref)["unused_modules"] == _last_tower_layer(ref)


def test_an_arch_with_no_unused_module_lists_none():
    from vlm.arch import get_arch

    arch = get_arch("qwen2_vl")
    assert arch.unused_modules(arch.tiny_config(), ["model.visual.blocks.0.attn.qkv"]) == []


def test_every_module_listed_as_not_produced_but_the_boundaries_is_refused(ref, tmp_path, capsys):
    """The review's bundle: every LoRA module "not produced", the boundaries kept; it passed with a warning."""
    lora = [x["name"] for x in _manifest(ref)["modules"] if not x["name"].startswith("@")]
    used = next(n for n in lora if n not in _manifest(ref)["unused_modules"])
    got = _not_built(ref, tmp_path / "got", lora)
    _refused(["compare", str(ref), str(got)], tmp_path, capsys, '"not_produced" lists', repr(used),
             "is used by the model: an engine must produce it")


def test_not_produced_against_a_reference_without_unused_modules_asks_to_re_record(ref, tmp_path, capsys):
    r = tmp_path / "ref"
    shutil.copytree(ref, r)
    m = _manifest(r)
    del m["unused_modules"]
    _write_manifest(r, m)
    _refused(["compare", str(r), str(_not_built(ref, tmp_path / "got", _last_tower_layer(ref)))], tmp_path, capsys,
             '"unused_modules"', "re-record")
    # with nothing listed, such a reference is read as before
    assert main(["compare", str(r), str(_got(ref, tmp_path / "all")), "--out", str(tmp_path / "a")]) == 0


# --- every reference module has a group ------------------------------------------------------------------------

@pytest.mark.parametrize("group", [None, "vision"])
def test_a_reference_module_without_a_known_group_is_refused(ref, tmp_path, capsys, group):
    """Its module would be left out of every judgement (a GOT without "groups" included), silently."""
    r = tmp_path / "ref"
    shutil.copytree(ref, r)
    m = _manifest(r)
    entry = _lora(m)
    if group is None:
        del entry["group"]
    else:
        entry["group"] = group
    _write_manifest(r, m)
    _refused(["compare", str(r), str(_got(ref, tmp_path / "got"))], tmp_path, capsys, repr(entry["name"]),
             f"has group {group!r}", "expected one of tower, connector, language_model")


# --- the verdict says what it did not judge --------------------------------------------------------------------

def test_the_verdict_line_says_what_was_not_judged(ref, tmp_path, capsys):
    gone = _last_tower_layer(ref)
    got = _not_built(ref, tmp_path / "got", gone, groups=["tower", "connector"])
    m = _manifest(got)
    groups = {x["name"]: x["group"] for x in _manifest(ref)["modules"]}
    m["modules"] = [x for x in m["modules"] if groups[x["name"]] != "language_model"]
    _write_manifest(got, m)
    capsys.readouterr()
    assert main(["compare", str(ref), str(got), "--out", str(tmp_path / "o")]) == 0
    words = (f"every judged module within the rule; NOT JUDGED: group language_model, {len(gone)} modules not "
             f"produced")
    err = capsys.readouterr().err
    assert f"mmlora compare: {words}; report in" in err and "every module within the rule" not in err, err
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["verdict"] == words and s["not_judged"] == f"group language_model, {len(gone)} modules not produced"
    html = (tmp_path / "o" / "index.html").read_text()
    assert f"&mdash; {words} (exit 0)</h1>" in html and "every module within its bound" not in html
    assert "every judged module within its bound (NOT JUDGED: group language_model" in html
    # a bundle answering everything keeps the plain words, with an empty "not_judged"
    assert main(["compare", str(ref), str(_got(ref, tmp_path / "all")), "--out", str(tmp_path / "a")]) == 0
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["verdict"] == "every module within the rule" and s["not_judged"] == ""


def test_groups_not_judged_lists_only_groups_the_reference_has(ref, tmp_path):
    """A reference with no tower module (here: its tower entries dropped) answered for connector and language
    model: no tower group was left out, so none is listed or said."""
    r = tmp_path / "ref"
    shutil.copytree(ref, r)
    m = _manifest(r)
    m["modules"] = [x for x in m["modules"] if x["group"] != "tower"]
    m["unused_modules"] = []
    _write_manifest(r, m)
    got = _got(ref, tmp_path / "got", groups=["connector", "language_model"])
    assert main(["compare", str(r), str(got), "--out", str(tmp_path / "o")]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["archs"][ARCH]["groups_not_judged"] == [] and s["not_judged"] == ""
    assert not [w for w in s["warnings"] if "NOT JUDGED" in w]
