"""The CUDA scan kernels (csrc/cuda/bilstm_cuda.cu), host launcher included, run on the CPU through the emulation
in csrc/cuda/emu/cuda_emu.h (far_kernels.cuda_emu) and checked against the float64 reference, as
test_bilstm_scan_cuda.py checks them on a GPU: same tolerances (twice the error of the same math in plain PyTorch,
conftest.assert_close_derived), NaN-poisoned outputs and shared memory, fresh random inputs.

What only the emulation can show here: every batch tile the host side can pick (the emulated GPU's SM count steers
it), blocks that run many items, results that do not depend on the order threads and blocks run in (seeded random
schedules), and that the harness catches broken kernels (mutated copies of the source must fail). What it cannot
show: speed, occupancy, registers, and hardware behaviour beyond the PTX ISA's description (cuda_emu.h).
"""
import math
import os
import shutil

import pytest
import torch

from far_kernels import bilstm_scan_ref, cuda_emu
from conftest import assert_close_derived

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = [("fp32", "fma"), ("fp16", "fma"), ("fp16", "mma"), ("bf16", "fma"), ("bf16", "mma")]
HS_MIXED = [[64, 37, 0], [0, 64, 37]]  # [2, H]: 64, 37 and 0 kept units in each direction


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    reason = cuda_emu.unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the CUDA emulation: {reason}")
        pytest.skip(f"CUDA emulation unavailable: {reason}")
    return cuda_emu.load(tmp_path_factory.mktemp("cuda-emu"))


def fresh_seed():
    return int.from_bytes(os.urandom(4), "little")


def make_inputs(H, B, T, n, dtype, scale=1.0):
    g = torch.Generator().manual_seed(fresh_seed())
    gx = torch.randn(H, B, T, 2, 4 * n, generator=g) * scale
    w = torch.randn(H, 2, 4 * n, n, generator=g) / n ** 0.5
    return gx.to(dtype), w.to(dtype)


def check(emu, gx, w, hs, path, name="", **device):
    """Emulated kernel vs the float64 oracle; returns (out, launches)."""
    hs = torch.as_tensor(hs)
    out, launches = cuda_emu.scan(gx, w, hs, path=path, lib=emu, **device)
    ref64 = bilstm_scan_ref(gx.double(), w.double(), hs)
    rounded = path == "mma" or (path == "auto" and gx.dtype != torch.float32 and gx.shape[1] >= 16
                                and int(hs.max()) <= 64)
    out_pt = bilstm_scan_ref(gx, w, hs, product_dtype=gx.dtype) if rounded else bilstm_scan_ref(gx, w, hs)
    assert_close_derived(out, ref64, out_pt, name, tiny=1e-5)
    for d in (0, 1):
        for h in range(gx.shape[0]):
            assert (out[h, :, :, d, int(hs[d, h]):] == 0).all(), f"{name}: pruned units must be written as 0"
    return out, launches


def kernel_args(launch):
    """("bilstm_fma_kernel", {"KS": 16, "BT": 8}) from a launch record."""
    name = launch.name
    fn, _, args = name.partition("<")
    vals = {}
    for a in args.rstrip(">").split(", "):
        if "=" in a:
            k, v = a.split("=")
            vals[k] = int(v) if v.lstrip("-").isdigit() else v
    return fn, vals


def expected_tile(path, H, B, resident):
    """The batch tile the host side documents (csrc/cuda/NOTES.md): the smallest whose items all fit on the GPU
    at once (fma: 1, 2, 4, else 8; mma: 8, 16, else 32)."""
    tiles = (1, 2, 4, 8) if path == "fma" else (8, 16, 32)
    for bt in tiles[:-1]:
        if 2 * H * math.ceil(B / bt) <= resident:
            return bt
    return tiles[-1]


@pytest.mark.parametrize("dname,path", VARIANTS, ids=[f"{d}-{p}" for d, p in VARIANTS])
@pytest.mark.parametrize("T,B", [(1, 1), (9, 3), (6, 17), (3, 40)], ids=lambda v: str(v))
def test_grid_matches_reference(emu, dname, path, T, B):
    gx, w = make_inputs(3, B, T, 64, DTYPES[dname])
    _, launches = check(emu, gx, w, HS_MIXED, path, name=f"{dname}/{path}/T{T}/B{B}")
    assert len(launches) == 1
    fn, args = kernel_args(launches[0])
    assert fn == f"bilstm_{path}_kernel", launches[0].name
    assert launches[0].block == 32 * 8  # one warp per 8 kept units of the widest (64)


TILE_CASES = [(d, p, 64) for d, p in VARIANTS] + [("fp32", "fma", 29), ("bf16", "mma", 29)]  # k <= 32: KS 8, KT 2


@pytest.mark.parametrize("dname,path,kmax", TILE_CASES, ids=[f"{d}-{p}-k{k}" for d, p, k in TILE_CASES])
def test_every_batch_tile_and_blocks_of_many_items(emu, dname, path, kmax):
    """The emulated GPU's size steers the host side through every tile; few SMs make each block loop over many
    (direction, head, tile) items, reloading W_hh when (direction, head) changes; a random schedule per case."""
    H, B, T = 3, 37, 3
    hs = [[kmax, 13, 0], [0, kmax, 1]]
    tiles = set()
    for sms in (400, 150, 60, 30, 18, 7, 1):
        gx, w = make_inputs(H, B, T, 64, DTYPES[dname])
        _, launches = check(emu, gx, w, hs, path, name=f"{dname}/{path}/sms{sms}", sms=sms,
                            schedule_seed=fresh_seed() | 1)
        (launch,) = launches
        fn, args = kernel_args(launch)
        tile = args["BT"] if path == "fma" else 8 * args["NT"]
        assert tile == expected_tile(path, H, B, sms), (sms, launch.name)
        if path == "fma":
            assert args["KS"] == (8 if kmax <= 32 else 16)
        else:
            assert args["KT"] == (2 if kmax <= 32 else 4)
        assert launch.block == 32 * math.ceil(kmax / 8)
        items = 2 * H * math.ceil(B / tile)
        per_block = math.ceil(items / sms)
        assert launch.grid == math.ceil(items / per_block) <= sms
        tiles.add(tile)
    assert tiles == ({1, 2, 4, 8} if path == "fma" else {8, 16, 32})


# (H, B, T, n, hidden [2, H]): n not a multiple of 8; n = 16; n = 96 with kept <= 64 (fast kernels, wide stride)
# and kept 96 (the simple wide kernel, path auto only); all pruned.
SHAPES = [
    pytest.param(2, 9, 7, 37, [[37, 20], [37, 1]], id="H2-B9-T7-n37"),
    pytest.param(2, 20, 5, 37, [[37, 37], [8, 36]], id="H2-B20-T5-n37"),
    pytest.param(1, 17, 6, 16, [[16], [9]], id="H1-B17-T6-n16"),
    pytest.param(2, 18, 4, 96, [[64, 3], [40, 64]], id="H2-B18-T4-n96-kept64"),
    pytest.param(2, 5, 4, 96, [[96, 50], [0, 96]], id="H2-B5-T4-n96-wide"),
    pytest.param(2, 4, 3, 64, [[0, 0], [0, 0]], id="H2-B4-T3-all-pruned"),
]


@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("H,B,T,n,hs", SHAPES)
def test_shapes_match_reference(emu, dname, H, B, T, n, hs):
    dtype = DTYPES[dname]
    paths = ["fma", "mma"] if dtype != torch.float32 else ["fma"]
    if max(max(r) for r in hs) > 64:
        paths = ["auto"]
    for path in paths:
        gx, w = make_inputs(H, B, T, n, dtype)
        _, launches = check(emu, gx, w, hs, path, name=f"{dname}/{path}", sms=5)
        if max(max(r) for r in hs) > 64:
            assert kernel_args(launches[0])[0] == "bilstm_wide_kernel"


@pytest.mark.parametrize("dname,path", VARIANTS, ids=[f"{d}-{p}" for d, p in VARIANTS])
def test_result_does_not_depend_on_the_schedule(emu, dname, path):
    """Threads and blocks in random orders (a missing barrier or a read of another warp's unfinished h shows up as
    a difference): bit-identical outputs."""
    gx, w = make_inputs(3, 19, 5, 64, DTYPES[dname])
    outs = [cuda_emu.scan(gx, w, HS_MIXED, path=path, sms=3, schedule_seed=s, lib=emu)[0]
            for s in (0, fresh_seed() | 1, fresh_seed() | 1)]
    for o in outs[1:]:
        assert torch.equal(o.view(torch.int16 if o.dtype != torch.float32 else torch.int32),
                           outs[0].view(torch.int16 if o.dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("fast", [False, True], ids=["accurate", "fast-tanh"])
@pytest.mark.parametrize("dname,path", VARIANTS, ids=[f"{d}-{p}" for d, p in VARIANTS])
def test_huge_preactivations_saturate_and_nan_stays_in_its_row(emu, dname, path, fast):
    dtype = DTYPES[dname]
    gx, w = make_inputs(2, 17, 4, 64, dtype, scale=1e4 if dtype != torch.float16 else 6e4)
    out, _ = cuda_emu.scan(gx, w, [[64, 30], [64, 30]], path=path, fast_tanh=fast, lib=emu)
    assert not out.isnan().any() and out.abs().max() <= 1
    gx, w = make_inputs(2, 17, 4, 64, dtype)
    gx[1, 5, 2, 0, 3] = float("nan")  # head 1, row 5, t = 2, forward
    out, _ = cuda_emu.scan(gx, w, [[64, 30], [64, 30]], path=path, fast_tanh=fast, lib=emu)
    bad = out.isnan()
    assert bad[1, 5, 2, 0, 3] and bad[1, 5, 2, 0].sum() == 1  # t = 2: the unit whose input gate is NaN
    assert bad[1, 5, 3:, 0, :30].all()  # later steps: every kept unit, through W_hh
    assert bad.sum() == 1 + bad[1, 5, 3:, 0, :30].numel()  # nowhere else: not t < 2, another row, head or direction


@pytest.mark.parametrize("dname,path", [("fp32", "fma"), ("fp16", "mma")])
@pytest.mark.parametrize("mode", ["up", "down"])
def test_fast_tanh_bound_holds_with_the_isa_worst_error_on_every_activation(emu, dname, path, mode):
    """test_bilstm_scan_cuda.py allows fast tanh 8 * 2^-11 over the float64 oracle (8 activations' worth). Here
    every tanh.approx call errs by the ISA's maximum relative error, all in one direction, over 120 steps: the
    recurrence must not amplify it past that bound (measured: about 2.2 * 2^-11 at 197 steps)."""
    gx, w = make_inputs(3, 3, 120, 64, DTYPES[dname])
    hs = torch.tensor(HS_MIXED)
    out, _ = cuda_emu.scan(gx, w, hs, path=path, fast_tanh=True, tanh_bias=cuda_emu.TANH_APPROX_REL_ERR,
                           tanh_bias_mode=mode, lib=emu)
    ref64 = bilstm_scan_ref(gx.double(), w.double(), hs)
    out_pt = bilstm_scan_ref(gx, w, hs, product_dtype=gx.dtype) if path == "mma" else bilstm_scan_ref(gx, w, hs)
    err, err_pt = assert_close_derived(out, ref64, out_pt, f"fast tanh {mode}", tiny=8 * cuda_emu.TANH_APPROX_REL_ERR)
    assert err > 2 * err_pt, "the biased tanh must show in the result (else this test checks nothing)"


def test_wide_kernel_shared_memory_above_48k_and_above_the_opt_in_limit(emu):
    """Kept 2064 units: 6 * 2064 floats = 49,536 bytes of dynamic shared memory, which a launch gets only after
    cudaFuncSetAttribute; above the GPU's opt-in limit the call names the sizes."""
    k = 2064
    gx, w = make_inputs(1, 2, 2, k, torch.float32, scale=0.1)
    _, launches = check(emu, gx, w, [[k], [7]], "auto", name="wide k2064")
    assert launches[0].shmem == 6 * k * 4 and launches[0].block == 1024
    with pytest.raises(RuntimeError, match=r"needs 49536 bytes of shared memory per block, above this GPU's 49152"):
        cuda_emu.scan(gx, w, [[k], [7]], optin_smem=49152, lib=emu)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(dtype=torch.float32, path="mma"), "the mma path needs float16 or bfloat16"),
    (dict(dtype=torch.float16, path="fma", n=65), "hidden sizes above 64 run only the simple kernel"),
    (dict(dtype=torch.float16, path="auto", H=257), "at most 256 heads"),
])
def test_host_side_refusals(emu, kwargs, needle):
    H, n = kwargs.get("H", 1), kwargs.get("n", 8)
    gx, w = make_inputs(H, 1, 1, n, kwargs["dtype"])
    with pytest.raises(RuntimeError, match=needle):
        cuda_emu.scan(gx, w, [[n] * H, [n] * H], path=kwargs["path"], lib=emu)


# Mutations of the kernel source the emulation must catch: (what, original text, replacement, path, how it shows)
MUTANTS = [
    ("mma A fragment rows g+8 and cols +8 swapped",
     "          a[mt][ks][1] = pack2<T>(wv(2 * mt + 1, c0), wv(2 * mt + 1, c0 + 1));\n"
     "          a[mt][ks][2] = pack2<T>(wv(2 * mt, c0 + 8), wv(2 * mt, c0 + 9));",
     "          a[mt][ks][2] = pack2<T>(wv(2 * mt + 1, c0), wv(2 * mt + 1, c0 + 1));\n"
     "          a[mt][ks][1] = pack2<T>(wv(2 * mt, c0 + 8), wv(2 * mt, c0 + 9));", "mma", "wrong"),
    ("fma kernel without the barrier after each step",
     "        out[out_row(p, head, b0 + r, t, dir) + u] = from_f32<T>(h);\n      }\n      __syncthreads();",
     "        out[out_row(p, head, b0 + r, t, dir) + u] = from_f32<T>(h);\n      }\n", "fma", "wrong"),
    ("pruned units never written", "  if (k == p.n) return;", "  return;", "fma", "nan"),
    ("a shuffle only half the warp reaches",
     "              pair[q][2 * j + lo] = keep + __shfl_xor_sync(0xffffffffu, give, 2);",
     "              pair[q][2 * j + lo] = (lane < 16) ? keep + __shfl_xor_sync(0xffffffffu, give, 2) : keep;",
     "fma", "error"),
]


def test_the_emulation_catches_broken_kernels(tmp_path):
    """Each mutated copy of bilstm_cuda.cu builds and runs, and its result is wrong, NaN or an emulation error —
    so a pass of the tests above means something."""
    if cuda_emu.unavailable_reason():
        pytest.skip(cuda_emu.unavailable_reason())
    hs = [[64, 37, 0], [0, 64, 37]]
    for i, (what, old, new, path, shows) in enumerate(MUTANTS):
        src = tmp_path / f"m{i}" / "csrc"
        shutil.copytree(cuda_emu._CSRC, src)
        cu = src / "cuda" / "bilstm_cuda.cu"
        text = cu.read_text()
        assert text.count(old) == 1, f"mutant '{what}': its original text is not in bilstm_cuda.cu (update MUTANTS)"
        cu.write_text(text.replace(old, new))
        lib = cuda_emu.load(tmp_path / f"m{i}" / "build", src, opt="-O0")
        dtype = torch.float16 if path == "mma" else torch.float32
        gx, w = make_inputs(3, 17, 6, 64, dtype)
        try:
            out, _ = cuda_emu.scan(gx, w, hs, path=path, sms=2, schedule_seed=fresh_seed() | 1, lib=lib)
        except RuntimeError as e:
            assert shows == "error", f"mutant '{what}': unexpected error {e}"
            assert "different collectives" in str(e) or "deadlock" in str(e), str(e)
            continue
        assert shows != "error", f"mutant '{what}' ran without the emulation noticing"
        if shows == "nan":
            assert out.isnan().any(), f"mutant '{what}' was not caught"
        else:
            ref = bilstm_scan_ref(gx.double(), w.double(), torch.tensor(hs))
            assert (out.double() - ref).abs().max() > 0.05, f"mutant '{what}' was not caught"
