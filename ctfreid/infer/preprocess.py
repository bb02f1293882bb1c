"""The test transform of ``ctfreid.data.transforms.build_test_transform`` in Pillow + NumPy (no torch).

``torchvision.transforms.Resize((h, w), BILINEAR, antialias=True)`` on a PIL image calls
``PIL.Image.resize((w, h), Image.BILINEAR)`` (Pillow's bilinear filter antialiases when shrinking), so the
same call gives the same uint8 pixels; ``ToTensor`` is ``float32(x) / 255`` in CHW order and ``Normalize``
is ``(x - mean) / std`` in float32. The result equals the torch transform within 1e-5 per value (checked
by tests/test_preprocess.py on real images of odd sizes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ctfreid.data.datasets import to_rgb
from ctfreid.errors import CtfreidError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the same numbers as ctfreid.data.transforms (which imports torch)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalised_hwc(image: Any, height: int, width: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise CtfreidError(f"expected a PIL image to encode, got {type(image).__name__}")
    rgb = to_rgb(image)  # 16-bit images scaled to 8 bits, not clipped
    x = np.asarray(rgb.resize((int(width), int(height)), Image.BILINEAR), dtype=np.float32)  # a new array
    # in place, in torch's order: ToTensor's float(x) / 255, then Normalize's (x - mean) / std
    x /= np.float32(255)
    x -= mean
    x /= std
    return x


def preprocess_image(image: Any, height: int, width: int, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """A PIL image -> float32 ``[3, height, width]``, resized (bilinear, antialiased) and normalised."""
    m, s = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(_normalised_hwc(image, height, width, m, s).transpose(2, 0, 1))


def preprocess_batch(images: Sequence[Any], height: int, width: int, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """PIL images -> float32 ``[B, 3, height, width]`` (see :func:`preprocess_image`)."""
    m, s = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    out = np.empty((len(images), 3, int(height), int(width)), dtype=np.float32)
    for i, image in enumerate(images):
        out[i] = _normalised_hwc(image, height, width, m, s).transpose(2, 0, 1)
    return out
