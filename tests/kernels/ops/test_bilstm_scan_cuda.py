"""bilstm_scan's cuda backend (csrc/cuda/bilstm_cuda.cu) against the float64 reference.

Awkward grid: T = 1, 50, 197; B = 1, 3, 17, 64; kept units 64 / 37 / 0 mixed per (direction, head);
fp32/fp16/bf16; both kernel paths (FMA, exact fp32 math; tensor-core MMA, h and W_hh rounded to the
input dtype). Fresh random inputs, NaN-poisoned outputs, derived tolerances (conftest.assert_close_derived):
the kernel's error against the float64 oracle is at most twice the error of the same math done by
plain PyTorch in the same precision; for the MMA path "the same math" rounds h and W_hh to the input
dtype before every recurrent product (bilstm_scan_ref(..., product_dtype=)). Every test needs a CUDA device and
the extension built with its CUDA kernels; each is skipped with the reason otherwise.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from far_kernels import bilstm_scan, bilstm_scan_ref
from far_kernels.dispatch import BackendUnavailable
from far_kernels.testing import behind_a_busy_side_stream
from conftest import assert_close_derived, require_backend

pytestmark = pytest.mark.cuda

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TANH_APPROX_REL_ERR = 2.0 ** -11  # tanh.approx.f32, PTX ISA "Floating Point Instructions: tanh"
ACT_SLACK = 1e-5  # ex2.approx/rcp.approx activations (~1e-7 each), accumulated over the steps


@pytest.fixture(autouse=True)
def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    require_backend("cuda", "cuda")


@pytest.fixture
def path_env(monkeypatch):
    def set_(path="auto", fast=False):
        monkeypatch.setenv("FAR_CUDA_SCAN_PATH", path)
        monkeypatch.setenv("FAR_CUDA_FAST_TANH", "1" if fast else "0")
    return set_


def make_inputs(H, B, T, n, seed, dtype, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    gx = torch.randn(H, B, T, 2, 4 * n, generator=g) * scale
    w = torch.randn(H, 2, 4 * n, n, generator=g) / n ** 0.5
    return gx.to(dtype), w.to(dtype)


def run_cuda(gx, w, hs):
    """Poisoned output, the cuda backend, back on the CPU."""
    H, B, T, _, G = gx.shape
    out = torch.full((H, B, T, 2, G // 4), float("nan"), dtype=gx.dtype, device="cuda")
    res = bilstm_scan(gx.cuda(), w.cuda(), hs, backend="cuda", out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.cuda.synchronize()
    return out.cpu()


def check(gx, w, hs, path, fast=False, name=""):
    out = run_cuda(gx, w, hs)
    ref64 = bilstm_scan_ref(gx.double(), w.double(), hs)
    if path == "mma":
        out_pt = bilstm_scan_ref(gx, w, hs, product_dtype=gx.dtype)
    else:
        out_pt = bilstm_scan_ref(gx, w, hs)
    # tanh.approx: each of the 5 activations per cell errs by <= 2^-11 (|tanh| <= 1); allow 8 of them
    tiny = 8 * TANH_APPROX_REL_ERR if fast else ACT_SLACK
    assert_close_derived(out, ref64, out_pt, name, tiny=tiny)
    for d in (0, 1):
        for h in range(gx.shape[0]):
            assert (out[h, :, :, d, int(hs[d, h]):] == 0).all(), f"{name}: pruned units must be written as 0"
    return out


GRID_TB = [(T, B) for T in (1, 50, 197) for B in (1, 3, 17, 64)]
HS_MIXED = [[64, 37, 0], [0, 64, 37]]  # [2, H]: 64, 37 and 0 kept units in each direction
VARIANTS = [("fp32", "fma"), ("fp16", "fma"), ("fp16", "mma"), ("bf16", "fma"), ("bf16", "mma")]


@pytest.mark.parametrize("dname,path", VARIANTS, ids=[f"{d}-{p}" for d, p in VARIANTS])
@pytest.mark.parametrize("T,B", GRID_TB, ids=[f"T{T}-B{B}" for T, B in GRID_TB])
def test_grid_matches_reference(path_env, dname, path, T, B):
    path_env(path)
    dtype = DTYPES[dname]
    gx, w = make_inputs(3, B, T, 64, seed=int.from_bytes(os.urandom(4), "little"), dtype=dtype)
    check(gx, w, torch.tensor(HS_MIXED), path, name=f"{dname}/{path}/T{T}/B{B}")


# (H, B, T, n, hidden [2, H]): n not a multiple of 8; n = 16 (narrow kernels); n = 96 with kept <= 64
# (fast kernels, wide stride) and kept 96 (the simple wide kernel, path auto only); all pruned.
SHAPES = [
    pytest.param(2, 9, 50, 37, [[37, 20], [37, 1]], id="H2-B9-T50-n37"),
    pytest.param(2, 20, 33, 37, [[37, 37], [8, 36]], id="H2-B20-T33-n37"),
    pytest.param(1, 17, 50, 16, [[16], [9]], id="H1-B17-T50-n16"),
    pytest.param(2, 18, 20, 96, [[64, 3], [40, 64]], id="H2-B18-T20-n96-kept64"),
    pytest.param(2, 5, 20, 96, [[96, 50], [0, 96]], id="H2-B5-T20-n96-wide"),
    pytest.param(2, 4, 10, 64, [[0, 0], [0, 0]], id="H2-B4-T10-all-pruned"),
]


@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("H,B,T,n,hs", SHAPES)
def test_shapes_match_reference(path_env, dname, H, B, T, n, hs):
    dtype = DTYPES[dname]
    paths = ["fma", "mma"] if dtype != torch.float32 else ["fma"]
    if max(max(r) for r in hs) > 64:
        paths = ["auto"]
    for path in paths:
        path_env(path)
        gx, w = make_inputs(H, B, T, n, seed=int.from_bytes(os.urandom(4), "little"), dtype=dtype)
        check(gx, w, torch.tensor(hs), path, name=f"{dname}/{path}")


def test_persistent_blocks_run_many_items(path_env):
    """More (dir, head, batch tile) items than resident blocks: each block loops over several items,
    reloading W_hh only when (dir, head) changes; mixed kept sizes including 0 along the way."""
    H, B, T, n = 12, 600, 6, 64
    hs = torch.tensor([[64, 37, 0, 64, 5, 64, 33, 64, 0, 64, 64, 17], [64, 0, 64, 48, 64, 1, 64, 64, 64, 0, 9, 64]])
    for dname, path in (("fp32", "fma"), ("fp16", "mma"), ("bf16", "fma")):
        path_env(path)
        gx, w = make_inputs(H, B, T, n, seed=int.from_bytes(os.urandom(4), "little"), dtype=DTYPES[dname])
        check(gx, w, hs, path, name=f"persistent {dname}/{path}")


@pytest.mark.parametrize("dname,path", VARIANTS, ids=[f"{d}-{p}" for d, p in VARIANTS])
@pytest.mark.parametrize("B", [3, 64])
def test_fast_tanh_within_its_documented_error(path_env, dname, path, B):
    path_env(path, fast=True)
    gx, w = make_inputs(3, B, 197, 64, seed=int.from_bytes(os.urandom(4), "little"), dtype=DTYPES[dname])
    check(gx, w, torch.tensor(HS_MIXED), path, fast=True, name=f"fast-tanh {dname}/{path}")


@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("B", [3, 40])
def test_auto_is_fma_below_16_rows_and_mma_from_16(path_env, dname, B):
    gx, w = make_inputs(2, B, 30, 64, seed=int.from_bytes(os.urandom(4), "little"), dtype=DTYPES[dname])
    hs = torch.tensor([[64, 37], [0, 64]])
    path_env("auto")
    auto = run_cuda(gx, w, hs)
    expect = "mma" if DTYPES[dname] != torch.float32 and B >= 16 else "fma"
    path_env(expect)
    assert torch.equal(auto, run_cuda(gx, w, hs)), f"auto should run the {expect} path"


@pytest.mark.parametrize("fast", [False, True], ids=["accurate", "fast-tanh"])
@pytest.mark.parametrize("dname,path", VARIANTS, ids=[f"{d}-{p}" for d, p in VARIANTS])
def test_huge_preactivations_saturate_without_nan(path_env, dname, path, fast):
    path_env(path, fast)
    dtype = DTYPES[dname]
    big = 3e38 if dtype != torch.float16 else 6e4
    gx, w = make_inputs(2, 17, 20, 16, seed=7, dtype=torch.float32, scale=1e4)
    gx = gx.clamp(-big, big)
    gx[0, 0, 3, 0, :5] = big
    gx[0, 1, 4, 1, 5:9] = -big
    gx, w = gx.to(dtype), (w * 100).to(dtype)
    out = check(gx, w, torch.full((2, 2), 16), path, fast, name=f"huge {dname}/{path}")
    assert out.abs().max() <= 1


@pytest.mark.parametrize("dname,path", VARIANTS, ids=[f"{d}-{p}" for d, p in VARIANTS])
def test_nan_input_propagates_to_its_row_only(path_env, dname, path):
    path_env(path)
    gx, w = make_inputs(1, 17, 5, 8, seed=3, dtype=DTYPES[dname])
    gx[0, 0, 2, 0, 0] = float("nan")
    out = run_cuda(gx, w, torch.full((2, 1), 8))
    assert torch.isnan(out[0, 0, 2:, 0]).any() and torch.isfinite(out[0, 1:]).all()


def test_zero_sizes_and_noncontiguous_input(path_env):
    path_env("auto")
    for shape in ((2, 0, 5), (2, 3, 0)):
        gx, w = make_inputs(*shape, 8, seed=1, dtype=torch.float32)
        assert bilstm_scan(gx.cuda(), w.cuda(), torch.full((2, 2), 8), backend="cuda").shape == (*shape, 2, 8)
    gx, w = make_inputs(2, 3, 7, 8, seed=5, dtype=torch.float32)
    gx_nc = gx.cuda().transpose(1, 2).contiguous().transpose(1, 2)
    assert not gx_nc.is_contiguous()
    hs = torch.tensor([[8, 3], [0, 8]])
    torch.testing.assert_close(bilstm_scan(gx_nc, w.cuda(), hs, backend="cuda").cpu(), bilstm_scan_ref(gx, w, hs),
                               rtol=0, atol=1e-5)


def test_runs_on_the_current_stream(path_env):
    """The launch goes to torch's current stream: on a side stream the input is written only after a
    long GPU sleep, so a kernel launched on any other stream would read the NaN it holds before."""
    path_env("auto")
    gx, w = make_inputs(2, 20, 197, 64, seed=int.from_bytes(os.urandom(4), "little"), dtype=torch.float16)
    hs = torch.tensor([[64, 37], [0, 64]])
    expect = run_cuda(gx, w, hs)
    wc = w.cuda()
    out = behind_a_busy_side_stream(lambda g: bilstm_scan(g, wc, hs, backend="cuda"), gx.cuda())
    assert torch.equal(out.cpu(), expect)


def test_converted_weights_follow_in_place_changes(path_env):
    """The wrapper keeps an fp32 copy of a 16-bit W_hh between calls: an in-place change must reach the kernel."""
    path_env("auto")
    gx, w = make_inputs(2, 5, 30, 64, seed=int.from_bytes(os.urandom(4), "little"), dtype=torch.bfloat16)
    hs = torch.tensor([[64, 37], [0, 64]])
    wc = w.cuda()
    first = bilstm_scan(gx.cuda(), wc, hs, backend="cuda")
    wc.mul_(-0.5)
    second = bilstm_scan(gx.cuda(), wc, hs, backend="cuda").cpu()
    assert not torch.equal(first.cpu(), second)
    w2 = wc.cpu()
    assert_close_derived(second, bilstm_scan_ref(gx.double(), w2.double(), hs), bilstm_scan_ref(gx, w2, hs),
                         "after an in-place change", tiny=ACT_SLACK)


def test_wide_kernel_shared_memory_follows_the_kept_sizes_not_n(path_env):
    """The wide kernel sizes its shared memory by the widest kept (head, direction), not the padded width: at
    n = 10,000 (6n floats would be 240 KB, above any GPU's per-block maximum) a head keeping 96 units runs, equal
    bit for bit to the same problem at n = 96; a kept size too wide for shared memory is refused in words."""
    path_env("auto")
    H, B, T, k, n = 1, 3, 6, 96, 10_000
    hs = torch.tensor([[96], [64]])
    gx_s, w_s = make_inputs(H, B, T, k, seed=int.from_bytes(os.urandom(4), "little"), dtype=torch.float32)
    small = run_cuda(gx_s, w_s, hs)
    gx = torch.zeros(H, B, T, 2, 4, n, device="cuda")
    gx[..., :k] = gx_s.view(H, B, T, 2, 4, k).cuda()
    w = torch.zeros(H, 2, 4, n, n, device="cuda")  # 3.2 GB: only the kept rows and columns are nonzero
    w[..., :k, :k] = w_s.view(H, 2, 4, k, k).cuda()
    gx, w = gx.view(H, B, T, 2, 4 * n), w.view(H, 2, 4 * n, n)
    big = bilstm_scan(gx, w, hs, backend="cuda").cpu()
    assert torch.equal(big[..., :k], small) and (big[..., k:] == 0).all()
    with pytest.raises(RuntimeError, match="shared memory"):
        bilstm_scan(gx, w, torch.tensor([[n], [64]]), backend="cuda")
    del gx, w
    torch.cuda.empty_cache()


def test_bad_requests_raise_clear_errors(path_env):
    gx, w = make_inputs(1, 2, 3, 96, seed=0, dtype=torch.float32)
    hs = torch.full((2, 1), 8)
    path_env("mma")
    with pytest.raises(RuntimeError, match="mma path needs float16 or bfloat16"):
        bilstm_scan(gx.cuda(), w.cuda(), hs, backend="cuda")
    path_env("fma")
    with pytest.raises(RuntimeError, match="above 64"):
        bilstm_scan(gx.cuda(), w.cuda(), torch.full((2, 1), 96), backend="cuda")
    path_env("fastest")
    with pytest.raises(ValueError, match="FAR_CUDA_SCAN_PATH"):
        bilstm_scan(gx.cuda(), w.cuda(), hs, backend="cuda")
    path_env("auto")
    with pytest.raises(ValueError, match="gx is on"):
        bilstm_scan(gx.cuda(), w, hs, backend="cuda")
    with pytest.raises(BackendUnavailable, match="computes in fp32"):
        bilstm_scan(gx.cuda().double(), w.cuda().double(), hs, backend="cuda")
    with pytest.raises(ValueError, match="out must be"):
        bilstm_scan(gx.cuda(), w.cuda(), hs, backend="cuda", out=torch.empty(1, 2, 3, 2, 96, device="cuda").half())


# ---- compute-sanitizer: memory errors (memcheck) and shared-memory races (racecheck) ----
SANITIZED = textwrap.dedent("""
    import os, sys, torch
    from far_kernels import bilstm_scan
    print("FAR-SANITIZE-READY", flush=True)
    torch.manual_seed(0)
    small = [  # one small case: both kernels of a 16-bit call (mma and fma), pruned units, a partial tile
        (2, 17, 3, 37, [[37, 20], [5, 0]], torch.float16, "mma"),
        (2, 17, 3, 37, [[37, 20], [5, 0]], torch.float16, "fma"),
    ]
    full = [  # (H, B, T, n, hidden, dtype, path)
        (2, 3, 5, 64, [[64, 37], [0, 64]], torch.float32, "fma"),
        (2, 17, 4, 37, [[37, 20], [5, 37]], torch.float16, "mma"),
        (2, 17, 4, 37, [[37, 20], [5, 37]], torch.bfloat16, "fma"),
        (1, 33, 3, 64, [[64], [33]], torch.bfloat16, "mma"),
        (1, 9, 3, 16, [[16], [16]], torch.float16, "fma"),
        (1, 2, 3, 80, [[80], [7]], torch.float32, "auto"),
        (12, 600, 2, 64, [[64, 0] * 6, [37, 64] * 6], torch.float16, "mma"),
    ]
    for H, B, T, n, hs, dtype, path in (small if sys.argv[1] == "small" else full):
        os.environ["FAR_CUDA_SCAN_PATH"] = path
        gx = torch.randn(H, B, T, 2, 4 * n, device="cuda").to(dtype)
        w = (torch.randn(H, 2, 4 * n, n, device="cuda") / n ** 0.5).to(dtype)
        out = bilstm_scan(gx, w, torch.tensor(hs), backend="cuda")
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
    print("FAR-SANITIZE-DONE", flush=True)
""")


def _sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME
    for root in (CUDA_HOME, "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "compute-sanitizer").exists():
            return str(Path(root) / "bin" / "compute-sanitizer")
    return None


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
@pytest.mark.parametrize("cases", ["small", "full"])
def test_compute_sanitizer_is_clean(cases, tool, tmp_path):
    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)")
    script = tmp_path / "sanitized.py"
    script.write_text(SANITIZED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[3])] + sys.path)}
    proc = subprocess.run([exe, "--tool", tool, "--error-exitcode", "99", sys.executable, str(script), cases],
                          capture_output=True, text=True, timeout=400, env=env)
    log = proc.stdout + proc.stderr
    if "FAR-SANITIZE-READY" not in log and ("not supported" in log.lower() or "error 999" in log.lower()):
        pytest.skip(f"compute-sanitizer cannot attach to this device: {log[-400:]}")
    summary = re.search(r"ERROR SUMMARY: (\d+) error", log)
    assert "FAR-SANITIZE-DONE" in log, f"{tool}: script did not finish (rc {proc.returncode}):\n{log[-3000:]}"
    assert summary is not None and int(summary.group(1)) == 0 and proc.returncode == 0, f"{tool}:\n{log[-3000:]}"
