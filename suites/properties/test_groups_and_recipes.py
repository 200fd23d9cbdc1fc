"""group_of is longest-prefix (checked against a brute-force scan) and each LoRA recipe, applied by the
real PEFT, wraps at least one Linear of its group and nothing outside it."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from suites.properties.measure import tiny_model
from vlm.arch import GROUPS, all_archs, get_arch

ARCHS = [a.model_type for a in all_archs()]
_suffix = st.text(alphabet="abcdefghij0123456789._", min_size=0, max_size=12)


def _brute_group(arch, name):
    hits = [(len(p), g) for g, ps in arch.prefixes().items() for p in ps
            if name.startswith(p) if p.endswith(".") or name == p or name.startswith(p + ".")]
    return max(hits)[1] if hits else None


@pytest.mark.parametrize("model_type", ARCHS)
@given(data=st.data())
def test_group_of_is_longest_prefix(model_type, data):
    arch = get_arch(model_type)
    all_prefixes = [p for ps in arch.prefixes().values() for p in ps]
    prefix = data.draw(st.sampled_from(all_prefixes))
    name = prefix + data.draw(_suffix) if prefix.endswith(".") else prefix + "." + data.draw(_suffix)
    assert arch.group_of(name) == _brute_group(arch, name)


@pytest.mark.parametrize("model_type", ARCHS)
@given(name=st.text(alphabet="abcxyz_.0123456789", min_size=1, max_size=20))
def test_name_in_no_group_raises(model_type, name):
    arch = get_arch(model_type)
    if _brute_group(arch, name) is None:
        with pytest.raises(ValueError, match="matches no group"):
            arch.group_of(name)
    else:
        assert arch.group_of(name) == _brute_group(arch, name)


@pytest.mark.parametrize("model_type", ARCHS)
def test_every_module_of_the_model_has_a_group(model_type):
    """Groups cover the whole model except top-level glue (lm_head etc. may be LM or unmatched)."""
    arch = get_arch(model_type)
    _, model = tiny_model(model_type, "{}")
    linear_groups = {arch.group_or_none(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"tower", "language_model"} <= linear_groups


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("group", GROUPS)
def test_recipe_wraps_only_its_group(model_type, group):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    arch = get_arch(model_type)
    _, model = tiny_model(model_type, "{}")
    linears = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and arch.group_or_none(n) == group]
    if arch.lora_targets.get(group) is None:
        # an honest "no target": the group really has no Linear, and the reason is written down
        assert arch.no_lora_reason.get(group), f"{model_type}/{group}: no recipe and no reason"
        assert not linears, f"{model_type}/{group} has Linear layers {linears[:3]} but no recipe"
        return
    peft_model = get_peft_model(copy.deepcopy(model),
                                LoraConfig(r=2, lora_alpha=4, target_modules=arch.target_regex([group])))
    wrapped = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if isinstance(m, LoraLayer)]
    assert wrapped, f"{model_type}: recipe for {group} wraps nothing"
    outside = [n for n in wrapped if arch.group_of(n) != group]
    assert not outside, f"{model_type}: recipe for {group} wraps {outside[:3]} outside the group"
    for n in wrapped:
        base = peft_model.get_submodule("base_model.model." + n).get_base_layer()
        assert isinstance(base, torch.nn.Linear), (n, type(base))
    # a recipe never aims at a module its arch refuses (the LLaMA-Factory "forbidden modules" rule)
    arch.check_targets(model.config, wrapped, f"{model_type} recipe for {group}")


def test_forbidden_target_is_refused_and_unused_layer_flagged():
    """Llama 4's MoE router is refused by name and reason; LLaVA's layers after vision_feature_layer=-2 run
    with no effect downstream, so targeting them is flagged, not refused."""
    llama4 = get_arch("llama4")
    with pytest.raises(ValueError, match=r"feed_forward\.router.*forbids: the MoE router"):
        llama4.check_targets(llama4.tiny_config(), ["language_model.model.layers.1.feed_forward.router"], "a")
    llava = get_arch("llava")
    cfg = llava.tiny_config()
    last = cfg.vision_config.num_hidden_layers - 1
    notes = llava.check_targets(cfg, [f"model.vision_tower.encoder.layers.{last}.mlp.fc1",
                                      "model.vision_tower.encoder.layers.0.mlp.fc1"], "a")
    assert len(notes) == 1 and f"layers.{last}.mlp.fc1" in notes[0] and "unused" in notes[0]
    cfg.vision_feature_layer = -1  # every layer's output used: nothing to flag
    assert llava.check_targets(cfg, [f"model.vision_tower.encoder.layers.{last}.mlp.fc1"], "a") == []
