"""vLLM's own LoRA kernels as the runtime's provider (`mmlora correctness --kernel vllm --dtype fp16`), judged by
the same engine and tolerance rules as the project's kernels, on two archs that stress different paths: Llama 4
(tiled tower with CLS rows, pixel-shuffle connector inside the tower prefix, MoE shared expert in the LM) and
Qwen2-VL (packed q/k/v as one `qkv` Linear, packed images, merger inside the tower). Mixed adapters with -1
rows (no-adapter and text-only requests), both modes. fp16 on CPU: vLLM's shrink refuses fp32 and the Triton
interpreter's bf16 dot is wrong. A vLLM release that changes the kernels' API or numbers fails here (the
`vllm_kernels` nox session requires vLLM, so these never skip in CI)."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from suites.helpers import need_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.mark.parametrize("arch", ["llama4", "qwen2_vl"])
def test_vllm_kernels_within_tolerance_of_peft(arch, tmp_path, capsys):
    need_vllm()
    out = tmp_path / "out"
    rc = main(["correctness", "--arch", arch, "--kernel", "vllm", "--dtype", "fp16", "--mode", "both",
               "--out", str(out)])
    err = capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    worst = summary["archs"][arch]["worst_margin"]  # figures only; the verdict is the exit code
    with capsys.disabled():  # the figures land in CI's log, beside the test's name
        print(f"\n  vllm fp16 {arch}: worst margin (error / bound against the fp64 truth) by mode/group: "
              + ", ".join(f"{k}={v:.3g}" for k, v in sorted(worst.items())))
    assert rc == 0, err
    assert summary["options"]["kernel"] == "vllm"
