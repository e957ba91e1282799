"""Compile the triton scan kernel ahead of time for a GPU architecture, no GPU needed, and print the
resource report per variant: registers, stack (spills), shared memory, and the instructions that
matter in the SASS (HGMMA = Hopper tensor-core MMA, HMMA = older MMA, FFMA, local loads/stores),
CTA barriers (BAR.SYNC), wgmma waits (WARPGROUP.DEPBAR) and the layout conversions left in the TTGIR.

    python bench/triton_scan_resources.py                 # sm_90 (H100/H200), default variants
    python bench/triton_scan_resources.py --arch 80 --json out.json
Uses the ptxas/cuobjdump that ship with triton.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, never the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from far_kernels.ops.bilstm_scan import triton as K  # noqa: E402

TL = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
# (operand dtype, batch tile, warps, fp32 precision)
VARIANTS = [("bf16", 16, 4, "ieee"), ("fp16", 16, 4, "ieee"), ("bf16", 32, 8, "ieee"), ("bf16", 64, 8, "ieee"),
            ("fp32", 16, 8, "ieee"), ("fp32", 16, 8, "tf32x3"), ("fp32", 16, 4, "ieee")]


def time_loop(sass: str) -> str:
    """The SASS of the time loop: the backward branch's body that holds the most MUFU.EX2 (activations)."""
    lines = sass.splitlines()
    addr = [(int(m.group(1), 16), i) for i, l in enumerate(lines) if (m := re.search(r"/\*([0-9a-f]{4,})\*/", l))]
    best = ""
    for a, i in addr:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", lines[i])
        if m and int(m.group(1), 16) < a:
            body = "\n".join(lines[j] for b, j in addr if int(m.group(1), 16) <= b <= a)
            if body.count("MUFU.EX2") > best.count("MUFU.EX2"):
                best = body
    return best


def compile_variant(dt: str, bb: int, warps: int, prec: str, arch: int, np_: int = 64) -> dict:
    sig = {"gx_ptr": f"*{dt}", "w_ptr": f"*{dt}", "hs_ptr": "*i32", "out_ptr": f"*{dt}",
           **{k: "i32" for k in ("H", "B", "T", "n", "s_gh", "s_gb", "s_gt", "s_gd", "s_wh", "s_wd",
                                  "s_oh", "s_ob", "s_ot", "s_od")},
           **{k: "constexpr" for k in ("NP", "NOUT", "NZ", "BB", "OP_DT", "SPLIT", "F32_PREC", "OUT_DT", "INTERP")}}
    const = {"NP": np_, "NOUT": np_, "NZ": 0, "BB": bb, "OP_DT": TL[dt], "SPLIT": dt != "fp32", "F32_PREC": prec, "OUT_DT": TL[dt],
             "INTERP": False}
    k = triton.compile(ASTSource(fn=K._bilstm_scan_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    loop = time_loop(sass)
    usage = {m[0].lower(): int(m[1]) for m in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return {"dtype": dt, "block_b": bb, "num_warps": warps, "fp32_precision": prec, "n_pad": np_, "arch": arch,
            **usage, "shared_dynamic": k.metadata.shared,
            **{op: sass.count(op) for op in ("HGMMA", "HMMA", "FFMA", "MUFU.EX2", "MUFU.RCP", "LDL", "STL")},
            # synchronization of the whole kernel (the zero-only branch has none, so these are the time
            # loop's plus any before it): CTA barriers and wgmma waits
            "BAR.SYNC": sass.count("BAR.SYNC"), "WGMMA_WAIT": sass.count("WARPGROUP.DEPBAR"),
            "per_step": {op: loop.count(op) for op in ("BAR.SYNC", "WARPGROUP.DEPBAR", "HGMMA", "LDL", "STL", "STS", "LDS")},
            "ttgir_convert_layout": k.asm["ttgir"].count("ttg.convert_layout"),
            "ttgir_dot_wait": k.asm["ttgir"].count("warp_group_dot_wait")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = []
    for dt, bb, warps, prec in VARIANTS:
        if dt != "fp32" and prec != "ieee":
            continue
        try:
            r = compile_variant(dt, bb, warps, prec, args.arch)
        except Exception as e:  # report and go on
            r = {"dtype": dt, "block_b": bb, "num_warps": warps, "fp32_precision": prec, "error": str(e)[:300]}
        rows.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
