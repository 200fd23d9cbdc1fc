"""`mmlora audit-vllm` (harness/audit_vllm.py): vLLM's own tower/connector LoRA count helpers, called on minimal
instances, against the registry's measured rows. Needs vLLM's model modules (`nox -s vllm_towers`); skipped
otherwise with the reason, except the exit-2 path, which is what a machine without them sees."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest

from harness import audit_vllm
from harness.cli import main
from harness.geometry_flags import geometry_text

vllm_towers = pytest.mark.vllm_towers


def _audit_or_skip():
    try:
        audit_vllm.import_vllm()
    except audit_vllm.VllmMissing as e:
        if os.environ.get("MMLORA_REQUIRE_VLLM") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    return audit_vllm


def _row(model_type: str) -> audit_vllm.AuditRow:
    _, rows = audit_vllm.run_audit([model_type])
    return rows[0]


@vllm_towers
def test_audit_covers_at_least_six_archs():
    audit = _audit_or_skip()
    version, rows = audit.run_audit()
    audited = [r.model_type for r in rows if not r.note and r.tried > 0]
    assert len(audited) >= 6, audit.markdown(version, rows)
    table = audit.markdown(version, rows)
    assert all(f"| {r.model_type} |" in table for r in rows)


@vllm_towers
def test_a_helper_that_forgets_cls_is_reported(monkeypatch):
    # Llama 4 runs CLS + patches per tile through its tower: a helper counting patches alone is one row short
    # per tile, at the first geometry tried
    _audit_or_skip()
    from vllm.model_executor.models.mllama4 import Llama4ForConditionalGeneration

    from vlm.arch import get_arch

    def no_cls(self, *, modality, mm_kwargs, num_mm_embeds):
        vc = self.config.vision_config
        per_tile = (vc.image_size // vc.patch_size) ** 2
        chunks = num_mm_embeds // (per_tile * vc.pixel_shuffle_ratio ** 2)
        return int(chunks * per_tile), int(num_mm_embeds)

    monkeypatch.setattr(Llama4ForConditionalGeneration, "get_mm_lora_token_counts", no_cls)
    row = _row("llama4")
    arch = get_arch("llama4")
    cfg = arch.tiny_config()
    geom = arch.mixed_geometries(cfg)[0]
    want = arch.counts(cfg, geom)
    d = row.disagreements["tower"]
    assert (d["config"], d["geometry"]) == ("tiny", geometry_text(geom)), row.result
    assert d["vllm"] == want.encoder_rows - geom.tiles and d["measured"] == want.encoder_rows
    assert "connector" not in row.disagreements, row.result
    assert "next image's adapter" in row.run_time and "get no LoRA" in row.run_time


@vllm_towers
def test_a_none_connector_count_is_reported(monkeypatch):
    _audit_or_skip()
    from vllm.model_executor.models.paligemma import PaliGemmaForConditionalGeneration

    # connector None: the runner sets no connector mapping at all
    monkeypatch.setattr(PaliGemmaForConditionalGeneration, "get_mm_lora_token_counts",
                        lambda self, *, modality, mm_kwargs, num_mm_embeds: (num_mm_embeds, None))
    row = _row("paligemma")
    assert row.disagreements["connector"]["vllm"] is None and "sets no connector mapping" in row.run_time


@vllm_towers
def test_a_floor_instead_of_ceil_pooling_count_is_reported(monkeypatch):
    # Gemma 4 pools partial k x k bins (ceil): a floor in the connector count drops the partial bins' rows
    _audit_or_skip()
    from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration

    from vlm.arch import get_arch

    arch = get_arch("gemma4")
    original = Gemma4ForConditionalGeneration.get_mm_lora_token_counts

    def floor(self, *, modality, mm_kwargs, num_mm_embeds):
        tower, _ = original(self, modality=modality, mm_kwargs=mm_kwargs, num_mm_embeds=num_mm_embeds)
        hp, wp = current["geom"].patches
        k = self.config.vision_config.pooling_kernel_size
        return tower, (hp // k) * (wp // k)

    current = {}
    real_counts = type(arch).counts

    def spy(self, config, geom):  # the helper gets no geometry: the audit's current one, for the floor above
        current["geom"] = geom
        return real_counts(self, config, geom)

    monkeypatch.setattr(type(arch), "counts", spy)
    monkeypatch.setattr(Gemma4ForConditionalGeneration, "get_mm_lora_token_counts", floor)
    row = _row("gemma4")
    cfg = arch.tiny_config()
    k = cfg.vision_config.pooling_kernel_size
    first_partial = next(g for g in arch.mixed_geometries(cfg) if arch.counts(cfg, g).connector_rows
                         != (g.patches[0] // k) * (g.patches[1] // k))
    d = row.disagreements["connector"]
    assert d["geometry"] == geometry_text(first_partial) and d["vllm"] < d["measured"], row.result
    assert "tower" not in row.disagreements, row.result


def test_cli_exits_2_naming_the_session_without_vllm(monkeypatch):
    def missing():
        raise audit_vllm.VllmMissing("vLLM's model modules do not import: ModuleNotFoundError: No module named "
                                     f"'vllm'; install them with {audit_vllm.NOX_SESSION}")

    monkeypatch.setattr(audit_vllm, "import_vllm", missing)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["audit-vllm"])
    assert rc == 2 and out.getvalue() == ""
    assert len(err.getvalue().strip().splitlines()) == 1 and "nox -s vllm_towers" in err.getvalue()
