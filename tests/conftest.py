"""Shared test helpers: the backends to test, an independent FAR-block oracle built from torch.nn.LSTM
(far_kernels.testing has the derived-tolerance asserts and the per-head oracle; re-exported here)."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

# Triton runs kernels on CPU tensors only in its interpreter, and the mode is fixed when triton is
# first imported (torch._dynamo, which timm and far import, does that): choose it here, first, on
# machines without a CUDA device. The shared CPU grids add "triton" only when the user set
# TRITON_INTERPRET=1 (slow); tests/kernels/ops/test_bilstm_scan_triton.py always covers it.
USER_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import far_kernels  # noqa: E402
from far_kernels.testing import (assert_close_derived, assert_same_rounding, max_err, per_head_lstm,  # noqa: E402,F401
                                 poisoned)

# The GPU suite's first test stage (bench/gpu_suite.sh, `pytest -m gpu_smoke`): one representative per
# kernel path and dtype, the current-stream checks, memcheck on one small case. Every id must exist
# (tests/bench/test_gpu_suite.py checks that the suite's dry run selects exactly these), so the list cannot
# rot silently. The suite runs them in this order; bench/gpu_suite_stage.py evaluates this assignment alone
# (no imports: plain strings, f-strings and generators only).
GPU_SMOKE = (
    *(f"tests/kernels/ops/test_bilstm_scan_cuda.py::test_grid_matches_reference[T197-B17-{v}]"
      for v in ("fp32-fma", "fp16-fma", "fp16-mma", "bf16-fma", "bf16-mma")),
    "tests/kernels/ops/test_bilstm_scan_cuda.py::test_shapes_match_reference[H2-B5-T20-n96-wide-fp16]",
    "tests/kernels/ops/test_bilstm_scan_cuda.py::test_runs_on_the_current_stream",
    "tests/kernels/ops/test_bilstm_scan_cuda.py::test_converted_weights_follow_in_place_changes",
    *(f"tests/kernels/ops/test_bilstm_scan_triton.py::test_cuda_matches_reference[H6-B64-T197-n64-pruned-{d}]"
      for d in ("fp32", "fp16", "bf16")),
    "tests/kernels/ops/test_bilstm_scan_triton.py::test_cuda_far_block[bf16]",
    "tests/kernels/ops/test_bilstm_scan_triton.py::test_cuda_runs_on_the_current_stream",
    "tests/kernels/ops/test_crossbar_matmul_triton.py::test_triton_cuda_noise",
    "tests/test_checkpoint.py::test_load_to_cuda",
    "tests/kernels/ops/test_bilstm_scan_cuda.py::test_compute_sanitizer_is_clean[small-memcheck]",  # last: slowest
)


# Tests marked `fmnist` read the real Fashion-MNIST test set; they skip where it is not installed, except in CI,
# which installs it (.ci/run), so that there a missing dataset fails instead of passing quietly.
FMNIST_DIR = Path(os.environ.get("FAR_FASHION_MNIST") or "/usr/share/datasets/fashion-mnist")
FMNIST_MISSING = not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file() and os.environ.get("CI") != "true"


def pytest_collection_modifyitems(config, items):
    smoke = set(GPU_SMOKE)
    skip_fmnist = pytest.mark.skip(reason=f"Fashion-MNIST not installed in {FMNIST_DIR} "
                                          "(apt-get install -y dataset-fashion-mnist)")
    for item in items:
        if item.nodeid in smoke:
            item.add_marker(pytest.mark.gpu_smoke)
        if FMNIST_MISSING and item.get_closest_marker("fmnist") is not None:
            item.add_marker(skip_fmnist)


def load_bench(name: str):
    """bench/<name>.py imported as a module (the bench folder is scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cpu_backends(op=None):
    """Backends of `op` (default: the scan's OP) to test on CPU: torch always, cpp when the extension is
    built (CI builds it), triton only when the user set TRITON_INTERPRET=1 and the op has a Triton kernel."""
    op = op or far_kernels.ops.bilstm_scan.OP
    out = ["torch", "cpp"]
    if USER_INTERPRET and op.impls.get("triton"):
        out.append("triton")
    return out


def require_backend(backend, device="cpu", op=None):
    why = (op or far_kernels.ops.bilstm_scan.OP).reason(backend, device)
    if why is not None:
        if os.environ.get("CI") == "true" and backend == "cpp":
            pytest.fail(f"CI must build the cpp backend: {why}")
        pytest.skip(f"backend {backend} unavailable: {why}")


def far_block_oracle(m, x):
    """FAR block composed from per-head torch.nn.LSTM in float64: proj(cat_h head_proj_h(BiLSTM_h(pre_proj x)))."""
    f64 = torch.float64
    with torch.no_grad():
        xh = nn.functional.linear(x.double(), m.pre_proj.weight.double(), m.pre_proj.bias.double())
        d = m.head_dim
        heads = []
        for h in range(m.num_heads):
            params = [[t.double() for t in m.lstm_params(dr, h)] for dr in (0, 1)]
            y = per_head_lstm(xh[..., h * d:(h + 1) * d], params)
            w, b = m.head_proj_params(h)
            heads.append(y @ w.to(f64).T + b.to(f64))
        o = torch.cat(heads, dim=-1)
        bias = None if m.proj.bias is None else m.proj.bias.double()
        return nn.functional.linear(o, m.proj.weight.double(), bias)


class HalvesImages(torch.utils.data.Dataset):
    """n random (image [1, 28, 28], label) pairs held in memory; the label says which half of the image is brighter,
    so that a model learns something in a few steps (two classes)."""

    def __init__(self, n: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 28, 28, generator=g)
        self.y = (self.x[:, 0, :14].mean((1, 2)) > self.x[:, 0, 14:].mean((1, 2))).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class RandomImages(torch.utils.data.Dataset):
    """n random (image [1, 28, 28], label in 0..9) pairs held in memory, drawn from `seed`."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 28, 28, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])
