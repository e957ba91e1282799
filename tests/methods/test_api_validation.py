"""The Python API refuses what it cannot do, before any work and without touching its inputs: devices it
cannot use, settings that are not finite numbers, data that does not fit the model, models far.load could
not read back; and it does what the README says where it failed (far.prune(threshold=...), analyze(t, t))."""
import os

import pytest
import torch

import far
from far.errors import ConfigError, DataError
from far.train import TrainConfig

FAST = TrainConfig(epochs=0.5, batch_size=8, progress=False, augment=False)


def tiny(far_model=True, **kw):
    torch.manual_seed(0)
    return far.create_model("fmnist_deit_tiny", far=far_model, depth=2, embed_dim=16, num_heads=2,
                            **({"hidden_sizes": 4} if far_model else {}), **kw)


def data(n=16, classes=10, chans=1):
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, chans, 28, 28, generator=g),
                                          torch.randint(0, classes, (n,), generator=g))


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("device", ["meta", "xla", "cuda:7" if not torch.cuda.is_available() else "cuda:99"])
def test_a_device_it_cannot_use_leaves_the_teacher_as_it_was(device):
    teacher = tiny(far_model=False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with pytest.raises(ConfigError, match="device"):
        far.distill(teacher, data(), config=FAST, device=device)
    assert next(teacher.parameters()).device.type == "cpu" and same_state(before, teacher.state_dict())


def test_save_refuses_what_load_would_refuse(tmp_path):
    path = tmp_path / "m.safetensors"
    mixed = tiny()
    mixed.head.double()
    with pytest.raises(ConfigError, match="mixed floating dtypes"):
        far.save(mixed, path)
    stale = tiny()
    stale.reset_classifier(5)  # timm's own API: the recorded .far_arch says 10 classes
    with pytest.raises(ConfigError, match="from its .far_arch.*head"):
        far.save(stale, path)
    from far_kernels import CrossbarConfig

    emulated = far.imc.emulate(tiny(), CrossbarConfig())
    with pytest.raises(ConfigError, match="cannot save an emulated model"):
        far.save(emulated, path)
    assert not path.exists()
    del stale.far_arch  # read from the model itself: it round-trips
    far.save(stale, path)
    assert far.load(path).num_classes == 5


def test_prune_takes_a_threshold_alone_and_refuses_nan():
    kept = far.prune(tiny(), data(), config=TrainConfig(epochs=0, batch_size=8, progress=False), threshold=1e9,
                     finetune_epochs=0)
    assert all(int(m.hidden_sizes.sum()) == 0 for _, m in far.far_modules(kept))
    for kw, match in (({"threshold": float("nan")}, "threshold must be a finite number"),
                      ({"threshold": 0.1, "prune_ratio": 0.3}, "give one of prune_ratio, threshold and budget"),
                      ({"prune_ratio": float("nan")}, "prune_ratio must be a finite number"),
                      ({"finetune_epochs": float("nan")}, "finetune_epochs must be a finite number")):
        with pytest.raises(ConfigError, match=match):
            far.prune(tiny(), data(), config=FAST, **kw)


@pytest.mark.parametrize("method", ["train_classifier", "prune", "distill", "reuse", "analyze"])
def test_training_and_analysis_check_the_data_against_the_model(method):
    calls = {
        "train_classifier": lambda d: far.train_classifier(tiny(far_model=False), d, config=FAST),
        "prune": lambda d: far.prune(tiny(), d, config=FAST, finetune_epochs=0),
        "distill": lambda d: far.distill(tiny(far_model=False), d, config=FAST, stage1="joint", stage2_epochs=0),
        "reuse": lambda d: far.reuse(tiny(far_model=False), d, plan={1: 0}, config=FAST),
        "analyze": lambda d: far.analyze(tiny(far_model=False), tiny(), d, map_images=0),
    }
    bad = data()
    bad.tensors[1][5] = 10  # one label beyond the 10 classes
    with pytest.raises(DataError, match="label 10 is outside the model's 10 classes"):
        calls[method](bad)
    with pytest.raises(ConfigError, match="28x28x3 images but .* takes 28x28x1"):
        calls[method](data(chans=3))


def test_a_float64_model_trains_on_float32_data():
    model = far.train_classifier(tiny(far_model=False).double(), data(), config=FAST)
    assert next(model.parameters()).dtype == torch.float64


def test_evaluate_counts_nan_logits_as_errors_and_refuses_a_headless_model():
    model = tiny()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.warns(UserWarning, match="16 of 16 images gave non-finite"):
        res = far.evaluate(model, data())
    assert res["accuracy"] == 0.0 and res["nonfinite"] == 16
    with pytest.raises(ConfigError, match="no classifier"):
        far.evaluate(tiny(num_classes=0), data())


def test_evaluate_and_predict_name_a_model_that_is_not_where_the_images_go():
    """Nothing is moved: a model elsewhere (meta stands in for a GPU) is named, not torch's error from its first
    layer."""
    model = tiny().to("meta")
    with pytest.raises(ConfigError, match="the model is on meta but the images go to cpu"):
        far.evaluate(model, data(), device="cpu")
    with pytest.raises(ConfigError, match="the model is on meta but the images go to cpu"):
        far.predict(model, data(), device="cpu")


@pytest.mark.parametrize("kw,match", [
    ({"kd_temperature": -2.0}, "kd_temperature must be a finite number > 0"),
    ({"ridge": float("nan")}, "ridge must be a finite number >= 0"),
    ({"stage2_epochs": float("nan")}, "stage2_epochs must be a finite number >= 0"),
    ({"plan": {}}, "plan must be a non-empty"),
])
def test_reuse_validates_its_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        far.reuse(tiny(far_model=False), data(), **{"plan": {1: 0}, "config": FAST, **kw})


@pytest.mark.parametrize("field", ["epochs", "lr", "warmup_epochs"])
def test_train_config_refuses_nan_and_inf(field):
    for v in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="finite"):
            TrainConfig(**{field: v}).validate()
    with pytest.raises(ConfigError, match="stage2 epochs must be a finite number"):
        far.distill(tiny(far_model=False), data(), config=FAST, stage2_epochs=float("nan"))


@pytest.mark.parametrize("hs,match", [([4, -1], "entry 1: units must lie in"), ([2.7, 4], "whole numbers"),
                                      (10**7, "must lie in \\[0, 16384\\]"), (2.5, "must be an int")])
def test_convert_checks_every_hidden_size_first(hs, match):
    model = tiny(far_model=False)
    with pytest.raises(ConfigError, match=match):
        far.convert(model, hidden_sizes=hs)
    assert not far.far_modules(model)  # nothing converted


def test_analyze_a_model_against_itself():
    teacher = tiny(far_model=False)  # replacing its mixers by its own recursed forever
    res = far.analyze(teacher, teacher, data(), map_images=0)
    assert res["agreement"] == 1.0


def test_backend_typos_are_refused_when_given_not_at_the_first_forward():
    from far_kernels import CrossbarConfig

    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        tiny(backend="nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        far.imc.emulate(tiny(), CrossbarConfig(), backend="nope")


def test_empty_blocks_and_depth_0_say_which():
    with pytest.raises(ConfigError, match="blocks is empty"):
        far.create_model("fmnist_deit_tiny", blocks=[])
    with pytest.raises(ConfigError, match="no blocks: depth 0"):
        far.create_model("fmnist_deit_tiny", depth=0)


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        far.train_classifier(tiny(far_model=False), data(), config=TrainConfig(out_dir=str(tmp_path / "f")))
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("where", ["/proc/far-run", "/proc/far-run/stage1"])
def test_an_out_dir_that_cannot_be_written_is_refused_before_training(where):
    # /proc refuses new files even to root; the run must say so before it trains (it wrote last.pt at its end)
    with pytest.raises(ConfigError, match=r"out_dir .*cannot be created in /proc"):
        far.train_classifier(tiny(far_model=False), data(), config=TrainConfig(out_dir=where))


def test_an_out_dir_below_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot be created \(.*f is not a folder\)"):
        far.train_classifier(tiny(far_model=False), data(), config=TrainConfig(out_dir=str(tmp_path / "f" / "run")))
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("method", ["distill", "prune", "reuse"])
def test_negative_epochs_are_refused_saying_that_0_is_allowed(method):
    # TrainConfig.validate ran first and said "epochs must be > 0", though 0 skips the stage (--epochs 0)
    run = {"distill": lambda c: far.distill(tiny(far_model=False), data(), config=c),
           "prune": lambda c: far.prune(tiny(), data(), config=c),
           "reuse": lambda c: far.reuse(tiny(far_model=False), data(), plan={1: 0}, config=c)}[method]
    with pytest.raises(ConfigError, match=r"epochs must be >= 0 \(0 "):
        run(TrainConfig(epochs=-1.0, batch_size=8, progress=False))
