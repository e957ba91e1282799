"""The `far` command line: help, info, convert -> eval round trip, and one-line user errors (exit 2)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import far
import far_kernels
from far.cli import main

needs_fmnist = pytest.mark.fmnist


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *fragments):
    assert code == 2
    assert err.startswith("far: error: ") and err.count("\n") == 1, err  # exactly one line
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The zoo teacher fmnist_deit_tiny converted by `far convert` (new, untrained LSTMs)."""
    path = tmp_path_factory.mktemp("ckpt") / "fmnist_tiny.safetensors"
    assert main(["convert", "fmnist_deit_tiny", "-o", str(path), "-q"]) == 0
    return path


# ---- help and info ----
@pytest.mark.parametrize("cmd,options", [
    ([], ["info", "convert", "eval", "--version", "--debug"]),
    (["info"], ["MODEL", "examples"]),
    (["convert"], ["MODEL", "--output", "--pretrained", "--hidden-size", "--num-classes", "--init", "--force",
                   "examples"]),
    (["eval"], ["MODEL", "--data", "--batch-size", "--limit", "--backend", "--device", "--threads", "--json",
                "--quiet", "--split", "--workers", "examples", "dataset-fashion-mnist"]),
    (["export"], ["MODEL", "--output", "--batch-size", "--check", "--threads", "--force", "examples"]),
    (["predict"], ["MODEL", "IMAGE", "--output", "--top-k", "--class-names", "--batch-size", "--backend",
                   "--storage", "--device", "--threads", "--force", "examples"]),
    (["import-public"], ["MODEL", "--output", "--num-heads", "--pruned", "--allow-pickle", "--arch", "--threads",
                         "examples"]),
], ids=["far", "info", "convert", "eval", "export", "predict", "import-public"])
def test_help(capsys, cmd, options):
    code, out, _ = run(capsys, *cmd, "--help")
    assert code == 0
    for opt in options:
        assert opt in out, f"`far {' '.join(cmd)} --help` does not mention {opt}"


def test_version_and_no_command(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("far ")
    code, _, err = run(capsys)
    assert code == 2 and "usage: far" in err


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert f"torch {torch.__version__}" in out and "timm " in out and "triton " in out
    assert "backends on cpu:" in out and "auto -> " in out
    report = far_kernels.backend_report("cpu")
    section = out.split("backends on cpu:")[1].split("backends on cuda:")[0].splitlines()
    for name, why in report.items():
        line = next(l for l in section if l.split()[:1] == [name])
        assert ("available" in line) and (why is None or why in line), line
    if torch.cuda.is_available():
        assert "backends on cuda:" in out and "cuda:0" in out
    else:
        assert "backends on cuda:" not in out


# ---- convert, info CKPT, eval ----
def test_convert_output(capsys, tmp_path):
    path = tmp_path / "m.safetensors"
    code, out, _ = run(capsys, "convert", "fmnist_deit_tiny", "-o", str(path), "--hidden-size", "16")
    assert code == 0 and path.is_file()
    assert re.search(r"blocks\.0\.attn\s+[\d,]+\s+[\d,]+", out) and "total" in out and f"wrote {path}" in out
    code, out, _ = run(capsys, "info", str(path))
    assert code == 0
    assert "architecture fmnist_deit_tiny" in out and "fwd [16, 16, 16]  bwd [16, 16, 16]" in out
    assert out.count("blocks.") == 4
    # an existing output needs --force
    code, _, err = run(capsys, "convert", "fmnist_deit_tiny", "-o", str(path))
    assert_user_error(code, err, "exists", "--force")
    assert run(capsys, "convert", "fmnist_deit_tiny", "-o", str(path), "--force", "-q")[0] == 0


def test_convert_with_a_width_per_block(capsys, tmp_path):
    """--hidden-size N,N,... sizes each converted block on its own (e.g. one block wider than head_dim)."""
    path = tmp_path / "w.safetensors"
    code, out, _ = run(capsys, "convert", "fmnist_deit_tiny", "-o", str(path), "--hidden-size", "32,32,48,8")
    assert code == 0 and "hidden size 32/32/48/8 per block" in out
    code, out, _ = run(capsys, "info", str(path))
    assert "blocks.2.attn  heads 3 x d 32  fwd [48, 48, 48]" in out and "fwd [8, 8, 8]  bwd [8, 8, 8]" in out
    assert "LSTM units 768, more than" not in out and "LSTM units kept 720/768" in out
    m = far.load(path)
    assert [mod.hidden_sizes.tolist() for _, mod in far.far_modules(m)] == [[[k] * 3] * 2 for k in (32, 32, 48, 8)]
    code, _, err = run(capsys, "convert", "fmnist_deit_tiny", "-o", str(tmp_path / "x.safetensors"), "--hidden-size",
                       "32,48", "--replace", "1-3")
    assert_user_error(code, err, "hidden_sizes has 2 entries but 3 attention block(s) are converted")
    assert not (tmp_path / "x.safetensors").exists()


@needs_fmnist
def test_eval_fashion_mnist(capsys, ckpt, tmp_path):
    out_json = tmp_path / "res.json"
    code, out, err = run(capsys, "eval", str(ckpt), "--data", "fashion-mnist", "--limit", "256",
                         "--batch-size", "128", "--json", str(out_json))
    assert code == 0, err
    m = re.search(r"accuracy (\d+\.\d+)% \((\d+)/256\)", out)
    assert m, out
    assert 0 <= float(m.group(1)) <= 100 and "images/s" in out
    res = json.loads(out_json.read_text())
    assert res["num_images"] == 256 and res["correct"] == int(m.group(2))
    assert res["accuracy"] == pytest.approx(res["correct"] / 256)
    assert res["images_per_s"] > 0 and res["warmup_excluded"] is True and res["batches"] == 2
    assert res["architecture"] == "fmnist_deit_tiny" and res["split"] == "test" and res["origin"] == "checkpoint"
    auto = far_kernels.dispatch.select(far_kernels.ops.bilstm_scan.OP, "auto", "cpu")
    assert res["backend"] == auto and f"backend {auto}" in out


@needs_fmnist
def test_eval_explicit_backend_and_threads(capsys, ckpt, tmp_path):
    out_json = tmp_path / "res.json"
    code, out, err = run(capsys, "eval", str(ckpt), "--data", "fashion-mnist", "--limit", "32", "--backend", "torch",
                         "--threads", "1", "--device", "cpu", "--json", str(out_json), "-q")
    assert code == 0, err
    res = json.loads(out_json.read_text())
    assert res["backend"] == "torch" and res["threads"] == 1 and res["num_images"] == 32
    assert res["warmup_excluded"] is False  # a single batch: nothing is left after the warm-up


@needs_fmnist
def test_eval_ragged_storage_gives_the_same_answers(capsys, tmp_path):
    out = {}
    for storage in ("padded", "ragged"):
        path = tmp_path / f"{storage}.json"
        code, text, err = run(capsys, "eval", "fmnist_far_tiny_xs", "--data", "fashion-mnist", "--limit", "64",
                              "--storage", storage, "--json", str(path), "-q")
        assert code == 0, err
        out[storage] = json.loads(path.read_text())
        assert f"(storage {storage})" in text
    padded, ragged = out["padded"], out["ragged"]
    assert padded["correct"] == ragged["correct"] and ragged["storage"] == "ragged"
    assert ragged["parameters"]["stored"] == ragged["parameters"]["kept"] == padded["parameters"]["kept"]
    assert padded["parameters"]["stored"] > padded["parameters"]["kept"]  # the zoo's xs model is pruned


def test_eval_image_folder(capsys, ckpt, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        img = Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L")
        img.save(tmp_path / "data" / f"class{c}" / "0.png")
    out_json = tmp_path / "res.json"
    code, out, err = run(capsys, "eval", str(ckpt), "--data", str(tmp_path / "data"), "--batch-size", "4",
                         "--workers", "0", "--json", str(out_json))
    assert code == 0, err
    res = json.loads(out_json.read_text())
    assert res["num_images"] == 10 and res["split"] is None and "accuracy" in out


def test_eval_and_info_take_a_zoo_name(capsys, tmp_path, monkeypatch):
    from PIL import Image

    from far.errors import ConfigError
    from far.models import resolve, zoo_path

    name = "fmnist_far_tiny_pruned"
    monkeypatch.chdir(tmp_path)
    assert resolve(name).kind == "zoo" and resolve(name).path == zoo_path(name)
    assert resolve("deit_tiny_patch16_224").kind == "timm"
    with pytest.raises(ConfigError, match="no such checkpoint file, zoo name"):
        resolve("not_a_model")
    (tmp_path / name).write_bytes(b"x")  # a file of that name in the working folder comes first
    assert resolve(name).kind == "file" and resolve(name).path == Path(name)
    (tmp_path / name).unlink()
    rng = np.random.default_rng(1)
    for c in range(10):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(tmp_path / "data" / f"class{c}" / "0.png")
    code, out, err = run(capsys, "eval", name, "--data", str(tmp_path / "data"), "--workers", "0",
                         "--json", str(tmp_path / "res.json"), "-q")
    assert code == 0, err
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["checkpoint"] == str(zoo_path(name)) and res["num_images"] == 10
    code, out, err = run(capsys, "info", name)
    assert code == 0, err
    assert str(zoo_path(name)) in out and "architecture fmnist_deit_tiny" in out and "pruning" in out


# ---- user errors: one line, exit 2 ----
def test_eval_missing_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "eval", str(tmp_path / "nope.safetensors"), "--data", "fashion-mnist")
    assert_user_error(code, err, "nope.safetensors", "no such checkpoint")


@pytest.mark.parametrize("content", [b"", b"garbage that is not a checkpoint at all", b"\x08" + b"\x00" * 7 + b"{}"])
def test_corrupt_checkpoint(capsys, tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    code, _, err = run(capsys, "eval", str(bad), "--data", "fashion-mnist")
    assert_user_error(code, err, str(bad))
    code, _, err = run(capsys, "info", str(bad))
    assert_user_error(code, err, str(bad))


def test_unknown_backend(capsys, ckpt, monkeypatch):
    code, _, err = run(capsys, "eval", str(ckpt), "--data", "fashion-mnist", "--backend", "nope")
    assert code == 2 and "invalid choice: 'nope'" in err
    monkeypatch.setenv("FAR_BACKEND", "bogus")
    code, _, err = run(capsys, "eval", str(ckpt), "--data", "fashion-mnist")
    assert_user_error(code, err, "unknown backend 'bogus'", "FAR_BACKEND")


def test_unavailable_backend(capsys, ckpt):
    # the cuda backend never runs on CPU tensors: BackendUnavailable with the reason, before any work
    code, _, err = run(capsys, "eval", str(ckpt), "--data", "fashion-mnist", "--backend", "cuda", "--device", "cpu")
    assert_user_error(code, err, "backend 'cuda' is unavailable", far_kernels.ops.bilstm_scan.OP.reason("cuda", "cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_cuda_device(capsys, ckpt):
    code, _, err = run(capsys, "eval", str(ckpt), "--data", "fashion-mnist", "--device", "cuda")
    assert_user_error(code, err, "no CUDA device")


@needs_fmnist
def test_mismatched_data(capsys, tmp_path):
    path = tmp_path / "five.safetensors"
    assert main(["convert", "fmnist_deit_small", "--num-classes", "5", "-o", str(path), "-q"]) == 0
    code, _, err = run(capsys, "eval", str(path), "--data", "fashion-mnist", "--limit", "8")
    assert_user_error(code, err, "5 classes", "Fashion-MNIST has 28x28x1 images and 10 classes")


def test_missing_data_folder(capsys, ckpt, tmp_path):
    code, _, err = run(capsys, "eval", str(ckpt), "--data", str(tmp_path / "nodata"))
    assert_user_error(code, err, "no such image folder")


def test_missing_fashion_mnist(capsys, ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("FAR_FASHION_MNIST", str(tmp_path))
    code, _, err = run(capsys, "eval", str(ckpt), "--data", "fashion-mnist")
    assert_user_error(code, err, "apt-get install -y dataset-fashion-mnist")


@pytest.mark.parametrize("argv,fragment", [
    (["convert", "not_a_model", "-o", "{tmp}/x.safetensors"], "not_a_model: no such checkpoint file, zoo name"),
    (["convert", "fmnist_deit_tiny", "--num-classes", "5", "-o", "{tmp}/x.safetensors"], "--num-classes, --model-kwargs and --weights apply to timm model names"),
    (["convert", "fmnist_far_tiny", "-o", "{tmp}/x.safetensors"], "already a FAR model"),
    (["convert", "fmnist_deit_small", "--pretrained", "-o", "{tmp}/x.safetensors"], "no pretrained weights are bundled"),
    (["convert", "fmnist_deit_tiny", "-o", "{tmp}/no/such/dir/x.safetensors"], "no such folder"),
    (["convert", "fmnist_deit_tiny", "--hidden-size", "0", "-o", "{tmp}/x.safetensors"], "--hidden-size"),
    (["convert", "fmnist_deit_tiny", "--hidden-size", "32,x", "-o", "{tmp}/x.safetensors"], "one per converted block"),
    (["convert", "fmnist_deit_tiny", "--hidden-size", "32,0", "-o", "{tmp}/x.safetensors"], "every size must be >= 1"),
    (["eval", "{ckpt}", "--data", "fashion-mnist", "--batch-size", "0"], "--batch-size"),
    (["eval", "{ckpt}", "--data", "fashion-mnist", "--device", "tpu"], "--device"),
    # a folder no file can be created in (even by root): refused before any work, naming the destination
    (["eval", "{ckpt}", "--data", "fashion-mnist", "--json", "/proc/x.json"],
     "--json /proc/x.json: cannot write in its folder /proc"),
    (["convert", "fmnist_deit_tiny", "-o", "/proc/x.safetensors"], "-o/--output /proc/x.safetensors: cannot write"),
    (["eval", "{ckpt}", "--data", "fashion-mnist", "--json", "{ckpt}/x.json"], "not a folder for --json x.json"),
    # an output named as another kind of file than the command writes
    (["convert", "fmnist_deit_tiny", "-o", "{tmp}/x.onnx"],
     "x.onnx: this command writes a far checkpoint, but the name's suffix says an ONNX graph; "
     "name it .safetensors"),
    (["prune", "{ckpt}", "--budget", "0.5", "-o", "{tmp}/x.json"], "the name's suffix says a JSON report"),
    (["eval", "{ckpt}", "--data", "fashion-mnist", "--json", "{tmp}/x.safetensors"],
     "this command writes a JSON report, but the name's suffix says a far checkpoint; name it .json"),
    # options that say the same thing differently (one of them won silently)
    (["convert", "deit_tiny_patch16_224", "--model-kwargs", "num_classes=3", "--num-classes", "5", "-o",
      "{tmp}/x.safetensors"], "--num-classes 5 and --model-kwargs num_classes=3 disagree"),
    (["convert", "fmnist_deit_tiny", "--init", "value", "--pre-proj-init", "random", "-o", "{tmp}/x.safetensors"],
     "--init value and --pre-proj-init random disagree"),
    (["convert", "fmnist_deit_tiny", "--init", "random", "--pre-proj-init", "v", "-o", "{tmp}/x.safetensors"],
     "--init random and --pre-proj-init v disagree"),
    # a chip setting given twice (the last one won silently)
    (["prune", "{ckpt}", "--budget", "arrays=1", "--set", "adc_bits=6", "--set", "adc_bits=8"],
     "--set adc_bits given twice"),
])
def test_argument_errors(capsys, ckpt, tmp_path, argv, fragment):
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in argv]
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, fragment)
    assert not (tmp_path / "x.safetensors").exists()


def test_console_script():
    exe = shutil.which("far")
    cmd = [exe] if exe else [sys.executable, "-m", "far.cli"]
    r = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("far "), r.stderr


def test_demo_runs_on_the_zoo(tmp_path, capsys):
    import json

    from far.cli import main

    # more speed images than test images: the speed subset is the test set (it was a shape error)
    rc = main(["demo", "--num-images", "24", "--bench-images", "40", "--batch-size", "32", "--threads", "1",
               "--out-dir", str(tmp_path), "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("teacher (attention)", "FAR pruned", "FAR xs", "TReX reuse", "torch", "cpp", "EDAP", "in memory"):
        assert name in out
    res = json.loads((tmp_path / "demo.json").read_text())
    assert res["num_images"] == res["bench_images"] == 24
    assert {r["name"] for r in res["rows"]} == {"fmnist_deit_tiny", "fmnist_far_tiny", "fmnist_far_tiny_pruned",
                                                 "fmnist_far_tiny_xs", "fmnist_trex_tiny"}
    xs = next(r for r in res["rows"] if r["name"] == "fmnist_far_tiny_xs")
    assert xs["mixer_params"] < xs["mixer_params_stored"] and xs["params"] < xs["params_stored"]  # kept vs padded
    # the cost columns are the cost model's, relative to the teacher (the first row)
    from far.imc.cost import model_cost
    from far.models import load, zoo_path

    trex = next(r for r in res["rows"] if r["name"] == "fmnist_trex_tiny")
    totals = model_cost(load(zoo_path("fmnist_trex_tiny"))).totals
    assert trex["imc_energy_uj"] == pytest.approx(totals["energy_uj"])
    assert trex["imc_edap_vs_teacher"] == pytest.approx(totals["edap"] / res["rows"][0]["imc_edap"])
    assert res["rows"][0]["imc_edap_vs_teacher"] == 1.0
    ok = [r for r in res["rows"] if r.get("backend") not in (None, "-") and "images_per_s" in r]
    assert ok and all(r["max_abs_diff_vs_torch"] < 1e-4 for r in ok)
    # Triton on CPU tensors is its interpreter (conftest sets TRITON_INTERPRET=1 here): checked, not timed
    interpreted = [r for r in ok if r["backend"] == "triton"]
    assert all(r.get("interpreted") for r in interpreted) and not any(r.get("interpreted") for r in ok
                                                                       if r["backend"] != "triton")
    assert ("not a kernel speed" in out) == bool(interpreted)
    assert all(0 <= r["top1"] <= 1 and r["num_images"] == 24 for r in res["rows"])
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert main(["demo", "--num-images", "0"]) == 2
    assert "--num-images must be >= 1" in capsys.readouterr().err


def test_finetune_counts_class_folders_as_the_data_does(tmp_path, capsys):
    """A hidden folder (.ipynb_checkpoints) is no class of the image folder; finetune counted it, built a classifier
    of one class too many, and refused the data ("has 3 class folders but ... has 4 classes")."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(3):
        d = tmp_path / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray((torch.rand(28, 28, generator=g) * 255).to(torch.uint8).numpy(), mode="L").save(
                d / f"{i}.png")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    out = tmp_path / "ft.safetensors"
    code, _, err = run(capsys, "finetune", "fmnist_deit_tiny", "--data", str(tmp_path / "train"), "--batch-size", "4",
                       "--epochs", "1", "-q", "--out-dir", str(tmp_path / "run"), "-o", str(out))
    assert code == 0, err
    assert far.load(out).num_classes == 3


@pytest.mark.parametrize("where", ["file", "under-file", "json-folder"])
def test_demo_out_dir_is_checked_before_the_models_run(tmp_path, capsys, monkeypatch, where):
    """--out-dir a file (or under one, or with a folder named demo.json in it): the demo evaluated every zoo model
    (minutes at the default 10000 images) and then failed to write."""
    import far.cli.demo

    def no_work(*a, **k):
        raise AssertionError("the demo ran before --out-dir was checked")

    monkeypatch.setattr(far.cli.demo, "run_demo", no_work)
    (tmp_path / "file").write_text("x")
    (tmp_path / "d" / "demo.json").mkdir(parents=True)
    out = {"file": tmp_path / "file", "under-file": tmp_path / "file" / "sub", "json-folder": tmp_path / "d"}[where]
    code, _, err = run(capsys, "demo", "--out-dir", str(out), "-q")
    assert_user_error(code, err, "--out-dir")


@pytest.mark.parametrize("cmd", [["eval", "fmnist_far_tiny", "--data", "fashion-mnist", "--limit", "1"],
                                 ["demo", "--num-images", "1"]])
def test_threads_beyond_the_cores_are_refused(capsys, monkeypatch, cmd):
    """--threads 100000 made torch spawn threads until the process crashed (a segfault, or 'corrupt safetensors
    file: unable to mmap' from the next allocation); more threads than cores never help."""
    import os

    import far.cli.demo

    monkeypatch.setattr(far.cli.demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    threads = torch.get_num_threads()
    code, _, err = run(capsys, *cmd, "--threads", str((os.cpu_count() or 1) + 1), "-q")
    assert_user_error(code, err, "--threads must be at most the")
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("argv,init", [([], "v"), (["--init", "random"], "random"), (["--pre-proj-init", "random"],
                                       "random"), (["--init", "value", "--pre-proj-init", "v"], "v")])
def test_convert_pre_proj_init_and_its_older_name(capsys, tmp_path, argv, init):
    out = tmp_path / "x.safetensors"
    code, _, err = run(capsys, "convert", "fmnist_deit_tiny", "-o", str(out), "-q", *argv)
    assert code == 0, err
    assert far.checkpoint.read_config(out)["metadata"]["init"] == init


@pytest.mark.parametrize("name,guess", [("fmnist_far_tinyy", "fmnist_far_tiny"),
                                        ("deit_tiny_patch16_22", "deit_tiny_patch16_224"),
                                        ("timm:deit_tiny_patch16_22", "deit_tiny_patch16_224"),
                                        ("totally_unknown_model", None)])
def test_unknown_model_name_suggests_the_closest(capsys, name, guess):
    code, _, err = run(capsys, "info", name)
    assert_user_error(code, err, name)
    assert (f"did you mean {guess}?" in err) if guess else ("did you mean" not in err)


def test_demo_without_a_plot_removes_an_older_plot(tmp_path, monkeypatch, capsys):
    """`far demo --no-plot` left an older run's demo.png beside the new demo.json: a figure of other numbers.
    One zoo model on 4 images keeps this quick."""
    import far.cli.demo

    monkeypatch.setattr(far.cli.demo, "MODELS", (("teacher (attention)", "fmnist_deit_tiny"),))
    (tmp_path / "demo.png").write_bytes(b"an older run's figure")
    code, out, err = run(capsys, "demo", "--num-images", "4", "--bench-images", "4", "--batch-size", "4",
                         "--out-dir", str(tmp_path), "--no-plot", "-q")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]
    assert f"removed {tmp_path / 'demo.png'}" in out
    (tmp_path / "demo.png").mkdir()  # not a file the demo wrote: left alone
    assert run(capsys, "demo", "--num-images", "4", "--bench-images", "4", "--batch-size", "4",
               "--out-dir", str(tmp_path), "--no-plot", "-q")[0] == 0
    assert (tmp_path / "demo.png").is_dir()


@needs_fmnist
def test_far_code_warnings_print_as_one_far_warning_line(tmp_path, capsys):
    """An option that has no effect prints a `far: warning:` line (README); the ones far's library code raises
    (here: an EMA that averages over more steps than the run has) came out as Python's UserWarning with a file
    name and a source line. Warnings of other code keep Python's form."""
    import warnings

    from far.cli.main import far_warnings

    code, _, err = run(capsys, "train-teacher", "fmnist_deit_tiny", "--limit", "32", "--eval-limit", "8",
                       "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--ema", "0.999",
                       "--max-steps", "1", "--out-dir", str(tmp_path / "run"), "-q")
    assert code == 0, err
    assert "far: warning: train-teacher: EMA decay 0.999 averages over ~1000 steps" in err, err
    assert "UserWarning" not in err and ".py:" not in err, err
    passed = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = far_warnings(lambda message, *rest: passed.append(str(message)))
        warnings.warn("not far's")  # raised here, in a test: handed on as it came
    assert passed == ["not far's"] and "far: warning" not in capsys.readouterr().err


def test_demo_table_shortens_an_unavailable_backends_reason_at_a_word():
    """The reason a backend is unavailable was cut at 70 characters mid-word ("(set i"); it now ends at a word
    and points to demo.json, which holds it whole."""
    from far.cli.demo import format_table

    why = ("far_kernels._C was built without CUDA (set FAR_CUDA_ARCHS and reinstall: pip install "
           "--no-build-isolation -e .)")
    row = {"name": "FAR", "model": "fmnist_far_tiny", "top1": 0.9, "params": 1, "mixer_params": 1,
           "imc_energy_uj": 1.0, "imc_latency_us": 1.0, "imc_edap_vs_teacher": 1.0, "backend": "cuda",
           "unavailable": why}
    line = [x for x in format_table({"rows": [row]}).splitlines() if "unavailable:" in x][0]
    shown = line.split("unavailable: ", 1)[1]
    assert len(shown) <= 70 and shown.endswith("... (demo.json has it all)")
    words = shown[:-len(" ... (demo.json has it all)")].split()
    assert words == why.split()[:len(words)]  # whole words of the reason, in order


@needs_fmnist
def test_eval_reports_the_backend_a_float64_model_runs(capsys, ckpt, tmp_path, monkeypatch):
    """auto runs the torch reference for float64 (dispatch.select): the report named auto's float32 pick."""
    path = tmp_path / "fp64.safetensors"
    far.save(far.load(ckpt).double(), path)
    ran = set()
    select = far_kernels.dispatch.select

    def spy(op, backend, device, dtype=torch.float32, *rest, **kw):
        name = select(op, backend, device, dtype, *rest, **kw)
        if rest or kw:  # a forward's call (needs_grad, args): the backend that ran
            ran.add(name)
        return name

    monkeypatch.setattr(far_kernels.dispatch, "select", spy)
    out_json = tmp_path / "res.json"
    code, out, err = run(capsys, "eval", str(path), "--data", "fashion-mnist", "--limit", "4", "--json",
                         str(out_json), "-q")
    assert code == 0, err
    res = json.loads(out_json.read_text())
    assert ran == {res["backend"]} == {"torch"} and "backend torch" in out
