"""The Python API of the methods: modules in, modules out, and nothing written to disk.

A tiny attention ViT built in memory, random in-memory data (no dataset files), far.distill then
far.prune then far.evaluate, with the working directory watched: no file may appear anywhere."""
import os

import pytest
import torch

import far
from conftest import HalvesImages
from far.train import TrainConfig


ImageSet = HalvesImages  # (image, label): which half is brighter


def _files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def test_distill_then_prune_in_memory_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    teacher = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=2, num_heads=2, num_classes=2)
    train_set, test_set = ImageSet(96, seed=1), ImageSet(32, seed=2)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-3, warmup_epochs=0.2, progress=False, augment=False)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    student = far.distill(teacher, train_set, eval_data=test_set, config=cfg, stage2_epochs=0.5, kd_weight=1.0)

    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items()), "the teacher is unchanged"
    assert teacher.training and all(p.requires_grad for p in teacher.parameters()), "mode and flags restored"
    assert len(far.far_modules(student)) == 2 and not far.far_modules(teacher)
    run = student.far_run
    assert run.completed and run.out_dir is None and run.steps == 6 + 3  # 96 / 16 per epoch: 1 + 0.5 epochs
    assert 0 <= run.accuracy <= 1 and any("cos_b1" in r for r in run.history)
    assert student.far_metadata["training"]["command"] == "distill"

    units = sum(int(m.hidden_sizes.sum()) for _, m in far.far_modules(student))
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    pruned = far.prune(student, train_set, eval_data=test_set, config=TrainConfig(
        epochs=0.5, batch_size=16, progress=False, augment=False), prune_ratio=0.5, finetune_epochs=0.5)
    kept = sum(int(m.hidden_sizes.sum()) for _, m in far.far_modules(pruned))
    assert kept == units - round(0.5 * units)  # exactly half the unit groups removed
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in s_before.items()), "the student is unchanged"
    assert all(m.width == int(m.hidden_sizes.max()) for _, m in far.far_modules(pruned))  # compacted
    assert pruned.far_metadata["pruning"]["lstm_params_after"] < pruned.far_metadata["pruning"]["lstm_params_before"]

    res = far.evaluate(pruned, test_set, batch_size=8)
    assert res["num_images"] == 32 and 0 <= res["accuracy"] <= 1
    assert _files(tmp_path) == [], "the Python API wrote files"


def test_methods_refuse_bad_input_before_training():
    teacher = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=1, num_heads=2, num_classes=2)
    data = ImageSet(16, seed=0)
    with pytest.raises(far.ConfigError, match="no FAR blocks"):
        far.prune(teacher, data)
    with pytest.raises(far.ConfigError, match="resume needs an out_dir"):
        far.distill(teacher, data, config=TrainConfig(resume=True))
    with pytest.raises(far.ConfigError, match="fewer than one batch"):
        far.distill(teacher, data, config=TrainConfig(batch_size=64, progress=False))


def test_a_refused_run_makes_no_folder(tmp_path):
    """A run refused before training (data smaller than one batch; nothing to train) used to leave the folders
    it had made: <out>/stage1 of far.distill, the out_dir of a one-stage run."""
    from far.methods.supervised import train_classifier

    teacher = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=1, num_heads=2, num_classes=2)
    data = ImageSet(16, seed=0)
    out = tmp_path / "runs" / "a"
    with pytest.raises(far.ConfigError, match="fewer than one batch"):
        far.distill(teacher, data, config=TrainConfig(batch_size=64, progress=False, out_dir=str(out)))
    with pytest.raises(far.ConfigError, match="nothing to train"):
        train_classifier(teacher, data, config=TrainConfig(batch_size=8, progress=False, out_dir=str(out)),
                         trainable=[])
    assert os.listdir(tmp_path) == []


def test_evaluate_refuses_images_that_do_not_fit_the_model():
    model = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=1, num_heads=2, num_classes=2)
    for shape, match in (((1, 32, 32), "32x32x1 images but fmnist_deit_tiny takes 28x28x1"),
                         ((3, 28, 28), "28x28x3 images")):
        data = torch.utils.data.TensorDataset(torch.randn(4, *shape), torch.zeros(4, dtype=torch.long))
        with pytest.raises(far.ConfigError, match=match):
            far.evaluate(model, data)
    assert model.training  # the mode is restored after the error
    assert far.evaluate(model, ImageSet(4, seed=1))["num_images"] == 4
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 2))  # no patch embedding: not checked
    assert far.evaluate(plain, ImageSet(4, seed=1))["num_images"] == 4


@pytest.mark.parametrize("labels", [[0, 1, 2, 0], [0, -1, 1, 1]], ids=["beyond-classes", "negative"])
def test_evaluate_refuses_labels_outside_the_classes(labels):
    """A label the model cannot predict (a 3rd class for 2 outputs, -1 for "unlabelled") used to count as a wrong
    answer silently; it is a DataError, found in any batch."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 2))
    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 28, 28), torch.tensor(labels))
    with pytest.raises(far.DataError, match="1 label\\(s\\) outside the model's 2 classes"):
        far.evaluate(model, data, batch_size=1)


@pytest.mark.parametrize("device,match", [("cuda:7" if torch.cuda.is_available() else "cuda", "device cuda"),
                                          ("foo", "device 'foo'"), ("mps", "device must be cpu or cuda")])
def test_evaluate_refuses_a_device_it_cannot_use(device, match):
    """As the CLI's --device: a ConfigError, not torch's driver error."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 2))
    with pytest.raises(far.ConfigError, match=match):
        far.evaluate(model, ImageSet(4, seed=1), device=device)
