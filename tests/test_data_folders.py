"""far.data's image folders on awkward files and layouts: 16-bit images, symlinked and looping folders, hidden
files and folders, and DeiT's per-image view (deit_view) of folders built with eval or train transforms."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from far.data import UnlabeledImages, deit_view, image_folder, load_image, make_dataset
from far.errors import DataError

RAMP16 = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)  # full-range 16-bit ramp


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# ---- 16-bit images ----
@pytest.mark.parametrize("ext", ["png", "tif", "pgm"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_16_bit_gray_keeps_its_top_8_bits(tmp_path, ext, mode):
    """PIL opens these as I;16 (PNG, TIFF) or I (PGM) and its convert clips them: 99.6% of the ramp became 255."""
    path = save(tmp_path / f"ramp.{ext}", RAMP16)
    assert Image.open(path).mode in ("I;16", "I")
    out = np.asarray(load_image(path, mode))
    want = (RAMP16 >> 8).astype(np.uint8)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, want if mode == "L" else np.stack([want] * 3, -1))


def test_8_bit_images_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(save(tmp_path / "g.png", gray), "L")), gray)
    np.testing.assert_array_equal(np.asarray(load_image(save(tmp_path / "c.png", rgb), "RGB")), rgb)


@pytest.mark.parametrize("arr,msg", [
    (np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "float image"),
    (np.arange(64, dtype=np.int32).reshape(8, 8) * 2048, r"values 0\.\.129024"),
    (np.arange(64, dtype=np.int32).reshape(8, 8) - 5, r"values -5\.\.58"),
], ids=["float", "int32-past-16-bit", "int32-negative"])
def test_images_without_a_defined_range_are_refused(tmp_path, arr, msg):
    path = save(tmp_path / "x.tif", arr)
    with pytest.raises(DataError, match=msg) as e:
        load_image(path, "L")
    assert str(path) in str(e.value) and "cannot read image" not in str(e.value)


def test_16_bit_through_an_image_folder(tmp_path):
    save(tmp_path / "f" / "a" / "ramp.png", RAMP16)
    ds = image_folder(tmp_path / "f", (1, 64, 64), (0.0,), (1.0,), crop_pct=1.0)
    x, _ = ds[0]
    torch.testing.assert_close(x[0], torch.from_numpy((RAMP16 >> 8).astype(np.float32) / 255), rtol=0, atol=1e-6)


# ---- walking folders: symlinks, loops, hidden names ----
def img(path: Path, value: int = 0, size=(20, 20)) -> Path:
    return save(path, np.full((size[1], size[0], 3), value, np.uint8))


def rel(root: Path, paths) -> list:
    return [os.path.relpath(str(p), root) for p in paths]


def test_symlinked_class_folders_are_followed_by_both(tmp_path):
    """Class folders that are links into a store: ImageFolder followed them, UnlabeledImages (Path.rglob,
    which does not follow symlinked folders in Python 3.11) listed only the loose root image."""
    store, root = tmp_path / "store", tmp_path / "ds"
    for c in ("cat", "dog"):
        for i in range(3):
            img(store / c / f"{i}.png")
    root.mkdir()
    (root / "cat").symlink_to(store / "cat")
    (root / "dog").symlink_to(store / "dog", target_is_directory=True)
    img(root / "extra.png")
    ds = image_folder(root, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    assert rel(root, (p for p, _ in ds.samples)) == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    u = UnlabeledImages(root, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    assert rel(root, u.files) == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)] + ["extra.png"]


def test_symlink_loops_end_and_each_image_is_listed_once(tmp_path):
    """cat/up -> .. made ImageFolder list the root's classes again under cat (82 samples for 2 files, 81 of
    them labelled cat); dog/self -> . repeated dog's image 40 times. Now each is skipped with a warning."""
    root = tmp_path / "f"
    img(root / "cat" / "0.png")
    img(root / "dog" / "0.png")
    os.symlink("..", root / "cat" / "up")
    os.symlink(".", root / "dog" / "self")
    with pytest.warns(UserWarning, match=r"skipped 2 symlinked folder\(s\).*cat/up -> .*dog/self -> "):
        ds = image_folder(root, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    assert [(os.path.relpath(p, root), y) for p, y in ds.samples] == [("cat/0.png", 0), ("dog/0.png", 1)]
    with pytest.warns(UserWarning, match="symlink loop"):
        u = UnlabeledImages(root, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    assert rel(root, u.files) == ["cat/0.png", "dog/0.png"]


def test_two_loops_do_not_explode(tmp_path):
    """Two links back to the root: os.walk(followlinks=True) without a visited set walks 2^40 paths."""
    root = tmp_path / "f"
    img(root / "cat" / "0.png")
    img(root / "dog" / "0.png")
    for name in ("a", "b"):
        os.symlink("..", root / "cat" / name)
    with pytest.warns(UserWarning, match="skipped 2"):
        assert len(image_folder(root, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)) == 2
    with pytest.warns(UserWarning, match="skipped 2"):
        assert len(UnlabeledImages(root, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)) == 2


def test_a_link_into_another_class_keeps_that_class_label(tmp_path):
    root = tmp_path / "f"
    img(root / "cat" / "0.png")
    img(root / "dog" / "0.png")
    os.symlink("../dog", root / "cat" / "dogs")
    with pytest.warns(UserWarning, match="cat/dogs"):
        ds = image_folder(root, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    assert [(os.path.relpath(p, root), y) for p, y in ds.samples] == [("cat/0.png", 0), ("dog/0.png", 1)]


def test_hidden_files_and_folders_are_skipped_by_both(tmp_path):
    """macOS AppleDouble "._0.png" files were listed and failed to load mid-run; a ".thumbnails" folder
    became class 0 and shifted every label (cat 1, dog 2), and UnlabeledImages took its images."""
    root = tmp_path / "f"
    for c in ("cat", "dog"):
        img(root / c / "0.png")
        (root / c / "._0.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 80)
        img(root / c / ".ipynb_checkpoints" / "1.png", 255)
    img(root / ".thumbnails" / "0.png", 255)
    img(root / "cat" / "sub" / "2.png")
    img(root / "cat" / "sub" / ".hidden.png", 255)
    ds = image_folder(root, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    want = [("cat/0.png", 0), ("cat/sub/2.png", 0), ("dog/0.png", 1)]
    assert [(os.path.relpath(p, root), y) for p, y in ds.samples] == want
    assert all(x.max() < 0 for x, _ in ds)  # every item loads; no white (hidden) image among them
    u = UnlabeledImages(root, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    assert rel(root, u.files) == [p for p, _ in want]
    cfg = {"input_size": (3, 16, 16), "num_classes": 2, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert len(make_dataset(root, "test", cfg)) == 3  # 2 classes, not 3


def test_class_folders_without_visible_images_are_refused(tmp_path):
    root = tmp_path / "f"
    img(root / "cat" / "0.png")
    (root / "dog").mkdir()
    (root / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(DataError, match=r"no images .* in class folder\(s\) dog") as e:
        image_folder(root, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    assert str(root) in str(e.value)
    only_hidden = tmp_path / "g"
    img(only_hidden / ".cache" / "0.png")
    with pytest.raises(DataError, match="no class subfolders"):
        image_folder(only_hidden, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(DataError, match="no images"):
        UnlabeledImages(only_hidden, (3, 16, 16), (0.5,) * 3, (0.5,) * 3)


def test_order_is_unchanged_on_plain_folders(tmp_path):
    """Without hidden names or links, image_folder lists what torchvision's ImageFolder lists, in its order
    (labels and `limit`'s first images stay what they were), and UnlabeledImages its sorted paths."""
    from torchvision.datasets import ImageFolder

    root = tmp_path / "f"
    for c in ("b", "a", "a-x"):
        for p in ("z.png", "b.png", "b/1.png", "b-x/0.png", "b.JPG", "b/c/2.png", "notes.txt"):
            save(root / c / p, np.zeros((4, 4), np.uint8)) if p.endswith("png") else (root / c / p).write_bytes(b"")
    ours = image_folder(root, (1, 8, 8), (0.5,), (0.5,))
    theirs = ImageFolder(str(root))
    assert ours.samples == theirs.samples and ours.classes == theirs.classes
    u = UnlabeledImages(root, (1, 8, 8), (0.5,), (0.5,))
    assert u.files == sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg"))


# ---- deit_view of image folders ----
def half_and_half(root: Path) -> Path:
    """Class a: a 200x200 image, left half black, right half white; class b: a 12x12 gray image."""
    arr = np.zeros((200, 200), np.uint8)
    arr[:, 100:] = 255
    save(root / "a" / "big.png", arr)
    save(root / "b" / "small.png", np.full((12, 12), 128, np.uint8))
    return root


@pytest.mark.parametrize("train", [False, True], ids=["eval-tf", "train-tf"])
@pytest.mark.parametrize("size", [(1, 32, 32), (3, 224, 224), (1, 28, 40)], ids=["32", "224", "28x40"])
def test_deit_view_of_a_folder_gives_the_model_s_input_size(tmp_path, train, size):
    """The size came from the first step with one: eval's Resize (size / crop_pct), so a 32-pixel model got
    36x36 images and a 224 one 256x256."""
    root = half_and_half(tmp_path / "f")
    C, H, W = size
    kw = dict(train=train, crop_pct=0.875)
    for ds in (image_folder(root, size, (0.5,) * C, (0.5,) * C, **kw),
               UnlabeledImages(root, size, (0.5,) * C, (0.5,) * C, **kw),
               torch.utils.data.Subset(image_folder(root, size, (0.5,) * C, (0.5,) * C, **kw), [1])):
        view, why = deit_view(ds, rand_augment=None, reprob=0.0)
        assert why is None
        for i in range(len(view)):
            assert view[(i, 0)][0].shape == size


def test_deit_view_size_from_the_crop_of_a_foreign_folder(tmp_path):
    """A torchvision ImageFolder with timm's eval transform (no recorded input size): the CenterCrop's size."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    root = half_and_half(tmp_path / "f")
    ds = ImageFolder(str(root), transform=create_transform((1, 32, 32), crop_pct=0.875, mean=(0.5,), std=(0.5,)),
                     loader=lambda p: load_image(p, "L"))
    assert [type(t).__name__ for t in ds.transform.transforms][:2] == ["Resize", "CenterCrop"]
    view, why = deit_view(ds, rand_augment=None, reprob=0.0)
    assert why is None and view[(0, 0)][0].shape == (1, 32, 32)


def test_deit_view_of_a_small_input_folder_resizes_its_crops(tmp_path):
    """Inputs <= 32 pixels got RandomCrop((h, w), padding=4) of the unresized image: 28x28 windows of a
    200x200 photo (82% of them one colour here), and a 12x12 image crashed. Folders keep the random resized
    crop (a crop of 8-100% of the image, resized); only Fashion-MNIST, stored 28x28, gets the padded crop."""
    from torchvision import transforms

    root = half_and_half(tmp_path / "f")
    view, _ = deit_view(image_folder(root, (1, 28, 28), (0.5,), (0.5,), train=True), rand_augment=None, reprob=0.0)
    assert not isinstance(view.transform.transforms[0], transforms.RandomCrop)
    crops = torch.stack([view[(0, s)][0] for s in range(100)])
    single = ((crops > 0).flatten(1).all(1) | (crops <= 0).flatten(1).all(1)).float().mean()
    assert single < 0.5  # a resized crop spans 8-100% of the image: mostly both halves
    assert view[(1, 0)][0].shape == (1, 28, 28)  # the 12x12 image is resized, not refused


def test_deit_view_of_fashion_mnist_keeps_the_padded_crop(tmp_path):
    import gzip
    import struct

    from torchvision import transforms

    from far.data import deit_train_transform, fashion_mnist

    def idx(arr):
        return gzip.compress(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())

    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(idx(np.zeros((3, 28, 28), np.uint8)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(idx(np.zeros(3, np.uint8)))
    view, _ = deit_view(fashion_mnist("test", root=tmp_path), rand_augment=None, reprob=0.0)
    crop = view.transform.transforms[0]
    assert isinstance(crop, transforms.RandomCrop) and crop.size == (28, 28) and crop.padding == 4
    assert view[(0, 0)][0].shape == (1, 28, 28)
    # deit_train_transform's default: images of unknown size, the resized crop
    assert not isinstance(deit_train_transform((1, 28, 28), (0.5,), (0.5,)).transforms[0], transforms.RandomCrop)
    assert isinstance(deit_train_transform((1, 28, 28), (0.5,), (0.5,), images_at_size=True).transforms[0],
                      transforms.RandomCrop)
