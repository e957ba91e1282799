"""bench/bench_cpu_block.py: its --warmup-s reaches the warm-up of every timed variant (bench/common.py time_variants),
not only the peak measurement, as its --help says."""
import torch

from conftest import load_bench


def test_time_variants_warms_up_for_warmup_s_in_the_first_round(monkeypatch):
    common = load_bench("common")
    seen = []

    def spy(fn, **kw):
        seen.append((kw["warmup"], kw["warmup_s"]))
        return {"times_ms": [1.0]}

    monkeypatch.setattr(common, "time_fn", spy)
    common.time_variants({"a": lambda: None}, "cpu", rounds=2, reps=1, warmup_s=0.05)
    assert seen == [(2, 0.05), (1, 0.0)]  # once per variant: the first round's warm-up


def test_warmup_s_is_passed_to_the_variants_timing(monkeypatch):
    bench = load_bench("bench_cpu_block")
    seen = []

    def spy(fns, device="cpu", **kw):
        seen.append(kw)
        return {name: {"ms": 1.0} for name in fns}

    monkeypatch.setattr(bench, "time_variants", spy)
    args = bench.parse_args(["--quick", "--warmup-s", "0.37", "--variants", "far_torch,attention_sdpa"])
    with torch.inference_mode():  # as main() runs it
        rec = bench.run_case("tiny", 4, 1, args, peak_gflops=100.0)
    assert seen and seen[0].get("warmup_s") == 0.37
    assert rec["variants"]["far_torch"]["ms"] == 1.0
