"""Downstream transfer: `far finetune --mode` trains exactly the parameters it names (the others
bit-identical after training), and distillation on a downstream set whose classes differ from the FAR
student's (the student takes the fine-tuned teacher's classifier), through the API and the two-step CLI."""
import copy
import warnings

import numpy as np
import pytest
import torch

import far
from far.cli import main
from far.errors import ConfigError
from far.methods.distill import make_student
from far.methods.supervised import FINETUNE_MODES, finetune_parameters
from far.train import TrainConfig

TINY = dict(embed_dim=48, depth=2, num_heads=2)


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return far.create_model("fmnist_deit_tiny", far=False, **TINY).eval()


def three_class_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.arange(n) % 3)


def expected(model, mode):
    """The trained parameter names of each mode, spelled out for a 2-block timm ViT."""
    mlp = [f"blocks.{b}.mlp.{fc}.{w}" for b in range(2) for fc in ("fc1", "fc2") for w in ("weight", "bias")]
    head = ["head.weight", "head.bias"]
    return {"full": [n for n, _ in model.named_parameters()], "fc": mlp + head, "fc+head": mlp + head,
            "head": head}[mode]


@pytest.mark.parametrize("inplace", [True, False])
def test_train_classifier_gives_the_callers_requires_grad_flags_back(inplace):
    """Which parameters train is train_classifier's argument; the caller's frozen flags come back as they were
    (before, every flag came back True, so a model frozen by hand lost its freeze)."""
    model = tiny_teacher()
    model.patch_embed.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    old = copy.deepcopy(model)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_epochs=0, progress=False)
    got = far.train_classifier(model, three_class_data(), config=cfg, inplace=inplace)
    assert (got is model) == inplace
    for m in (got, model):
        assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    # every parameter trained (trainable=None), frozen flags notwithstanding, as documented
    assert not torch.equal(got.patch_embed.proj.weight, old.patch_embed.proj.weight)


@pytest.mark.parametrize("mode", FINETUNE_MODES)
@pytest.mark.parametrize("far_model", [False, True])
def test_finetune_modes_train_exactly_their_parameters(mode, far_model):
    model = tiny_teacher()
    if far_model:
        model = make_student(model)
    assert sorted(finetune_parameters(model, mode)) == sorted(expected(model, mode))
    before = copy.deepcopy(model)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_epochs=0, progress=False, weight_decay=0.05)
    got = far.finetune(model, three_class_data(), num_classes=3, config=cfg, mode=mode)
    assert got.num_classes == 3 and model.num_classes == 10  # a copy; the new classifier has 3 classes
    trained = set(expected(model, mode))
    old = dict(before.named_parameters())
    for name, p in got.named_parameters():
        assert p.requires_grad  # restored after training
        if name.startswith("head."):
            continue  # a new classifier: compared below
        if name in trained:
            assert not torch.equal(p, old[name]), name
        else:
            assert torch.equal(p, old[name]), name  # frozen: bit-identical after two AdamW steps
    assert got.far_metadata["finetune_mode"] == mode
    assert got.far_metadata["trained_parameters"] == sum(p.numel() for n, p in got.named_parameters()
                                                         if n in trained)


def test_finetune_mode_head_moves_only_the_new_classifier_from_its_seeded_init():
    model = tiny_teacher()
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_epochs=0, progress=False, seed=3)
    start = copy.deepcopy(model)
    torch.manual_seed(3)
    start.reset_classifier(3)
    got = far.finetune(model, three_class_data(), num_classes=3, config=cfg, mode="head")
    assert not torch.equal(got.head.weight, start.head.weight)
    for (n, p), (_, q) in zip(got.named_parameters(), start.named_parameters()):
        if not n.startswith("head."):
            assert torch.equal(p, q), n


def test_finetune_refuses_unknown_modes():
    with pytest.raises(ConfigError, match="finetune mode must be one of"):
        far.finetune(tiny_teacher(), three_class_data(), num_classes=3, mode="last")
    with pytest.raises(ConfigError, match="has no classifier"):
        finetune_parameters(torch.nn.Sequential(torch.nn.Linear(2, 2)), "fc")


def test_downstream_distillation_with_another_number_of_classes():
    """A 10-class FAR student, a 3-class teacher fine-tuned on the downstream set: the student gets the
    teacher's classifier (shape and weights) and distils on the 3-class data."""
    base = tiny_teacher()
    student = make_student(base)  # 10 classes, like its ImageNet-style parent
    data = three_class_data(32)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-3, warmup_epochs=0, progress=False)
    teacher_ft = far.finetune(base, data, num_classes=3, config=cfg, mode="full")
    got = far.distill(teacher_ft, data, student=student, config=dataclasses_replace(cfg, epochs=0),
                      stage2_epochs=1, stage2_lr=1e-9, eval_data=data)
    assert got.num_classes == 3 and student.num_classes == 10  # the given student is untouched
    torch.testing.assert_close(got.head.weight, teacher_ft.head.weight, atol=1e-6, rtol=0)  # lr 1e-9: ~copied
    assert "copied from the teacher (3 classes; the student had 10)" in got.far_metadata["recipe"]["classifier"]
    x = torch.randn(2, 1, 28, 28)
    assert got(x).shape == (2, 3)


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def _folder(root, classes=3, per_class=6, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L").save(root / f"c{c}" / f"{i}.png")
    return root


def test_two_step_downstream_workflow_on_the_command_line(tmp_path, capsys):
    """far finetune the attention teacher on a 3-class folder (--mode fc), then far distill its FAR student
    (10 classes) on the same folder with the paper recipe (RandAugment on the folder's grayscale images)."""
    data = _folder(tmp_path / "flowers")
    teacher = tiny_teacher()
    tpath, spath = tmp_path / "deit.safetensors", tmp_path / "far.safetensors"
    far.save(teacher, tpath)
    far.save(make_student(teacher), spath)
    tft, sft = tmp_path / "deit_flowers.safetensors", tmp_path / "far_flowers.safetensors"
    assert main(["finetune", str(tpath), "--data", str(data), "--mode", "fc", "--epochs", "1", "--batch-size", "6",
                 "-q", "--out-dir", str(tmp_path / "ft"), "-o", str(tft), "--pretrained"]) == 0
    assert "--pretrained has no effect: " + str(tpath) + " is a checkpoint (it has its own weights)" in capsys.readouterr().err
    ft = far.load(tft)
    assert ft.num_classes == 3 and ft.far_checkpoint["metadata"]["finetune_mode"] == "fc"
    for n, p in ft.named_parameters():  # fc: attention, norms and embeddings as they were
        if ".mlp." not in n and not n.startswith("head."):
            assert torch.equal(p, dict(teacher.named_parameters())[n]), n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the paper EMA's horizon is longer than this run
        assert main(["distill", str(tft), "--student", str(spath), "--data", str(data), "--recipe", "paper",
                     "--epochs", "0.5", "--stage2-epochs", "0.5", "--batch-size", "6", "-q",
                     "--out-dir", str(tmp_path / "d"), "-o", str(sft)]) == 0
    got = far.load(sft)
    meta = got.far_checkpoint["metadata"]
    assert got.num_classes == 3 and meta["recipe"]["name"] == "paper"
    assert meta["training"]["config"]["rand_augment"] == "rand-m9-mstd0.5-inc1"
    assert "copied from the teacher" in meta["recipe"]["classifier"]
