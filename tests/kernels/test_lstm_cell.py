"""csrc/lstm_cell.h, the LSTM cell math that the CPU and CUDA scans share, compiled for the CPU.

The CUDA scan computes its cell with lstm_cell_via_tanh (every activation from one tanh) and the
accurate tanh_via_exp; no other CPU test reaches that code, so a swapped gate there would pass
every test that runs without a GPU. Here a small C++ driver (g++, the header as the CUDA kernel
includes it, no torch) runs lstm_cell, lstm_cell_via_tanh with tanh_via_exp and with std::tanh, and
the 8-lane VecF8 lstm_cell of the CPU kernel on fresh random gates and cell states, plus saturating
and non-finite inputs; each is checked against the float64 cell with a derived tolerance (twice the
error of the same update in float32 torch, plus the activations' ~1e-7)."""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from far_kernels.testing import assert_close_derived

CSRC = Path(__file__).resolve().parents[2] / "csrc"
DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "lstm_cell.h"
struct TanhExp { float operator()(float x) const { return far::tanh_via_exp(x); } };
struct TanhStd { float operator()(float x) const { return std::tanh(x); } };
// argv: in (N x 5 float32: gi gf gg go c), out (N x 8 float32: h, c of lstm_cell, via_tanh(tanh_via_exp),
// via_tanh(std::tanh), VecF8 lstm_cell), N
int main(int argc, char** argv) {
  const long n = std::atol(argv[3]);
  std::vector<float> in(5 * n), out(8 * n);
  FILE* f = std::fopen(argv[1], "rb");
  if (!f || std::fread(in.data(), sizeof(float), in.size(), f) != in.size()) return 2;
  std::fclose(f);
  for (long r = 0; r < n; ++r) {
    const float* g = &in[5 * r];
    float* o = &out[8 * r];
    float c = g[4];
    o[0] = far::lstm_cell(g[0], g[1], g[2], g[3], c); o[1] = c;
    c = g[4];
    o[2] = far::lstm_cell_via_tanh(g[0], g[1], g[2], g[3], c, TanhExp{}); o[3] = c;
    c = g[4];
    o[4] = far::lstm_cell_via_tanh(g[0], g[1], g[2], g[3], c, TanhStd{}); o[5] = c;
  }
  for (long r0 = 0; r0 < n; r0 += 8) {  // the CPU kernel's 8-lane form, rows r0 .. r0+7 as lanes
    far::VecF8 gi{}, gf{}, gg{}, go{}, c{};
    for (int l = 0; l < 8 && r0 + l < n; ++l) {
      const float* g = &in[5 * (r0 + l)];
      gi[l] = g[0]; gf[l] = g[1]; gg[l] = g[2]; go[l] = g[3]; c[l] = g[4];
    }
    const far::VecF8 h = far::lstm_cell(gi, gf, gg, go, c);
    for (int l = 0; l < 8 && r0 + l < n; ++l) { out[8 * (r0 + l) + 6] = h[l]; out[8 * (r0 + l) + 7] = c[l]; }
  }
  f = std::fopen(argv[2], "wb");
  if (!f || std::fwrite(out.data(), sizeof(float), out.size(), f) != out.size()) return 3;
  std::fclose(f);
  return 0;
}
"""
VARIANTS = {"lstm_cell": 0, "via_tanh(tanh_via_exp)": 2, "via_tanh(std::tanh)": 4, "lstm_cell(VecF8)": 6}


def build_driver(d: Path, include: Path) -> Path:
    """Compile DRIVER in `d` against the lstm_cell.h in `include`; skip without a compiler (fail in CI)."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have a C++ compiler (it builds far_kernels._C)")
        pytest.skip("no C++ compiler (g++/c++) on PATH")
    (d / "driver.cpp").write_text(DRIVER)
    exe = d / "driver"
    # the extension's host flags (setup.py): no -ffast-math, so NaN and inf behave as in the kernels
    r = subprocess.run([cxx, "-O3", "-std=c++20", "-fno-math-errno", "-Wno-psabi", f"-I{include}", str(d / "driver.cpp"),
                        "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build_driver(tmp_path_factory.mktemp("lstm_cell"), CSRC)


def run_cell(exe, gates_c: np.ndarray) -> np.ndarray:
    """gates_c [N, 5] (gi, gf, gg, go, c) float32 -> [N, 8] float32 (h, c) per variant."""
    d = exe.parent
    n = gates_c.shape[0]
    np.ascontiguousarray(gates_c, dtype=np.float32).tofile(d / "in.bin")
    subprocess.run([str(exe), str(d / "in.bin"), str(d / "out.bin"), str(n)], check=True, timeout=60)
    return np.fromfile(d / "out.bin", dtype=np.float32).reshape(n, 8)


def cell(gates_c: torch.Tensor):
    """The LSTM cell in torch, in gates_c's dtype: (h, c)."""
    gi, gf, gg, go, c = gates_c.unbind(-1)
    c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
    return torch.sigmoid(go) * torch.tanh(c), c


def check_variants(out, x, tiny, name=""):
    x32 = torch.from_numpy(x)
    h64, c64 = cell(x32.double())
    h32, c32 = cell(x32)
    res = torch.from_numpy(out)
    for vname, col in VARIANTS.items():
        assert_close_derived(res[:, col], h64, h32, f"{name}{vname} h", tiny=tiny)
        assert_close_derived(res[:, col + 1], c64, c32, f"{name}{vname} c", tiny=tiny)


def test_cell_updates_match_float64_on_random_gates(driver):
    g = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    n = 4099  # not a multiple of 8: a partial VecF8 group
    x = np.concatenate([g.normal(0, 3, (n, 4)), g.normal(0, 2, (n, 1))], axis=1).astype(np.float32)
    check_variants(run_cell(driver, x), x, tiny=1e-6)


def test_gates_are_not_interchangeable(driver):
    """Each gate has its own role: the same inputs with two gates swapped give another cell, so a
    kernel that mixes them up cannot pass the test above (guards the test itself)."""
    g = np.random.default_rng(0)
    x = np.concatenate([g.normal(0, 3, (512, 4)), g.normal(0, 2, (512, 1))], axis=1).astype(np.float32)
    h64, c64 = cell(torch.from_numpy(x).double())
    for a, b in ((0, 1), (0, 2), (1, 3), (2, 3)):
        xs = x.copy()
        xs[:, [a, b]] = xs[:, [b, a]]
        out = torch.from_numpy(run_cell(driver, xs))
        for col in VARIANTS.values():
            assert (out[:, col].double() - h64).abs().max() > 1e-2 or (out[:, col + 1].double() - c64).abs().max() > 1e-2


def test_saturation_and_non_finite_inputs(driver):
    big = [3e38, -3e38, float("inf"), float("-inf"), 1e30, -1e30, 1e4, -1e4, 89.0, -89.0, 44.5, -44.5, 20.0, -20.0,
           1e-30, 0.0]
    g = np.random.default_rng(1)
    rows = []
    for v in big:  # each gate saturated in turn, the others and c random
        for q in range(4):
            r = np.concatenate([g.normal(0, 2, 4), g.normal(0, 2, 1)])
            r[q] = v
            rows.append(r)
    rows.append([big[0]] * 4 + [1e30])  # everything huge: c = 1e30 + 1 stays finite, h = tanh(c) = 1
    x = np.array(rows, dtype=np.float32)
    out = run_cell(driver, x)
    assert np.isfinite(out).all()
    for col in VARIANTS.values():
        assert np.abs(out[:, col]).max() <= 1.0
    check_variants(out, x, tiny=1e-6, name="saturated ")
    nan = x[:9].copy()
    nan[:, 0] = np.nan  # a NaN input gate: NaN h and c in that row, nowhere else
    out = run_cell(driver, np.concatenate([nan, x[9:20]]))
    assert np.isnan(out[:9]).all() and np.isfinite(out[9:]).all()


# Mutations of the header that the checks above must catch: (what, [(original text, mutated text)]).
MUTANTS = {
    "i and f swapped in lstm_cell_via_tanh": [("const V i = th(gi * 0.5f)", "const V i = th(gf * 0.5f)"),
                                              ("const V f = th(gf * 0.5f)", "const V f = th(gi * 0.5f)")],
    "o and g swapped in lstm_cell_via_tanh": [("const V o = th(go * 0.5f)", "const V o = th(gg * 0.5f)"),
                                              ("c = f * c + i * th(gg);", "c = f * c + i * th(go);")],
    "i and f swapped in lstm_cell": [("sigmoid_f32(gf) * c + sigmoid_f32(gi)", "sigmoid_f32(gi) * c + sigmoid_f32(gf)")],
    "tanh_via_exp off by its sign": [("return 1.0f - 2.0f / (1.0f + exp_f32(2.0f * x));",
                                      "return 2.0f / (1.0f + exp_f32(2.0f * x)) - 1.0f;")],
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_mutated_cell_fails_the_checks(mutant, tmp_path):
    """The random-gate check is strong enough: the header with a gate mix-up compiles and fails it."""
    text = (CSRC / "lstm_cell.h").read_text()
    for old, new in MUTANTS[mutant]:
        assert text.count(old) == 1, f"csrc/lstm_cell.h changed: update MUTANTS[{mutant!r}] ({old!r} not found once)"
        text = text.replace(old, new)
    (tmp_path / "lstm_cell.h").write_text(text)
    exe = build_driver(tmp_path, tmp_path)
    g = np.random.default_rng(2)
    x = np.concatenate([g.normal(0, 3, (256, 4)), g.normal(0, 2, (256, 1))], axis=1).astype(np.float32)
    with pytest.raises(AssertionError, match="error"):
        check_variants(run_cell(exe, x), x, tiny=1e-6)
