"""Static resource check of every stored LoRA kernel config for Hopper (sm_90), on any machine.

Triton's ahead-of-time compiler builds each kernel for `GPUTarget("cuda", 90, 32)` without a GPU; the
cubin's resource usage (`cuobjdump -res-usage`, the copy inside the triton wheel) gives registers and
local memory per thread, and Triton's metadata the dynamic shared memory per program. A config that
spills registers to local memory (the rank-128 cliff the H200 run showed: 9 ms for an expand that moves
~30 MB) or asks for more shared memory than an H100 / H200 block may have fails here, before a GPU sees it.

Each config is compiled at the largest rank its rule serves (rank_max, else 128) and at bf16 and fp16 (the
fp16 expand also scales rows). The grouping kernels are checked at their largest one-hot (256 groups).
The kernels are compiled in a child process with TRITON_INTERPRET=0 (in an interpreted process every
`@triton.jit` function is an interpreter object the compiler cannot take); `python -m
suites.unit.test_kernel_lora_aot` prints the table.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from runtime.kernels import lora as L
from runtime.kernels import lora_config as lc
from runtime.kernels import lora_grouping as G

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a triton without the AOT entry points
    pytest.skip("this triton has no ahead-of-time compile API", allow_module_level=True)

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
TARGET = GPUTarget("cuda", 90, 32)
# Hopper: 227 KB of shared memory per block at most (opt-in), 64K 32-bit registers per SM
MAX_SHARED = 232448
REGS_PER_SM = 65536
PTR_TYPES = {"x_ptr": "ACT", "a_ptr": "ACT", "b_ptr": "ACT", "y_ptr": "ACT", "meta_ptr": "*i64", "out_ptr": "*fp32",
             "v_ptr": "*fp32", "ws_ptr": "*fp32", "order_ptr": "*i32", "start_ptr": "*i32", "count_ptr": "*i32",
             "hist_ptr": "*i32", "slot_ptr": "*i32"}
DT = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}

pytestmark = pytest.mark.skipif(not CUOBJDUMP.is_file(), reason=f"no cuobjdump in the triton wheel ({CUOBJDUMP})")


def _signature(kernel, constexprs: dict, act: str) -> dict:
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in PTR_TYPES:
            sig[p.name] = act if PTR_TYPES[p.name] == "ACT" else PTR_TYPES[p.name]
        else:
            sig[p.name] = "i32"
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in constexprs]
    assert not missing, f"{kernel.fn.__name__}: constexprs {missing} not given"
    return sig


@functools.cache
def _compile(kernel_name: str, act: str, constexprs: tuple, num_warps: int, num_stages: int) -> dict:
    """Resources of one compiled kernel: REG (cuobjdump -res-usage), `spill_ops` (local-memory loads and
    stores, STL / LDL, counted in the SASS: -res-usage reported LOCAL:0 for Triton cubins whose SASS spills,
    so the instructions are the evidence), `dyn_shared` (Triton's shared memory per program), the MMA
    instructions (HGMMA = Hopper warpgroup MMA, HMMA = the older warp MMA) and the global access widths."""
    kernel = getattr(G if kernel_name.startswith("_group_") else L, kernel_name)
    cx = dict(constexprs)
    sig = _signature(kernel, cx, act)
    # What Triton's JIT specialises on at run time: pointers 16-byte aligned (torch's allocations are) and
    # integer arguments divisible by 16, taken at the headline bench point (without them loads do not
    # vectorise and the resources would be those of another kernel).
    ints = _int_values(cx)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
             if sig[p.name].startswith("*") or (sig[p.name] == "i32" and ints.get(p.name, 1) % 16 == 0)}
    src = ASTSource(fn=kernel, signature=sig, constexprs=cx, attrs=attrs)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(compiled.asm["cubin"])
        res = subprocess.run([str(CUOBJDUMP), "-res-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    assert m, res
    reg, stack, shared, local = (int(g) for g in m.groups())
    ops = Counter(o.split(".")[0] for o in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+([A-Z][A-Z0-9._]+)", sass, re.M))
    return {"REG": reg, "STACK": stack, "SHARED": shared, "LOCAL": local, "spill_ops": ops["STL"] + ops["LDL"],
            "dyn_shared": int(compiled.metadata.shared), "num_warps": num_warps, "HGMMA": ops["HGMMA"],
            "HMMA": ops["HMMA"], "global": sorted(set(re.findall(r"\b((?:LDG|STG)\.[A-Z0-9.]+)", sass)))}


def _int_values(cx: dict) -> dict:
    """Integer arguments at the headline bench point (T = H = O = 4096, 8 adapters in 9 slots, one slice,
    rank = BLOCK_R, the split a config asks for), by argument name across the LoRA kernels."""
    T, H, W, S, R = 4096, 4096, 4096, 9, cx.get("BLOCK_R", 16)
    return dict(T=T, H=H, R=R, n_slots=S, k_span=H // 4, span=cx.get("BLOCK_T", 256), n_prog=16,
                stride_xt=H, stride_xh=1, stride_as=R * H, stride_ar=H, stride_ok=T * R, stride_on=T * R,
                stride_ot=R, width0=W, offset0=0, stride_bs=W * R, stride_bo=R, stride_vk=T * R, stride_vn=T * R,
                stride_vt=R, stride_yt=W, stride_yo=1, stride_wk=T * R, stride_wn=T * R, stride_wt=R)


def _block_r(rule) -> int:
    return max(16, 1 << (int(rule.when.get("rank_max", 128)) - 1).bit_length())


def _shrink_constexprs(cfg: lc.ShrinkConfig, block_r: int, multi: bool = False) -> tuple:
    return tuple(sorted(dict(OUT_SORTED=True, FP32=False, X_UNIT=True, MULTI=multi, ALIGNED=True, BLOCK_M=cfg.block_m,
                             BLOCK_K=cfg.block_k, BLOCK_R=block_r, BLOCK_S=16).items()))


def _expand_constexprs(cfg: lc.ExpandConfig, block_r: int, split: int, dtype: torch.dtype, multi: bool = False
                       ) -> tuple:
    return tuple(sorted(dict(SPLIT=split, V_SORTED=True, MODE=L.HI_LO, SCALE_ROWS=dtype == torch.float16,
                             Y_UNIT=True, MULTI=multi, ALIGNED=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                             BLOCK_R=block_r, BLOCK_S=16, COL_SPLIT=cfg.col_split).items()))


def stored_cases() -> list[tuple[str, str, str, tuple, int, int]]:
    """(label, kernel, act pointer type, constexprs, warps, stages) for every stored rule: shrink at bf16
    (fp16 compiles to the same resources), expand at bf16 and fp16 (fp16 also scales rows); the catch-all
    rules also with several slices (pointers from the device table); and the fallback formula at the
    headline point for GPUs without a file."""
    out = []
    for path in sorted(lc.CONFIG_DIR.glob("*.json")):
        table = lc.load_table(path)
        max_split = max([r.config.split_k for r in table.shrink] or [1])
        for i, rule in enumerate(table.shrink):
            c, br = rule.config, _block_r(rule)
            out.append((f"{path.stem} shrink[{i}] r<={br}", "_shrink_kernel", "*bf16", _shrink_constexprs(c, br),
                        c.num_warps, c.num_stages))
            if not rule.when:
                out.append((f"{path.stem} shrink[{i}] r<={br} 3 slices", "_shrink_kernel", "*bf16",
                            _shrink_constexprs(c, br, multi=True), c.num_warps, c.num_stages))
        for dtype in (torch.bfloat16, torch.float16):
            for i, rule in enumerate(table.expand):
                c, br = rule.config, _block_r(rule)
                out.append((f"{path.stem} expand[{i}] {_dt(dtype)} r<={br}", "_expand_kernel", DT[dtype],
                            _expand_constexprs(c, br, max_split, dtype), c.num_warps, c.num_stages))
                if not rule.when and dtype == torch.bfloat16:
                    out.append((f"{path.stem} expand[{i}] {_dt(dtype)} r<={br} 3 slices", "_expand_kernel",
                                DT[dtype], _expand_constexprs(c, br, max_split, dtype, multi=True), c.num_warps,
                                c.num_stages))
    for r in (16, 128):
        s = lc.fallback_shrink(4096, 4096, r, 1)
        e = lc.fallback_expand(4096, 4096, r, 1)
        out.append((f"fallback shrink T=4096 r={r}", "_shrink_kernel", "*bf16", _shrink_constexprs(s, r),
                    s.num_warps, s.num_stages))
        out.append((f"fallback expand T=4096 r={r}", "_expand_kernel", "*bf16",
                    _expand_constexprs(e, r, s.split_k, torch.bfloat16), e.num_warps, e.num_stages))
    return out


def support_cases() -> list[tuple[str, str, str, tuple, int, int]]:
    """The grouping kernels at their largest one-hot (256 groups, many rows), the reduce launch at rank 128."""
    bt, bg, n_prog, _ = G._group_blocks(1 << 20, G.MAX_KERNEL_GROUPS - 2)
    bp = max(2, 1 << (n_prog - 1).bit_length())
    return [
        ("group_count G=256", "_group_count_kernel", "*i32", (("BLOCK_G", bg), ("BLOCK_T", bt)), 4, 3),
        ("group_order G=256", "_group_order_kernel", "*i32", (("BLOCK_G", bg), ("BLOCK_P", bp), ("BLOCK_T", bt)), 4, 3),
        ("reduce split=8 r<=128", "_reduce_kernel", "*fp32",
         (("BLOCK_M", 64), ("BLOCK_R", 128), ("BLOCK_S", 16), ("SPLIT", 8)), 4, 3),
    ]


def _dt(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]



CASES = stored_cases() + support_cases()
# a config no GPU should run (a 256 x 512 fp32 accumulator per 4-warp program): the negative control
SPILLING = ("control: shrink 256x512 acc", "_shrink_kernel", "*bf16",
            _shrink_constexprs(lc.ShrinkConfig(256, 64, 1, num_warps=4, num_stages=2), 512), 4, 2)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def resources() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "suites.unit.test_kernel_lora_aot", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_every_stored_config_file_parses_and_covers_every_call():
    for path in sorted(lc.CONFIG_DIR.glob("*.json")):
        table = lc.parse_table(json.loads(path.read_text()), str(path))
        for op in ("shrink", "expand"):
            rules = getattr(table, op)
            assert rules and rules[-1].when == {}, f"{path.name}: {op} needs a last catch-all rule"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_config_compiles_for_sm90_without_spills(case, resources):
    label, warps = case[0], case[4]
    res = resources[label]
    assert res["spill_ops"] == 0 and res["LOCAL"] == 0 and res["STACK"] == 0, f"{label}: register spills {res}"
    assert res["SHARED"] + res["dyn_shared"] <= MAX_SHARED, f"{label}: shared memory {res}"
    assert res["REG"] * 32 * warps <= REGS_PER_SM, f"{label}: one program does not fit an SM's registers {res}"


def test_the_check_sees_a_spilling_config(resources):
    """Negative control: the check above proves nothing unless a spilling config shows local memory."""
    res = resources[SPILLING[0]]
    assert res["spill_ops"] > 0, res


def _all() -> dict:
    return {c[0]: _compile(*c[1:]) for c in [*CASES, SPILLING]}


def table(res: dict) -> str:
    lines = [f"{'config':<34} {'warps':>5} {'REG':>4} {'LOCAL':>5} {'STL+LDL':>7} {'SHARED':>6} {'dyn smem':>8} "
             f"{'MMA':>9}  global accesses"]
    for label, r in res.items():
        mma = f"{r['HGMMA']} HGMMA" if r["HGMMA"] else f"{r['HMMA']} HMMA" if r["HMMA"] else "-"
        lines.append(f"{label:<34} {r['num_warps']:>5} {r['REG']:>4} {r['LOCAL']:>5} {r['spill_ops']:>7} "
                     f"{r['SHARED']:>6} {r['dyn_shared']:>8} {mma:>9}  {' '.join(r['global'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") == "0", "run with TRITON_INTERPRET=0 (compiling, not interpreting)"
    found = _all()
    print(json.dumps(found) if "--json" in sys.argv else table(found))
