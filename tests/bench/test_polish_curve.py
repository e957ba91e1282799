"""bench/polish_curve.py end to end on a few images: a point per round with the block's isolated cosine (the same
as far.fidelity's), the polished block really better on the images it was polished on, bad input refused."""
import json

import pytest
import torch

from conftest import load_bench  # bench/<name>.py as a module
from far.data import fashion_mnist
from far.methods.polish import block_problem, full_batch_loss
from far.models import load_model
from far.nn import token_mixers

TINY = ["--images", "64", "--test-images", "32", "--iters", "4", "--every", "2"]


def _load():
    return load_bench("polish_curve")


def test_polish_curve_measures_each_round(tmp_path):
    out = tmp_path / "p.json"
    mod = _load()
    assert mod.main(["--blocks", "3,1", *TINY, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "polish_curve" and [b["block"] for b in r["blocks"]] == [1, 3]
    teacher, _ = load_model("fmnist_deit_tiny")
    student, _ = load_model("fmnist_far_tiny")
    for blk in r["blocks"]:
        pts = blk["points"]
        assert [p["iters"] for p in pts] == sorted({p["iters"] for p in pts})
        assert pts[-1]["iters"] == blk["end"]["iters"]
        assert blk["end"]["loss"] < blk["start"]["loss"] and pts[-1]["loss"] == pytest.approx(blk["end"]["loss"])
        assert all(-1 <= p["test_cos"] <= 1 and p["seconds"] >= 0 for p in pts)
        mix = token_mixers(student)[blk["block"]]  # the zoo block as shipped: the curve's start
        x, t = block_problem(teacher, fashion_mnist("test"), blk["block"], 32, 32, "cpu")
        assert blk["start"]["test_cos"] == pytest.approx(mod.isolated_cos(mix, x, t), rel=1e-9)
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(mix.token_mix(x).double(), t.double(), dim=1).mean()
        assert blk["start"]["test_cos"] == pytest.approx(float(cos), rel=1e-6)
        x, t = block_problem(teacher, fashion_mnist("train"), blk["block"], 64, 64, "cpu")
        assert blk["start"]["loss"] == pytest.approx(full_batch_loss(mix, x, t, "cos+mse", 64)["loss"], rel=1e-6)
    assert out.with_suffix(".png").is_file()


@pytest.mark.parametrize("argv, msg", [(["--blocks", "9"], "blocks 0-3"), (["--blocks", "a"], "comma-separated"),
                                       (["--iters", "0"], "--iters must be"), (["--every", "0"], "--every must be"),
                                       (["--plot-only"], "needs --out")])
def test_polish_curve_refuses_bad_input(tmp_path, argv, msg):
    with pytest.raises(SystemExit) as e:
        _load().main(argv)
    assert msg in str(e.value)
