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
                                       (["--lstm-mappings", "fused,stacked"], "--lstm-mappings"),
                                       (["--models", "fmnist_far_tiny_prunned"], "--models: choose from"),
                                       (["--models"], "--models: choose from")])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, argv, msg):
    out = tmp_path / "speed.json"
    with pytest.raises(SystemExit) as e:
        _load().main(["--quick", "--out", str(out), *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not out.exists()


QUICK = ["--quick", "--models", "fmnist_far_tiny_pruned", "--reps", "1", "--batch", "2", "--threads", "1"]


def test_json_is_rewritten_after_every_row(tmp_path, monkeypatch):
    """A run cut short keeps every emulated row it finished (the JSON was rewritten per model only)."""
    mod = _load()
    snapshots = []
    real = mod.write_json
    monkeypatch.setattr(mod, "write_json", lambda path, obj, **k: snapshots.append(json.loads(json.dumps(obj)))
                        or real(path, obj, **k))
    out = tmp_path / "speed.json"
    assert mod.main(QUICK + ["--out", str(out)]) == 0
    n = len(mod.backends(torch.device("cpu"))) * 2  # x (no noise, read noise)
    partial = [len(s["results"][0]["emulated"]) for s in snapshots if s["partial"] and s["results"]]
    assert partial == list(range(n + 1))  # the model's digital time alone, then one more row per write
    assert snapshots[-1]["partial"] is False and len(snapshots[-1]["results"][0]["emulated"]) == n


def test_backends_are_checked_against_torch_before_timing(tmp_path, monkeypatch):
    """Every backend's noiseless emulated output equals the torch backend's bit for bit before it is timed; one that
    differs has its rows (with and without noise) flagged and not timed, and the others are timed as before."""
    mod = _load()
    others = [b for b in mod.backends(torch.device("cpu")) if b != "torch"]
    if not others:
        pytest.skip("only the torch backend runs here (far_kernels._C not built)")
    bad = others[0]
    real = mod.emulate

    class OneUlpOff(torch.nn.Module):
        def __init__(self, emu):
            super().__init__()
            self.emu = emu

        def forward(self, x):
            y = self.emu(x)
            return torch.nextafter(y, torch.full_like(y, float("inf")))

    monkeypatch.setattr(mod, "emulate", lambda model, cfg, backend=None, **k:
                        OneUlpOff(real(model, cfg, backend=backend, **k)) if backend == bad
                        else real(model, cfg, backend=backend, **k))
    out = tmp_path / "speed.json"
    assert mod.main(QUICK + ["--out", str(out)]) == 0
    [row] = json.loads(out.read_text())["results"]
    by = {(e["backend"], e["setting"]): e for e in row["emulated"]}
    assert set(by) == {(b, s) for b in mod.backends(torch.device("cpu")) for s in ("no noise", "read_noise=0.02")}
    for (be, setting), e in by.items():
        if be == bad:
            assert e["check"]["ok"] is False and e["check"]["bit_identical_to_torch"] is False
            assert "differs from the torch backend" in e["failed"] and "ms" not in e
        else:
            assert e["check"]["ok"] and "failed" not in e and e["ms"] > 0
    assert by[("torch", "no noise")]["check"]["reference"] is True
