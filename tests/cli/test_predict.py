"""far.predict and `far predict`: per-image classes of image files and folders, the same as the model on the same
pixels in memory, in the order the files are listed, written as CSV or JSON; clear errors for bad input."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import far
from far.cli import main
from far.data import FASHION_MNIST_CLASSES, fashion_mnist, image_files
from far.errors import ConfigError, DataError
from far.models import data_config

pytestmark = pytest.mark.fmnist
MODEL = "fmnist_far_tiny_pruned"


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """The first 10 Fashion-MNIST test images as PNGs: 7 in a folder, 3 in a subfolder; and their raw pixels."""
    root = tmp_path_factory.mktemp("imgs")
    (root / "sub").mkdir()
    ds = fashion_mnist("test", limit=10, mean=(0.0,), std=(1.0,))
    pix = []
    for i in range(10):
        x = (ds[i][0][0].numpy() * 255).round().astype(np.uint8)
        pix.append(x)
        Image.fromarray(x).save(root / ("sub" if i >= 7 else "") / f"im{i}.png")
    return root, np.stack(pix)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_equals_the_model_on_the_same_pixels(pngs):
    root, pix = pngs
    model = far.create_model(MODEL, pretrained=True)
    data = image_files([root], data_config(model))
    assert [p.relative_to(root).as_posix() for p in data.files] == (
        [f"im{i}.png" for i in range(7)] + [f"sub/im{i}.png" for i in range(7, 10)])  # files, then subfolders
    res = far.predict(model, data, batch_size=4, top_k=3)
    cfg = data_config(model)
    x = (torch.from_numpy(pix).float()[:, None] / 255 - cfg["mean"][0]) / cfg["std"][0]
    with torch.inference_mode():
        p = torch.softmax(model.eval()(x).float(), dim=1)
    v, i = p.topk(3, dim=1)
    assert torch.equal(res["classes"], i) and res["num_images"] == 10
    torch.testing.assert_close(res["probs"], v, rtol=0, atol=1e-5)  # PNG decode + transform vs raw: float noise


def test_cli_csv_json_and_the_table(pngs, tmp_path, capsys):
    root, _ = pngs
    csv_path, json_path = tmp_path / "p.csv", tmp_path / "p.json"
    code, out, _ = run(capsys, "predict", MODEL, str(root), str(root / "im3.png"), "--top-k", "2", "-o", str(csv_path))
    assert code == 0 and len(out.splitlines()) == 10  # the table too: the 10 images, nothing left out
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["image", "class1", "name1", "prob1", "class2", "name2", "prob2"]
    assert len(rows) == 11  # im3.png given twice: listed once
    for r in rows[1:]:
        assert r[2] == FASHION_MNIST_CLASSES[int(r[1])] and float(r[3]) >= float(r[6])
    assert run(capsys, "predict", MODEL, str(root), "-o", str(json_path), "-q")[0] == 0
    j = json.loads(json_path.read_text())
    assert j["num_images"] == 10 and [t["class"] for t in j["predictions"][0]["top"]] == [int(rows[1][1])]
    code, out, _ = run(capsys, "predict", MODEL, str(root / "sub"))
    assert code == 0 and len(out.splitlines()) == 3 and out.splitlines()[0].split()[1] in FASHION_MNIST_CLASSES


def test_cli_class_names_file(pngs, tmp_path, capsys):
    root, _ = pngs
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    code, out, _ = run(capsys, "predict", MODEL, str(root / "im0.png"), "--class-names", str(names))
    assert code == 0 and out.split()[1].startswith("c")
    names.write_text("a\nb\n")
    code, _, err = run(capsys, "predict", MODEL, str(root / "im0.png"), "--class-names", str(names))
    assert code == 2 and "2 names for a model of 10 classes" in err
    names.write_bytes(b"a\nb\n\xff\n")  # not UTF-8 (e.g. Latin-1): the file and the byte named, one line
    code, _, err = run(capsys, "predict", MODEL, str(root / "im0.png"), "--class-names", str(names))
    assert code == 2 and err.strip() == f"far: error: {names}: not UTF-8 text (byte 0xff at offset 4)", err


@pytest.mark.parametrize("args,needle", [
    (["{root}/missing.png"], "no such image file or folder"),
    (["{root}/notes.txt"], "not an image file"),
    (["{root}/empty"], "no images"),
    (["{root}", "-o", "{tmp}/p.txt"], "give a .csv or .json file"),
    (["{root}", "--top-k", "11"], "--top-k 11: the model has 10 classes"),
    (["{root}", "--top-k", "0"], "--top-k"),
])
def test_cli_errors(pngs, tmp_path, capsys, args, needle):
    root, _ = pngs
    (tmp_path / "empty").mkdir(exist_ok=True)
    (root / "notes.txt").write_text("x")
    argv = [a.format(root=root if "empty" not in a else tmp_path, tmp=tmp_path) for a in args]
    code, _, err = run(capsys, "predict", MODEL, *argv)
    assert code == 2 and err.startswith("far: error: ") and needle in err, err


def test_existing_output_is_kept_without_force(pngs, tmp_path, capsys):
    root, _ = pngs
    out = tmp_path / "p.csv"
    out.write_text("keep me")
    code, _, err = run(capsys, "predict", MODEL, str(root), "-o", str(out))
    assert code == 2 and out.read_text() == "keep me"
    assert run(capsys, "predict", MODEL, str(root), "-o", str(out), "-f", "-q")[0] == 0
    assert out.read_text().startswith("image,")


class _Nan(nn.Module):
    num_classes = 3

    def forward(self, x):
        out = x.flatten(1)[:, :3].clone()
        out[1] = float("nan")
        return out


def test_api_non_finite_logits_and_bad_arguments():
    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 2, 2), torch.zeros(4))
    with pytest.warns(UserWarning, match="1 image"):
        res = far.predict(_Nan(), data, top_k=2)
    assert res["classes"][1].tolist() == [-1, -1] and res["probs"][1].isnan().all()
    assert (res["classes"][[0, 2, 3]] >= 0).all()
    with pytest.raises(ConfigError, match="top_k"):
        far.predict(_Nan(), data, top_k=4)
    with pytest.raises(DataError, match="no images given"):
        image_files([], {"input_size": (1, 28, 28), "num_classes": 10})


def test_json_output_is_strict_json_when_a_probability_is_nan(pngs, tmp_path, capsys):
    """An image whose logits are not finite gets probability NaN: the JSON report holds it as the string "nan"
    (as every far --json does, far.utils.fs.strict_json), not the bare NaN token that strict parsers refuse."""
    root, _ = pngs
    model = far.create_model(MODEL, pretrained=True)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    ckpt, out = tmp_path / "nan.safetensors", tmp_path / "p.json"
    far.save(model, ckpt)
    code, _, err = run(capsys, "predict", str(ckpt), str(root / "im0.png"), "-o", str(out), "-q")
    assert code == 0 and "non-finite logits" in err, err

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    j = json.loads(out.read_text(), parse_constant=refuse)
    assert j["predictions"][0]["top"][0] == {"class": -1, "name": None, "prob": "nan"}
