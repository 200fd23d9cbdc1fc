"""Adapters as users have them: saved under transformers 4.x module names, they load through the model class's
own key conversion on both sides (the runtime's reader and the PEFT reference), every LoRA tensor applied.

The 4.x names are written down here, from the 4.x module layouts, not derived from the conversion they test:
LLaVA held the LM as `language_model.model.layers...` (LlamaForCausalLM), the tower as a CLIPVisionModel
(`vision_tower.vision_model.encoder...`) and the projector at the top; Qwen2-VL held the LM as `model.layers...`
and the tower as `visual.blocks...`.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

OLD_PREFIXES = {
    "llava": [("model.language_model.", "language_model.model."),
              ("model.vision_tower.", "vision_tower.vision_model."),
              ("model.multi_modal_projector.", "multi_modal_projector.")],
    "qwen2_vl": [("model.language_model.", "model."), ("model.visual.", "visual.")],
}


def old_name(arch: str, name: str) -> str:
    for new, old in OLD_PREFIXES[arch]:
        if name.startswith(new):
            return old + name[len(new):]
    raise AssertionError(f"no 4.x name for {name!r}")


def _old_key(arch: str, key: str) -> str:
    base = "base_model.model."
    assert key.startswith(base), key
    return base + old_name(arch, key[len(base):])


def save_old_names(arch_name: str, new_folder, folder):
    """The adapter PEFT saved, with every tensor key and the target regex under the 4.x names."""
    from safetensors.torch import load_file, save_file

    from vlm.arch import get_arch

    shutil.copytree(new_folder, folder)
    st = folder / "adapter_model.safetensors"
    save_file({_old_key(arch_name, k): v for k, v in load_file(str(st)).items()}, str(st), metadata={"format": "pt"})
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    regex = get_arch(arch_name).target_regex(["tower", "connector", "language_model"])
    for new, old in OLD_PREFIXES[arch_name]:
        regex = regex.replace(new.replace(".", r"\."), "\0" + old.replace(".", r"\."))
    cfg["target_modules"] = regex.replace("\0", "")
    cfg_path.write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def pair(request, tmp_path_factory):
    """(arch, model, new-name folder, 4.x-name folder) for one tiny model and one full adapter."""
    from reference.adapters import AdapterSpec, add_adapters, save_adapters
    from vlm.arch import get_arch
    from vlm.checkpoint import build_tiny

    arch = get_arch(request.param)
    root = tmp_path_factory.mktemp(request.param)
    spec = AdapterSpec("u", ("tower", "connector", "language_model"), rank=4, alpha=8, seed=5)
    new = save_adapters(add_adapters(build_tiny(arch)[1], arch, [spec]), root / "new")["u"]
    return request.param, build_tiny(arch)[1], new, save_old_names(request.param, new, root / "old")


def _same_file(a, b):
    assert list(a.modules) == list(b.modules)
    for m in a.modules:
        wa, wb = a.modules[m], b.modules[m]
        assert torch.equal(wa.A, wb.A) and torch.equal(wa.B, wb.B) and wa.scale == wb.scale, m


def test_old_names_read_as_the_model_names_them(pair):
    """The runtime's reader: the 4.x file reads as the same modules, tensors and scales as the 5.x file."""
    from safetensors.torch import load_file

    from vlm.adapter_files import read_adapter

    arch, model, new, old = pair
    held = {k for k in load_file(str(old / "adapter_model.safetensors"))}
    assert not any(k.startswith("base_model.model.model.language_model.") for k in held)  # really the old names
    a_old, a_new = read_adapter(old, model), read_adapter(new, model)
    _same_file(a_old, a_new)
    assert a_new.renamed == {}
    assert a_old.renamed == {m: old_name(arch, m) for m in a_new.modules}
    names = {n for n, _ in model.named_modules()}
    assert set(a_old.modules) <= names and len(a_old.modules) == len(held) // 2


LM_LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEAVES = {"llava": LM_LEAVES + ["out_proj", "fc1", "fc2", "linear_1", "linear_2"],
          "qwen2_vl": LM_LEAVES + ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "merger.mlp.0", "merger.mlp.2"]}


@pytest.mark.parametrize("targets", ["old regex", "leaf names"])
def test_reference_loads_every_tensor(pair, targets, tmp_path):
    """PEFT holds every module of the 4.x file, with the file's tensors (check_loaded inside load_adapters,
    and counted here): none dropped, which would make both sides skip it and agree. With leaf names as
    target_modules (users' usual form) PEFT 0.21 on its own injects every module but leaves LLaVA's projector
    at its zero-B init; with the 4.x regex it finds no module at all."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from reference.adapters import BASE_PREFIX, load_adapters
    from vlm.arch import get_arch
    from vlm.checkpoint import build_tiny

    arch, _, new, old = pair
    if targets == "leaf names":
        old = shutil.copytree(old, tmp_path / "leaves")
        cfg = json.loads((old / "adapter_config.json").read_text())
        (old / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": LEAVES[arch]}))
    pm = load_adapters(build_tiny(get_arch(arch))[1], {"u": old})
    held = load_file(str(new / "adapter_model.safetensors"))
    loaded = {n.removeprefix(BASE_PREFIX): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert len(loaded) == len(held) // 2
    for name, mod in loaded.items():
        assert torch.equal(mod.lora_A["u"].weight, held[f"{BASE_PREFIX}{name}.lora_A.weight"]), name
        assert torch.equal(mod.lora_B["u"].weight, held[f"{BASE_PREFIX}{name}.lora_B.weight"]), name


def test_check_loaded_names_a_tensor_peft_left_out(pair):
    """A LoRA module PEFT adapted but left at its init (B = 0: a tensor it did not load) is an error naming it."""
    from reference.adapters import check_loaded, load_adapters
    from vlm.adapter_files import read_adapter
    from vlm.arch import get_arch
    from vlm.checkpoint import build_tiny

    arch, model, new, old = pair
    pm = load_adapters(build_tiny(get_arch(arch))[1], {"u": old})
    adapter = read_adapter(old, model)
    module = sorted(adapter.modules)[-1]
    with torch.no_grad():
        pm.get_submodule(f"base_model.model.{module}").lora_B["u"].weight.zero_()
    with pytest.raises(ValueError, match=f"module '{module}'.* lora_B that is not the file's"):
        check_loaded(pm, "u", adapter)


def test_runtime_slots_equal_for_old_and_new_names(pair, tmp_path):
    from runtime.model import RuntimeModel
    from vlm.checkpoint import save_checkpoint

    _, model, new, old = pair
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    rt = RuntimeModel.from_checkpoint(ckpt, kernel="torch", max_slots=2, r_max=4)
    s_old, s_new = rt.load_adapter("old", old), rt.load_adapter("new", new)
    for m in rt.lora_names:
        assert torch.equal(rt.tables.A[m][s_old], rt.tables.A[m][s_new]), m
        assert torch.equal(rt.tables.B[m][s_old], rt.tables.B[m][s_new]), m
        assert rt.tables.B[m][s_old].any(), m  # every recipe module holds a non-zero LoRA


def test_unconvertible_old_name_refused(pair, tmp_path):
    """A name the model's conversion does not bring to a module of the model: one error naming it."""
    from safetensors.torch import load_file, save_file

    from reference.adapters import load_adapters
    from vlm.adapter_files import read_adapter

    arch, model, _, old = pair
    bad = shutil.copytree(old, tmp_path / "bad")
    st = bad / "adapter_model.safetensors"
    tensors = load_file(str(st))
    module = sorted(k for k in tensors if ".q_proj." in k)[0].removeprefix("base_model.model.").split(".lora_")[0]
    wrong = module.replace(".q_proj", ".qq_proj")
    for ab in ("A", "B"):
        tensors[f"base_model.model.{wrong}.lora_{ab}.weight"] = tensors.pop(f"base_model.model.{module}.lora_{ab}.weight")
    save_file(tensors, str(st))
    module = wrong
    for load in (lambda: read_adapter(bad, model), lambda: load_adapters(model, {"bad": bad})):
        with pytest.raises(ValueError) as e:
            load()
        assert repr(module) in str(e.value) and "does not have" in str(e.value)
        assert "\n" not in str(e.value)
