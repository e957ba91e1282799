"""far.data: the IDX reader (real and crafted corrupt files), Fashion-MNIST, image folders, make_dataset."""
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from far.data import (FMNIST_MEAN, FMNIST_STD, FashionMNIST, RandomShiftFlip, fashion_mnist, first, image_folder,
                      iterate_batches, make_dataset, read_idx, shard)
from far.errors import ConfigError
from far.errors import DataError as DatasetError
from far.models import data_config

FMNIST_DIR = Path(os.environ.get("FAR_FASHION_MNIST") or "/usr/share/datasets/fashion-mnist")
FMNIST_CFG = {"input_size": (1, 28, 28), "num_classes": 10, "mean": FMNIST_MEAN, "std": FMNIST_STD,
              "architecture": "fmnist_test"}


@pytest.fixture(scope="module")
def fmnist_dir():
    if not (FMNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have Fashion-MNIST (apt-get install -y dataset-fashion-mnist), not in {FMNIST_DIR}")
        pytest.skip(f"Fashion-MNIST not installed in {FMNIST_DIR} (apt-get install -y dataset-fashion-mnist)")
    return FMNIST_DIR


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


# ---- IDX reader ----
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("code,dtype,shape", [
    (0x08, ">u1", (3, 4, 5)), (0x09, ">i1", (7,)), (0x0B, ">i2", (2, 3)),
    (0x0C, ">i4", (1, 1, 1, 2)), (0x0D, ">f4", (4, 0)), (0x0E, ">f8", (3, 2)),
], ids=["u8-3d", "i8-1d", "i16", "i32-4d", "f32-empty", "f64"])
def test_read_idx_roundtrip(tmp_path, gz, code, dtype, shape):
    rng = np.random.default_rng(code)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    data = idx_bytes(arr, code)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.shape == shape
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, arr)
    out.flat[:1] = 0 if out.size else None  # writable, not a view of the read buffer


def test_read_idx_real_fashion_mnist(fmnist_dir):
    labels = read_idx(fmnist_dir / "t10k-labels-idx1-ubyte.gz")
    images = read_idx(fmnist_dir / "t10k-images-idx3-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10  # the test split is balanced
    assert images.max() == 255 and images.min() == 0


GOOD = idx_bytes(np.arange(24, dtype=">i4").reshape(2, 3, 4), 0x0C)
CORRUPT = {
    "empty": (b"", "header alone is 4"),
    "bad-magic": (b"\x01\x02" + GOOD[2:], "magic"),
    "bad-dtype": (GOOD[:2] + b"\x0a" + GOOD[3:], "dtype code 0x0a"),
    "zero-dims": (b"\x00\x00\x08\x00", "0 dimensions"),
    "short-header": (GOOD[:10], "truncated IDX header"),
    "truncated-data": (GOOD[:-5], "truncated"),
    "trailing-bytes": (GOOD + b"\x00" * 3, "trailing bytes"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", list(CORRUPT))
def test_read_idx_corrupt(tmp_path, name, gz):
    data, msg = CORRUPT[name]
    path = tmp_path / ("bad.gz" if gz else "bad")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=msg) as e:
        read_idx(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name,data", [
    ("truncated-gzip", gzip.compress(GOOD)[:-12]),
    ("not-gzip", GOOD),
    ("gzip-garbage", gzip.compress(GOOD)[:12] + b"\xff" * 40),
])
def test_read_idx_corrupt_gzip(tmp_path, name, data):
    path = tmp_path / "bad.gz"
    path.write_bytes(data)
    with pytest.raises(DatasetError, match="corrupt or truncated gzip"):
        read_idx(path)


@pytest.mark.parametrize("dims", [(65536,) * 4, (65536, 65536), (2 ** 32 - 1,) * 3],
                         ids=["2^64-wraps-int64-to-0", "4GiB", "2^96"])
def test_read_idx_header_too_large(tmp_path, dims):
    """A header declaring more than MAX_IDX_BYTES is a DataError naming the file, never numpy's reshape error:
    4 dims of 2^16 once multiplied to 0 in int64 and passed the size check on an empty payload."""
    path = tmp_path / "huge.idx"
    path.write_bytes(bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims))
    with pytest.raises(DatasetError, match=r"more than 2048 MiB") as e:
        read_idx(path)
    assert str(path) in str(e.value) and str(list(dims)) in str(e.value)


def test_read_idx_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_idx(tmp_path / "nope.gz")


# ---- Fashion-MNIST ----
@pytest.fixture(scope="module")
def fmnist_test(fmnist_dir):
    return fashion_mnist("test", root=fmnist_dir)


def test_fashion_mnist_items(fmnist_test):
    ds = fmnist_test
    assert len(ds) == 10000 and ds.images.dtype == torch.uint8 and ds.targets.dtype == torch.int64
    x, y = ds[17]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < 10
    expect = (ds.images[17].double() / 255 - FMNIST_MEAN[0]) / FMNIST_STD[0]
    torch.testing.assert_close(x[0].double(), expect, rtol=0, atol=1e-6)
    assert int(ds.targets.min()) == 0 and int(ds.targets.max()) == 9
    assert ds.classes[y] and len(ds.classes) == 10


def test_fashion_mnist_normalization_statistics(fmnist_dir):
    x, y = fashion_mnist("train", root=fmnist_dir).tensors()
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    # FMNIST_MEAN / FMNIST_STD are the training set's statistics (rounded to 4 digits)
    assert abs(x.mean().item()) < 2e-3 and abs(x.std().item() - 1) < 2e-3


def test_fashion_mnist_batches(fmnist_test):
    ds = fmnist_test
    xs, ys = zip(*ds.batches(3000))
    assert [x.shape[0] for x in xs] == [3000, 3000, 3000, 1000] and ds.num_batches(3000) == 4
    X, Y = ds.tensors()
    assert torch.equal(torch.cat(xs), X) and torch.equal(torch.cat(ys), Y)
    assert torch.equal(torch.stack([ds[i][0] for i in range(5)]), X[:5])
    assert sum(x.shape[0] for x, _ in ds.batches(3000, drop_last=True)) == 9000
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = torch.cat([y for _, y in ds.batches(4096, shuffle=True, generator=g1)])
    b = torch.cat([y for _, y in ds.batches(4096, shuffle=True, generator=g2)])
    assert torch.equal(a, b) and not torch.equal(a, Y)
    assert torch.equal(a.sort().values, Y.sort().values)  # a permutation
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches(0))


def test_fashion_mnist_limit_and_transform(fmnist_dir):
    ds = fashion_mnist("test", root=fmnist_dir, limit=100, transform=lambda x: x * 0 + 1)
    assert len(ds) == 100
    assert torch.equal(ds[3][0], torch.ones(1, 28, 28))
    x, _ = next(ds.batches(64))
    assert torch.equal(x, torch.ones(64, 1, 28, 28))
    x, _ = next(ds.batches(64, transform=None))
    assert x.min() < 0
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("val", root=fmnist_dir)
    with pytest.raises(ValueError, match="limit"):
        fashion_mnist("test", root=fmnist_dir, limit=0)


def test_fashion_mnist_env_and_missing_message(tmp_path, monkeypatch, fmnist_dir):
    monkeypatch.setenv("FAR_FASHION_MNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist("test")
    msg = str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "FAR_FASHION_MNIST" in msg
    assert str(tmp_path) in msg and "t10k-images-idx3-ubyte.gz" in msg
    # the env var is honoured: a copy with a truncated label file is read and rejected
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes((fmnist_dir / name).read_bytes())
    assert len(fashion_mnist("test", limit=10)) == 10
    lbl = tmp_path / "t10k-labels-idx1-ubyte.gz"
    lbl.write_bytes(gzip.compress(gzip.decompress(lbl.read_bytes())[:-100]))
    with pytest.raises(DatasetError, match="truncated"):
        fashion_mnist("test")
    # an explicit root wins over the env var
    assert len(fashion_mnist("test", root=fmnist_dir, limit=5)) == 5


def test_fashion_mnist_label_count_mismatch(tmp_path):
    imgs = np.zeros((4, 28, 28), np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs, 0x08)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8), 0x08)))
    with pytest.raises(DatasetError, match="expected 4 labels"):
        fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(4, 10, np.uint8), 0x08)))
    with pytest.raises(DatasetError, match=r"labels must be in \[0, 10\)"):
        fashion_mnist("test", root=tmp_path)


def tiny_fmnist(root: Path, n: int = 10) -> FashionMNIST:
    """A synthetic Fashion-MNIST test split of n images (image i filled with i, label i % 10)."""
    root.mkdir(parents=True, exist_ok=True)
    imgs = np.repeat(np.arange(n, dtype=np.uint8), 28 * 28).reshape(n, 28, 28)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs, 0x08)))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.arange(n, dtype=np.uint8) % 10,
                                                                            0x08)))
    return fashion_mnist("test", root=root)


def test_shard_and_first(tmp_path):
    fm = tiny_fmnist(tmp_path)
    td = torch.utils.data.TensorDataset(torch.arange(10), torch.zeros(10, dtype=torch.long))
    for ds in (fm, td):
        parts = [shard(ds, r, 3) for r in range(3)]
        assert [len(p) for p in parts] == [4, 3, 3]
        assert shard(ds, 0, 1) is ds
    assert fm.shard(1, 3).images[:, 0, 0].tolist() == [1, 4, 7]
    assert len(first(fm, 4)) == 4 and first(fm, 10) is fm and first(None, 0) is None and first(fm, None) is fm
    assert fm.first(3).images[:, 0, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("rank,world", [(0, 0), (0, -2), (-1, 2), (2, 2), (5, 3), (1, 1)],
                         ids=["world0", "world-neg", "rank-neg", "rank=world", "rank>world", "rank1-of-1"])
def test_shard_refuses_bad_rank_or_world(tmp_path, rank, world):
    """A bad rank/world is a ConfigError naming both, on every path: FashionMNIST.shard, a generic dataset
    (range), and world 1 (which returns the dataset itself). Before, (2, 2) gave an empty share silently and
    world <= 0 numpy's / range's own ValueErrors."""
    fm = tiny_fmnist(tmp_path)
    td = torch.utils.data.TensorDataset(torch.zeros(10, 1), torch.zeros(10, dtype=torch.long))
    for call in (lambda: shard(fm, rank, world), lambda: fm.shard(rank, world), lambda: shard(td, rank, world)):
        with pytest.raises(ConfigError, match=f"rank {rank} of world {world}"):
            call()


@pytest.mark.parametrize("n", [0, -3])
def test_first_refuses_n_below_1(tmp_path, n):
    """FashionMNIST.first(-3) kept 7 of 10 images (a negative slice); the module-level first skipped its
    check on a dataset of no more than n images."""
    fm = tiny_fmnist(tmp_path)
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1))
    for call in (lambda: fm.first(n), lambda: first(fm, n), lambda: first(empty, n)):
        with pytest.raises(ConfigError, match=f"got {n}"):
            call()


def test_random_shift_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    y = RandomShiftFlip(pad=2, flip=0.5, generator=g)(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.equal(y, x)
    # every output pixel is an input pixel of the same image or that image's minimum (the fill)
    for i in range(16):
        vals = set(x[i].flatten().tolist()) | {x[i].min().item()}
        assert set(y[i].flatten().tolist()) <= vals
    assert torch.equal(RandomShiftFlip(pad=0, flip=1.0)(x), x.flip(-1))
    assert torch.equal(RandomShiftFlip(pad=0, flip=0.0)(x), x)
    assert RandomShiftFlip(generator=g)(x[0]).shape == (1, 28, 28)
    shifted = RandomShiftFlip(pad=3, flip=0.0, fill=-5.0, generator=g)(torch.zeros(64, 1, 8, 8))
    assert (shifted == -5.0).any() and set(shifted.unique().tolist()) <= {0.0, -5.0}


# ---- image folders ----
def make_folder(root: Path, classes=("cat", "dog"), per_class=3, size=(40, 30), mode="RGB") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


def test_image_folder_rgb_and_gray(tmp_path):
    root = make_folder(tmp_path / "imgs")
    ds = image_folder(root, (3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6
    gray = image_folder(root, (1, 28, 28), FMNIST_MEAN, FMNIST_STD, crop_pct=1.0)
    assert gray[0][0].shape == (1, 28, 28)
    train = image_folder(root, (1, 16, 16), FMNIST_MEAN, FMNIST_STD, train=True)
    assert train[0][0].shape == (1, 16, 16)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        image_folder(tmp_path / "nope", (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class subfolders"):
        image_folder(tmp_path / "empty", (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        image_folder(tmp_path / "file.png", (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="noimg"):
        image_folder(tmp_path / "noimg", (3, 32, 32), (0.5,) * 3, (0.5,) * 3)


# ---- make_dataset ----
def test_make_dataset_fashion_mnist(fmnist_dir, monkeypatch):
    monkeypatch.setenv("FAR_FASHION_MNIST", str(fmnist_dir))
    ds = make_dataset("fashion-mnist", "test", FMNIST_CFG, limit=50)
    assert isinstance(ds, FashionMNIST) and len(ds) == 50 and ds.split == "test"

    class Tiny(torch.nn.Module):  # a model: its pretrained_cfg and num_classes are used
        pretrained_cfg = dict(FMNIST_CFG)
        num_classes = 10

    assert len(make_dataset("fmnist", "train", data_config(Tiny()), limit=7)) == 7


def test_make_dataset_warns_that_a_folder_named_like_the_dataset_is_not_read(fmnist_dir, monkeypatch, tmp_path):
    """--data fmnist with a folder ./fmnist of one's own images evaluated Fashion-MNIST's instead, silently."""
    monkeypatch.setenv("FAR_FASHION_MNIST", str(fmnist_dir))
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "fmnist", classes=("a", "b", "c"), per_class=2, size=(28, 28), mode="L")
    with pytest.warns(UserWarning, match="folder 'fmnist' here is not read; give ./fmnist"):
        assert isinstance(make_dataset("fmnist", "test", FMNIST_CFG, limit=5), FashionMNIST)
    assert len(make_dataset("./fmnist", "test", {**FMNIST_CFG, "num_classes": 3})) == 6


@pytest.mark.parametrize("cfg,msg", [
    ({"input_size": (3, 224, 224), "num_classes": 1000, "architecture": "deit_tiny_patch16_224"},
     "deit_tiny_patch16_224 expects 224x224x3 images and 1000 classes, but Fashion-MNIST has 28x28x1"),
    ({**FMNIST_CFG, "num_classes": 5}, "5 classes"),
    ({**FMNIST_CFG, "input_size": (1, 32, 32)}, "32x32x1"),
    ({"num_classes": 10}, "lacks input_size"),
])
def test_make_dataset_fashion_mnist_mismatch(cfg, msg):
    with pytest.raises(DatasetError, match=msg):
        make_dataset("fashion-mnist", "test", cfg)


def test_data_config_takes_num_classes_from_the_model():
    class Head5(torch.nn.Module):  # e.g. created with --num-classes 5: pretrained_cfg still says 10
        pretrained_cfg = dict(FMNIST_CFG)
        num_classes = 5

    with pytest.raises(DatasetError, match="5 classes"):
        make_dataset("fashion-mnist", "test", data_config(Head5()))


def test_iterate_batches_takes_a_batch_size_beyond_the_index_range(tmp_path):
    """far eval --batch-size 10**20 ran on Fashion-MNIST but failed on an image folder (islice's sys.maxsize)."""
    data = torch.utils.data.TensorDataset(torch.arange(5.0)[:, None], torch.arange(5))
    (x, y), = iterate_batches(data, 10 ** 20)
    assert torch.equal(y, torch.arange(5)) and torch.equal(x[:, 0], torch.arange(5.0))


def test_make_dataset_folder_keeps_the_models_crop_mode(tmp_path):
    """A timm cfg with crop_mode "squash" (vit_*_clip_384 and 50 more) was center-cropped instead: a wide image
    lost its sides. The folder's transform is now timm's create_transform of resolve_data_config, crop_mode too."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    (tmp_path / "f" / "a").mkdir(parents=True)
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :16] = 255  # a white left quarter: squashing keeps it, a center crop cuts it off
    Image.fromarray(img).save(tmp_path / "f" / "a" / "x.png")
    for mode in ("squash", "border", "center"):
        cfg = {"input_size": (3, 32, 32), "num_classes": 1, "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0,
               "interpolation": "bilinear", "crop_mode": mode}
        x = make_dataset(tmp_path / "f", "test", cfg)[0][0]
        timm_tf = create_transform(**resolve_data_config(pretrained_cfg=cfg))
        assert torch.equal(x, timm_tf(Image.fromarray(img))), mode
        assert (x[:, :, 0] == 1).all() == (mode == "squash"), mode


def test_make_dataset_folder(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=2)
    cfg = {"input_size": (3, 24, 24), "num_classes": 3, "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9}
    ds = make_dataset(str(root), "test", cfg)
    assert len(ds) == 6 and ds[0][0].shape == (3, 24, 24)
    sub = make_dataset(root, "test", cfg, limit=4)
    assert len(sub) == 4
    xs, ys = zip(*iterate_batches(sub, 3))
    assert [x.shape for x in xs] == [(3, 3, 24, 24), (1, 3, 24, 24)] and torch.cat(ys).tolist() == [0, 0, 1, 1]
    with pytest.raises(DatasetError, match="3 class folders but .* has 10 classes"):
        make_dataset(root, "test", {**cfg, "num_classes": 10})
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        make_dataset(tmp_path / "missing", "test", cfg)
    with pytest.raises(ValueError, match="split"):
        make_dataset(root, "val", cfg)
