"""The acceptance of issue 14 item 5: `mmlora correctness --arch llava --adapter` runs an adapter saved under
transformers 4.x module names (suites/unit/test_adapter_key_conversion.py checks each side's loading)."""

from __future__ import annotations

import csv

from harness.cli import main
from suites.unit.test_adapter_key_conversion import save_old_names
from vlm.adapter_files import read_adapter


def test_cli_runs_a_4x_llava_adapter(tmp_path):
    """The acceptance: `mmlora correctness --arch llava --adapter` on an adapter with 4.x names exits 0, and
    every module of the file changes the truth's output (PEFT applied it) in the adapter's requests."""
    from reference.adapters import AdapterSpec, add_adapters, save_adapters
    from vlm.arch import get_arch
    from vlm.checkpoint import build_tiny

    arch = get_arch("llava")
    spec = AdapterSpec("u", ("tower", "connector", "language_model"), rank=4, alpha=8, seed=5)
    new = save_adapters(add_adapters(build_tiny(arch)[1], arch, [spec]), tmp_path / "new")["u"]
    old = save_old_names("llava", new, tmp_path / "old")
    out = tmp_path / "r"
    assert main(["correctness", "--arch", "llava", "--adapter", f"u={old}", "--mode", "e2e", "--out", str(out)]) == 0
    with open(out / "layers.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["adapter"] == "u" and r["kind"] == "lora"]
    modules = set(read_adapter(new).modules)
    applied = {r["module"] for r in rows if float(r["delta_scale"]) > 0}
    assert applied == modules and all(r["ok"] == "True" for r in rows)
