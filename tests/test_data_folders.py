"""far.data's image folders on awkward files and layouts: 16-bit images, symlinked and looping folders, hidden
files and folders, and DeiT's per-image view (deit_view) of folders built with eval or train transforms."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from far.data import image_folder, load_image
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
