"""`mmlora vllm-engine REF --out GOT`: a reference bundle's requests through vLLM's own tower/connector LoRA
path, written as an output bundle that `mmlora compare REF GOT` judges (tower and connector groups)."""

from __future__ import annotations

import sys
from pathlib import Path


def _run(r: dict) -> str:
    if r["counted_for_request"] is None:
        return "no LoRA (past the mapping's end)"
    return f"{r['adapter'] or 'no adapter'} (request {r['counted_for_request']}'s entries)"


def cmd_vllm_engine(args) -> int:
    from harness.audit_vllm import VllmMissing, import_vllm
    from harness.output import atomic_dir

    try:
        import_vllm()
    except VllmMissing as e:
        print(f"mmlora vllm-engine: {e}", file=sys.stderr)
        return 2
    from harness.vllm_engine.engine import run
    from harness.vllm_engine.runner import VllmCannotRun

    out = Path(args.out)
    try:
        with atomic_dir(out, "bundle", args.overwrite) as tmp:
            m = run(Path(args.bundle), tmp, all_modules=args.all_modules, max_loras=args.max_loras,
                    per_image=args.per_image, rename_adapters=not args.adapters_as_saved, punica=args.punica)
    except VllmCannotRun as e:  # the system under test fails on a valid reference: exit 1, not bad input
        print(f"mmlora vllm-engine: vLLM cannot run this reference: {type(e).__name__}: {' '.join(str(e).split())} "
              f"(nothing written)", file=sys.stderr)
        return 1
    if m["not_produced"]:
        print(f"mmlora vllm-engine: vLLM's model does not build {len(m['not_produced'])} tower/connector modules of the "
              f"reference (listed in \"not_produced\": compare leaves them unjudged, warning): "
              f"{', '.join(m['not_produced'])}", file=sys.stderr)
    for x in m["rows_beyond_mapping"][:3]:
        print(f"mmlora vllm-engine: {x['module']} received {x['rows']} rows under a mapping of {x['mapping_entries']} "
              f"entries; vLLM's Triton kernels ran it (rows past the mapping's length get no LoRA)", file=sys.stderr)
    if len(m["rows_beyond_mapping"]) > 3:
        print(f"mmlora vllm-engine: ... and {len(m['rows_beyond_mapping']) - 3} more LoRA layers (manifest "
              f"rows_beyond_mapping)", file=sys.stderr)
    for x in m["rows_as_run"]:
        runs = "; ".join(f"rows {a}-{b - 1} " + _run(r) for r in x["runs"] for a, b in [r["rows"]])
        print(f"mmlora vllm-engine: request {x['request']}'s image {x['image']} ({x['group']}, {x['rows']} rows, helper "
              f"count {x['helper_count']}, its adapter {x['own_adapter']}) runs under vLLM's kernels as: {runs}",
              file=sys.stderr)
    for c in m["mm_lora_counts"]:
        if c["embeddings"] != c["num_mm_embeds"]:
            print(f"mmlora vllm-engine: vLLM's embed_multimodal gives {c['embeddings']} embeddings for request "
                  f"{c['request']}'s image of {c['num_mm_embeds']} placeholders (its runner would refuse them)",
                  file=sys.stderr)
        for g in ("tower", "connector"):
            if c[f"measured_{g}"] is not None and c[g] != c[f"measured_{g}"]:
                print(f"mmlora vllm-engine: vLLM's get_mm_lora_token_counts gives {g} {c[g]} for request "
                      f"{c['request']} (num_mm_embeds {c['num_mm_embeds']}); its {g} ran {c[f'measured_{g}']} rows",
                      file=sys.stderr)
    print(f"mmlora vllm-engine: output bundle in {out} (groups {', '.join(m['groups'])}; "
          f"compare with: mmlora compare {args.bundle} {out})", file=sys.stderr)
    return 0


def register(sub) -> None:
    v = sub.add_parser("vllm-engine", help="a reference bundle's requests through vLLM's tower/connector LoRA path "
                                           "(vLLM's model class, LoRA manager, count helper), as an output bundle "
                                           "for `mmlora compare REF GOT` (needs vLLM's model modules)")
    v.add_argument("bundle", metavar="REF", help="a reference bundle (mmlora record)")
    v.add_argument("--out", required=True, metavar="GOT", help="the output bundle folder to write")
    v.add_argument("--max-loras", type=int, default=None, metavar="N",
                   help="vLLM's --max-loras (default: one slot per adapter the batch uses)")
    v.add_argument("--all-modules", action="store_true",
                   help="vLLM's default deployment: every supported tower/connector module wrapped (no "
                        "--lora-target-modules); default: the modules the adapters target")
    v.add_argument("--per-image", action="store_true",
                   help="one encoder step per image (the runner's mapping block and the encoder for each image "
                        "alone); default: the whole mixed batch through one mapping")
    v.add_argument("--adapters-as-saved", action="store_true",
                   help="hand vLLM the adapters under the names they were saved with, where the arch's checkpoint "
                        "needs a rename for vLLM (LLaVA-NeXT, harness/vllm_engine/layout.py); default: renamed too")
    v.add_argument("--punica", choices=["cpu", "gpu"], default="cpu",
                   help="the punica wrapper vLLM's get_punica_wrapper builds: cpu (PunicaWrapperCPU, vLLM's CPU "
                        "platform's torch ops; default) or gpu (PunicaWrapperGPU, vLLM's Triton LoRA kernels as its "
                        "CUDA platform runs them; without CUDA in the Triton interpreter, fp16 references only)")
    v.add_argument("--overwrite", action="store_true", help="replace an earlier bundle at --out")
    v.set_defaults(func=cmd_vllm_engine)
