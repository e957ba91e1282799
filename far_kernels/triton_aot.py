"""Compile the Triton kernels for a GPU, on a machine without one, exactly as their launchers would launch them.

Triton's CPU interpreter (TRITON_INTERPRET=1, how the test suite runs the kernels) never lowers a kernel to
PTX: a kernel that the interpreter runs correctly can still fail on a GPU at compile time, or at launch with
"out of resources" when its tiles need more shared memory than the GPU has. This tool runs each launcher
(`crossbar_matmul_triton`, `bilstm_scan_triton`) on CPU tensors with the kernel swapped for a recorder and
the GPU tiling forced on, then compiles every recorded launch for the chosen architecture with Triton's own
specialization rules (the same signature, constexprs and alignment attributes a launch on the GPU would
get) and checks its shared memory against that architecture's limit per block.

    python -m far_kernels.triton_aot                    # sm_90 (H100/H200), the built-in launches
    python -m far_kernels.triton_aot --arch 80 --json out.json

Must run in a fresh process: it refuses to run under TRITON_INTERPRET=1 (the kernels would be interpreted
functions). Uses Triton internals (`create_function_from_signature`, `JITFunction._pack_args`) of the
installed version; a version without them is reported as such. Register counts and spills come from the
cuobjdump that ships with Triton, when it is there.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, List, Optional

# opt-in shared memory per block (bytes), from the CUDA C++ Programming Guide's table of compute capabilities
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def _kernel_source(kernel):
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{kernel!r} is not a compiled-mode Triton kernel (TRITON_INTERPRET=1 set at import?)")
    return kernel


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch and runs nothing."""

    def __init__(self, kernel, sink: list, module):
        self.kernel, self.sink, self.module = kernel, sink, module

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.kernel, grid, args, kwargs, self.module))
        return launch


@contextlib.contextmanager
def recording(module, name: str, sink: list) -> Iterator[_Recorder]:
    """Swap module.<name> (a @triton.jit kernel) for a recorder that appends (kernel, grid, args, kwargs, module)
    to sink; yields the recorder (to launch a kernel that only tests launch)."""
    kernel = _kernel_source(getattr(module, name))
    recorder = _Recorder(kernel, sink, module)
    setattr(module, name, recorder)
    try:
        yield recorder
    finally:
        setattr(module, name, kernel)


def _specialize(kernel, args, kwargs, arch: int):
    """Bind one recorded launch as the JIT would for sm_<arch>: (target, backend, kw, bound, spec, options). spec
    is Triton's specialization, the JIT's cache key: per argument its type and alignment ('D': divisible by 16),
    or its value where it is a constexpr (an int argument equal to 1 becomes one)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kw = dict(kwargs, debug=False)
    bound, spec, options = binder(*args, **kw)
    return target, backend, kw, bound, spec, options


def compile_launch(kernel, args, kwargs, arch: int):
    """Compile one recorded launch for sm_<arch> as the JIT would specialize it; returns the CompiledKernel."""
    import triton
    from triton.compiler import ASTSource

    target, backend, kw, bound, spec, options = _specialize(kernel, args, kwargs, arch)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _args_spec(kernel, spec) -> str:
    """The runtime arguments' specialization in words: those equal to 1 (compiled as constants) and those not
    divisible by 16 (no alignment assumed), by parameter name."""
    ones, unaligned = [], []
    for p, (ty, attr) in zip(kernel.params, spec):
        if p.is_constexpr:
            continue
        if ty == "constexpr":
            ones.append(p.name)
        elif attr != "D" and (ty.startswith("*") or ty[0] in "iu"):
            unaligned.append(p.name)
    return f"ones={','.join(ones) or '-'} unaligned={','.join(unaligned) or '-'}"


def _resource_usage(compiled) -> dict:
    """Registers, stack (spills) and local memory per thread from cuobjdump -res-usage, when Triton ships it."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool) or "cubin" not in compiled.asm:
        return {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    return {m[0].lower(): int(m[1]) for m in re.findall(r"(REG|STACK|LOCAL):(\d+)", res)}


def _describe(args, kwargs) -> str:
    return " ".join(f"{k}={v}" for k, v in kwargs.items() if not k.startswith("num_") and k != "enable_fp_fusion"
                    and not hasattr(v, "data_ptr"))


# ---- the launches to compile: every constexpr branch of each kernel, at the tiling a GPU launch uses ----

def crossbar_launches(quick: bool = False) -> List[tuple]:
    """Record crossbar_matmul_triton's launches over its specializations (ADC modes, noisy levels, read noise,
    tile sizes, encodings, wide accumulators, bias) with the GPU tiling: each at an odd shape (K, N not multiples
    of 16) and at an aligned one (a DeiT layer's, what models run: strides divisible by 16 let Triton vectorize and
    pipeline the loads differently), then the cuda tests' configurations at their shapes, one row with a single
    tile (T = 1, a recurrent product's K <= tile_rows), and inputs and bias at unaligned addresses (a member of a
    stacked group) with a single row (M = 1): Triton compiles arguments equal to 1 as constants."""
    import torch

    from far_kernels.ops.crossbar_matmul import triton as K
    from far_kernels.ops.crossbar_matmul.config import CrossbarConfig
    from far_kernels.ops.crossbar_matmul.program import prepare_call

    cases = [dict(), dict(adc_range="granular"), dict(adc_bits=None), dict(adc_range="calibrated"),
             dict(prog_noise=0.02), dict(read_noise=0.02), dict(prog_noise=0.02, read_noise=0.02, adc_range="granular"),
             dict(encoding="offset"), dict(tile_rows=256), dict(tile_rows=256, prog_noise=0.02, read_noise=0.02),
             dict(tile_rows=64, dac_bits=2, cell_bits=4), dict(adc_bits=14, tile_rows=512, cell_bits=4),
             dict(adc_bits=None, prog_noise=0.02)]
    # (config, M, K, N): tests/kernels/ops/test_crossbar_matmul_triton.py's CUDA_GRID (the GPU suite runs them)
    cuda_tests = [(dict(), 4096, 768, 768),
                  (dict(adc_bits=6, encoding="offset", weight_scale="tensor", input_scale="tensor"), 1576, 384, 1152),
                  (dict(cell_bits=1, dac_bits=2, adc_bits=10, adc_range="granular"), 1576, 1536, 384),
                  (dict(cell_bits=4, adc_bits=5, adc_range="calibrated", tile_rows=256), 1000, 1000, 300),
                  (dict(adc_bits=None, input_bits=6, cell_bits=3, tile_rows=100), 333, 777, 129),
                  (dict(weight_bits=3, input_bits=3, adc_bits=None, read_noise=0.01, tile_rows=16, seed=4),
                   512, 300, 256),
                  (dict(adc_bits=None, prog_noise=0.03), 512, 768, 384)]
    shapes = [(8, 300, 40), (64, 384, 384)]
    if quick:
        cases, shapes, cuda_tests = cases[:3] + [cases[9]], shapes[:1], []
    sink: list = []
    gen = torch.Generator().manual_seed(0)

    def launch(over, M, Kd, N, bias=True, offset=0):
        cfg = CrossbarConfig(**over)
        x = torch.randn(M * Kd + offset, generator=gen)[offset:].view(M, Kd)  # offset 1: 4 bytes off alignment
        w = torch.randn(N, Kd, generator=gen)
        b = torch.randn(N + offset, generator=gen)[offset:] if bias else None
        adc_range = 50.0 if cfg.adc_range == "calibrated" else None
        K.crossbar_matmul_triton(prepare_call(x, w, cfg, b, adc_range, consume_read=False))

    with recording(K, "_crossbar_kernel", sink), _forced_gpu_tiling(K):
        for M, Kd, N in shapes:
            for over in cases:
                for bias in ((True,) if over else (False, True)):
                    launch(over, M, Kd, N, bias)
        for over, M, Kd, N in cuda_tests:
            launch(over, M, Kd, N)
        if not quick:
            for over in (dict(), dict(read_noise=0.02), dict(prog_noise=0.02)):
                launch(over, 1, 64, 256, offset=1)
    return sink


def scan_launches(quick: bool = False) -> List[tuple]:
    """Record bilstm_scan_triton's launches: operand dtypes, batch tiles, padded widths (a store wider than the
    kept units, NZ > 0, and ragged heads), both fp32 product precisions and mixed dtypes (16-bit gates with fp32
    W_hh), within the op's limit on units; then every shape of the triton tests' CUDA_GRID in every dtype
    (Triton compiles H, B or T equal to 1 as constants, and n = 37 or 8 leaves the strides unaligned), the batch
    tiles test_cuda_batch_tiles_agree asks for, and the activations kernel test_cuda_activations_* launches."""
    import torch

    from far_kernels.ops.bilstm_scan import triton_units_limit
    from far_kernels.ops.bilstm_scan import triton as K

    # (gx dtype, stored units n, most units kept, keyword arguments, W_hh dtype if not gx's)
    cases = [(torch.bfloat16, 64, 64, {}), (torch.float16, 64, 64, {}), (torch.float32, 64, 64, {}),
             (torch.float32, 64, 64, {"fp32_precision": "tf32x3"}), (torch.bfloat16, 64, 64, {"block_b": 32}),
             (torch.float32, 24, 24, {}), (torch.bfloat16, 64, 20, {}),
             (torch.float16, 64, 64, {"block_b": 32}), (torch.float32, 64, 64, {"block_b": 32}),
             (torch.float16, 64, 64, {"block_b": 64}), (torch.float32, 64, 20, {}),
             (torch.bfloat16, 16, 16, {}, torch.float32), (torch.float16, 64, 37, {}, torch.float32)]
    # (H, B, T, n, hidden sizes [2, H]): tests/kernels/ops/test_bilstm_scan_triton.py's CUDA_GRID
    grid = [(2, 1, 1, 64, [[64, 37], [0, 64]]), (2, 3, 50, 64, [[64, 0], [37, 64]]),
            (2, 17, 50, 37, [[37, 20], [0, 37]]), (1, 1, 197, 64, [[64], [37]]), (1, 3, 20, 64, [[20], [3]]),
            (2, 2, 9, 8, [[8, 0], [3, 8]]), (6, 64, 197, 64, [[64] * 6, [64] * 6]),
            (6, 64, 197, 64, [[64, 37, 0, 64, 1, 33], [0, 17, 64, 8, 64, 64]]),
            (6, 3, 197, 64, [[64, 37, 0, 64, 1, 33], [0, 17, 64, 8, 64, 64]]),
            (3, 17, 197, 37, [[37, 37, 0], [37, 20, 37]])]
    if quick:
        cases, grid = cases[:1] + cases[2:3], []
    sink: list = []

    def launch(dtype, H, B, T, n, hs, kw=None, w_dtype=None):
        hs = torch.tensor(hs)
        if triton_units_limit(hs, torch.device("cuda")) is None:
            gx = torch.empty(H, B, T, 2, 4 * n, dtype=dtype)  # never read: the kernel is recorded, not run
            w = torch.empty(H, 2, 4 * n, n, dtype=w_dtype or dtype)
            K.bilstm_scan_triton(gx, w, hs, **(kw or {}))

    with recording(K, "_bilstm_scan_kernel", sink), recording(K, "_activations_kernel", sink) as activations:
        for dtype, n, kept, kw, *w_dtype in cases:
            launch(dtype, 3, 20, 5, n, [[kept, kept // 2, kept], [kept - 1, kept, 1]], kw, *w_dtype)
        for shape in grid:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                launch(dtype, *shape)
        if not quick:
            x = torch.empty(512)
            activations[(1,)](x, torch.empty_like(x), torch.empty_like(x), N=512)
    return sink


@contextlib.contextmanager
def _forced_gpu_tiling(module) -> Iterator[None]:
    saved = module._gpu_launch
    module._gpu_launch = lambda device: True
    try:
        yield
    finally:
        module._gpu_launch = saved


def check(arch: int = 90, quick: bool = False, progress: Optional[Callable[[str], None]] = None,
          shard: tuple = (0, 1)) -> List[dict]:
    """Compile every built-in launch for sm_<arch>; one row per distinct specialization with its shared memory,
    the limit, registers/spills where known, and `ok` (compiled and within the limit) or `error`. shard=(k, n):
    only the distinct specializations whose index is k modulo n (n processes compile the whole list between them)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("triton_aot: unset TRITON_INTERPRET (the kernels must be compiled-mode JIT functions)")
    launches = [("crossbar_matmul", rec) for rec in crossbar_launches(quick)] + \
               [("bilstm_scan", rec) for rec in scan_launches(quick)]
    rows, seen = [], set()
    limit = SHARED_LIMIT.get(arch)
    for op, (kernel, _grid, args, kwargs, module) in launches:
        # one compile per distinct specialization, Triton's own (argument types, alignment, arguments equal to 1,
        # constexprs) and launch options: launches that differ only in, say, a stride's alignment compile apart
        spec = _specialize(kernel, args, kwargs, arch)[4]
        key = (op, kernel.fn.__name__, repr(spec), tuple(sorted((k, repr(v)) for k, v in kwargs.items()
                                                                 if not hasattr(v, "data_ptr"))))
        if key in seen:
            continue
        seen.add(key)
        if (len(seen) - 1) % shard[1] != shard[0]:
            continue
        dtypes = sorted({str(a.dtype) for a in args if hasattr(a, "dtype")})
        row = {"op": op, "kernel": kernel.fn.__name__, "arch": arch,
               "specialization": f"{_describe(args, kwargs)} {_args_spec(kernel, spec)}".strip(),
               "operand_dtypes": dtypes, "num_warps": kwargs.get("num_warps"), "num_stages": kwargs.get("num_stages"),
               "shared_limit": limit}
        # a launcher that retries with fewer pipelining stages on "out of resources" (GPU_STAGES) gets the same here
        stages = [s for s in getattr(module, "GPU_STAGES", ()) if s <= (kwargs.get("num_stages") or 0)]
        t0 = time.perf_counter()
        try:
            for s in stages or [kwargs.get("num_stages")]:
                kw = kwargs if s is None else dict(kwargs, num_stages=s)
                compiled = compile_launch(kernel, args, kw, arch)
                row.update(num_stages=s, shared=int(compiled.metadata.shared))
                if limit is None or row["shared"] <= limit:
                    break
            row.update(_resource_usage(compiled))
            row["ok"] = limit is None or row["shared"] <= limit
            if not row["ok"]:
                row["error"] = f"needs {row['shared']} B of shared memory per block, sm_{arch} allows {limit}"
        except Exception as e:  # noqa: BLE001 - a compile failure is the finding: report it, go on
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[:2000]}")
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        if progress is not None:
            progress(f"{'ok ' if row['ok'] else 'FAIL'} {op} sm_{arch} stages={row['num_stages']} "
                     f"shared={row.get('shared')} reg={row.get('reg')} stack={row.get('stack')} "
                     f"{row['specialization']}" + ("" if row["ok"] else f"\n     {row['error']}"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, action="append",
                   help="compute capability x10 (90 = H100/H200, 80 = A100); repeat for several (default 90)")
    p.add_argument("--quick", action="store_true", help="a few launches per kernel instead of every branch")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--shard", default="0/1", metavar="K/N",
                   help="compile only every N-th distinct launch, starting at the K-th (run N processes at once)")
    a = p.parse_args(argv)
    try:
        k, n = (int(v) for v in a.shard.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        p.error(f"--shard must be K/N with 0 <= K < N, got {a.shard!r}")
    rows = []
    for arch in a.arch or [90]:
        rows += check(arch, a.quick, progress=lambda s: print(s, flush=True), shard=(k, n))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} launches compile within their shared-memory limit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
