"""`far imc-eval`: table, JSON and plot for a sweep on tiny random models; one-line user errors."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import far
from far.cli import main

FMNIST_DIR = Path(os.environ.get("FAR_FASHION_MNIST") or "/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file() and os.environ.get("CI") != "true",
    reason=f"Fashion-MNIST not installed in {FMNIST_DIR} (apt-get install -y dataset-fashion-mnist)")

# few slices per product (fast on a CPU), still an ADC that clips
FAST = ["--set", "cell_bits=4", "--set", "dac_bits=4"]
FASTEST = ["--set", "cell_bits=7", "--set", "dac_bits=7"]  # 8-bit weights and inputs: one slice each


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("far: error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A 1-block attention ViT for Fashion-MNIST (random init), saved with far.save."""
    torch.manual_seed(0)
    model = far.create_model("fmnist_deit_tiny", far=False, depth=1, embed_dim=16, num_heads=2)
    path = tmp_path_factory.mktemp("imc") / "teacher.safetensors"
    far.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def far_ckpt(tmp_path_factory):
    """The same shape converted to FAR with 2 LSTM units per head and direction."""
    torch.manual_seed(1)
    model = far.create_model("fmnist_deit_tiny", depth=1, embed_dim=8, num_heads=2, hidden_sizes=2)
    path = tmp_path_factory.mktemp("imc") / "far.safetensors"
    far.save(model, str(path))
    return path


def test_help(capsys):
    code, out, _ = run(capsys, "imc-eval", "--help")
    assert code == 0
    for opt in ("--sweep", "--set", "--include", "--exclude", "--calib-images", "--plot", "--json", "--limit",
                "adc_bits", "calibrated", "examples", "q@k^T"):
        assert opt in out, opt
    code, out, _ = run(capsys, "--help")
    assert "imc-eval" in out


@needs_fmnist
def test_sweep_table_json_plot(capsys, teacher_ckpt, tmp_path):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", "--limit", 12,
                         "--batch-size", 6, "--sweep", "adc_bits=3,8", *FAST, "--json", js, "--plot", png)
    assert code == 0, err
    lines = out.splitlines()
    head = next(i for i, l in enumerate(lines) if l.split()[:2] == ["setting", "accuracy"])
    rows = [l.split() for l in lines[head + 1:]]
    assert [r[0] for r in rows] == ["digital", "adc_bits=3", "adc_bits=8"]
    res = json.loads(js.read_text())
    assert res["num_images"] == 12 and res["sweep"] == {"key": "adc_bits", "values": [3, 8]}
    assert res["checkpoint_sha256"] == hashlib.sha256(Path(teacher_ckpt).read_bytes()).hexdigest()
    from far.utils.env import device_name

    assert res["device"] == "cpu" and res["device_name"] == device_name("cpu")  # e.g. "cpu (Intel Xeon, 2 cores)"
    assert [r["setting"] for r in res["results"]] == ["digital", "adc_bits=3", "adc_bits=8"]
    for r, printed in zip(res["results"], rows):
        assert 0 <= r["accuracy"] <= 1 and r["num_images"] == 12
        assert printed[1] == f"{100 * r['accuracy']:.2f}%"
    assert res["results"][1]["config"]["adc_bits"] == 3 and res["results"][2]["config"]["cell_bits"] == 4
    assert res["base_config"]["dac_bits"] == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


@needs_fmnist
def test_far_model_calibrated_and_include(capsys, far_ckpt, tmp_path):
    """A FAR checkpoint: its recurrent products through crossbars, calibrated ADC ranges."""
    js = tmp_path / "far.json"
    code, out, err = run(capsys, "imc-eval", far_ckpt, "--data", "fashion-mnist", "--limit", 2, "--batch-size", 2,
                         "--sweep", "adc_range=max,calibrated", "--set", "adc_bits=6", *FASTEST,
                         "--include", "*.w_hh.*", "--calib-images", 2, "--json", js, "-q")
    assert code == 0, err
    res = json.loads(js.read_text())
    assert [r["setting"] for r in res["results"]] == ["digital", "adc_range=max", "adc_range=calibrated"]
    assert res["results"][2]["calibration_images"] == 2 and res["include"] == ["*.w_hh.*"]
    assert "emulated: 4 crossbar products" in out  # 2 heads x 2 directions of W_hh


@needs_fmnist
def test_model_name_random_init(capsys, tmp_path):
    code, out, err = run(capsys, "imc-eval", "fmnist_deit_small", "--no-far", "--data", "fashion-mnist",
                         "--limit", 4, "--batch-size", 4, *FAST, "--include", "head", "-q")
    assert code == 0, err
    assert "fmnist_deit_small (random init)" in out and "crossbar " in out


@needs_fmnist
def test_zoo_name_loads_the_trained_checkpoint(capsys, tmp_path):
    code, out, err = run(capsys, "imc-eval", "fmnist_deit_tiny", "--data", "fashion-mnist",
                         "--limit", 4, "--batch-size", 4, *FAST, "--include", "head", "-q")
    assert code == 0, err
    assert "fmnist_deit_tiny (zoo checkpoint)" in out


@pytest.mark.parametrize("argv,fragments", [
    (["--sweep", "adc_bitz=4,6"], ["--sweep: unknown crossbar setting 'adc_bitz'", "adc_bits"]),
    (["--sweep", "adc_bits=4,x"], ["--sweep: adc_bits='x' is not"]),
    (["--sweep", "adc_bits=1,4"], ["--sweep adc_bits=1", "adc_bits"]),
    (["--sweep", "adc_bits"], ["--sweep takes KEY=VALUES"]),
    (["--sweep", "adc_bits=4,,6"], ["empty value"]),
    (["--sweep", "adc_bits=4,4"], ["repeated value"]),
    (["--set", "cell_bits=9"], ["--set", "cell_bits"]),
    (["--set", "stuck_at=0.1"], ["stuck_at='0.1' is not a pair like 0.01/0.02"]),
    (["--set", "adc_bits=6", "--sweep", "adc_bits=4,6"], ["conflict"]),
    (["--limit", "0"], ["--limit must be >= 1"]),
    (["--include", "blocks.7.*"], ["include pattern 'blocks.7.*' matches no emulatable layer"]),
    (["--plot", "/nonexistent-dir/p.png"], ["no such folder for --plot"]),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ["--device cuda"]),
], ids=["unknown-key", "bad-value", "invalid-config", "no-values", "empty-value", "repeated", "bad-set", "bad-pair",
        "conflict", "limit", "include-typo", "plot-folder", "device"])
def test_user_errors(capsys, teacher_ckpt, argv, fragments):
    code, _, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", *argv)
    assert_user_error(code, err, *fragments)


def test_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "imc-eval", tmp_path / "nope.safetensors", "--data", "fashion-mnist")
    assert_user_error(code, err, "nope.safetensors: no such checkpoint file, zoo name")


def test_unavailable_backend(capsys, teacher_ckpt):
    code, _, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", "--backend", "cuda",
                       "--device", "cpu")
    assert_user_error(code, err, "crossbar_matmul", "unavailable")
