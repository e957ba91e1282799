"""The bundled zoo: every checkpoint loads offline (far.load and far.create_model(pretrained=True)),
carries a timm-style pretrained_cfg, and the pruned model is physically smaller."""

import pytest
import timm
import torch

import far
from far.models import ZOO, zoo_path


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_checkpoint_loads_offline(name):
    path = zoo_path(name)
    m = far.load(path)
    cfg = m.pretrained_cfg
    assert tuple(cfg["input_size"]) == (1, 28, 28) and cfg["num_classes"] == 10
    assert len(cfg["mean"]) == 1 and len(cfg["std"]) == 1
    assert (ZOO[name]["kind"] == "far") == any(True for _ in far.far_modules(m))
    meta = m.far_checkpoint["metadata"]["training"]
    assert meta["command"] in ("train-teacher", "distill", "finetune", "prune", "reuse") and meta["test_accuracy"] > 0.7  # trained, not random (10%)
    m2 = far.create_model(name, pretrained=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(m(x), m2(x))


def test_zoo_teacher_through_timm_and_far_conversion():
    t = timm.create_model("fmnist_deit_tiny", pretrained=True)
    ref = far.load(zoo_path("fmnist_deit_tiny"))
    for (k, a), (_, b) in zip(t.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    t5 = timm.create_model("fmnist_deit_tiny", pretrained=True, num_classes=5)  # new head, same backbone
    assert t5.head.weight.shape[0] == 5 and torch.equal(t5.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    converted = far.create_model("fmnist_deit_tiny", pretrained=True, far=True)
    assert len(list(far.far_modules(converted))) == 4
    assert not any(True for _ in far.far_modules(far.create_model("fmnist_deit_tiny", pretrained=True)))


def test_pruned_zoo_model_is_smaller_and_architectures_build_untrained():
    full = far.create_model("fmnist_far_tiny", pretrained=True)
    pruned = far.create_model("fmnist_far_tiny_pruned", pretrained=True)
    lstm = lambda m: sum(x.num_lstm_params() for _, x in far.far_modules(m))  # noqa: E731
    assert lstm(pruned) <= 0.7 * lstm(full)
    assert zoo_path("fmnist_far_tiny_pruned").stat().st_size < zoo_path("fmnist_far_tiny").stat().st_size
    arch = far.create_model("fmnist_far_tiny_pruned")  # architecture only (random init)
    assert [m.hidden_sizes.tolist() for _, m in far.far_modules(arch)] == \
        [m.hidden_sizes.tolist() for _, m in far.far_modules(pruned)]
    with pytest.raises(ValueError, match="takes no model arguments"):
        far.create_model("fmnist_far_tiny", pretrained=True, num_classes=3)
    with pytest.raises(ValueError, match="not in the model zoo"):
        zoo_path("nope")
    assert all(zoo_path(name).is_file() for name in ZOO)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_checkpoint_round_trips_byte_for_byte(name, tmp_path):
    """far.load then far.save (with the file's own metadata) writes the very same bytes: the checkpoint
    format and the compact layout are what the zoo files were written with."""
    m = far.load(zoo_path(name))
    out = tmp_path / f"{name}.safetensors"
    far.save(m, out, metadata=m.far_checkpoint["metadata"])
    assert out.read_bytes() == zoo_path(name).read_bytes()


def test_xs_zoo_model_is_smaller_and_cheaper_than_the_attention_it_replaces():
    """fmnist_far_tiny_xs was pruned to a budget: token mixers at most 0.78x the teacher attention's parameters
    (kept units), fewer crossbar arrays than the teacher's attention at ISAAC defaults (static + K/V)."""
    from far.imc.cost import model_cost
    from far.models import param_counts

    teacher, xs = far.load(zoo_path("fmnist_deit_tiny")), far.load(zoo_path("fmnist_far_tiny_xs"))
    assert param_counts(xs)["mixer_kept"] <= 0.78 * param_counts(teacher)["mixer_kept"]
    budget = xs.far_checkpoint["metadata"]["pruning"]["budget"]
    assert budget["met"] and budget["achieved"] == param_counts(xs)["mixer_kept"] <= budget["value"]

    def mixer_arrays(m):
        return sum(r.arrays + r.dynamic_arrays for r in model_cost(m).rows if r.kind in ("far", "attention"))

    assert mixer_arrays(xs) < mixer_arrays(teacher)


@pytest.mark.fmnist
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_survives_the_crossbar_emulator(name):
    """Every zoo model keeps most of its accuracy on emulated crossbars at the ISAAC-like defaults (100 test
    images; far imc-cost / imc-eval give the full figures). Chance is 10%: the TReX model once emulated at
    11.6% (transformation weights that cancel only in exact arithmetic) while every test passed."""
    from far.data import fashion_mnist
    from far.imc import emulate
    from far_kernels import CrossbarConfig

    x, y = fashion_mnist("test", limit=100).tensors()
    model = far.load(zoo_path(name))
    with torch.inference_mode():
        digital = (model(x).argmax(-1) == y).float().mean().item()
        emulated = (emulate(model, CrossbarConfig())(x).argmax(-1) == y).float().mean().item()
    assert digital > 0.8 and emulated > 0.6, (digital, emulated)


@pytest.mark.fmnist
def test_wide_zoo_model_reproduces_every_attention_block():
    """fmnist_far_tiny_wide (block 2 at 56 units, the rest at n = d) was distilled until every FAR block matches its
    attention block: its record says isolated cosine >= 0.95 for every block on the 10k test images, and a fresh
    measurement on 500 of them agrees with that record."""
    from far.data import fashion_mnist
    from far.fidelity import block_fidelity

    teacher, wide = far.load(zoo_path("fmnist_deit_tiny")), far.load(zoo_path("fmnist_far_tiny_wide"))
    assert [m.width for _, m in far.far_modules(wide)] == [32, 32, 56, 32]
    record = wide.far_checkpoint["metadata"]["fidelity"]
    assert record["num_images"] == 10000 and record["agreement"] >= 0.97
    assert all(b["isolated"]["cos"] >= 0.95 and b["in_model"]["cos"] >= 0.90 for b in record["blocks"])
    fresh = block_fidelity(teacher, wide, fashion_mnist("test", limit=500), batch_size=250)
    for got, rec in zip(fresh["blocks"], record["blocks"]):
        assert abs(got["isolated"]["cos"] - rec["isolated"]["cos"]) < 0.01, (got, rec)


@pytest.mark.fmnist
def test_noise_robust_zoo_model_loses_less_under_read_noise():
    """fmnist_far_tiny_nr was distilled with --weight-noise (training-time weight noise, far.train.loop.weight_noise):
    its record says so, and on the emulator with read noise σ/p_max = 0.002 (granular 8-bit ADC, seed 0) it keeps
    more of its top-1 than fmnist_far_tiny on the same 500 test images. The README's 2,000-image figures differ by
    about 4 points; the paired difference's standard error on 500 images is about 1.3 points."""
    from far.checkpoint import read_config
    from far.data import fashion_mnist
    from far.imc import emulate
    from far_kernels import CrossbarConfig

    config = read_config(zoo_path("fmnist_far_tiny_nr"))["metadata"]["training"]["config"]
    assert config["weight_noise"] > 0 and "w_ih" in config["weight_noise_on"]
    x, y = fashion_mnist("test", limit=500).tensors()
    cfg = CrossbarConfig(adc_range="granular", read_noise=0.002, seed=0)
    acc = {}
    for name in ("fmnist_far_tiny", "fmnist_far_tiny_nr"):
        with torch.inference_mode():
            acc[name] = (emulate(far.load(zoo_path(name)), cfg)(x).argmax(-1) == y).float().mean().item()
    assert acc["fmnist_far_tiny_nr"] > acc["fmnist_far_tiny"], acc


@pytest.mark.parametrize("img_size,want", [(32, (1, 32, 32)), ((28, 32), (1, 28, 32)), ([24, 28], (1, 24, 28))])
def test_registered_architecture_cfg_input_size_is_c_h_w(img_size, want):
    """timm's data config (resolve_model_data_config) reads pretrained_cfg['input_size'] as ints [C, H, W]:
    a non-square img_size must not give (1, (28, 32), (28, 32))."""
    from timm.data import resolve_model_data_config

    m = timm.create_model("fmnist_deit_tiny", img_size=img_size)
    assert m.pretrained_cfg["input_size"] == want
    assert resolve_model_data_config(m)["input_size"] == want


@pytest.fixture
def zoo_copy(tmp_path, monkeypatch):
    """An installed zoo folder of our own (a copy of two entries), used by every zoo lookup."""
    import shutil

    import far.models.pretrained as pretrained

    for name in ("fmnist_far_tiny", "fmnist_far_tiny_pruned"):
        shutil.copy(zoo_path(name), tmp_path / ZOO[name]["file"])
    monkeypatch.setattr(pretrained, "ZOO_DIR", tmp_path)
    return tmp_path


def _without_digest(path):
    """The checkpoint at `path` rewritten with its config's sha256 removed (a file far.load accepts unverified)."""
    import json
    import struct

    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    config = json.loads(header["__metadata__"]["far_config"])
    del config["sha256"]
    header["__metadata__"]["far_config"] = json.dumps(config, separators=(",", ":"))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


@pytest.mark.parametrize("edit,needle", [
    pytest.param(lambda d: (d / "fmnist_far_tiny.safetensors").write_bytes(
        (d / "fmnist_far_tiny_pruned.safetensors").read_bytes()), "its sha256 d1c42aa9", id="replaced"),
    pytest.param(lambda d: _without_digest(d / "fmnist_far_tiny.safetensors"), "it has no sha256", id="no-digest"),
])
def test_an_edited_or_replaced_zoo_file_is_refused_by_name(zoo_copy, edit, needle, capsys):
    """A zoo file that is a valid checkpoint, but not the one this release ships (replaced by another model,
    re-saved, its digest stripped so nothing is verified), is refused wherever the zoo name is used: the
    release pins each file's sha256 (ZOO[name]['sha256']). Loaded by its path, it is an ordinary checkpoint."""
    from far.cli import main

    path = zoo_copy / "fmnist_far_tiny.safetensors"
    assert far.load(path) is not None  # a valid checkpoint
    assert far.create_model("fmnist_far_tiny", pretrained=True) is not None
    edit(zoo_copy)
    far.load(path)  # still valid as a file
    want = f"{path}: not the zoo checkpoint 'fmnist_far_tiny' this release of far ships ({needle}"
    for use in (lambda: zoo_path("fmnist_far_tiny"), lambda: far.create_model("fmnist_far_tiny", pretrained=True),
                lambda: far.models.load_model("fmnist_far_tiny")):
        with pytest.raises(far.CheckpointError) as e:
            use()
        assert str(e.value).startswith(want) and "reinstall" in str(e.value), e.value
    assert main(["info", "fmnist_far_tiny"]) == 2
    assert capsys.readouterr().err.startswith(f"far: error: {want}")
    assert zoo_path("fmnist_far_tiny_pruned") == zoo_copy / "fmnist_far_tiny_pruned.safetensors"  # untouched


def test_zoo_pins_are_the_files_digests():
    """Every zoo entry pins the sha256 its file carries (re-pin here when the zoo is retrained)."""
    from far.checkpoint import DIGEST_KEY, read_config

    for name, entry in ZOO.items():
        assert read_config(zoo_path(name))[DIGEST_KEY] == entry["sha256"], name
