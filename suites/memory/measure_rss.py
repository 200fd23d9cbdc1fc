"""Peak RSS of `mmlora correctness --model DIR` on a random-weight checkpoint with real layer widths.

LLaVA-1.5-7B widths (Llama LM: hidden 4096, MLP 11008, vocab 32064; CLIP-L tower: hidden 1024, MLP 4096),
few layers, a 56x56 image (4x4 patches of 14) so the float64 truth stays quick on a CPU. The checkpoint is
built and saved in a child process, then the correctness run is a second child whose own peak RSS is read
with `os.wait4` (ru_maxrss). Not a test (minutes and GBs): run it by hand,

    python -m suites.memory.measure_rss --lm-layers 2 --tower-layers 2 --work /tmp/rss
    python -m suites.memory.measure_rss --lm-layers 8 --tower-layers 8 --work /tmp/rss

and it prints one JSON line: checkpoint bytes, peak RSS bytes, their ratio, the run's exit code and time, and
per phase of the run (the progress line it last printed) the peak RSS sampled from /proc every 50 ms, split
into anonymous memory and mapped file pages (a checkpoint or bundle file mapped by safetensors counts in RSS
while it is mapped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def build(folder: Path, lm_layers: int, tower_layers: int) -> None:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                         pad_token_id=0, eos_token_id=2, bos_token_id=1),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=tower_layers, num_attention_heads=16, image_size=56, patch_size=14,
                           projection_dim=768),
        image_token_index=32000, image_seq_length=16, vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _rss(pid: int) -> tuple[int, int] | None:
    """(anonymous, file-backed) resident bytes of a live process, from /proc (Linux)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in text.splitlines() if ln.startswith("Rss"))}
    return kb.get("RssAnon", 0) * 1024, (kb.get("RssFile", 0) + kb.get("RssShmem", 0)) * 1024


def peak_rss(cmd: list[str], env: dict) -> tuple[int, int, float, dict]:
    """(exit code, the child's peak RSS in bytes, seconds, per phase {peak, anon, file} in bytes)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            errors="replace")
    phase = ["start"]

    def follow() -> None:  # the run's progress lines (stderr) name the phase; passed through
        for line in proc.stderr:  # drained to the end whatever happens, or the child would block on a full pipe
            try:
                sys.stderr.write(line)
            except (OSError, ValueError):
                pass
            if line.startswith(("[", "  ")) and line.strip():
                phase[0] = line.strip()[:80]
    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    phases: dict[str, dict] = {}
    while True:
        done, status, usage = os.wait4(proc.pid, os.WNOHANG)  # not proc.poll(): it would reap the child's usage
        if done:
            break
        got = _rss(proc.pid)
        if got is not None:
            p = phases.setdefault(phase[0], {"peak": 0, "anon": 0, "file": 0})
            if sum(got) > p["peak"]:
                p.update(peak=sum(got), anon=got[0], file=got[1])
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    return proc.returncode, usage.ru_maxrss * 1024, time.time() - t0, phases  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm-layers", type=int, default=2)
    ap.add_argument("--tower-layers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/mmlora-rss", help="folder for the checkpoint and the report")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--extra", default="", help="more options for `mmlora correctness`, one string")
    args = ap.parse_args(argv)
    work = Path(args.work)
    ckpt = work / f"llava-lm{args.lm_layers}-tower{args.tower_layers}"
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    if not any(ckpt.glob("*.safetensors")):
        subprocess.run([sys.executable, "-c", f"from suites.memory.measure_rss import build; from pathlib import Path; "
                        f"build(Path({str(ckpt)!r}), {args.lm_layers}, {args.tower_layers})"], check=True, env=env)
    out = work / f"report-{ckpt.name}-{args.dtype}-{int(time.time())}"
    cmd = [sys.executable, "-m", "harness.cli", "correctness", "--model", str(ckpt), "--dtype", args.dtype,
           "--adapters", "1", "--kernel", "torch", "--out", str(out), *args.extra.split()]
    size = checkpoint_bytes(ckpt)
    if not size:
        print(f"measure_rss: {str(ckpt)!r} holds no *.safetensors file (the build failed?)", file=sys.stderr)
        return 2
    code, rss, seconds, phases = peak_rss(cmd, env)
    print(json.dumps({"checkpoint": ckpt.name, "checkpoint_bytes": size, "peak_rss_bytes": rss,
                      "ratio": round(rss / size, 3), "exit": code, "seconds": round(seconds, 1),
                      "options": cmd[3:], "phases": phases}), flush=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
