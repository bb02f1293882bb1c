"""Input pipeline of Sec. 4.2: resize to 256 x 128, horizontal flip, pad + random crop, ImageNet
normalisation and random erasing for training; resize + normalisation for testing. The datasets that apply
them are in ``ctfreid.data.loader``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torchvision import transforms as T

from ctfreid.errors import CtfreidError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TransformConfig:
    """Augmentation settings; the defaults are the paper's (Sec. 4.2) plus the usual pad-crop of 10 px."""

    height: int = 256
    width: int = 128
    flip_p: float = 0.5
    padding: int = 10  # 0 disables pad + random crop
    erasing_p: float = 0.5  # random erasing (Zhong et al.); 0 disables
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise CtfreidError(f"image size must be positive, got {self.height} x {self.width}")
        for name in ("flip_p", "erasing_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise CtfreidError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.padding < 0:
            raise CtfreidError(f"padding must be >= 0, got {self.padding}")


def build_train_transform(config: TransformConfig | None = None) -> Callable:
    """PIL image -> normalised float tensor ``[3, height, width]`` with the training augmentations."""
    c = config or TransformConfig()
    size = (c.height, c.width)
    steps: list = [T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    if c.flip_p > 0:
        steps.append(T.RandomHorizontalFlip(c.flip_p))
    if c.padding > 0:
        steps += [T.Pad(c.padding), T.RandomCrop(size)]
    steps += [T.ToTensor(), T.Normalize(c.mean, c.std)]
    if c.erasing_p > 0:
        # Erased pixels are 0 after normalisation, i.e. the ImageNet mean colour, as in Zhong et al.
        steps.append(T.RandomErasing(p=c.erasing_p, value=0))
    return T.Compose(steps)


def build_test_transform(config: TransformConfig | None = None) -> Callable:
    """PIL image -> normalised float tensor ``[3, height, width]`` (resize + normalise only)."""
    c = config or TransformConfig()
    return T.Compose(
        [
            T.Resize((c.height, c.width), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.ToTensor(),
            T.Normalize(c.mean, c.std),
        ]
    )
