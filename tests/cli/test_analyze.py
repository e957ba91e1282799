"""`far analyze TEACHER STUDENT`: tiny checkpoints on a tiny image folder; the tables, JSON, maps and
plots it writes, and its one-line user errors."""
import copy
import json

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import far
from far.analysis import analyze
from far.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    teacher = VisionTransformer(img_size=16, patch_size=8, in_chans=1, num_classes=3, embed_dim=12, depth=2,
                                num_heads=3, mlp_ratio=2.0).eval()
    teacher.pretrained_cfg = {"input_size": (1, 16, 16), "num_classes": 3, "mean": (0.5,), "std": (0.5,),
                              "architecture": "tiny"}
    student = far.convert(copy.deepcopy(teacher))
    far.save(teacher, root / "t.safetensors")
    far.save(student, root / "s.safetensors")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "data" / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(root / "data" / f"c{c}" / f"{i}.png")
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_writes_tables_json_maps_and_plots(capsys, setup, tmp_path):
    out_dir = tmp_path / "res"
    code, out, err = run(capsys, "analyze", setup / "t.safetensors", setup / "s.safetensors", "--data", setup / "data",
                         "--batch-size", "4", "--map-images", "2", "--map-image", "1", "--map-head", "2",
                         "--out-dir", out_dir, "--json", tmp_path / "a.json", "-q")
    assert code == 0, err
    assert "partial replacement" in out and "A vs J(FAR)" in out and "full student" in out
    res = json.loads((tmp_path / "a.json").read_text())
    assert res == json.loads((out_dir / "analysis.json").read_text())
    assert res["teacher"].endswith("t.safetensors") and res["num_images"] == 6 and res["split"] is None
    assert len(res["blocks"]) == 2 and len(res["partial"]["mixer"]) == 2 and res["maps"]["images"] == 2
    # the same numbers as the Python API on the same images (the folder's sorted files, labels by folder)
    teacher, _ = far.load_model(setup / "t.safetensors")
    student, _ = far.load_model(setup / "s.safetensors")
    data = far.data.make_dataset(setup / "data", "test", far.models.data_config(teacher))
    api = analyze(teacher, student, data, batch_size=4, map_images=2)
    for key in ("agreement", "teacher_accuracy"):
        assert res[key] == pytest.approx(api[key])
    assert res["blocks"][1]["isolated"]["cos"] == pytest.approx(api["blocks"][1]["isolated"]["cos"])
    assert res["partial"]["block"][0]["feature_cos"] == pytest.approx(api["partial"]["block"][0]["feature_cos"])
    with np.load(out_dir / "token_maps.npz") as z:
        assert z["attention"].shape == (2, 2, 3, 5, 5)
    if far.utils.plot.pyplot() is not None:
        assert {p.name for p in out_dir.glob("*.png")} == {"block_cosine.png", "error_accumulation.png",
                                                         "token_maps.png"}
    # files exist now: refused without -f, replaced with it
    code, _, err = run(capsys, "analyze", setup / "t.safetensors", setup / "s.safetensors", "--data", setup / "data",
                       "--map-images", "0", "--out-dir", out_dir)
    assert code == 2 and "exists" in err and err.count("\n") == 1
    code, out, err = run(capsys, "analyze", setup / "t.safetensors", setup / "s.safetensors", "--data", setup / "data",
                         "--map-images", "0", "--out-dir", out_dir, "-f", "-q")
    assert code == 0, err
    assert json.loads((out_dir / "analysis.json").read_text())["maps"] is None and "A vs J" not in out
    # the first run's token maps (npz and figure) are not left beside a report that has none
    assert not (out_dir / "token_maps.npz").exists() and not (out_dir / "token_maps.png").exists()


def test_analyze_json_says_which_code_and_when(capsys, setup, tmp_path):
    """--json carries the environment record the benchmarks write: git commit and dirty flag, date, host."""
    from far.utils.env import git_state

    code, _, err = run(capsys, "analyze", setup / "t.safetensors", setup / "s.safetensors", "--data", setup / "data",
                       "--limit", "2", "--map-images", "0", "--json", tmp_path / "a.json", "-q")
    assert code == 0, err
    env = json.loads((tmp_path / "a.json").read_text())["environment"]
    assert {k: env[k] for k in ("git_commit", "git_dirty", "git_source")}.keys() == git_state().keys()
    assert env["git_commit"] == git_state()["git_commit"] and env["date_utc"] and env["versions"]["far"]


def test_analyze_maps_span_batches(capsys, setup, tmp_path):
    """--batch-size 1 --map-images 2 --map-image 1: two map images from two batches, every file written."""
    out_dir = tmp_path / "an"
    code, _, err = run(capsys, "analyze", setup / "t.safetensors", setup / "s.safetensors", "--data", setup / "data",
                       "--limit", "2", "--batch-size", "1", "--map-images", "2", "--map-image", "1",
                       "--out-dir", out_dir, "-q")
    assert code == 0, err
    assert json.loads((out_dir / "analysis.json").read_text())["maps"]["images"] == 2
    with np.load(out_dir / "token_maps.npz") as z:
        assert z["attention"].shape == (2, 2, 3, 5, 5)
    if far.utils.plot.pyplot() is not None:
        assert (out_dir / "token_maps.png").is_file()


def test_analyze_without_matplotlib_still_writes_json(capsys, setup, tmp_path, monkeypatch):
    monkeypatch.setattr(far.utils.plot, "pyplot", lambda: None)
    code, _, err = run(capsys, "analyze", setup / "t.safetensors", setup / "s.safetensors", "--data", setup / "data",
                       "--map-images", "1", "--out-dir", tmp_path / "r")
    assert code == 0, err
    assert "far: warning: matplotlib is not installed" in err
    assert (tmp_path / "r" / "analysis.json").is_file() and not list((tmp_path / "r").glob("*.png"))


@pytest.mark.parametrize("argv,fragment", [
    (["s", "t"], "TEACHER"),  # swapped: the FAR model given as the teacher
    (["t", "s", "--map-head", "3"], "--map-head 3: the teacher has 3 heads"),
    (["t", "s", "--map-images", "2", "--map-image", "2"], "--map-image 2 is not one of the 2 map images"),
    (["t", "s", "--limit", "2", "--map-images", "4", "--map-image", "2"],
     "--map-image 2 is not one of the 2 map images (--limit 2) (0..1); lower --map-image"),
    (["t", "s", "--map-images", "8", "--map-image", "6"], "--map-image 6 is not one of the 6 map images (the data has "
                                                          "6 images)"),
    (["t", "s", "--limit", "0"], "--limit must be >= 1"),
    (["t", "no_such_model"], "no_such_model"),
])
def test_analyze_user_errors(capsys, setup, tmp_path, argv, fragment):
    names = {"t": setup / "t.safetensors", "s": setup / "s.safetensors"}
    argv = [names.get(a, a) for a in argv]
    code, _, err = run(capsys, "analyze", *argv, "--data", setup / "data", "--out-dir", tmp_path / "o")
    assert code == 2 and err.startswith("far: error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert not (tmp_path / "o").exists()  # refused before any work or output


@pytest.mark.parametrize("exists", [False, True])
@pytest.mark.parametrize("name", ["analysis.json", "token_maps.npz", "block_cosine.png"])
def test_analyze_json_that_out_dir_writes_is_refused_up_front(capsys, setup, tmp_path, exists, name):
    """--json naming a file that --out-dir gets too: refused before any work (it used to write the JSON,
    then fail on the out-dir's file as existing, or with -f overwrite it)."""
    out_dir = tmp_path / "o"
    if exists:
        out_dir.mkdir()
    code, _, err = run(capsys, "analyze", setup / "t.safetensors", setup / "s.safetensors", "--data", setup / "data",
                       "--out-dir", out_dir, "--json", out_dir / "sub" / ".." / name if exists else out_dir / name,
                       "-f")
    assert code == 2 and err.startswith("far: error: ") and err.count("\n") == 1, err
    assert "--out-dir writes the same file" in err, err
    assert not list(out_dir.iterdir()) if exists else not out_dir.exists()


def test_help(capsys):
    code, out, _ = run(capsys, "analyze", "--help")
    assert code == 0
    for word in ("TEACHER", "STUDENT", "--data", "--limit", "--out-dir", "--json", "--map-images", "Jacobian",
                 "examples", "dataset-fashion-mnist"):
        assert word in out


def test_analyze_out_dir_that_cannot_be_made_is_refused_before_any_work(capsys, setup, tmp_path, monkeypatch):
    """--out-dir under a file: the whole analysis ran, then mkdir failed ("Not a directory")."""
    def no_work(*a, **k):
        raise AssertionError("analyze ran before --out-dir was checked")

    monkeypatch.setattr(far.analysis, "analyze", no_work)
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "analyze", setup / "t.safetensors", setup / "s.safetensors", "--data", setup / "data",
                       "--map-images", "0", "--out-dir", tmp_path / "file" / "sub")
    assert code == 2 and err.startswith("far: error: --out-dir ") and err.count("\n") == 1, err
    assert "is not a folder" in err
