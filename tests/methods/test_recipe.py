"""`--recipe paper` (far.methods.recipes) and the DeiT pieces of the training loop: the preset sets what it
says and records it, explicit options win, the LR scaling by hand, mixup's soft targets by hand, RandAugment
on grayscale Fashion-MNIST, drop-path on the blocks for the run only, repeated augmentation under DDP."""
import dataclasses
import json
import warnings

import pytest
import torch

import far
from far.cli import main
from far.data import deit_train_transform, deit_view, fashion_mnist
from far.errors import ConfigError
from far.methods.recipes import PAPER, apply, preset
from far.train import Task, TrainConfig, setup_distributed, train
from far.train.loop import (Dist, TrainData, apply_mixup, classification_loss, drop_path, effective_lr, lr_at,
                            make_mixup)

TINY = dict(embed_dim=48, depth=2, num_heads=2)


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return far.create_model("fmnist_deit_tiny", far=False, **TINY).eval()


def test_lr_scaling_by_hand():
    cfg = TrainConfig(batch_size=64, lr_scale_batch=512)
    assert effective_lr(5e-4, cfg, world=4) == pytest.approx(5e-4 * 64 * 4 / 512)  # 2.5e-4
    assert effective_lr(5e-5, cfg, world=1) == pytest.approx(6.25e-6)
    assert effective_lr(5e-4, TrainConfig(batch_size=64), world=4) == 5e-4  # 0 = off


def test_preset_fills_only_what_was_not_given():
    import inspect

    from far.methods.distill import distill

    defaults = {k: v.default for k, v in inspect.signature(distill).parameters.items() if k in PAPER}
    cfg, kw, rec = apply("paper", TrainConfig(epochs=3, batch_size=32), {**defaults, "kd_weight": 0.5},
                         explicit=None, defaults=defaults)
    # epochs/batch/kd differ from their defaults: explicit; stage1 equals its default: the preset's
    assert (cfg.epochs, cfg.batch_size, kw["kd_weight"], kw["stage1"]) == (3, 32, 0.5, "joint")
    assert (cfg.lr, cfg.lr_scale_batch, cfg.mixup, cfg.cutmix, cfg.ema) == (5e-4, 512, 0.8, 1.0, 0.99996)
    assert cfg.rand_augment == "rand-m9-mstd0.5-inc1" and cfg.reprob == 0.25 and cfg.drop_path == 0.1
    assert rec["explicit"] == ["batch_size", "epochs", "kd_weight"] and rec["values"]["kd_weight"] == 0.5
    assert set(rec["sources"]) == set(PAPER) and all("modeling/" in v or "no " in v or "replaced" in v
                                                      for v in rec["sources"].values())
    # explicit names keep even default-equal values
    _, kw, _ = apply("paper", TrainConfig(), defaults, explicit={"stage1"})
    assert kw["stage1"] == "isolated" and kw["stage2_epochs"] == 100
    with pytest.raises(ConfigError, match="not options of this method"):
        apply("paper", TrainConfig(), {"kd_weight": 1.0})
    assert preset("far") == {}
    with pytest.raises(ConfigError, match="recipe must be one of"):
        preset("deit")


def test_mixup_targets_are_soft_and_the_loss_is_soft_ce():
    K, eps = 4, 0.1
    cfg = TrainConfig(mixup=0.8, cutmix=0.0, label_smoothing=eps, batch_size=6)
    mix = make_mixup(cfg, K)
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    xm, t = apply_mixup(mix, x.clone(), y, seed=5)
    assert t.shape == (6, K) and torch.allclose(t.sum(1), torch.ones(6))
    lam = float(((xm - x.flip(0)) / (x - x.flip(0)))[0, 0, 0, 0])  # x_mixed = lam x + (1 - lam) x.flip(0)
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    off, on = eps / K, 1 - eps + eps / K
    hot = torch.full((6, K), off).scatter_(1, y[:, None], on)
    torch.testing.assert_close(t, lam * hot + (1 - lam) * hot.flip(0))
    assert 0 < lam < 1 and (t.max(1).values < on).any()  # not one-hot
    logits = torch.randn(6, K)
    want = -(t * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(classification_loss(logits, t), want)
    # the same seed mixes alike (resumable); unlabeled batches keep their -1 labels
    xm2, t2 = apply_mixup(mix, x.clone(), y, seed=5)
    assert torch.equal(xm, xm2) and torch.equal(t, t2)
    _, u = apply_mixup(mix, x.clone(), torch.full((6,), -1), seed=5)
    assert torch.equal(u, torch.full((6,), -1))
    with pytest.raises(ConfigError, match="even"):
        TrainConfig(mixup=0.8, batch_size=5).validate()


def test_the_loop_hands_soft_targets_to_the_task_and_warns_when_randaugment_cannot_apply():
    seen = []

    class Spy(Task):
        def loss(self, model, x, y):
            seen.append(y.shape)
            return super().loss(model, x, y)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    model.num_classes = 3
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 4, 4), torch.arange(8) % 3)
    cfg = TrainConfig(epochs=1, batch_size=4, mixup=0.8, cutmix=1.0, rand_augment="rand-m9-mstd0.5-inc1",
                      progress=False)
    with pytest.warns(UserWarning, match="RandAugment / random erasing not applied: TensorDataset"):
        train(Spy(model, cfg), data, None, cfg, setup_distributed("cpu"))
    assert seen == [(4, 3), (4, 3)]


def test_randaugment_and_random_erasing_on_grayscale_fashion_mnist():
    """Every RandAugment op runs on a PIL "L" image; the view gives normalized 1x28x28 tensors, the same for
    the same seed and different for another."""
    from PIL import Image
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, rand_augment_transform

    ds = fashion_mnist("train", limit=16)
    img = Image.fromarray(ds.images[0].numpy(), mode="L")
    for name in _RAND_INCREASING_TRANSFORMS:
        for m in (0, 5, 10):
            out = rand_augment_transform(f"rand-n1-m{m}-inc1", {"img_mean": (128,)}, transforms=[name])
            for op in out.ops:
                op.prob = 1.0  # every op applied (timm's default p=0.5 made this check a coin toss)
            if name == "PosterizeIncreasing" and m == 10:  # timm asks Pillow for 0 bits here: Pillow >= 10 refuses
                with pytest.raises(ValueError, match="bits"):
                    out(img)
                continue
            assert out(img).mode == "L"
    # ... which is why deit_train_transform swaps in a posterize that allows 0 bits (a black image)
    tf = deit_train_transform((1, 28, 28), (0.5,), (0.5,))
    ra = next(t for t in tf.transforms if hasattr(t, "ops"))
    post = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    post.prob, post.magnitude_std = 1.0, 0.0
    post.magnitude = 10
    black = post(img)
    assert black.mode == "L" and max(black.getdata()) == 0
    view, why = deit_view(ds)
    assert why is None and len(view) == 16
    a, y = view[(3, 7)]
    assert a.shape == (1, 28, 28) and a.dtype == torch.float32 and y == int(ds.targets[3])
    assert torch.equal(a, view[(3, 7)][0]) and not torch.equal(a, view[(3, 8)][0])
    for i in range(16):  # every image, many seeds (the top magnitudes included)
        for s in range(20):
            assert torch.isfinite(view[(i, s)][0]).all()
    sub = torch.utils.data.Subset(ds, [5, 2])
    v2, _ = deit_view(sub)
    assert len(v2) == 2 and v2[(1, 0)][1] == int(ds.targets[2])


def test_drop_path_on_the_blocks_for_the_run_only():
    from timm.layers import DropPath

    model = tiny_teacher()
    before = [type(b.drop_path1) for b in model.blocks]
    with drop_path(model, 0.1):
        rates = [(b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0) for b in model.blocks]
        assert rates == pytest.approx([0.0, 0.1])  # linear from 0 at the first block to 0.1 at the last
    assert [type(b.drop_path1) for b in model.blocks] == before
    with pytest.warns(UserWarning, match="drop-path 0.1 not applied"):
        with drop_path(torch.nn.Linear(2, 2), 0.1):
            pass


def test_repeated_augmentation_only_under_ddp():
    data = torch.utils.data.TensorDataset(torch.zeros(12, 1), torch.zeros(12, dtype=torch.long))
    one = TrainData(data, 2, Dist(rank=0, world=1), seed=0, augment=False, repeated_aug=True)
    plain = TrainData(data, 2, Dist(rank=0, world=1), seed=0, augment=False)
    assert one._indices(0) == plain._indices(0)  # one process: no repeats (as DeiT)
    ranks = [TrainData(data, 2, Dist(rank=r, world=2), seed=0, augment=False, repeated_aug=True) for r in (0, 1)]
    idx = [t._indices(0) for t in ranks]
    assert all(len(i) == 6 and t.steps_per_epoch == 3 for i, t in zip(idx, ranks))
    both = idx[0] + idx[1]
    assert len(set(both)) < len(both)  # images repeat within an epoch (each 3x over the processes)
    assert ranks[0]._indices(1) != idx[0]  # a new order every epoch


def test_paper_recipe_run_records_the_recipe(tmp_path):
    """A fraction of an epoch of each stage on a tiny model: the preset's values ran (config, stage 1 joint
    with CE + block mse, no KD unless given, CE-only stage 2, the scaled LR in the metrics) and are recorded
    in the checkpoint with what was given explicitly."""
    teacher = tiny_teacher()
    train_set, test_set = fashion_mnist("train", limit=32), fashion_mnist("test", limit=32)
    cfg = TrainConfig(epochs=0.5, batch_size=16, progress=False, log_every=1, out_dir=str(tmp_path / "run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the EMA's horizon is longer than this run: said
        student = far.distill(teacher, train_set, eval_data=test_set, config=cfg, recipe="paper",
                              stage2_epochs=0.5, explicit={"epochs", "batch_size", "stage2_epochs"})
    meta = student.far_metadata
    rec = meta["recipe"]
    assert rec["name"] == "paper" and rec["explicit"] == ["batch_size", "epochs", "stage2_epochs"]
    assert rec["values"]["stage1"] == "joint" and rec["values"]["kd_weight"] == 0.0
    assert rec["lr"] == {"stage1": pytest.approx(5e-4 * 16 / 512), "stage2": pytest.approx(5e-5 * 16 / 512),
                         "scale_batch": 512, "global_batch": 16}
    conf = meta["training"]["config"]
    assert (conf["mixup"], conf["cutmix"], conf["reprob"], conf["drop_path"], conf["ema"]) == (0.8, 1.0, 0.25, 0.1,
                                                                                                0.99996)
    assert meta["distill"]["stage1"] == "joint" and meta["distill"]["stage2_block_weight"] == 0.0
    s1 = [json.loads(r) for r in (tmp_path / "run" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    s2 = [json.loads(r) for r in (tmp_path / "run" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    step1 = next(r for r in s1 if r["kind"] == "step")
    assert "ce" in step1 and "mse_b1" in step1 and "kd" not in step1 and "cos" not in step1
    # warm-up of 5 epochs = 10 steps at 2 steps an epoch: the first step runs at peak / 10
    assert step1["lr"] == pytest.approx(lr_at(0, 1, 10, 5e-4 * 16 / 512, 1e-6))
    step2 = next(r for r in s2 if r["kind"] == "step")
    assert "ce" in step2 and not any(k.startswith(("mse", "kd")) for k in step2)


def test_cli_recipe_explicit_options_override_and_help_lists_the_preset(tmp_path, capsys):
    assert main(["distill", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # help lines wrap
    for flag in ("--recipe {far,paper}", "rand-m9-mstd0.5-inc1", "modeling/config_template.py", "--block-ft-epochs 100",
                 "--recipe paper: 0.8"):
        assert flag in text
    teacher = tiny_teacher()
    tpath, out = tmp_path / "t.safetensors", tmp_path / "s.safetensors"
    far.save(teacher, tpath)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(["distill", str(tpath), "--recipe", "paper", "--epochs", "0.5", "--stage2-epochs", "0.5",
                     "--batch-size", "16", "--limit", "32", "--eval-limit", "32", "--kd-weight", "1.0",
                     "--ema", "0", "--rand-augment", "none", "-q", "--out-dir", str(tmp_path / "run"),
                     "-o", str(out)]) == 0
    meta = far.load(out).far_checkpoint["metadata"]
    rec = meta["recipe"]
    # --kd-weight 1.0 equals far's default but was given: it wins over the preset's 0
    assert rec["values"]["kd_weight"] == 1.0 and rec["values"]["ema"] == 0.0 and rec["values"]["rand_augment"] is None
    assert set(rec["explicit"]) == {"epochs", "stage2_epochs", "batch_size", "kd_weight", "ema", "rand_augment"}
    assert rec["values"]["mixup"] == 0.8 and meta["training"]["config"]["reprob"] == 0.25
    # the default recipe changes nothing
    assert main(["distill", str(tpath), "--epochs", "0", "--stage2-epochs", "0.5", "--batch-size", "16",
                 "--limit", "32", "--eval-limit", "32", "-q", "--out-dir", str(tmp_path / "run2"),
                 "-o", str(tmp_path / "d.safetensors")]) == 0
    meta = far.load(tmp_path / "d.safetensors").far_checkpoint["metadata"]
    assert meta["recipe"]["name"] == "far" and meta["distill"]["kd_weight"] == 1.0
    conf = meta["training"]["config"]
    assert conf["mixup"] == 0 and conf["drop_path"] == 0 and conf["lr_scale_batch"] == 0 and conf["augment"] is True
    assert dataclasses.asdict(TrainConfig())["rand_augment"] is None
