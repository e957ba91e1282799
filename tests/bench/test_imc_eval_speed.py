"""bench/bench_imc_eval.py: one small run writes a JSON whose rows time every CPU backend and give the 10k-image
seconds consistent with their images/s; a device that cannot be used is refused before any work."""
import json

import pytest
import torch

from conftest import load_bench  # bench/<name>.py as a module


def _load():
    return load_bench("bench_imc_eval")


def test_quick_run_writes_every_backend_row(tmp_path):
    mod = _load()
    out = tmp_path / "speed.json"
    assert mod.main(["--quick", "--models", "fmnist_far_tiny_pruned", "--no-noise", "--reps", "1", "--batch", "3",
                     "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["device"], r["partial"]) == ("cpu", False)
    [row] = r["results"]
    assert (row["model"], row["batch"], row["input"]) == ("fmnist_far_tiny_pruned", 3, [3, 1, 28, 28])
    assert sorted(e["backend"] for e in row["emulated"]) == sorted(mod.backends(torch.device("cpu")))
    for e in row["emulated"]:
        assert e["setting"] == "no noise"
        assert e["seconds_per_10k_images"] == pytest.approx(1e4 / e["images_per_s"])
        assert e["images_per_s"] == pytest.approx(3 / e["ms"] * 1e3)
        assert e["slowdown_vs_digital"] == pytest.approx(e["ms"] / row["digital_ms"])


def test_both_lstm_mappings_are_timed_for_far_models_only(tmp_path):
    mod = _load()
    out = tmp_path / "speed.json"
    assert mod.main(["--quick", "--models", "fmnist_far_tiny_pruned", "fmnist_deit_tiny", "--no-noise", "--reps", "1",
                     "--batch", "2", "--threads", "1", "--lstm-mappings", "separate,fused", "--out", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    n = len(mod.backends(torch.device("cpu")))
    far_rows = rows["fmnist_far_tiny_pruned"]["emulated"]
    assert sorted(e["lstm_mapping"] for e in far_rows) == ["fused"] * n + ["separate"] * n
    assert [e["lstm_mapping"] for e in rows["fmnist_deit_tiny"]["emulated"]] == [None] * n
    assert out.with_suffix(".png").exists()


def test_gpu_backends_are_torch_and_triton_only():
    mod = _load()
    assert set(mod.backends(torch.device("cpu"))) <= {"torch", "cpp"}
    if torch.cuda.is_available():
        assert set(mod.backends(torch.device("cuda"))) <= {"torch", "triton"}


@pytest.mark.parametrize("argv, msg", [(["--device", "tpu"], "--device"), (["--batch", "0"], "--batch"),
                                       (["--lstm-mappings", "fused,stacked"], "--lstm-mappings")])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, argv, msg):
    out = tmp_path / "speed.json"
    with pytest.raises(SystemExit) as e:
        _load().main(["--quick", "--out", str(out), *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not out.exists()
