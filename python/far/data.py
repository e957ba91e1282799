"""Datasets: Fashion-MNIST from IDX files (in memory, batched fast path) and ImageNet-style folders.

    >>> ds = fashion_mnist("test", limit=1000)           # Debian's dataset-fashion-mnist
    >>> x, y = ds[0]                                      # [1, 28, 28] float32 (normalized), int
    >>> for xb, yb in ds.batches(256): ...                # [B, 1, 28, 28], [B] int64: no per-item Python
    >>> ds = make_dataset("fashion-mnist", "test", far.models.data_config(model))  # checks the model fits
    >>> ds = image_folder("imgs/", (3, 224, 224), mean, std)  # imgs/<class>/<image>.png, labels = sorted classes
    >>> view, why = deit_view(ds)                         # DeiT's per-image augmentation, at 224x224

Image folders (image_folder, UnlabeledImages) skip names starting with "." at every depth (.thumbnails/,
AppleDouble ._x.png), follow symlinked folders and list each folder once (a symlink loop is skipped with a
warning). 16-bit grayscale images keep their top 8 bits; float images are refused (load_image).
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.datasets import ImageFolder

from far.errors import ConfigError, DataError
from far.utils.fs import NotRegularFile, open_input

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
FASHION_MNIST_ENV = "FAR_FASHION_MNIST"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_INPUT_SIZE = (1, 28, 28)


# ---- IDX ----
# IDX header: 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32 sizes, then the data (big-endian).
MAX_IDX_BYTES = 1 << 31  # 2 GiB: 40x Fashion-MNIST's training images
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or .gz) into a native-endian numpy array of its declared shape.

    Raises FileNotFoundError if `path` does not exist and DataError (a ValueError) if it is not a
    regular file or not valid IDX: bad gzip stream, wrong magic, unknown dtype code, a size that does
    not match the header (truncated or trailing bytes), or more than MAX_IDX_BYTES of data (read, or declared
    by the header's dims: their product is taken in Python ints, so no header wraps the size check).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    gz = path.suffix == ".gz"
    try:
        with open_input(path, "IDX file") as raw, (gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw) as f:
            buf = f.read(MAX_IDX_BYTES + 1)  # bounded: a gzip bomb stops here
    except NotRegularFile as e:
        raise DataError(str(e)) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    if len(buf) > MAX_IDX_BYTES:
        raise DataError(f"{path}: more than {MAX_IDX_BYTES >> 20} MiB of IDX data; not a dataset file this reads")
    if len(buf) < 4:
        raise DataError(f"{path}: not an IDX file ({len(buf)} bytes, the header alone is 4)")
    zero0, zero1, code, ndim = buf[:4]
    if zero0 != 0 or zero1 != 0:
        raise DataError(f"{path}: not an IDX file (magic {buf[:4].hex()}, expected 0000xxxx)")
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x} "
                           f"(known: {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    head = 4 + 4 * ndim
    if len(buf) < head:
        raise DataError(f"{path}: truncated IDX header ({len(buf)} bytes, {head} needed for {ndim} dims)")
    dims = tuple(int(v) for v in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    want = head + math.prod(dims) * dtype.itemsize  # Python ints: 4 dims of 2^16 wrap int64 to 0
    if want > MAX_IDX_BYTES + head:
        raise DataError(f"{path}: IDX header says shape {list(dims)} of {dtype.name} ({want - head} bytes of "
                        f"data), more than {MAX_IDX_BYTES >> 20} MiB; not a dataset file this reads "
                        f"(file has {len(buf)} bytes)")
    if len(buf) != want:
        what = "truncated" if len(buf) < want else "has trailing bytes"
        raise DataError(f"{path}: IDX file {what}: header says shape {list(dims)} of {dtype.name} "
                           f"({want} bytes), file has {len(buf)} bytes")
    arr = np.frombuffer(buf, dtype=dtype, offset=head).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # writable, native byte order


# ---- Fashion-MNIST ----
def fashion_mnist_root(root=None) -> Path:
    """The Fashion-MNIST folder: `root`, else env FAR_FASHION_MNIST, else /usr/share/datasets/fashion-mnist."""
    return Path(root if root is not None else os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


class FashionMNIST(torch.utils.data.Dataset):
    """One Fashion-MNIST split held in memory as uint8 (60k train / 10k test images of 28x28).

    Items are (image [1, 28, 28] float32 normalized with mean/std, label int). `batches()` is the
    fast path: whole batches normalized at once (on `device` if given), no per-item Python.

    Args:
        split: "train" or "test".
        root: folder with the four IDX .gz files (default: see `fashion_mnist_root`).
        limit: keep only the first `limit` images (quick runs).
        transform: callable applied to each normalized image [1, 28, 28] in __getitem__, and to each
            batch [B, 1, 28, 28] in `batches()` unless `batches(transform=...)` overrides it; use a
            batch-aware transform such as `RandomShiftFlip` for augmentation.
        mean, std: normalization (default FMNIST_MEAN / FMNIST_STD = 0.2860 / 0.3530).
    Attributes: images uint8 [N, 28, 28], targets int64 [N], classes (10 names).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", root=None, limit: Optional[int] = None,
                 transform: Optional[Callable] = None, mean: Sequence[float] = FMNIST_MEAN,
                 std: Sequence[float] = FMNIST_STD) -> None:
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"fashion_mnist: split must be 'train' or 'test', got {split!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"fashion_mnist: limit must be >= 1, got {limit}")
        folder = fashion_mnist_root(root)
        img_name, lbl_name = FASHION_MNIST_FILES[split]
        img_path, lbl_path = folder / img_name, folder / lbl_name
        missing = [p.name for p in (img_path, lbl_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST {split} files not found in {folder} (missing {', '.join(missing)}); "
                f"install Debian's package (`apt-get install -y dataset-fashion-mnist`, files under "
                f"{FASHION_MNIST_DIR}) or point env {FASHION_MNIST_ENV} to a folder with {img_name} and {lbl_name}")
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{img_path}: expected uint8 images [N, 28, 28], "
                               f"got {images.dtype} {list(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{lbl_path}: expected {images.shape[0]} labels, got shape {list(labels.shape)}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DataError(f"{lbl_path}: labels must be in [0, 10), got [{labels.min()}, {labels.max()}]")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.split = split
        self.root = folder
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # uint8 [N, 28, 28]
        self.targets = torch.from_numpy(labels.astype(np.int64))      # int64 [N]
        self.transform = transform
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 1 or len(self.std) != 1:
            raise ValueError(f"fashion_mnist: images have 1 channel; mean/std must have 1 value, got {mean} / {std}")
        # x = (u8 / 255 - mean) / std = u8 * a + b
        self._a = 1.0 / (255.0 * self.std[0])
        self._b = -self.mean[0] / self.std[0]
        self._device_images: dict = {}

    def __len__(self) -> int:
        return self.images.shape[0]

    def normalize(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 28, 28] -> float32 [..., 1, 28, 28] normalized."""
        return (u8.to(torch.float32) * self._a + self._b).unsqueeze(-3)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        x = self.normalize(self.images[i])
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(images [N, 1, 28, 28] float32 normalized, targets [N] int64): for a TensorDataset."""
        return self.normalize(self.images), self.targets

    def on_device(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(images uint8 [N, 28, 28], targets int64 [N]) on `device`, moved once and cached."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.images, self.targets
        key = str(device)
        if key not in self._device_images:  # the uint8 split is small (47 MB for train): move it once
            self._device_images[key] = (self.images.to(device), self.targets.to(device))
        return self._device_images[key]

    def batches(self, batch_size: int = 256, shuffle: bool = False, drop_last: bool = False,
                generator: Optional[torch.Generator] = None, device=None,
                transform: Optional[Callable] = ...) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x [B, 1, 28, 28] float32 normalized, y [B] int64) on `device` (default CPU).

        shuffle draws a permutation from `generator`; transform (default: self.transform; None for
        none) is applied to each whole batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        tf = self.transform if transform is ... else transform
        images, targets = self.on_device(device)
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for s in range(0, stop, batch_size):
            if order is None:
                u8, y = images[s:s + batch_size], targets[s:s + batch_size]
            else:
                idx = order[s:s + batch_size].to(device)
                u8, y = images[idx], targets[idx]
            x = self.normalize(u8)
            if tf is not None:
                x = tf(x)
            yield x, y

    def shard(self, rank: int, world: int) -> "FashionMNIST":
        """Images rank, rank + world, rank + 2 world, ... (one process's share of an evaluation).
        Raises ConfigError unless world >= 1 and 0 <= rank < world."""
        import copy

        _check_shard(rank, world)
        part = copy.copy(self)
        part.images = self.images[rank::world]
        part.targets = self.targets[rank::world]
        part._device_images = {}
        return part

    def first(self, n: int) -> "FashionMNIST":
        """The first n images (the in-memory fast path kept: a copy with sliced tensors); n >= 1 (ConfigError
        otherwise: a negative n would slice off the last images instead)."""
        import copy

        _check_limit(n)
        part = copy.copy(self)
        part.images = self.images[:n]
        part.targets = self.targets[:n]
        part._device_images = {}
        return part

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, n={len(self)}, root='{self.root}')"


def fashion_mnist(split: str = "train", root=None, limit: Optional[int] = None,
                  transform: Optional[Callable] = None, mean: Sequence[float] = FMNIST_MEAN,
                  std: Sequence[float] = FMNIST_STD) -> FashionMNIST:
    """Fashion-MNIST `split` ("train" 60k / "test" 10k) as an in-memory dataset; see `FashionMNIST`."""
    return FashionMNIST(split, root=root, limit=limit, transform=transform, mean=mean, std=std)


class RandomShiftFlip(torch.nn.Module):
    """Batched augmentation: random translation by up to `pad` pixels and horizontal flip with
    probability `flip`, drawn independently per image. Uncovered pixels get `fill` (default None:
    each image's minimum, i.e. the background of normalized Fashion-MNIST).
    Accepts [C, H, W] or [B, C, H, W]."""

    def __init__(self, pad: int = 2, flip: float = 0.5, fill: Optional[float] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.pad, self.flip, self.fill, self.generator = int(pad), float(flip), fill, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        B, C, H, W = xb.shape
        g, dev = self.generator, xb.device
        if self.flip > 0:
            f = (torch.rand(B, generator=g) < self.flip).to(dev)
            xb = torch.where(f[:, None, None, None], xb.flip(-1), xb)
        if self.pad > 0:
            p = self.pad
            fill = (xb.amin(dim=(1, 2, 3), keepdim=True) if self.fill is None
                    else torch.tensor(float(self.fill), dtype=xb.dtype, device=dev))
            padded = fill.expand(B, C, H + 2 * p, W + 2 * p).clone()
            padded[:, :, p:p + H, p:p + W] = xb
            dy = torch.randint(0, 2 * p + 1, (B,), generator=g).to(dev)
            dx = torch.randint(0, 2 * p + 1, (B,), generator=g).to(dev)
            rows = (dy[:, None] + torch.arange(H, device=dev))[:, None, :, None].expand(B, C, H, W + 2 * p)
            xb = padded.gather(2, rows)
            cols = (dx[:, None] + torch.arange(W, device=dev))[:, None, None, :].expand(B, C, H, W)
            xb = xb.gather(3, cols)
        return xb[0] if single else xb


# ---- image folders ----
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _to_8_bits(im, path):
    """A 16-bit grayscale PIL image as 8-bit "L" (the top 8 bits: value >> 8); others unchanged.

    PIL's convert("L"/"RGB") clips these modes to 0..255 instead of rescaling (a full-range 16-bit ramp came
    out 99.6% white). Modes "I;16*" (16-bit PNG / TIFF) and "I" holding 0..65535 (how PIL opens a 16-bit
    PGM) are 16-bit. "I" with values outside 0..65535 and "F" (float) have no range that says what white
    is: a DataError naming the file, not a guess."""
    from PIL import Image

    if im.mode == "F":
        raise DataError(f"{path}: 32-bit float image (PIL mode F): no defined range to map to 8 bits; "
                        "save it as an 8- or 16-bit image")
    if im.mode != "I" and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise DataError(f"{path}: 32-bit integer image (PIL mode {im.mode}) with values {lo}..{hi}: only "
                        "0..65535 (16-bit) is rescaled to 8 bits; save it as an 8- or 16-bit image")
    return Image.fromarray((a.astype(np.uint16) >> 8).astype(np.uint8))


def load_image(path, mode: str):
    """The image file at `path` converted to PIL `mode` ("L" or "RGB"). 16-bit grayscale (PNG, TIFF, PGM)
    keeps its top 8 bits (value >> 8) rather than PIL's clipping; 32-bit float images and 32-bit integer
    ones past 0..65535 are refused (`_to_8_bits`). Every failure is a DataError that names the file: not a
    regular file (a FIFO is never waited on), unreadable, not an image, truncated, of such a mode, or larger
    than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)."""
    import warnings

    from PIL import Image

    try:
        with open_input(path, "image file") as f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _to_8_bits(Image.open(f), path).convert(mode)
    except NotRegularFile as e:
        raise DataError(str(e)) from None
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: image too large to decode safely ({e})") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{path}: cannot read image: not an image format PIL recognises, or truncated") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:  # PIL's ways of saying "bad image"
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise DataError(f"{path}: cannot read image: {reason}") from None


def _image_pipeline(path, input_size: Sequence[int], mean, std, train: bool, interpolation: str,
                    crop_pct: Optional[float], crop_mode: Optional[str] = None):
    """(folder Path, PIL loader, timm transform) for images of `input_size` = (C, H, W)."""
    from timm.data import create_transform

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such image folder")
    if not path.is_dir():
        raise DataError(f"{path}: not a folder of images")
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) != 3 or input_size[0] not in (1, 3):
        raise DataError(f"image_folder: input_size must be (C, H, W) with C in (1, 3), got {input_size}")
    mode = "L" if input_size[0] == 1 else "RGB"

    def loader(p: str):
        return load_image(p, mode)

    tf = create_transform(input_size=input_size, is_training=train, mean=tuple(mean), std=tuple(std),
                          interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode,
                          **({"color_jitter": 0.0} if train and mode == "L" else {}))
    return path, loader, tf


class ImageFiles(torch.utils.data.Dataset):
    """Images named by `paths` for inference (far predict): each path an image file, taken as it is, or a
    folder, walked as UnlabeledImages walks it (any depth, sorted); in the order given, each file once.
    Items are (image, -1); `files` holds the paths in item order. Eval transforms of the model's data config
    (image_files makes one from it)."""

    def __init__(self, paths: Sequence, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear", crop_pct: Optional[float] = None, crop_mode: Optional[str] = None):
        if not paths:
            raise DataError("no images given")
        files, seen_files = [], set()
        for given in paths:
            p = Path(given)
            if not p.exists():
                raise FileNotFoundError(f"{given}: no such image file or folder")
            if p.is_dir():
                new = _images_under(p, stacklevel=2)
            else:
                if not p.is_file():
                    raise DataError(f"{given}: not a regular file")
                if p.suffix.lower() not in IMAGE_EXTENSIONS:
                    raise DataError(f"{given}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
                new = [p]
            for f in new:
                key = _stat_key(f) or str(f.resolve())
                if key not in seen_files:
                    seen_files.add(key)
                    files.append(f)
        self.files = files
        _, self.loader, self.transform = _image_pipeline(files[0].parent, input_size, mean, std, False,
                                                         interpolation, crop_pct, crop_mode)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.loader(str(self.files[i]))), -1


def image_files(paths: Sequence, data_cfg) -> ImageFiles:
    """ImageFiles with the eval transforms a model expects (data_cfg as in make_dataset: far.models.data_config)."""
    cfg = _check_data_cfg(data_cfg)
    rc = folder_config(cfg)
    return ImageFiles(paths, cfg["input_size"], rc["mean"], rc["std"], interpolation=rc["interpolation"],
                      crop_pct=rc["crop_pct"], crop_mode=rc.get("crop_mode"))


def _hidden(name: str) -> bool:
    return name.startswith(".")  # .thumbnails/, .ipynb_checkpoints/, macOS AppleDouble ._x.png, .DS_Store


def _stat_key(path) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)  # follows symlinks: the folder a link leads to
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk_images(top, seen: set, skipped: list) -> list:
    """Paths (str) of the image files under folder `top`, any depth, symlinked folders followed (as
    os.walk(followlinks=True)), in torchvision's order: folders by sorted path, then files by sorted name.

    Skipped: names starting with "." (hidden folders and files: `_hidden`), files that are not regular
    files (broken links, FIFOs), and folders whose (st_dev, st_ino) is in `seen` (a symlink loop such as
    cat/up -> .., or a second link to a folder already walked: its images stay listed once), which are
    appended to `skipped`. `seen` gets every folder walked; seed it with `top`'s key so loops end."""
    found = []  # (folder, sorted image names)
    stack = [os.fspath(top)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"{folder}: cannot list folder ({e.strerror or e})") from None
        names, subdirs = [], []
        for e in entries:
            if _hidden(e.name):
                continue
            try:
                if e.is_dir():
                    key = _stat_key(e.path)
                    if key is None:  # gone since scandir listed it
                        continue
                    if key in seen:
                        skipped.append(e.path)
                        continue
                    seen.add(key)
                    subdirs.append(e.path)
                elif e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    names.append(e.name)
            except OSError:  # vanished or unreadable entry: not an image we can list
                continue
        found.append((folder, names))
        stack.extend(reversed(subdirs))
    found.sort(key=lambda t: t[0])
    return [os.path.join(d, n) for d, names in found for n in names]


def _images_under(root: Path, stacklevel: int) -> list:
    """The image files under folder `root` (any depth, _walk_images), sorted, as Paths; a warning for the symlinked
    folders skipped (`stacklevel` as the caller's own warnings.warn would take it); DataError if there are none."""
    skipped: list = []
    files = sorted(Path(p) for p in _walk_images(root, {_stat_key(root)}, skipped))
    _warn_skipped(root, skipped, stacklevel=stacklevel + 1)
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under it")
    return files


def _warn_skipped(root: Path, skipped: list, stacklevel: int) -> None:
    if skipped:
        import warnings

        shown = ", ".join(f"{os.path.relpath(p, root)} -> {os.path.realpath(p)}" for p in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"{root}: skipped {len(skipped)} symlinked folder(s) leading to a folder already listed "
                      f"(a symlink loop or a second link; its images are listed once): {shown}{more}",
                      stacklevel=stacklevel + 1)


class _ImageFolder(ImageFolder):
    """torchvision's ImageFolder with far's folder walk: class folders are the sorted names of the root's
    non-hidden subfolders, and each class lists `_walk_images` of its folder (hidden names skipped, symlink
    loops ending, never re-entering the root or another class's folder)."""

    def find_classes(self, directory):
        with os.scandir(directory) as it:
            classes = sorted(e.name for e in it if not _hidden(e.name) and e.is_dir())
        if not classes:
            raise DataError(f"{directory}: has no class subfolders (expected {directory}/<class>/<image>.png "
                            "...; folders whose names start with '.' are hidden and skipped)")
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        directory = os.fspath(directory)
        keys = {_stat_key(directory)} | {_stat_key(os.path.join(directory, c)) for c in class_to_idx}
        samples, empty, skipped = [], [], []
        for c in sorted(class_to_idx, key=class_to_idx.get):
            files = _walk_images(os.path.join(directory, c), set(keys), skipped)
            if not files:
                empty.append(c)
            samples.extend((f, class_to_idx[c]) for f in files)
        if empty and not allow_empty:
            raise DataError(f"{directory}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folder(s) "
                            f"{', '.join(empty)}")
        _warn_skipped(Path(directory), skipped, stacklevel=5)  # -> DatasetFolder -> ImageFolder -> image_folder
        return samples


def image_folder(path, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 train: bool = False, interpolation: str = "bilinear", crop_pct: Optional[float] = None,
                 crop_mode: Optional[str] = None):
    """An ImageNet-style folder (one subfolder per class, sorted names = labels 0..K-1) as a
    torchvision ImageFolder with timm's transforms for `input_size` = (C, H, W).

    Eval (train=False): resize to size / crop_pct (default 0.875), center crop (crop_mode: timm's, default
    "center"; "squash" resizes the whole image, "border" pads), normalize; train:
    random resized crop + flip. C == 1 loads images as grayscale, C == 3 as RGB.

    Walked as UnlabeledImages is (`_walk_images`): names starting with "." are skipped at every depth (a
    ".thumbnails" folder is no class, "._x.png" AppleDouble files are no images), symlinked folders are
    followed, and a link back into a folder already listed (a loop, the root, another class) is skipped
    with a warning. A class folder without images is a DataError.
    """
    path, loader, tf = _image_pipeline(path, input_size, mean, std, train, interpolation, crop_pct, crop_mode)
    ds = _ImageFolder(str(path), transform=tf, loader=loader)
    ds.input_size = tuple(int(v) for v in input_size)  # for deit_view: the size the images are made
    return ds


class UnlabeledImages(torch.utils.data.Dataset):
    """Every image under a folder (any depth, sorted paths) with timm's transforms; items are
    (image, -1): for methods that need no labels (label-free distillation). Walked as image_folder is:
    hidden names skipped, symlinked folders followed, each folder listed once (loops end)."""

    def __init__(self, path, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 train: bool = False, interpolation: str = "bilinear", crop_pct: Optional[float] = None,
                 crop_mode: Optional[str] = None):
        root, self.loader, self.transform = _image_pipeline(path, input_size, mean, std, train, interpolation,
                                                            crop_pct, crop_mode)
        self.root = root
        self.input_size = tuple(int(v) for v in input_size)
        self.files = _images_under(root, stacklevel=2)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.loader(str(self.files[i]))), -1

    def __repr__(self) -> str:
        return f"UnlabeledImages({self.root}, n={len(self)})"


# ---- construction for a model ----
FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist")


def is_fashion_mnist(spec) -> bool:
    """True when a data spec names Fashion-MNIST (not a folder)."""
    return str(spec).lower() in FASHION_MNIST_NAMES


def _check_data_cfg(data_cfg) -> dict:
    cfg = dict(data_cfg or {})
    if "input_size" not in cfg or "num_classes" not in cfg:
        raise DataError(f"the model's config lacks input_size/num_classes (got keys {sorted(cfg)}); "
                        "cannot check it against the data")
    cfg["input_size"] = tuple(int(v) for v in cfg["input_size"])
    cfg["num_classes"] = int(cfg["num_classes"])
    return cfg


def _fmt_size(s) -> str:
    return "x".join(str(v) for v in s[1:]) + f"x{s[0]}"


def folder_config(data_cfg) -> dict:
    """timm's resolve_data_config of a model's data config (input_size, interpolation, mean, std,
    crop_pct, crop_mode): the transforms image folders get. The model's input_size wins (the caller's
    data_config has it from the patch embedding); a 1-channel model without its own mean/std gets (0.5,) / (0.5,)
    instead of timm's 3-channel ImageNet defaults."""
    from timm.data import resolve_data_config

    cfg = dict(data_cfg)
    given = {k: cfg[k] for k in ("mean", "std") if cfg.get(k)}
    rc = resolve_data_config({}, pretrained_cfg={k: v for k, v in cfg.items() if v is not None})
    rc["input_size"] = tuple(int(v) for v in cfg["input_size"])
    C = rc["input_size"][0]
    for key in ("mean", "std"):
        v = tuple(float(x) for x in given.get(key, rc[key]))
        rc[key] = v if key in given or len(v) == C else (0.5,) * C
    return rc


def make_dataset(spec, split: str, data_cfg, limit: Optional[int] = None, train: Optional[bool] = None,
                 labels: bool = True):
    """The dataset named by `spec` for a model, after checking they fit each other.

    Args:
        spec: "fashion-mnist" (alias "fmnist") or the path of an ImageNet-style folder (the name wins over a
            folder of that name, with a warning: "./fmnist" names the folder).
        split: "train" or "test" (Fashion-MNIST split; for a folder it only selects train/eval transforms).
        data_cfg: what the model expects, a pretrained_cfg-like dict with input_size (C, H, W),
            num_classes and optionally mean, std, interpolation, crop_pct, architecture
            (far.models.data_config(model) gives it; folders get timm's resolve_data_config /
            create_transform of it, see folder_config).
        limit: keep the first `limit` images (a torch Subset for folders).
        train: use training transforms for a folder (default: split == "train").
        labels: False takes every image under a folder (any layout; items (image, -1)) and does not
            check the number of classes (Fashion-MNIST keeps its labels, which the caller may ignore); a
            model without a classifier (num_classes 0) needs labels=False.
    Raises DataError if the model expects other images or another number of classes
    (e.g. a 3x224x224, 1000-class model on Fashion-MNIST).
    """
    cfg = _check_data_cfg(data_cfg)
    C, H, W = cfg["input_size"]
    K = cfg["num_classes"]
    arch = cfg.get("architecture") or "the model"
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if labels and K == 0:
        raise DataError(f"{arch} has no classifier (num_classes 0): there are no labels to train or test it "
                        "with; distil it without labels (far distill --no-labels, far.distill(labels=False))")
    if is_fashion_mnist(spec):
        if Path(spec).is_dir():  # silently evaluating Fashion-MNIST instead of the user's folder of that name
            import warnings

            warnings.warn(f"'{spec}' names the Fashion-MNIST dataset, so the folder '{spec}' here is not read; "
                          f"give ./{spec} to use that folder's images", stacklevel=2)
        if (C, H, W) != FASHION_MNIST_INPUT_SIZE or (labels and K != len(FASHION_MNIST_CLASSES)):
            raise DataError(
                f"{arch} expects {_fmt_size((C, H, W))} images and {K} classes, but Fashion-MNIST has "
                f"{_fmt_size(FASHION_MNIST_INPUT_SIZE)} images and 10 classes; use a Fashion-MNIST model "
                "(e.g. fmnist_deit_tiny) or --data PATH to an image folder")
        mean = tuple(cfg.get("mean") or FMNIST_MEAN)
        std = tuple(cfg.get("std") or FMNIST_STD)
        return fashion_mnist(split, limit=limit, mean=mean, std=std)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such image folder (and not a dataset name; known: fashion-mnist)")
    rc = folder_config(cfg)
    mean, std = rc["mean"], rc["std"]
    if len(mean) != C or len(std) != C:
        raise DataError(f"{arch}: mean/std have {len(mean)}/{len(std)} values for {C} input channels")
    kw = dict(train=split == "train" if train is None else train, interpolation=rc["interpolation"],
              crop_pct=rc["crop_pct"], crop_mode=rc.get("crop_mode"))  # a squashing model's images are squashed
    if not labels:
        ds = UnlabeledImages(path, (C, H, W), mean, std, **kw)
        return torch.utils.data.Subset(ds, range(min(limit, len(ds)))) if limit is not None else ds
    ds = image_folder(path, (C, H, W), mean, std, **kw)
    if len(ds.classes) != K:
        raise DataError(f"{path} has {len(ds.classes)} class folders but {arch} has {K} classes; "
                           "labels are the sorted folder names, so the folder must hold every class of the model")
    if limit is not None:
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
    return ds


def iterate_batches(dataset, batch_size: int, device=None, num_workers: int = 0
                    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches (x, y) in order: `dataset.batches()` when the dataset has a fast path,
    else a DataLoader (pinned memory when `device` is CUDA); tensors land on `device`."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if hasattr(dataset, "batches"):
        yield from dataset.batches(batch_size, device=device)
        return
    # no batch holds more than the dataset: a batch_size past sys.maxsize made the DataLoader's islice raise
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, max(len(dataset), 1)), shuffle=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def num_batches(dataset, batch_size: int) -> int:
    return -(-len(dataset) // batch_size)


def _check_limit(n: int) -> None:
    if n < 1:
        raise ConfigError(f"a limit must be >= 1 image, got {n}")


def _check_shard(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"shard: need world >= 1 processes and 0 <= rank < world, got rank {rank} of world {world}")


def first(dataset, n: Optional[int]):
    """The first n items of `dataset` (the dataset itself when n is None or it holds no more; its own
    `first(n)` where it has one, keeping a fast path; else a torch Subset). None stays None; n < 1 is a
    ConfigError."""
    if dataset is None or n is None:
        return dataset
    _check_limit(n)
    if len(dataset) <= n:
        return dataset
    if hasattr(dataset, "first"):
        return dataset.first(n)
    return torch.utils.data.Subset(dataset, range(n))


def shard(dataset, rank: int, world: int):
    """Every world-th item from `rank` (the dataset itself when world == 1): one process's share.
    Raises ConfigError unless world >= 1 and 0 <= rank < world (a rank past the end gave an empty share,
    world 0 or below numpy's / range's own errors)."""
    _check_shard(rank, world)
    if world == 1:
        return dataset
    if hasattr(dataset, "shard"):
        return dataset.shard(rank, world)
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world))


# ---- DeiT's per-image training augmentation (far distill --recipe paper) ----
def deit_train_transform(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                         rand_augment: Optional[str] = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                         interpolation: str = "bicubic", images_at_size: bool = False):
    """DeiT's training transform of a PIL image (timm create_transform, as the FAR authors' modeling/data.py
    build_transform): random resized crop + flip + RandAugment (`rand_augment`, None = off) + normalize +
    random erasing (probability `reprob`, per-pixel noise, one box). With `images_at_size` (every image is
    stored at input_size's H x W already, as Fashion-MNIST's 28x28 or CIFAR's 32x32), inputs of 32 pixels or
    less get a 4-pixel-padded random crop instead of the resized crop (as there); images of any other size
    (a folder of photos) keep the resized crop, which sees the whole image and never needs it to be H x W.
    Grayscale (C = 1) works: PIL's ops accept mode "L"; colour jitter is off (timm turns it off under
    RandAugment anyway)."""
    from timm.data import create_transform
    from torchvision import transforms

    c, h, w = (int(v) for v in input_size)
    tf = create_transform(input_size=(c, h, w), is_training=True, mean=tuple(mean), std=tuple(std),
                          interpolation=interpolation, auto_augment=rand_augment, re_prob=reprob,
                          re_mode="pixel", re_count=1, color_jitter=0.0 if c == 1 else 0.3)
    if images_at_size and max(h, w) <= 32:
        tf.transforms[0] = transforms.RandomCrop((h, w), padding=4)
    for t in tf.transforms:  # timm's posterize asks Pillow for 0 bits at top magnitude: Pillow >= 10 refuses
        for op in getattr(t, "ops", []):
            if getattr(op.aug_fn, "__name__", "") == "posterize":
                op.aug_fn = _posterize
    return tf


def _posterize(img, bits_to_keep, **_):
    """timm's posterize with 0 bits allowed (a black image, what older Pillow gave DeiT)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


class DeiTView(torch.utils.data.Dataset):
    """A training set seen through `deit_train_transform`: items are keyed (index, seed); the image's
    random augmentation is drawn from `seed` (python, numpy and torch RNGs seeded, then restored), so a
    run's augmentations are reproducible and resumable. `pil(i)` gives the raw PIL image and label."""

    def __init__(self, pil, n: int, transform):
        self.pil, self.n, self.transform = pil, n, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        from far.utils.env import seeded_rngs

        i, seed = key
        img, y = self.pil(int(i))
        with seeded_rngs(seed):
            return self.transform(img), y


def _output_size(steps) -> Optional[Tuple[int, int]]:
    """(H, W) a transform's steps produce: the size of its crop (eval's CenterCrop, train's random resized
    crop), else of a Resize to a fixed (H, W); None when neither says. Not the first step with a size: eval's
    Resize has size / crop_pct (36 for a 32-pixel model, 256 for 224) and only sets the shorter side."""
    from timm.data import transforms as timm_tf
    from torchvision import transforms

    crops = (transforms.CenterCrop, transforms.RandomCrop, transforms.RandomResizedCrop,
             *(getattr(timm_tf, n) for n in ("RandomResizedCropAndInterpolation", "CenterCropOrPad",
                                             "RandomCropOrPad") if hasattr(timm_tf, n)))

    def pair(size):
        size = (size,) if isinstance(size, int) else tuple(size)
        return (int(size[0]), int(size[-1])) if len(size) in (1, 2) else None

    for t in steps:
        if isinstance(t, crops):
            return pair(t.size)
    for t in steps:
        if isinstance(t, transforms.Resize) and isinstance(t.size, (tuple, list)) and len(t.size) == 2:
            return pair(t.size)
    return None


def _normalize_of(transform):
    """(mean, std, (H, W)) of a timm/torchvision Compose (its Normalize and `_output_size`), or None."""
    from torchvision import transforms

    steps = getattr(transform, "transforms", None) or []
    norm = next((t for t in steps if isinstance(t, transforms.Normalize)), None)
    size = _output_size(steps)
    if norm is None or size is None:
        return None
    mean, std = tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std)
    return mean, std, size


def deit_view(dataset, rand_augment: Optional[str] = "rand-m9-mstd0.5-inc1", reprob: float = 0.25):
    """(DeiTView of `dataset`, None), or (None, why not) when its images cannot be had as PIL images.

    Works on Fashion-MNIST (uint8 28x28 -> PIL "L", normalized with its mean/std; 4-pixel-padded random
    crops, its images being 28x28 already), image folders (ImageFolder / UnlabeledImages from far.data: the
    file through their loader, random resized crops to the input size they were made for, normalization
    from their own transform, eval or train) and torch Subsets of them. Other datasets (tensors) are
    refused."""
    from PIL import Image

    indices = None
    base = dataset
    while isinstance(base, torch.utils.data.Subset):
        inner = list(base.indices)
        indices = inner if indices is None else [inner[i] for i in indices]
        base = base.dataset
    n = len(dataset)
    at = (lambda i: i) if indices is None else (lambda i: indices[i])
    if isinstance(base, FashionMNIST):
        def pil(i):
            j = at(i)
            return Image.fromarray(base.images[j].numpy(), mode="L"), int(base.targets[j])

        tf = deit_train_transform(FASHION_MNIST_INPUT_SIZE, base.mean, base.std, rand_augment, reprob,
                                  images_at_size=True)
        return DeiTView(pil, n, tf), None
    loader = getattr(base, "loader", None)
    files = getattr(base, "samples", None) or ([(str(f), -1) for f in base.files] if isinstance(base, UnlabeledImages)
                                               else None)
    found = _normalize_of(getattr(base, "transform", None)) if loader is not None and files else None
    if found is None:
        return None, (f"{type(base).__name__} does not give PIL images (DeiT's augmentation needs Fashion-MNIST "
                      "or an image folder)")
    mean, std, (h, w) = found
    recorded = getattr(base, "input_size", None)  # (C, H, W) image_folder / UnlabeledImages were made for
    if recorded is not None:
        h, w = (int(v) for v in recorded[1:])

    def pil(i):
        path, y = files[at(i)]
        return loader(path), int(y)

    tf = deit_train_transform((len(mean), h, w), mean, std, rand_augment, reprob)
    return DeiTView(pil, n, tf), None


__all__ = [
    "DataError",
    "DeiTView",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "FashionMNIST",
    "RandomShiftFlip",
    "UnlabeledImages",
    "deit_train_transform",
    "deit_view",
    "fashion_mnist",
    "fashion_mnist_root",
    "first",
    "folder_config",
    "image_folder",
    "is_fashion_mnist",
    "iterate_batches",
    "load_image",
    "make_dataset",
    "num_batches",
    "read_idx",
    "shard",
]
