"""The torch-free preprocessing (Pillow + NumPy) equals the torch test transform (the oracle) per value."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from ctfreid.data.datasets import read_image  # noqa: E402
from ctfreid.data.transforms import TransformConfig, build_test_transform  # noqa: E402
from ctfreid.errors import CtfreidError  # noqa: E402
from ctfreid.infer.preprocess import preprocess_batch, preprocess_image  # noqa: E402


def _reference(image, height, width, mean=None, std=None):
    config = TransformConfig(height=height, width=width)
    if mean is not None:
        config = TransformConfig(height=height, width=width, mean=mean, std=std)
    return build_test_transform(config)(image.convert("RGB")).numpy()


@pytest.mark.parametrize("size", [(256, 128), (64, 32), (97, 41)])
def test_real_images_match_the_torch_transform(synth_dataset, size):
    height, width = size
    for path, _, _ in synth_dataset.query[:8] + synth_dataset.gallery[:8]:
        image = read_image(path)  # JPEG files decoded by Pillow, as the loaders do
        got = preprocess_image(image, height, width)
        assert got.dtype == np.float32 and got.shape == (3, height, width)
        assert np.abs(got - _reference(image, height, width)).max() <= 1e-5


@pytest.mark.parametrize("image_size", [(61, 143), (300, 97), (13, 7), (129, 257), (128, 256)])
def test_odd_sizes_up_and_down_match(image_size):
    rng = np.random.default_rng(sum(image_size))
    w, h = image_size
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    assert np.abs(preprocess_image(image, 256, 128) - _reference(image, 256, 128)).max() <= 1e-5


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_are_converted_like_the_loaders(mode):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (70, 30, 3), dtype=np.uint8)).convert(mode)
    assert np.abs(preprocess_image(image, 64, 32) - _reference(image, 64, 32)).max() <= 1e-5


def test_custom_normalisation_and_batches():
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (50 + i, 20 + 3 * i, 3), dtype=np.uint8)) for i in range(5)]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    batch = preprocess_batch(images, 64, 32, mean, std)
    assert batch.shape == (5, 3, 64, 32)
    for got, image in zip(batch, images):
        assert np.abs(got - _reference(image, 64, 32, mean, std)).max() <= 1e-5


def test_not_an_image_is_one_error():
    with pytest.raises(CtfreidError, match="expected a PIL image"):
        preprocess_image(np.zeros((3, 64, 32)), 64, 32)


def test_16_bit_images_are_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    # before: Pillow's convert("RGB") clipped every value above 255, so a 16-bit PNG crop was encoded all white
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (70, 30), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "16.png")  # the same picture in 16 bits
    eight, sixteen = read_image(tmp_path / "8.png"), read_image(tmp_path / "16.png")
    with Image.open(tmp_path / "16.png") as raw:
        assert raw.mode == "I;16"
        raw.load()
        as_i = raw.convert("I")  # how older Pillows read 16-bit PNGs
    assert sixteen.mode == "RGB" and np.array_equal(np.asarray(sixteen), np.asarray(eight))
    want = preprocess_image(eight, 64, 32)
    for image in (Image.open(tmp_path / "16.png"), as_i):  # decoded images given directly (serve, encode_images)
        assert np.array_equal(preprocess_image(image, 64, 32), want)
    assert np.abs(want - _reference(eight, 64, 32)).max() <= 1e-5


def test_mode_i_images_with_8_bit_values_keep_their_grey_levels(tmp_path):
    # an integer array saved as is (mode I, 32-bit) holding 0..255: its grey levels, not divided by 257 into black
    rng = np.random.default_rng(4)
    grey = rng.integers(0, 256, (70, 30), dtype=np.uint8)
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as raw:
        assert raw.mode == "I"
        raw.load()
        got = preprocess_image(raw, 64, 32)
    eight = Image.fromarray(grey, "L")
    assert np.array_equal(np.asarray(read_image(tmp_path / "i.tif")), np.asarray(eight.convert("RGB")))
    assert np.array_equal(got, preprocess_image(eight, 64, 32))
