"""The Triton kernels compile for the GPU the project targets (sm_90), on this GPU-less machine.

The suite runs the kernels in Triton's CPU interpreter, which never lowers them to PTX: a kernel can pass every
interpreted test and still fail to compile on a GPU (the scan did, for stores wider than the kept units), or
need more shared memory than a block gets. far_kernels.triton_aot compiles every launch its launchers make, at
the GPU tiling, with Triton's own specialization rules."""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")


def _aot_available() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError:
        return False
    return hasattr(JITFunction, "_pack_args")


@pytest.mark.skipif(not _aot_available(), reason="this triton lacks the internals triton_aot compiles with")
def test_every_triton_launch_compiles_for_sm90_within_its_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from an earlier run's cache
    # two processes, each compiling every other distinct launch (CI has two cores; ~70 compiles)
    outs = [tmp_path / f"aot{k}.json" for k in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "far_kernels.triton_aot", "--arch", "90", "--shard", f"{k}/2",
                               "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for k, out in enumerate(outs)]
    logs = [p.communicate(timeout=1200)[0] for p in procs]
    rows = []
    for out, log in zip(outs, logs):
        assert out.exists(), log
        rows += json.loads(out.read_text())
    bad = [f"{x['op']} {x['specialization']}: {x['error'][:400]}" for x in rows if not x["ok"]]
    assert not bad, "\n".join(bad)
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    assert len({(x["kernel"], x["specialization"]) for x in rows}) == len(rows)  # the shards did not overlap
    # the launches cover every branch that changes the compiled code
    xbar = [x["specialization"] for x in rows if x["op"] == "crossbar_matmul"]
    for flag in ("MODE=0", "MODE=1", "MODE=2", "MODE=3", "FLOAT_LEV=True", "READ_NOISE=True", "NSUB=2",
                 "HAS_BIAS=False", "OFFSET=128"):
        assert any(flag in s for s in xbar), flag
    assert all("BM=64 BN=128" in s for s in xbar)  # the GPU tiling, not the interpreter's
    scan = [x["specialization"] for x in rows if x["kernel"] == "_bilstm_scan_kernel"]
    for flag in ("OP_DT=bf16", "OP_DT=fp16", "OP_DT=fp32", "F32_PREC=tf32x3", "BB=32", "BB=64", "NZ=32",
                 "OP_DT=fp32 SPLIT=False F32_PREC=ieee OUT_DT=bf16"):
        assert any(flag in s for s in scan), flag
    assert any(x["kernel"] == "_activations_kernel" for x in rows)
    # Triton's own specialization tells launches apart, not just the constexprs: arguments equal to 1 (compiled as
    # constants: the cuda tests' B = T = 1 and H = B = 1), unaligned n (37, 8), aligned DeiT-sized crossbar
    # strides, a crossbar read of one row and one tile from an unaligned input
    for flag in ("ones=B,T ", "ones=H,B ", "unaligned=H,B,T,n,"):
        assert any(flag in s for s in scan), flag
    for flag in ("ones=M,T unaligned=x_ptr,bias_ptr", "ones=- unaligned=T", "TILE_ROWS=100", "MODE=3"):
        assert any(flag in s for s in xbar), flag
    assert any("MODE=3" in s and "NSUB=2" in s for s in xbar)
    assert all(x["shared"] <= x["shared_limit"] == 232448 for x in rows)


def test_triton_aot_refuses_the_interpreter():
    from far_kernels import triton_aot

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the suite sets TRITON_INTERPRET=1 unless a GPU runs it")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_aot.check(90, quick=True)


def test_crossbar_launch_retries_with_fewer_stages_when_shared_memory_runs_out(monkeypatch):
    """A GPU launch whose tiles need more shared memory than the block gets is retried at 2, then 1 stage, and
    the depth that fit is remembered; if 1 stage does not fit either, the error reaches the caller."""
    from triton.runtime.errors import OutOfResources

    from far_kernels.ops.crossbar_matmul import triton as K
    from far_kernels.ops.crossbar_matmul.config import CrossbarConfig
    from far_kernels.ops.crossbar_matmul.program import prepare_call

    fits = {"at": 2}
    tried = []

    class Fake:
        def __getitem__(self, grid):
            def launch(*args, num_stages, **kwargs):
                tried.append(num_stages)
                if num_stages > fits["at"]:
                    raise OutOfResources(229376 * num_stages // 3, 166912, "shared memory")
                args[8].fill_(float(num_stages))  # y: marks which launch ran
            return launch

    monkeypatch.setattr(K, "_crossbar_kernel", Fake())
    monkeypatch.setattr(K, "_gpu_launch", lambda device: True)
    monkeypatch.setattr(K, "_STAGES", {})
    cfg = CrossbarConfig(tile_rows=256, prog_noise=0.02)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 300, generator=g), torch.randn(8, 300, generator=g)

    def call():
        return K.crossbar_matmul_triton(prepare_call(x, w, cfg, None, None, consume_read=False))

    y = call()
    assert tried == [3, 2] and bool((y == 2).all())
    tried.clear()
    assert bool((call() == 2).all()) and tried == [2]  # remembered: no failed launch the second time
    monkeypatch.setattr(K, "_STAGES", {})
    fits["at"] = 0
    tried.clear()
    with pytest.raises(OutOfResources):
        call()
    assert tried == [3, 2, 1]
