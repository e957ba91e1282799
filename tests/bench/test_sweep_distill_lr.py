"""bench/sweep_distill_lr.py end to end on a few images: one point per LR, the best recorded, bad input refused."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "sweep_distill_lr.py"


def _load():
    spec = importlib.util.spec_from_file_location("sweep_distill_lr", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_writes_one_point_per_lr(tmp_path):
    out = tmp_path / "lr.json"
    assert _load().main(["--lrs", "4e-2,1e-3", "--epochs", "0.5", "--train-images", "256", "--test-images", "32",
                         "--block", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [p["lr"] for p in r["points"]] == [1e-3, 4e-2]
    assert all(-1 <= p["cos"] <= 1 and p["rel_mse"] >= 0 for p in r["points"])
    assert r["best_lr"] == max(r["points"], key=lambda p: p["cos"])["lr"] and r["args"]["block"] == 1


@pytest.mark.parametrize("argv, msg", [(["--lrs", "x"], "comma-separated"), (["--lrs", "0"], "positive"),
                                       (["--block", "9"], "blocks 0-3")])
def test_sweep_refuses_bad_input(tmp_path, argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        _load().main(argv + ["--out", str(tmp_path / "x.json")])
    assert msg in str(e.value)
    assert not (tmp_path / "x.json").exists()


def test_plot_only_needs_an_existing_result(tmp_path):
    with pytest.raises(SystemExit) as e:
        _load().main(["--plot-only", "--out", str(tmp_path / "none.json")])
    assert "existing result" in str(e.value)
