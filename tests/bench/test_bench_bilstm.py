"""bench/bench_bilstm.py without a GPU: which dtypes the ceilings are measured for, and which rate a row's floor
uses (the unit its product runs on: tensor cores, or fp32 FMA on the CUDA cores)."""
import json
import types

import pytest
import torch

from conftest import load_bench

CEIL = {"copy_GBps": 3000.0, "mm_gflops": {"fp16": 800e3, "bf16": 790e3, "fp32": 50e3}, "fma_gflops": 50e3}


def test_only_first_measures_the_ceilings_of_its_own_dtypes(tmp_path, monkeypatch):
    """--only-first (the GPU suite's headline stage) empties the grid; the ceilings must still cover the dtypes
    it times (they were measured for none: the floor was bytes only)."""
    mod = load_bench("bench_bilstm")
    seen = []
    monkeypatch.setattr(mod, "measure_ceilings", lambda device, dtypes, args: seen.append(list(dtypes)) or {})
    monkeypatch.setattr(mod, "Group", lambda *a, **k: types.SimpleNamespace(chain={}))
    monkeypatch.setattr(mod, "run_case", lambda g, shape, dname, B, *a, **k: {"shape": shape, "dtype": dname, "B": B,
                                                                              "ms": {}})
    out = tmp_path / "b.json"
    mod.main(["--device", "cpu", "--only-first", "--first", "tiny:fp16:1,small:bf16:64,tiny:fp16:8", "--no-plot",
              "--out", str(out)])
    assert seen == [["fp16", "bf16"]]
    assert [(r["dtype"], r["B"]) for r in json.loads(out.read_text())["records"]] == [("fp16", 1), ("bf16", 64),
                                                                                      ("fp16", 8)]


@pytest.mark.parametrize("dname, B, cuda_unit, triton_unit", [
    ("fp16", 64, "matrix", "matrix"),  # auto: mma from B >= 16
    ("fp16", 8, "fma", "matrix"),      # cuda's FMA path at small B: the fp32 rate, not the tensor cores'
    ("bf16", 1, "fma", "matrix"),
    ("fp32", 64, "fma", "fma"),        # fp32 never uses the matrix units in either kernel
])
def test_floor_uses_the_rate_of_the_unit_each_backend_runs_on(monkeypatch, dname, B, cuda_unit, triton_unit):
    monkeypatch.delenv("FAR_CUDA_SCAN_PATH", raising=False)
    mod = load_bench("bench_bilstm")
    H, T, n = 6, 197, 64
    dtype = mod.DTYPES[dname]
    paths = mod.scan_paths(dtype, B, ["cuda", "triton", "cpp"])
    assert paths == {"cuda": cuda_unit, "triton": triton_unit}
    rec = mod.scan_floor(H, B, T, n, torch.finfo(dtype).bits // 8, CEIL, dname, paths)
    fl = rec["floor"]
    flops_step, bytes_step = rec["flops_per_step"], rec["bytes_per_step"]
    assert fl["flops_us_per_step_fma"] == pytest.approx(flops_step / (CEIL["fma_gflops"] * 1e3))
    assert fl["bytes_us_per_step"] == pytest.approx(bytes_step / (CEIL["copy_GBps"] * 1e3))
    if dname == "fp32":
        assert "us_per_step_matrix" not in fl
    else:
        assert fl["flops_us_per_step_matrix"] == pytest.approx(flops_step / (CEIL["mm_gflops"][dname] * 1e3))
    for be, unit in paths.items():
        want = max(fl[f"flops_us_per_step_{unit}"], fl["bytes_us_per_step"])
        assert mod.backend_floor(fl, be) == pytest.approx(want)
    assert (fl["us_per_step"], fl["us_per_step_path"]) == (mod.backend_floor(fl, "cuda"), cuda_unit)
    assert mod.backend_floor(fl, "cpp") is None


def test_forced_mma_path_moves_the_cuda_floor_to_the_matrix_rate(monkeypatch):
    monkeypatch.setenv("FAR_CUDA_SCAN_PATH", "mma")
    mod = load_bench("bench_bilstm")
    assert mod.scan_paths(torch.float16, 1, ["cuda"]) == {"cuda": "matrix"}
