"""bench/bench_cuda_scan.py on the CPU (its dry run: the reference stands in for the kernel): TFLOP/s from the
kept sizes, and the fastest exact variant reported apart from the fastest of all (fast tanh is opt-in)."""
import json

import pytest

from conftest import load_bench


def test_pruned_cases_count_the_flops_of_their_kept_units(tmp_path):
    mod = load_bench("bench_cuda_scan")
    out = tmp_path / "s.json"
    mod.main(["--device", "cpu", "--quick", "--pruned", "--out", str(out)])
    res = json.loads(out.read_text())
    recs = [r for r in res["records"] if r["variant"] != "attention_sdpa"]
    assert {r["kept"] for r in recs} == {"full", "pruned"}
    for r in recs:
        ks = [k for row in r["kept_sizes"] for k in row]
        assert r["flops"] == 2 * r["B"] * r["T"] * 4 * sum(k * k for k in ks)
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)
    full = next(r for r in recs if r["kept"] == "full")
    pruned = next(r for r in recs if r["kept"] == "pruned")
    assert full["flops"] == 2 * 2 * full["H"] * full["B"] * full["T"] * 4 * 64 * 64
    assert pruned["flops"] == full["flops"] * (64 ** 2 + 37 ** 2) // (3 * 64 ** 2)  # 64/37/0 of every 3 heads
    assert set(res["fastest_exact_variant"]) == set(res["fastest_any_variant"]) and res["fastest_exact_variant"]
    assert not any(v["variant"].endswith("_fasttanh") for v in res["fastest_exact_variant"].values())


def test_fast_tanh_wins_only_the_any_column():
    mod = load_bench("bench_cuda_scan")
    base = {"H": 6, "dtype": "fp16", "kept": "full", "B": 64}
    recs = [{**base, "variant": "fma", "ms": 3.0, "auto_would_pick": False},
            {**base, "variant": "fma_fasttanh", "ms": 1.0, "auto_would_pick": False},
            {**base, "variant": "mma", "ms": 2.0, "auto_would_pick": True},
            {**base, "variant": "mma_fasttanh", "ms": 1.5, "auto_would_pick": True},
            {**base, "variant": "attention_sdpa", "ms": 0.5},
            {**base, "B": 1, "variant": "fma", "ms": 1.0, "auto_would_pick": True},
            {**base, "B": 1, "variant": "mma", "ms": 0.9, "auto_would_pick": False}]
    best = mod.fastest(recs)
    b64, b1 = best["H6-fp16-full-B64"], best["H6-fp16-full-B1"]
    assert (b64["exact"], b64["any"]) == ({"variant": "mma", "ms": 2.0}, {"variant": "fma_fasttanh", "ms": 1.0})
    assert b64["auto_is_fastest_exact"] is True
    assert b1["exact"]["variant"] == "mma" and b1["auto_is_fastest_exact"] is False
