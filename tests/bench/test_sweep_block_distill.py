"""bench/sweep_block_distill.py end to end on a few images: one point per value of the varied setting, that
setting really used (LR, epochs, width), the best recorded, bad input refused, old results still plotted."""
import json
from pathlib import Path

import pytest

from conftest import load_bench  # bench/<name>.py as a module

TINY = ["--train-images", "256", "--test-images", "32", "--block", "1"]


def _load():
    return load_bench("sweep_block_distill")


def test_sweep_writes_one_point_per_lr(tmp_path):
    out = tmp_path / "lr.json"
    assert _load().main(["--lrs", "4e-2,1e-3", "--epochs", "0.5", *TINY, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [p["lr"] for p in r["points"]] == [1e-3, 4e-2] and r["benchmark"] == "distill_lr"
    assert all(-1 <= p["cos"] <= 1 and p["rel_mse"] >= 0 for p in r["points"])
    assert all(p["epochs"] == 0.5 and p["hidden_size"] == 32 for p in r["points"])
    assert r["best_lr"] == max(r["points"], key=lambda p: p["cos"])["lr"] and r["args"]["block"] == 1
    assert out.with_suffix(".png").is_file()


def test_sweep_over_width_builds_wider_blocks(tmp_path):
    out = tmp_path / "w.json"
    assert _load().main(["--vary", "hidden", "--values", "8,16", "--epochs", "0.25", "--lr", "2e-2", *TINY,
                         "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [p["hidden_size"] for p in r["points"]] == [8, 16] and all(p["lr"] == 2e-2 for p in r["points"])
    # 3 heads x 2 directions x (4k x 32 input weights + 4k x k recurrent + 2 x 4k biases)
    assert [p["lstm_params"] for p in r["points"]] == [6 * (4 * k * 32 + 4 * k * k + 8 * k) for k in (8, 16)]
    assert r["best"]["value"] in (8, 16) and r["first_at_target"] in (None, 8, 16)


def test_sweep_over_epochs(tmp_path):
    out = tmp_path / "e.json"
    assert _load().main(["--vary", "epochs", "--values", "0.5,0.25", *TINY, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [p["epochs"] for p in r["points"]] == [0.25, 0.5] and r["benchmark"] == "distill_epochs"
    assert all(p["lr"] == 1e-2 for p in r["points"])  # far distill's isolated default


@pytest.mark.parametrize("argv, msg", [(["--lrs", "x"], "comma-separated"), (["--lrs", "0"], "positive"),
                                       (["--vary", "hidden", "--values", "1.5"], "integers"),
                                       (["--lrs", "1e-3", "--vary", "epochs"], "one or the other"),
                                       (["--lr", "-1", "--vary", "hidden"], "--lr must be positive"),
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


def test_plot_only_redraws_a_result_from_before_vary(tmp_path):
    """The committed LR sweep was written by the script's first version (no --vary, no 'value' per point)."""
    committed = Path(__file__).resolve().parents[2] / "bench" / "results" / "distill_lr-vm-20261206.json"
    out = tmp_path / "old.json"
    out.write_text(committed.read_text())
    assert _load().main(["--plot-only", "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 0
