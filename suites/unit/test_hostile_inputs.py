"""The hostile-input catalog (docs/hostile-inputs.md lists the same ids; a test checks it). Every case: a clear
one-line error naming the bad value (exit 2 from the CLI, ValueError from the API), nothing half-written,
nothing unsafe executed. A few cases are hostile but legal and must simply work or be reported as such."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from harness.cli import main

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    id: str
    layer: str  # cli | reference | runtime | bench
    what: str
    run: Callable


def cli_refuses(tmp: Path, argv: list[str], needle: str) -> None:
    out = tmp / "out"
    if argv and argv[0] in ("correctness", "bench") and "--out" not in argv:
        argv = argv + ["--out", str(out)]
    import io
    from contextlib import redirect_stderr

    buf = io.StringIO()
    with redirect_stderr(buf):
        rc = main(argv)
    err = buf.getvalue().strip().splitlines()
    assert rc == 2, (rc, err)
    assert err, "no message"
    msg = err[-1]
    assert needle in msg, (needle, msg)
    assert not out.exists(), "a refused run left an output folder"
    assert not list(tmp.glob(".*partial*")), "a refused run left a partial folder"


def refused(argv: list[str], needle: str) -> Callable:
    """A case that is one refused command line."""
    return lambda saved, tmp: cli_refuses(tmp, argv, needle)


def api_refuses(fn: Callable, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert needle in msg, (needle, msg)


def _copy_ckpt(saved, tmp) -> Path:
    shutil.copytree(saved[0] / "ckpt", tmp / "ck")
    return tmp / "ck"


def _edit_weights(ckpt: Path, edit: Callable[[dict], dict]) -> None:
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    save_file(edit(load_file(str(f))), str(f), metadata={"format": "pt"})


def _copy_adapter(saved, tmp, name="lm") -> Path:
    shutil.copytree(saved[1][name], tmp / "ad")
    return tmp / "ad"


# ----------------------------------------------------------------------------- the cases
def c_unknown_arch(saved, tmp):
    cli_refuses(tmp, ["tokens", "--arch", "gpt9"], "'gpt9'")











def c_checkpoint_missing(saved, tmp):
    cli_refuses(tmp, ["correctness", "--model", str(tmp / "nowhere")], "nowhere")


def c_checkpoint_without_vision(saved, tmp):
    ck = _copy_ckpt(saved, tmp)
    raw = json.loads((ck / "config.json").read_text())
    del raw["vision_config"]
    (ck / "config.json").write_text(json.dumps(raw))
    cli_refuses(tmp, ["correctness", "--model", str(ck)], "no vision_config")


def c_checkpoint_missing_tensor(saved, tmp):
    ck = _copy_ckpt(saved, tmp)
    _edit_weights(ck, lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.fc1" not in k})
    cli_refuses(tmp, ["correctness", "--model", str(ck)], "layers.1.mlp.fc1")


def c_checkpoint_misshaped_tensor(saved, tmp):
    ck = _copy_ckpt(saved, tmp)
    key = "vision_model.model.layers.0.mlp.fc2.weight"

    def edit(sd):
        sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
        return sd
    _edit_weights(ck, edit)
    cli_refuses(tmp, ["correctness", "--model", str(ck)], "fc2")


def c_checkpoint_pickle_only(saved, tmp):
    ck = _copy_ckpt(saved, tmp)
    (ck / "model.safetensors").unlink()
    (ck / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    cli_refuses(tmp, ["correctness", "--model", str(ck)], "pytorch_model.bin")


def c_adapter_truncated(saved, tmp):
    ad = _copy_adapter(saved, tmp)
    f = ad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapter", f"x={ad}"], "not a valid safetensors")


def c_adapter_not_safetensors(saved, tmp):
    ad = _copy_adapter(saved, tmp)
    (ad / "adapter_model.safetensors").write_text("hello, I am text")
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapter", f"x={ad}"], "not a valid safetensors")


class _Boom:
    """Unpickling this would create a file: the proof that nothing unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def c_adapter_pickle(saved, tmp):
    ad = _copy_adapter(saved, tmp)
    canary = tmp / "unpickled"
    (ad / "adapter_model.safetensors").write_bytes(pickle.dumps(_Boom(canary)))
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapter", f"x={ad}"], "never unpickled")
    assert not canary.exists()


def c_adapter_absent_targets(saved, tmp):
    from safetensors.torch import load_file, save_file

    ad = _copy_adapter(saved, tmp)
    f = ad / "adapter_model.safetensors"
    save_file({k.replace("language_model.", "lang_model."): v for k, v in load_file(str(f)).items()}, str(f))
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapter", f"x={ad}"], "lang_model")


def c_adapter_rank_above_rmax(saved, tmp):
    from runtime.model import RuntimeModel

    rt = RuntimeModel.from_checkpoint(saved[0] / "ckpt", r_max=4)
    api_refuses(lambda: rt.load_adapter("all", saved[1]["all"]), "r_max=4")


def c_adapter_integer_dtype(saved, tmp):
    from safetensors.torch import load_file, save_file

    ad = _copy_adapter(saved, tmp)
    f = ad / "adapter_model.safetensors"
    save_file({k: (v * 100).to(torch.int32) for k, v in load_file(str(f)).items()}, str(f))
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapter", f"x={ad}"], "torch.int32")


def c_adapter_nan(saved, tmp):
    from safetensors.torch import load_file, save_file

    ad = _copy_adapter(saved, tmp)
    f = ad / "adapter_model.safetensors"
    sd = load_file(str(f))
    k = sorted(sd)[0]
    sd[k][0, 0] = float("nan")
    save_file(sd, str(f))
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapter", f"x={ad}"], "NaN")


def c_more_adapters_than_slots(saved, tmp):
    from runtime.model import RuntimeModel

    rt = RuntimeModel.from_checkpoint(saved[0] / "ckpt", max_slots=2)
    rt.load_adapter("all", saved[1]["all"])
    rt.load_adapter("lm", saved[1]["lm"])
    api_refuses(lambda: rt.load_adapter("tower", saved[1]["tower"]), "all 2 slots")


def c_images_differ_from_placeholders(saved, tmp):
    from vlm.arch import ImageGeometry, get_arch
    from vlm.checkpoint import build_tiny
    from vlm.requests import Request, build_batch, make_request

    arch = get_arch("llama4")
    cfg, _ = build_tiny(arch)
    req = make_request(arch, cfg, [ImageGeometry(tiles=1)], None)
    bad = Request(req.images * 2, req.prompt_ids, None)
    api_refuses(lambda: build_batch(arch, cfg, [bad]), "2 image(s)")


def c_empty_batch(saved, tmp):
    from vlm.arch import get_arch
    from vlm.checkpoint import build_tiny
    from vlm.requests import build_batch

    arch = get_arch("llama4")
    api_refuses(lambda: build_batch(arch, build_tiny(arch)[0], []), "empty batch")


def c_unknown_adapter_in_request(saved, tmp):
    from runtime.model import RuntimeModel
    from vlm.arch import get_arch
    from vlm.requests import make_request

    rt = RuntimeModel.from_checkpoint(saved[0] / "ckpt")
    arch = get_arch("llama4")
    req = make_request(arch, rt.config, [arch.default_geometry(rt.config)], "ghost")
    api_refuses(lambda: rt.run([req]), "'ghost'")


def c_every_request_without_adapter(saved, tmp):
    # hostile but legal: the runtime must equal the base model for every request
    out = tmp / "out"
    assert main(["correctness", "--arch", "llama4", "--adapters", "0", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] is True and all(r["adapter"] is None for r in s["archs"]["llama4"]["requests"])


def c_nan_in_weights(saved, tmp):
    # reported as non-finite in the layer table, never as a tolerance failure with NaN figures
    ck = _copy_ckpt(saved, tmp)

    def edit(sd):
        sd["vision_model.model.layers.0.mlp.fc2.weight"][0, 0] = float("nan")
        return sd
    _edit_weights(ck, edit)
    out = tmp / "out"
    assert main(["correctness", "--model", str(ck), "--mode", "e2e", "--out", str(out)]) == 1
    import pandas as pd

    df = pd.read_csv(out / "layers.csv")
    assert (df["status"] == "nonfinite").any()
    assert not (df["status"] == "mismatch").any()

    def strict(c):
        raise ValueError(f"summary.json holds {c}: not JSON")
    json.loads((out / "summary.json").read_text(), parse_constant=strict)


def c_nan_in_pixels(saved, tmp):
    # a NaN pixel poisons every row after attention: nonfinite rows, exit 1, no NaN "error figure"
    from harness.correctness import Options, run_arch
    from vlm.arch import get_arch

    arch = get_arch("llama4")
    cls = type(arch)
    original = cls.build_pixel_inputs

    def poisoned(self, config, geoms, generator):
        out = original(self, config, geoms, generator)
        out["pixel_values"][0, 0, 0, 0] = float("nan")
        return out

    cls.build_pixel_inputs = poisoned
    try:
        res = run_arch("llama4", Options(archs=["llama4"], modes=("e2e",)), tmp)
    finally:
        cls.build_pixel_inputs = original
    statuses = {r.metrics.status for r in res.rows if r.group == "tower"}
    assert res.summary["ok"] is False and "nonfinite" in statuses and "mismatch" not in statuses


def c_adapter_dora(saved, tmp):
    ad = _copy_adapter(saved, tmp)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapter", f"x={ad}"], "use_dora")


def c_adapter_extra_tensor(saved, tmp):
    from safetensors.torch import load_file, save_file

    ad = _copy_adapter(saved, tmp)
    f = ad / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    sd[key] = torch.ones(32)
    save_file(sd, str(f))
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapter", f"x={ad}"], "lora_magnitude_vector")


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text())), allow_nan=True))


def _adapter_config_edit(saved, tmp, edit, needle: str) -> None:
    tmp.mkdir(exist_ok=True)
    ad = _copy_adapter(saved, tmp)
    _edit_json(ad / "adapter_config.json", edit)
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapter", f"x={ad}"], needle)


def c_adapter_alpha_infinite(saved, tmp):
    # json writes Infinity, Python's json reads it back: once judged as a runtime divergence (exit 1)
    _adapter_config_edit(saved, tmp, lambda c: {**c, "lora_alpha": float("inf")}, "adapter_config.json': lora_alpha")


def c_adapter_bad_patterns(saved, tmp):
    bad = [({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern['q_proj']='big'"),
           ({"rank_pattern": {"(": 4}}, "rank_pattern key '('"),
           ({"rank_pattern": [4]}, "rank_pattern must be an object"),
           ({"target_modules": 7}, "target_modules=7")]
    for k, (change, needle) in enumerate(bad):
        _adapter_config_edit(saved, tmp / str(k), lambda c, change=change: {**c, **change}, needle)


def c_adapter_config_deep(saved, tmp):
    ad = _copy_adapter(saved, tmp)
    (ad / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapter", f"x={ad}"], "nested too deeply")


def c_checkpoint_config_nonfinite(saved, tmp):
    ck = _copy_ckpt(saved, tmp)
    _edit_json(ck / "config.json", lambda c: {**c, "text_config": {**c["text_config"], "rms_norm_eps": float("nan")}})
    cli_refuses(tmp, ["correctness", "--model", str(ck)], "text_config.rms_norm_eps is not a finite number")


def c_checkpoint_config_array(saved, tmp):
    ck = _copy_ckpt(saved, tmp)
    (ck / "config.json").write_text("[1, 2]")
    cli_refuses(tmp, ["correctness", "--model", str(ck)], "not an object of config keys")


def c_checkpoint_weights_empty(saved, tmp):
    ck = _copy_ckpt(saved, tmp)
    (ck / "model.safetensors").write_bytes(b"")
    cli_refuses(tmp, ["correctness", "--model", str(ck)], "model.safetensors")


def c_checkpoint_weights_truncated(saved, tmp):
    ck = _copy_ckpt(saved, tmp)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cli_refuses(tmp, ["correctness", "--model", str(ck)], "model.safetensors' is not a valid safetensors")


def c_adapter_name_twice(saved, tmp):
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapter", f"x={saved[1]['lm']}",
                      "--adapter", f"x={saved[1]['all']}"], "'x'")


def c_adapter_name_reserved(saved, tmp):
    # (`--adapter=-=DIR`: argparse reads a lone `-=DIR` as an option)
    cli_refuses(tmp, ["correctness", "--arch", "llama4", f"--adapter=-={saved[1]['lm']}"], "'-'")


def c_out_holds_other_files(saved, tmp):
    mine = tmp / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--out", str(mine)], "not a report of mmlora")
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "sub").is_dir()


def c_fault_mode_not_run(saved, tmp):
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--mode", "replay", "--inject-fault",
                      "pixel-shuffle-transposed"], "e2e")


def c_upstream_crash(saved, tmp):
    # an exception from transformers / PEFT mid-run is one line and exit 2, never exit 1 ("divergence")
    import harness.correctness.engine as corr

    original = corr.run_reference

    def boom(*a, **k):
        raise AttributeError("'tuple' object has no attribute 'dtype'")

    corr.run_reference = boom
    try:
        cli_refuses(tmp, ["correctness", "--arch", "llama4"], "AttributeError")
    finally:
        corr.run_reference = original


def c_cuda_without_cuda(saved, tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--device", "cuda"], "CUDA is not available")





def c_vllm_not_installed(saved, tmp):
    # vLLM hidden (sys.modules entry None: `import vllm` raises ImportError(name="vllm")), as where it is absent
    import sys

    from runtime import vllm_lora

    held = sys.modules.get("vllm", "absent")
    sys.modules["vllm"] = None
    vllm_lora.load.cache_clear()
    try:
        cli_refuses(tmp, ["correctness", "--arch", "llava", "--kernel", "vllm", "--dtype", "fp16", "--mode", "replay"],
                    "vLLM is not installed; install vLLM's kernels with `nox -s vllm_kernels`")
    finally:
        if held == "absent":
            del sys.modules["vllm"]
        else:
            sys.modules["vllm"] = held
        vllm_lora.load.cache_clear()


def c_output_not_writable(saved, tmp):
    blocker = tmp / "a_file"
    blocker.write_text("x")
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--out", str(blocker / "sub")], "a_file")


def c_html_in_strings(saved, tmp):
    out = tmp / "out"
    evil = "<script>alert(1)</script>"
    assert main(["correctness", "--arch", "llama4", "--adapter", f"{evil}={saved[1]['all']}", "--mode", "e2e",
                 "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert evil not in page and "&lt;script&gt;" in page



def c_gpu_preset_without_cuda(saved, tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cli_refuses(tmp, ["bench", "--preset", "nightly"], "nightly")


def c_baseline_with_other_columns(saved, tmp):
    base = tmp / "base.csv"
    base.write_text("foo,bar\n1,2\n")
    cli_refuses(tmp, ["bench", "--preset", "smoke", "--baseline", str(base)], "base.csv")


def _user_folder(tmp: Path) -> tuple[Path, dict[str, str]]:
    """A folder of the user's own files, one of them a summary.json of their own; returns the files' texts."""
    mine = tmp / "mine"
    (mine / "data").mkdir(parents=True)
    files = {"summary.json": '{"mine": true}', "notes.txt": "keep me", "data/table.csv": "a,b\n1,2\n"}
    for name, text in files.items():
        (mine / name).write_text(text)
    return mine, files


def _intact(folder: Path, files: dict[str, str]) -> None:
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == set(files)
    for name, text in files.items():
        assert (folder / name).read_text() == text, name


def c_out_holds_user_summary(saved, tmp):
    # a summary.json was taken for an earlier report: the run went ahead and deleted notes.txt and data/
    mine, files = _user_folder(tmp)
    for argv in (["correctness", "--arch", "llama4", "--mode", "e2e", "--overwrite"],
                 ["faults", "--power", "--arch", "llama4", "--fault", "slot-shift", "--dtype", "fp32"],
                 ["bench", "--preset", "smoke"], ["bench-merge", str(tmp / "run")]):
        cli_refuses(tmp, argv + ["--out", str(mine)], "not a report of mmlora")
        _intact(mine, files)


def _earlier_report(tmp: Path, kind: str) -> Path:
    from harness.output import MARKER

    rep = tmp / f"earlier-{kind}"
    rep.mkdir()
    (rep / MARKER).write_text(kind + "\n")
    (rep / "summary.json").write_text('{"ok": true}')
    return rep


def c_out_earlier_report_needs_overwrite(saved, tmp):
    rep = _earlier_report(tmp, "correctness")
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--out", str(rep)], "pass --overwrite")
    assert (rep / "summary.json").read_text() == '{"ok": true}'


def c_out_report_of_another_kind(saved, tmp):
    # bench-merge and bench replaced (or wrote into) a correctness report; --overwrite does not change that
    rep = _earlier_report(tmp, "correctness")
    for argv in (["bench-merge", str(tmp / "run"), "--overwrite"], ["bench", "--preset", "smoke"],
                 ["record", "--arch", "llama4", "--overwrite"], ["compare", str(tmp / "bundle"), "--overwrite"]):
        cli_refuses(tmp, argv + ["--out", str(rep)], "holds a correctness report")
    assert sorted(p.name for p in rep.iterdir()) == [".mmlora-report", "summary.json"]


def c_float_flag_not_finite(saved, tmp):
    # --adapter-scale inf failed after the work naming a temporary file; --warmup-ms inf never ended;
    # --rep-ms nan exited 0; faults --power --adapter-scale inf wrote a table of HARNESS ERROR rows
    for argv, flag in ((["correctness", "--arch", "llama4", "--adapter-scale", "inf"], "--adapter-scale"),
                       (["record", "--arch", "llama4", "--adapter-scale", "nan", "--out", str(tmp / "b")],
                        "--adapter-scale"),
                       (["bench", "--preset", "smoke", "--warmup-ms", "inf"], "--warmup-ms"),
                       (["bench", "--preset", "smoke", "--rep-ms", "nan"], "--rep-ms"),
                       (["bench", "--preset", "smoke", "--rep-ms", "1e999"], "--rep-ms"),
                       (["faults", "--power", "--arch", "llama4", "--adapter-scale", "0.1,inf", "--out",
                         str(tmp / "out")], "--adapter-scale")):
        cli_refuses(tmp, argv, flag)


def c_too_many_adapters(saved, tmp):
    from harness.correctness.cli import MAX_ADAPTERS

    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--adapters", str(MAX_ADAPTERS + 1)],
                f"between 0 and {MAX_ADAPTERS}")


def c_device_map_unknown_module(saved, tmp):
    dm = tmp / "map.json"
    dm.write_text(json.dumps({"vision_model": "cpu", "language_modle": "cpu"}))
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--device-map", str(dm)],
                "'language_modle' is no module of llama4; did you mean 'language_model'?")


def c_device_map_absent_gpu(saved, tmp):
    # {"": 7} reached accelerate, which failed with an error of its own after the model was built
    dm = tmp / "map.json"
    dm.write_text(json.dumps({"": 7}))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n > 7:
        pytest.skip("this machine has a GPU 7")
    cli_refuses(tmp, ["correctness", "--arch", "llama4", "--device-map", str(dm)], f"{str(dm)!r}: '' -> 7: this machine has")


CATALOG = [
    Case("unknown-arch", "cli", "--arch names no registered architecture", c_unknown_arch),
    Case("set-missing-key", "cli", "--set on a key the config lacks",
         refused(["tokens", "--arch", "llama4", "--set", "vision_config.nokey=1"], "nokey")),
    Case("set-wrong-type", "cli", "--set with a value of the wrong type",
         refused(["tokens", "--arch", "llama4", "--set", "vision_config.image_size=big"], "big")),
    Case("set-malformed", "cli", "--set without '='",
         refused(["tokens", "--arch", "llama4", "--set", "vision_config.image_size"], "dotted.key=value")),
    Case("odd-grid-before-shuffle", "cli", "patch grid that a pixel shuffle cannot split",
         refused(["tokens", "--arch", "llama4", "--set", "vision_config.image_size=42"], "42")),
    Case("grid-not-divisible-by-merge", "cli", "qwen grid h/w not divisible by the merge size",
         refused(["tokens", "--arch", "qwen2_vl", "--grid", "1,3,6"], "3")),
    Case("patches-over-soft-token-budget", "cli", "gemma4 patch grid pooling to more soft tokens than the budget",
         refused(["tokens", "--arch", "gemma4", "--patches", "12x12"], "12x12")),
    Case("malformed-geometry-flag", "cli", "--grid with two numbers",
         refused(["tokens", "--arch", "qwen2_vl", "--grid", "1,2"], "'1,2'")),
    Case("geometry-of-another-family", "cli", "--grid given to a tiled tower",
         refused(["tokens", "--arch", "llama4", "--grid", "1,2,2"], "grid=(1, 2, 2)")),
    Case("checkpoint-missing", "reference", "--model folder that does not exist", c_checkpoint_missing),
    Case("checkpoint-without-vision", "reference", "config.json without a vision part", c_checkpoint_without_vision),
    Case("checkpoint-missing-tensor", "reference", "weights missing a tensor", c_checkpoint_missing_tensor),
    Case("checkpoint-misshaped-tensor", "reference", "weights with a mis-shaped tensor", c_checkpoint_misshaped_tensor),
    Case("checkpoint-pickle-only", "reference", "weights only as pytorch_model.bin (pickle)", c_checkpoint_pickle_only),
    Case("adapter-truncated", "reference", "adapter_model.safetensors cut short", c_adapter_truncated),
    Case("adapter-not-safetensors", "reference", "adapter file that is not safetensors", c_adapter_not_safetensors),
    Case("adapter-pickle", "reference", "a pickle posing as the adapter: refused, never unpickled", c_adapter_pickle),
    Case("adapter-absent-targets", "reference", "adapter targeting modules the model lacks", c_adapter_absent_targets),
    Case("adapter-rank-above-rmax", "runtime", "adapter rank above the runtime's r_max", c_adapter_rank_above_rmax),
    Case("adapter-integer-dtype", "reference", "adapter tensors of an integer dtype", c_adapter_integer_dtype),
    Case("adapter-nan", "reference", "adapter tensors holding NaN", c_adapter_nan),
    Case("more-adapters-than-slots", "runtime", "loading more adapters than slots", c_more_adapters_than_slots),
    Case("images-differ-from-placeholders", "reference", "image count != placeholder count",
         c_images_differ_from_placeholders),
    Case("empty-batch", "reference", "a batch with no request", c_empty_batch),
    Case("unknown-adapter-in-request", "runtime", "a request naming an adapter never loaded",
         c_unknown_adapter_in_request),
    Case("every-request-without-adapter", "cli", "legal: no request has an adapter (exit 0)",
         c_every_request_without_adapter),
    Case("nan-in-weights", "cli", "NaN in checkpoint weights: reported as nonfinite (exit 1)", c_nan_in_weights),
    Case("nan-in-pixels", "reference", "NaN in pixel values: reported as nonfinite", c_nan_in_pixels),
    Case("adapter-dora", "reference", "a DoRA adapter (use_dora): refused, not run as plain LoRA", c_adapter_dora),
    Case("adapter-extra-tensor", "reference", "an adapter tensor that is no lora_A/lora_B weight", c_adapter_extra_tensor),
    Case("adapter-alpha-infinite", "reference", "lora_alpha Infinity in adapter_config.json: refused before work",
         c_adapter_alpha_infinite),
    Case("adapter-bad-patterns", "reference", "alpha_pattern / rank_pattern / target_modules of a wrong type or bad regex",
         c_adapter_bad_patterns),
    Case("adapter-config-deep", "reference", "adapter_config.json a 100,000-deep JSON array", c_adapter_config_deep),
    Case("checkpoint-config-nonfinite", "reference", "NaN in a float field of config.json", c_checkpoint_config_nonfinite),
    Case("checkpoint-config-array", "reference", "config.json a JSON array", c_checkpoint_config_array),
    Case("checkpoint-weights-empty", "reference", "0-byte model.safetensors", c_checkpoint_weights_empty),
    Case("checkpoint-weights-truncated", "reference", "model.safetensors cut in half", c_checkpoint_weights_truncated),
    Case("set-zero-size", "cli", "--set a size to 0 (vision_config.patch_size=0)",
         refused(["tokens", "--arch", "llama4", "--set", "vision_config.patch_size=0"], "patch_size=0")),
    Case("adapter-name-twice", "cli", "--adapter x=A --adapter x=B: refused, not B alone", c_adapter_name_twice),
    Case("adapter-name-reserved", "cli", "--adapter -=A ('-' means no adapter in layers.csv)", c_adapter_name_reserved),
    Case("out-holds-other-files", "cli", "--out a folder holding other files: refused, files kept",
         c_out_holds_other_files),
    Case("fault-mode-not-run", "cli", "--inject-fault localised in a mode --mode leaves out", c_fault_mode_not_run),
    Case("upstream-crash", "cli", "an exception inside transformers / PEFT: one line, exit 2", c_upstream_crash),
    Case("cuda-without-cuda", "cli", "--device cuda on a machine without CUDA", c_cuda_without_cuda),
    Case("unknown-dtype", "cli", "--dtype not fp32/fp16/bf16",
         refused(["correctness", "--arch", "llama4", "--dtype", "fp8"], "'fp8'")),
    Case("negative-adapter-count", "cli", "--adapters -1",
         refused(["correctness", "--arch", "llama4", "--adapters", "-1"], "-1")),
    Case("unknown-fault", "cli", "--inject-fault not in the catalog",
         refused(["correctness", "--arch", "llama4", "--inject-fault", "gremlins"], "'gremlins'")),
    Case("kernel-vllm-not-installed", "cli", "--kernel vllm where vLLM is not installed",
         c_vllm_not_installed),
    Case("kernel-vllm-fp32", "cli", "--kernel vllm --dtype fp32 (vLLM's shrink takes fp16 / bf16 only)",
         refused(["correctness", "--arch", "llava", "--kernel", "vllm", "--dtype", "fp32"], "dtype float32")),
    Case("unknown-device-map", "cli", "--device-map neither auto, balanced nor a file",
         refused(["correctness", "--arch", "llava", "--device-map", "sequentially"], "'sequentially'")),
    Case("device-map-not-json", "cli", "--device-map FILE that is not a JSON object of module -> device",
         refused(["correctness", "--arch", "llava", "--device-map", __file__], "not a JSON file")),
    Case("bad-max-memory", "cli", "--max-memory not DEVICE=SIZE[,...]",
         refused(["correctness", "--arch", "llava", "--max-memory", "0=lots"], "'0=lots'")),
    Case("output-not-writable", "cli", "--out below a file", c_output_not_writable),
    Case("html-in-strings", "cli", "adapter name holding HTML: escaped in the report (exit 0)", c_html_in_strings),
    Case("unknown-gpu-profile", "bench", "--gpu names no profile",
         refused(["bench", "--gpu", "tpu9", "--preset", "smoke"], "tpu9")),
    Case("gpu-preset-without-cuda", "bench", "--preset nightly on a CPU machine", c_gpu_preset_without_cuda),
    Case("baseline-with-other-columns", "bench", "--baseline CSV with foreign columns", c_baseline_with_other_columns),
    Case("out-holds-user-summary", "cli", "--out a folder of user files with a summary.json of their own: refused by "
         "every writing command, every file kept", c_out_holds_user_summary),
    Case("out-earlier-report-needs-overwrite", "cli", "--out an earlier report of the command: refused without "
         "--overwrite", c_out_earlier_report_needs_overwrite),
    Case("out-report-of-another-kind", "cli", "--out a report of another command: refused even with --overwrite",
         c_out_report_of_another_kind),
    Case("float-flag-not-finite", "cli", "nan / inf / 1e999 to a float flag: refused before any work, naming the flag",
         c_float_flag_not_finite),
    Case("too-many-adapters", "cli", "--adapters above the stated limit", c_too_many_adapters),
    Case("device-map-unknown-module", "cli", "--device-map FILE naming no module of the model: the nearest suggested",
         c_device_map_unknown_module),
    Case("device-map-absent-gpu", "cli", "--device-map FILE placing a module on a GPU this machine lacks",
         c_device_map_absent_gpu),
]


@pytest.mark.parametrize("case", CATALOG, ids=[c.id for c in CATALOG])
def test_hostile_input(case, saved, tmp_path):
    case.run(saved, tmp_path)


def test_catalog_has_at_least_25_cases():
    assert len(CATALOG) >= 25 and len({c.id for c in CATALOG}) == len(CATALOG)


def test_docs_catalog_matches_the_suite():
    text = (ROOT / "docs" / "hostile-inputs.md").read_text()
    block = text.split("<!-- hostile-inputs:begin -->", 1)[1].split("<!-- hostile-inputs:end -->", 1)[0]
    ids = re.findall(r"^\| `([a-z0-9-]+)` \|", block, flags=re.M)
    assert ids == [c.id for c in CATALOG]


def test_no_unsafe_loading_in_the_source():
    offenders = []
    for folder in ("vlm", "harness", "runtime", "reference"):
        for f in (ROOT / folder).rglob("*.py"):
            src = f.read_text()
            for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
                if "weights_only=True" not in m.group(1):
                    offenders.append(f"{f}: torch.load without weights_only=True")
            if re.search(r"pickle\.loads?\(", src):
                offenders.append(f"{f}: pickle.load")
            if re.search(r"trust_remote_code\s*=\s*True", src):
                offenders.append(f"{f}: trust_remote_code=True")
    assert not offenders, offenders
