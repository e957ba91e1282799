"""Bring your own ViT: any timm ViT saved and loaded (architecture read from the model), weights files for a
timm architecture (safetensors / torch, never the network), data at the teacher's resolution, partial
replacement and teachers without a classifier, from the Python API and `far distill`."""
import contextlib
import functools
import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import far
from far.cli.main import main
from far.errors import CheckpointError, ConfigError
from far.models import arch as archs
from far.models.weights import load_weights, read_state_dict

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
DINO = "vit_small_patch14_dinov2"  # timm's DINOv2 ViT-S/14 entry point (LayerScale init_values=1e-5), built tiny
DINO_KW = dict(img_size=28, patch_size=7, embed_dim=48, depth=2, num_heads=3, num_classes=0)


def _randomize(model):
    """Every parameter and buffer random (LayerScale gammas included), so a round trip that rebuilt a
    default initialisation anywhere would show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in list(model.parameters()):
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


FAMILIES = {
    "deit-like": lambda: VisionTransformer(**SMALL, num_classes=5),
    "avg-pool-no-cls": lambda: VisionTransformer(**SMALL, num_classes=5, global_pool="avg", class_token=False),
    "dinov2-like": lambda: VisionTransformer(**SMALL, num_classes=0, init_values=1e-5, reg_tokens=4,
                                             no_embed_class=True),
    "timm-name": lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=2),
    "timm-dinov2-reg": lambda: timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28,
                                                 embed_dim=48, depth=2, num_heads=3, num_classes=0),
}


def _round_trip(model, path, x):
    far.save(model, path)
    loaded = far.load(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    return loaded, far.read_config(path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("convert", ["far", "attention", "partial"])
def test_any_timm_vit_saves_and_loads_exactly(tmp_path, family, convert):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    assert not hasattr(model, "far_arch")  # not built by far.create_model: save reads the architecture
    if convert == "far":
        far.convert(model)
    elif convert == "partial":
        far.convert(model, blocks=[1])
    _randomize(model)
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    loaded, cfg = _round_trip(model, tmp_path / "m.safetensors", x)
    kinds = [type(b.attn).__name__ for b in loaded.blocks]
    assert kinds == {"far": ["FARAttention"] * 2, "attention": ["Attention"] * 2,
                     "partial": ["Attention", "FARAttention"]}[convert]
    arch, kw = cfg["architecture"], cfg["architecture"]["kwargs"]
    assert arch["timm_name"] == (model.pretrained_cfg["architecture"] if family.startswith("timm") else archs.VIT_CLASS)
    assert kw["depth"] == 2 and kw["num_classes"] == model.num_classes
    assert cfg["pretrained_cfg"]["input_size"] == [3, *size]
    assert cfg["pretrained_cfg"]["num_classes"] == model.num_classes
    if "dinov2" in family:
        assert kw["init_values"] == 1e-5 or family == "dinov2-like"  # LayerScale recorded; gammas from the file
        assert kw["reg_tokens"] == 4 and kw["no_embed_class"] is True and kw["num_classes"] == 0
    # a loaded model saves again to the same config and tensors
    far.save(loaded, tmp_path / "again.safetensors")
    assert far.read_config(tmp_path / "again.safetensors")["sha256"] == cfg["sha256"]


def test_pretrained_cfg_follows_the_img_size_the_model_was_built_at(tmp_path):
    model = timm.create_model(DINO, pretrained=False, **DINO_KW)
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 518, 518)  # timm keeps the default cfg
    assert far.models.data_config(model)["input_size"] == (3, 28, 28)
    far.save(model, tmp_path / "m.safetensors")
    cfg = far.read_config(tmp_path / "m.safetensors")
    assert cfg["pretrained_cfg"]["input_size"] == [3, 28, 28] and cfg["pretrained_cfg"]["num_classes"] == 0
    assert far.load(tmp_path / "m.safetensors").pretrained_cfg["input_size"] == (3, 28, 28)


def test_mean_and_std_follow_the_in_chans_the_model_was_built_with(tmp_path):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from far.data import make_dataset

    model = timm.create_model(DINO, pretrained=False, **DINO_KW, in_chans=1)
    assert tuple(model.pretrained_cfg["mean"]) == IMAGENET_DEFAULT_MEAN  # timm keeps the default cfg's RGB values
    gray = (pytest.approx([sum(IMAGENET_DEFAULT_MEAN) / 3]), pytest.approx([sum(IMAGENET_DEFAULT_STD) / 3]))
    dcfg = far.models.data_config(model)
    assert (list(dcfg["mean"]), list(dcfg["std"])) == gray  # adapt_input_conv sums RGB filters: gray = mean
    far.save(model, tmp_path / "gray.safetensors")  # was: pretrained_cfg.mean has 3 values for 1 input channel(s)
    pcfg = far.read_config(tmp_path / "gray.safetensors")["pretrained_cfg"]
    assert (pcfg["mean"], pcfg["std"], pcfg["input_size"]) == (*gray, [1, 28, 28])
    far.save(far.load(tmp_path / "gray.safetensors"), tmp_path / "again.safetensors")
    assert far.read_config(tmp_path / "again.safetensors")["pretrained_cfg"] == pcfg
    ds = make_dataset(_images(tmp_path / "imgs"), "train", dcfg, labels=False)  # was: 3 values for 1 channel
    assert ds[0][0].shape == (1, 28, 28)
    # more channels repeat the values in turn (timm repeats the filters); one value is repeated (resolve_data_config)
    assert far.models.data_config(timm.create_model(DINO, **DINO_KW, in_chans=4))["mean"] == \
        (*IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_MEAN[0])
    fm3 = far.create_model("fmnist_deit_tiny", far=False, in_chans=3, depth=1)
    assert far.models.data_config(fm3)["mean"] == (far.data.FMNIST_MEAN[0],) * 3
    rc, _, err = _cli(["convert", f"timm:{DINO}", "--model-kwargs",
                       "img_size=28,patch_size=7,embed_dim=48,depth=1,num_heads=3,num_classes=0,in_chans=1",
                       "-o", tmp_path / "cli.safetensors", "-q"])
    assert rc == 0, err
    assert far.read_config(tmp_path / "cli.safetensors")["pretrained_cfg"]["mean"] == gray[0]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(depth=100000), r"cannot build vit_small_patch14_dinov2: depth must be an int in \[0, 64\], got 100000"),
    (dict(embed_dim=-1), r"embed_dim must be an int in \[1, 16384\], got -1"),
    (dict(img_size=(28, 0)), r"img_size must be an int in \[1, 16384\], got \(28, 0\)"),
    (dict(mlp_ratio=float("nan")), r"mlp_ratio must be a number in \[0, 64\], got nan"),
    (dict(num_heads=5), r"cannot build vit_small_patch14_dinov2 with \{.*'num_heads': 5.*\}: "
                        r"dim should be divisible by num_heads"),  # timm's AssertionError
    (dict(no_such_kwarg=1), r"cannot build .*unexpected keyword argument 'no_such_kwarg'"),  # TypeError
], ids=["depth", "embed_dim", "img_size", "mlp_ratio", "num_heads", "unknown"])
def test_create_model_refuses_kwargs_timm_cannot_build(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        far.create_model(DINO, far=False, **{**DINO_KW, **kwargs})


class Doubled(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.inner = mlp

    def forward(self, x):
        return 2 * self.inner(x)


def test_what_cannot_be_rebuilt_is_a_clear_error(tmp_path):
    class MyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = VisionTransformer(**SMALL)

    with pytest.raises(ConfigError, match=r"cannot record the architecture of .*MyNet.*far_arch"):
        far.save(MyNet(), tmp_path / "a.safetensors")
    model = VisionTransformer(**SMALL)
    model.blocks[1].mlp = Doubled(model.blocks[1].mlp)  # a layer no constructor argument describes
    with pytest.raises(ConfigError, match=r"cannot be rebuilt.*blocks\.1\.mlp"):
        far.save(model, tmp_path / "b.safetensors")
    model = VisionTransformer(**SMALL, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5))  # another eps
    with pytest.raises(ConfigError, match=r"cannot be rebuilt.*eps"):
        far.save(model, tmp_path / "c.safetensors")
    assert not any(tmp_path.iterdir())  # nothing half-written


# ---- weights files ----
@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """A tiny DINOv2-architecture backbone and its weights as .safetensors and as wrapped torch files."""
    d = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    model = _randomize(timm.create_model(DINO, pretrained=False, **DINO_KW))
    state = model.state_dict()
    save_file(state, d / "w.safetensors")
    torch.save(state, d / "plain.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, d / "wrapped.pth")
    return model, d


@pytest.mark.parametrize("name", ["w.safetensors", "plain.pth", "wrapped.pth"])
def test_timm_architecture_with_a_weights_file(dino, name, monkeypatch):
    import timm.models._builder as builder

    def no_network(*a, **k):
        raise AssertionError("the network was asked for")

    monkeypatch.setattr(builder, "load_pretrained", no_network)
    monkeypatch.setattr(builder, "load_custom_pretrained", no_network)
    teacher, d = dino
    model = far.create_model(f"timm:{DINO}", weights=d / name, **DINO_KW)
    assert not far.models.is_far(model)  # weights alone: the attention model, as in the file
    for k, v in teacher.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    student = far.create_model(f"timm:{DINO}", weights=d / name, far=True, blocks=[0], **DINO_KW)
    assert [type(b.attn).__name__ for b in student.blocks] == ["FARAttention", "Attention"]
    A = student.blocks[0].attn.attn_dim
    assert torch.equal(student.blocks[0].attn.pre_proj.weight, teacher.blocks[0].attn.qkv.weight[2 * A:])


def test_weights_file_position_embeddings_resized_by_timm(dino):
    teacher, d = dino
    model = far.create_model(f"timm:{DINO}", weights=d / "w.safetensors", **{**DINO_KW, "img_size": 42})
    assert model.pos_embed.shape == (1, 1 + 36, 48)  # 4x4 patches (+ class token) resampled to 6x6
    assert torch.equal(model.patch_embed.proj.weight, teacher.patch_embed.proj.weight)
    assert torch.equal(model.pos_embed[:, :1], teacher.pos_embed[:, :1])  # the class token's is kept


def test_classifier_dropped_for_a_backbone_and_wrong_files_are_clear_errors(dino, tmp_path):
    teacher, d = dino
    with_head = timm.create_model(DINO, pretrained=False, **{**DINO_KW, "num_classes": 4})
    save_file(with_head.state_dict(), tmp_path / "head.safetensors")
    backbone = far.create_model(f"timm:{DINO}", weights=tmp_path / "head.safetensors", **DINO_KW)
    assert torch.equal(backbone.blocks[1].mlp.fc2.weight, with_head.blocks[1].mlp.fc2.weight)
    with pytest.raises(ConfigError, match=r"do not fit.*head\.weight.*another classifier size"):
        far.create_model(f"timm:{DINO}", weights=tmp_path / "head.safetensors", **{**DINO_KW, "num_classes": 3})
    with pytest.raises(ConfigError, match=r"do not fit.*mis-shaped.*embed_dim"):
        far.create_model(f"timm:{DINO}", weights=d / "w.safetensors", **{**DINO_KW, "embed_dim": 24})
    (tmp_path / "junk.bin").write_bytes(b"\x10" * 40)
    with pytest.raises(ConfigError, match=r"junk\.bin is not a safetensors file; nor a torch checkpoint"):
        read_state_dict(tmp_path / "junk.bin")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="no such weights file"):
        read_state_dict(tmp_path / "missing.pth")
    far.save(teacher, tmp_path / "far.safetensors")
    with pytest.raises(ConfigError, match="a FAR checkpoint; give it as MODEL"):
        read_state_dict(tmp_path / "far.safetensors")
    with pytest.raises(ConfigError, match="not both"):
        far.create_model(DINO, pretrained=True, weights=d / "w.safetensors")
    # a torch file given where a FAR checkpoint belongs says what it is and what to do
    with pytest.raises(CheckpointError, match=r"plain\.pth is not a safetensors file; it is a torch checkpoint.*"
                                              r"--teacher-weights"):
        far.load(d / "plain.pth")
    with pytest.raises(ConfigError, match="no timm model"):
        far.models.resolve("timm:not_a_model")


def test_a_safetensors_header_length_that_starts_like_a_pickle(tmp_path):
    """A header of 128 + 256 k bytes starts with 0x80, as a pickle does; the JSON after it says safetensors."""
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    for pad in range(512, 1024, 8):  # header lengths 0x280 .. 0x2ff: bytes 0x80, 0x02
        save_file(state, tmp_path / "w.safetensors", metadata={"pad": "x" * pad})
        if (tmp_path / "w.safetensors").read_bytes()[:2] == b"\x80\x02":
            break
    raw = (tmp_path / "w.safetensors").read_bytes()
    assert raw[0] == 0x80 and 2 <= raw[1] <= 5  # the case: the first two bytes read as a pickle's
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["w"], state["w"])


def test_a_pickle_with_code_is_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "cfg": Doubled(torch.nn.Identity())}, tmp_path / "code.pth")
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_weights(VisionTransformer(**SMALL), tmp_path / "code.pth")


# ---- data at the teacher's resolution, and distillation ----
def _images(root, classes=2, per_class=4, size=40):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_image_folder_at_the_teachers_resolution(dino, tmp_path):
    from far.data import make_dataset

    teacher, _ = dino
    folder = _images(tmp_path / "imgs")  # 40x40 files
    ds = make_dataset(folder, "train", far.models.data_config(teacher), labels=False)
    assert ds[0][0].shape == (3, 28, 28)  # the model's img_size, not its default cfg's 518
    with pytest.raises(far.DataError, match="no classifier.*--no-labels"):
        make_dataset(folder, "train", far.models.data_config(teacher))
    wrong = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"32x32x3 images but vit_small_patch14_dinov2 takes 28x28x3"):
        far.distill(teacher, wrong, config=far.TrainConfig(epochs=0.5, batch_size=4, progress=False))


def _cli(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


FAST = ["--epochs", "0.5", "--stage2-epochs", "0.5", "--batch-size", "4", "--warmup-epochs", "0", "-q"]


@pytest.mark.parametrize("name", ["w.safetensors", "wrapped.pth"])
def test_far_distill_a_backbone_from_a_weights_file(dino, tmp_path, name):
    teacher, d = dino
    folder = _images(tmp_path / "imgs")
    out = tmp_path / "student.safetensors"
    rc, _, err = _cli(["distill", "--teacher", f"timm:{DINO}", "--teacher-weights", d / name, "--model-kwargs",
                       "img_size=28,patch_size=7,embed_dim=48,depth=2,num_heads=3,num_classes=0",
                       "--data", folder, "--out-dir", tmp_path / "run", "-o", out, *FAST])
    assert rc == 0, err
    student = far.load(out)
    assert [type(b.attn).__name__ for b in student.blocks] == ["FARAttention"] * 2 and student.num_classes == 0
    meta = far.read_config(out)["metadata"]
    assert meta["distill"]["labels"] is False and meta["teacher_weights"].endswith(name)
    import json

    rows = [json.loads(line) for line in open(tmp_path / "run" / "stage2" / "metrics.jsonl")]
    step = next(r for r in rows if r["kind"] == "step")
    assert "ce" not in step and step["kd"] > 0  # no labels; KD on the pooled features (relative squared error)
    assert step["loss"] == pytest.approx(step["cos"] + step["mse"] + step["kd"], rel=1e-5)
    # trained: stage 2 moved the MLPs too (the whole model trains when every block is replaced)
    assert not torch.equal(student.blocks[0].mlp.fc1.weight, teacher.blocks[0].mlp.fc1.weight)


def test_far_distill_partial_replacement_trains_only_the_replaced_blocks(tmp_path):
    torch.manual_seed(0)
    teacher = _randomize(timm.create_model(DINO, pretrained=False, **{**DINO_KW, "num_classes": 2}))
    save_file(teacher.state_dict(), tmp_path / "t.safetensors")
    folder = _images(tmp_path / "imgs")
    out = tmp_path / "partial.safetensors"
    rc, _, err = _cli(["distill", f"timm:{DINO}", "--teacher-weights", tmp_path / "t.safetensors", "--model-kwargs",
                       '{"img_size": 28, "patch_size": 7, "embed_dim": 48, "depth": 2, "num_heads": 3, '
                       '"num_classes": 2}', "--replace", "1", "--pre-proj-init", "random", "--data", folder,
                       "--out-dir", tmp_path / "run", "-o", out, *FAST])
    assert rc == 0, err
    student = far.load(out)
    assert [type(b.attn).__name__ for b in student.blocks] == ["Attention", "FARAttention"]
    meta = far.read_config(out)["metadata"]["distill"]
    assert meta["blocks"] == [1] and meta["pre_proj_init"] == "random" and meta["labels"] is True
    s, t = student.state_dict(), teacher.state_dict()
    frozen = [k for k in t if not k.startswith("blocks.1.")]
    assert all(torch.equal(s[k], t[k]) for k in frozen)  # block 0, embeddings, norm, head: the teacher's
    assert not torch.equal(s["blocks.1.mlp.fc1.weight"], t["blocks.1.mlp.fc1.weight"])  # stage 2 trained block 1
    A = student.blocks[1].attn.attn_dim
    assert not torch.allclose(student.blocks[1].attn.pre_proj.weight, t["blocks.1.attn.qkv.weight"][2 * A:])


@pytest.mark.parametrize("argv,needle", [
    (["distill", "fmnist_deit_tiny", "--teacher", "fmnist_deit_tiny"], "give the teacher once"),
    (["distill"], "no teacher"),
    (["distill", "fmnist_deit_tiny", "--teacher-weights", "x.pth"], "go with a timm architecture"),
    (["distill", f"timm:{DINO}", "--model-kwargs", "img_size"], "K=V pairs"),
    (["distill", f"timm:{DINO}", "--model-kwargs", "{bad"], "not valid JSON"),
    (["distill", "fmnist_deit_tiny", "--replace", "3-1"], "runs backwards"),
    (["distill", "fmnist_deit_tiny", "--replace", "a"], "block list"),
    (["distill", "fmnist_deit_tiny", "--replace", "9", "--epochs", "0.01"], "block 9 does not exist"),
    (["convert", f"timm:{DINO}", "--weights", "missing.pth", "-o", "x.safetensors"], "no such weights file"),
    (["convert", f"timm:{DINO}", "--model-kwargs", "no_such_kwarg=1", "-o", "x.safetensors"], "cannot build"),
    (["convert", f"timm:{DINO}", "--model-kwargs", "img_size=28,pretrained=true", "-o", "x.safetensors"],
     "--model-kwargs: pretrained is set by far (timm's loader arguments)"),
    (["distill", f"timm:{DINO}", "--model-kwargs", '{"checkpoint_path": "w.pth", "cache_dir": "."}'],
     "--model-kwargs: cache_dir, checkpoint_path are set by far"),
    (["convert", f"timm:{DINO}", "--model-kwargs", "img_size=28,patch_size=7,embed_dim=-1", "-o", "x.safetensors"],
     "embed_dim must be an int in [1, 16384], got -1"),
    (["convert", f"timm:{DINO}", "--model-kwargs", "img_size=28,patch_size=7,embed_dim=48,num_heads=5", "-o",
      "x.safetensors"], "dim should be divisible by num_heads"),
    (["distill", f"timm:{DINO}", "--model-kwargs", "img_size=28,patch_size=7,depth=100000"],
     "depth must be an int in [0, 64], got 100000"),
])
def test_cli_errors(tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(argv + ["--data", "fashion-mnist"] * (argv[0] == "distill"))
    assert rc == 2 and err.startswith("far: error: ") and err.count("\n") == 1 and needle in err, err


def test_far_convert_weights_file_partial_and_pre_proj_init(dino, tmp_path):
    teacher, d = dino
    out = tmp_path / "c.safetensors"
    rc, text, err = _cli(["convert", f"timm:{DINO}", "--weights", d / "wrapped.pth", "--model-kwargs",
                          "img_size=28,patch_size=7,embed_dim=48,depth=2,num_heads=3,num_classes=0",
                          "--replace", "0", "--pre-proj-init", "random", "-o", out])
    assert rc == 0, err
    assert "1 attention block(s) -> FAR" in text and "pre_proj init random" in text
    model = far.load(out)
    assert [type(b.attn).__name__ for b in model.blocks] == ["FARAttention", "Attention"]
    assert torch.equal(model.blocks[1].attn.qkv.weight, teacher.blocks[1].attn.qkv.weight)
    assert far.read_config(out)["metadata"]["replaced_blocks"] == [0]


def test_partial_student_fidelity_report():
    torch.manual_seed(0)
    teacher = timm.create_model(DINO, pretrained=False, **{**DINO_KW, "depth": 3, "num_classes": 3})
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 28, 28), torch.randint(0, 3, (16,)))
    student = far.distill(teacher, data, eval_data=data, blocks="1",
                          config=far.TrainConfig(epochs=0.5, batch_size=8, progress=False), stage2_epochs=0.5)
    blocks = student.far_metadata["fidelity"]["blocks"]
    assert [b["isolated"] is None for b in blocks] == [True, False, True]  # only block 1 is FAR
    # block 0 is the teacher's own attention on the teacher's own input (nothing replaced before it): identical
    assert blocks[0]["in_model"]["cos"] == pytest.approx(1.0, abs=1e-6)
    row = dict(student.far_run.rows)["block cosine isolated / in model"]
    assert row.startswith("-/1.000 ") and row.count("-/") == 2
