"""Input pipeline (Sec. 4.2): shapes, ImageNet normalisation, flip, pad + crop, random erasing, and the
test transform through the loader that applies it (``ctfreid.data.loader``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ctfreid.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TransformConfig,
    build_test_transform,
    build_train_transform,
)


def noise_image(h: int = 40, w: int = 20, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(1, 255, (h, w, 3), dtype=np.uint8))


def test_default_sizes_are_the_papers():
    torch.manual_seed(0)
    img = noise_image(128, 64)
    x = build_train_transform()(img)
    assert x.shape == (3, 256, 128) and x.dtype == torch.float32
    assert build_test_transform()(img).shape == (3, 256, 128)
    assert build_test_transform(TransformConfig(height=64, width=32))(img).shape == (3, 64, 32)


def test_normalisation_by_hand():
    colour = (200, 100, 30)
    x = build_test_transform(TransformConfig(height=8, width=4))(Image.new("RGB", (10, 20), colour))
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]
    for ch in range(3):
        assert torch.allclose(x[ch], torch.full((8, 4), expected[ch]), atol=1e-5)


def test_flip_only_mirrors_the_test_image():
    cfg = TransformConfig(height=16, width=8, flip_p=1.0, padding=0, erasing_p=0.0)
    img = noise_image()
    assert torch.equal(build_train_transform(cfg)(img), build_test_transform(cfg)(img).flip(-1))


def test_pad_and_crop_is_a_shifted_window():
    cfg = TransformConfig(height=16, width=8, flip_p=0.0, padding=3, erasing_p=0.0)
    img = noise_image()
    base = build_test_transform(cfg)(img)
    # Padding with black, then normalising: the padded border equals normalised zero.
    black = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    padded = black.expand(3, 22, 14).clone()
    padded[:, 3:19, 3:11] = base
    torch.manual_seed(1)
    offsets = set()
    for _ in range(20):
        out = build_train_transform(cfg)(img)
        found = [(dy, dx) for dy in range(7) for dx in range(7)
                 if torch.allclose(out, padded[:, dy : dy + 16, dx : dx + 8], atol=1e-5)]
        assert found, "output is not a window of the padded image"
        offsets.update(found)
    assert len(offsets) > 3  # the crop position is random


def test_random_erasing_sets_a_rectangle_to_the_mean():
    img = noise_image()  # no pixel equals the ImageNet mean exactly
    cfg = TransformConfig(height=32, width=16, flip_p=0.0, padding=0, erasing_p=1.0)
    base = build_test_transform(cfg)(img)
    assert not (base == 0).all(0).any()
    torch.manual_seed(0)
    x = build_train_transform(cfg)(img)
    zero = (x == 0).all(0)
    assert zero.any()
    rows, cols = torch.nonzero(zero, as_tuple=True)
    box = zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all()  # one filled rectangle
    assert torch.equal(x[:, ~zero], base[:, ~zero])  # the rest untouched


@pytest.mark.parametrize("kwargs", [dict(height=0), dict(flip_p=1.5), dict(erasing_p=-0.1), dict(padding=-1)])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        TransformConfig(**kwargs)


def test_loader_applies_the_test_transform(synth_dataset):
    from ctfreid.data.datasets import read_image
    from ctfreid.data.loader import image_loader

    transform = build_test_transform(TransformConfig(height=32, width=16))
    loader = image_loader(synth_dataset.query[:7], transform, batch_size=5)
    xb, pids, camids, idx = next(iter(loader))
    assert xb.shape == (5, 3, 32, 16) and idx.tolist() == [0, 1, 2, 3, 4]
    assert pids.tolist() == [r[1] for r in synth_dataset.query[:5]]
    assert camids.tolist() == [r[2] for r in synth_dataset.query[:5]]
    torch.testing.assert_close(xb[3], transform(read_image(synth_dataset.query[3][0])))


def test_loader_reports_bad_image(tmp_path):
    from ctfreid.data.loader import image_loader

    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"broken")
    with pytest.raises(ValueError, match="0001_c1s1_000001_00.jpg"):
        next(iter(image_loader([(str(bad), 1, 0)], build_test_transform())))
