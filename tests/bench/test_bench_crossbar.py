"""bench/bench_crossbar.py on the CPU (tiny shapes): every backend checked against crossbar_matmul_ref before it
is timed (a failing one is flagged, not timed), rows timed by bench/common.py time_variants, the JSON rewritten
after every case, and the floor computed from the measured rates and the levels' own bytes."""
import json

import pytest
import torch

from conftest import load_bench
from far_kernels import CrossbarConfig, program_crossbar

TINY = ["--device", "cpu", "--quick", "--M", "24", "--KN", "40", "--B", "1", "--T", "3", "--reps", "1",
        "--threads", "1", "--no-plot", "--backends", "torch"]  # triton on a CPU: the interpreter, minutes


def test_json_is_rewritten_after_every_case(tmp_path, monkeypatch):
    """A run killed in its third case leaves the two it finished (it wrote the JSON only at the end)."""
    mod = load_bench("bench_crossbar")
    real, calls = mod.run_case, []

    def run_case(*a, **k):
        calls.append(a[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a suite stage's time limit would
        return real(*a, **k)

    monkeypatch.setattr(mod, "run_case", run_case)
    out = tmp_path / "x.json"
    with pytest.raises(KeyboardInterrupt):
        mod.main(TINY + ["--out", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"] is False and [r["variant"] for r in res["records"]] == ["noiseless", "read_noise"]
    assert res["environment"]["date_utc"] and "flags" in res


def test_every_row_is_checked_then_timed_by_time_variants(tmp_path):
    mod = load_bench("bench_crossbar")
    out = tmp_path / "x.json"
    mod.main(TINY + ["--out", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"] and [r["variant"] for r in res["records"][:3]] == ["noiseless", "read_noise", "prog_noise"]
    for r in res["records"]:
        assert set(r["checks"]) >= {"torch", "gemm_fp32"} and all(c["ok"] for c in r["checks"].values()), r["checks"]
        assert not r.get("failed")
        for name in ("torch", "gemm_fp32"):
            t = r["timing"][name]
            assert r["ms"][name] == t["ms"] > 0 and t["method"] == "perf_counter" and len(t["round_ms"]) == 1
    noiseless, read_noise, prog_noise = res["records"][:3]
    assert noiseless["checks"]["torch"]["bit_identical"] and read_noise["checks"]["torch"]["noiseless_read_equal"]
    assert prog_noise["floor"]["level_dtype"] == "float32" and noiseless["floor"]["level_dtype"] == "int8"


def test_a_backend_that_fails_its_check_is_flagged_and_not_timed(tmp_path, monkeypatch):
    mod = load_bench("bench_crossbar")
    real = mod.crossbar_matmul

    def off_by_one_ulp(x, prog, cfg=None, bias=None, backend=None, **k):
        y = real(x, prog, cfg, bias=bias, backend=backend, **k)
        return torch.nextafter(y, torch.full_like(y, float("inf"))) if backend == "torch" else y

    monkeypatch.setattr(mod, "crossbar_matmul", off_by_one_ulp)
    out = tmp_path / "x.json"
    mod.main(TINY + ["--no-noise", "--out", str(out)])
    for r in json.loads(out.read_text())["records"]:
        assert r["checks"]["torch"]["ok"] is False and r["checks"]["torch"]["max_abs_diff"] > 0
        assert "torch" in r["failed"] and r["ms"]["torch"] is None and "torch" not in r["timing"]
        assert r["ms"]["gemm_fp32"] > 0  # the baselines are timed either way


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_floor_is_the_larger_of_ops_over_the_measured_rate_and_bytes_over_the_copy_rate(noise):
    mod = load_bench("bench_crossbar")
    cfg = CrossbarConfig(prog_noise=noise)
    M, K, N = 300, 200, 100
    prog = program_crossbar(torch.randn(N, K), cfg)
    S, J = cfg.n_weight_slices, cfg.n_input_slices
    level_bytes = 4 if noise else 1  # programming noise stores fp32 levels
    assert prog.levels.element_size() == level_bytes
    ceil = {"copy_GBps": 3000.0, "mm_int8_tops": 1500.0, "mm_fp32_tflops": 50.0, "mm_bf16_tflops": 700.0}
    fl = mod.crossbar_floor(M, K, N, prog, ceil)
    want_bytes = M * K * 4 + S * N * K * level_bytes + prog.w_scale.numel() * 4 + N * 4 + M * N * 4
    ops = 2 * S * J * M * N * K
    rate = ceil["mm_fp32_tflops"] if noise else ceil["mm_int8_tops"]
    assert (fl["bytes"], fl["int_ops"]) == (want_bytes, ops)
    assert fl["bytes_ms"] == pytest.approx(want_bytes / 3000e9 * 1e3)
    assert fl["compute_ms"] == pytest.approx(ops / (rate * 1e12) * 1e3)
    assert fl["compute_rate"] == ("fp32" if noise else "int8")
    assert fl["ms"] == max(fl["compute_ms"], fl["bytes_ms"])
    assert fl["bound_by"] == ("compute" if fl["compute_ms"] > fl["bytes_ms"] else "bytes")
    # where the rate it needs was not measured: the bf16 rate, said so
    fl = mod.crossbar_floor(M, K, N, prog, {"copy_GBps": 3000.0, "mm_bf16_tflops": 700.0})
    assert fl["compute_ms"] == pytest.approx(ops / 700e12 * 1e3) and fl["compute_rate"].startswith("bf16")
    assert mod.crossbar_floor(M, K, N, prog, {})["ms"] is None  # CPU: no ceilings, no floor


def test_triton_rows_are_checked_too(tmp_path):
    """The triton backend (the Triton interpreter on a CPU) passes the same checks before it is timed."""
    import far_kernels

    why = far_kernels.ops.crossbar_matmul.OP.reason("triton", "cpu")
    if why is not None:
        pytest.skip(why)
    mod = load_bench("bench_crossbar")
    out = tmp_path / "x.json"
    mod.main(["--device", "cpu", "--quick", "--M", "16", "--KN", "24", "--B", "", "--reps", "1", "--threads", "1",
              "--no-plot", "--backends", "triton,torch", "--out", str(out)])
    recs = json.loads(out.read_text())["records"]
    assert [r["variant"] for r in recs] == ["noiseless", "read_noise", "prog_noise"]
    for r in recs:
        assert r["checks"]["triton"]["ok"], r["checks"]["triton"]
        assert r["ms"]["triton"] > 0 and "torch_over_triton" in r["ratios"]
