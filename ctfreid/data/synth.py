"""A synthetic person re-identification dataset in Market-1501 layout, generated from a seed.

Each identity has a fixed appearance: skin and hair (short/long), upper clothing colour with a pattern
(plain, horizontal or vertical stripes, checks, chest logo, open jacket), sleeves, lower clothing
(trousers, shorts, skirt), shoes, build and height, and accessories (backpack, shoulder bag, cap). About a
third of the identities are look-alikes: copies of an earlier identity with one or two attribute groups
changed, so that colour alone does not identify a person. Cameras differ in background, gain, contrast,
colour cast, blur, noise, resolution, framing and in the viewpoint they mostly see (front, back, side: a
backpack or a chest logo is visible from one side only); every image adds its own pose, position, scale,
mirror, lighting and sometimes an occluder. Matching across cameras is thus real but learnable.

Layout (as Market-1501, Sec. 4.1): ``bounding_box_train/`` (training identities), ``query/`` (one image per
test identity per camera), ``bounding_box_test/`` (the other test images, plus distractors with pid 0 and a
few junk crops with pid -1); names ``{pid:04d}_c{cam}s1_{frame:06d}_00.jpg``. Train and test identities
are disjoint. Only NumPy and Pillow are used; the same seed gives byte-identical files.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ctfreid._atomic import atomic_write
from ctfreid.data.datasets import (
    GALLERY_DIR,
    MAX_IMAGE_PIXELS,
    QUERY_DIR,
    TRAIN_DIR,
    ReIDDataset,
    load_market_layout,
)
from ctfreid.errors import CtfreidError

CLOTH = np.array(
    [
        (28, 28, 32), (225, 225, 218), (128, 128, 130), (32, 42, 92), (48, 92, 182), (132, 172, 220),
        (182, 36, 42), (112, 32, 44), (226, 140, 170), (230, 132, 42), (226, 202, 64), (48, 132, 62),
        (112, 116, 52), (112, 76, 46), (202, 182, 142), (112, 62, 142),
    ],
    dtype=np.float64,
)
SKIN = np.array([(241, 194, 160), (224, 172, 130), (198, 134, 94), (161, 102, 63), (110, 70, 45)], np.float64)
HAIR = np.array([(20, 18, 18), (62, 40, 26), (112, 76, 40), (182, 150, 92), (140, 140, 140), (150, 62, 30)], np.float64)

PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo", "jacket")
LOWER_TYPES = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "shoulder")
VIEWS = ("front", "back", "side")
# Attribute groups a look-alike re-draws (the rest is copied from its model identity).
_GROUPS = ("upper", "pattern", "lower", "bag", "hat", "hair", "build")


@dataclass
class SynthConfig:
    """Parameters of the generator; all of them are written to the dataset's README.txt."""

    ids: int = 200
    cams: int = 4
    seed: int = 0
    images_per_id: int = 8
    height: int = 128
    width: int = 64
    train_fraction: float = 0.5  # share of identities in bounding_box_train (Market-1501: 751 of 1501)
    distractors: int = -1  # pid-0 images in the gallery; -1: one per test identity
    junk: int = -1  # pid -1 crops in the gallery; -1: one per ten test identities
    lookalike_fraction: float = 0.35
    occlusion_p: float = 0.12
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if not 2 <= self.ids <= 9999:
            raise CtfreidError(f"ids must be in [2, 9999] (4-digit Market pids), got {self.ids}")
        if not 2 <= self.cams <= 9:
            raise CtfreidError(f"cams must be in [2, 9] (one-digit Market camera ids; queries need a second camera), "
                             f"got {self.cams}")
        if self.images_per_id < 4:
            raise CtfreidError(f"images_per_id must be >= 4 (two cameras x query + gallery), got {self.images_per_id}")
        if self.height < 32 or self.width < 16:
            raise CtfreidError(f"images must be at least 32 x 16 (height x width), got {self.height} x {self.width}")
        if self.height * self.width > MAX_IMAGE_PIXELS:  # the loaders would refuse them (and memory runs out first)
            raise CtfreidError(f"images of {self.height} x {self.width} pixels are more than the limit of "
                               f"{MAX_IMAGE_PIXELS:,} (ctfreid.data.datasets.MAX_IMAGE_PIXELS): expected person crops "
                               "(e.g. 128 x 64)")
        if not 0.0 < self.train_fraction < 1.0:
            raise CtfreidError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if not 0.0 <= self.lookalike_fraction <= 1.0 or not 0.0 <= self.occlusion_p <= 1.0:
            raise CtfreidError("lookalike_fraction and occlusion_p must be in [0, 1]")
        if self.distractors < -1 or self.junk < -1:
            raise CtfreidError(f"distractors and junk must be >= 0 (or -1 for the default), got {self.distractors}, "
                             f"{self.junk}")
        if not 1 <= self.jpeg_quality <= 100:
            raise CtfreidError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")

    @property
    def num_train_ids(self) -> int:
        return min(max(int(round(self.ids * self.train_fraction)), 1), self.ids - 1)


# ----------------------------------------------------------------------------------------------- identities


def _colour(rng: np.random.Generator, palette: np.ndarray, jitter: float = 12.0) -> tuple[int, int, int]:
    c = palette[rng.integers(len(palette))] + rng.normal(0.0, jitter, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _draw_group(rng: np.random.Generator, a: dict, group: str) -> None:
    """(Re)draw one attribute group of identity ``a`` in place."""
    if group == "upper":
        a["upper"] = _colour(rng, CLOTH)
        a["long_sleeves"] = bool(rng.random() < 0.6)
    elif group == "pattern":
        a["pattern"] = PATTERNS[rng.choice(len(PATTERNS), p=[0.34, 0.16, 0.1, 0.1, 0.15, 0.15])]
        a["upper2"] = _colour(rng, CLOTH)
        a["period"] = float(rng.uniform(0.035, 0.07))  # stripe period, fraction of body height
    elif group == "lower":
        a["lower"] = _colour(rng, CLOTH)
        a["lower_type"] = LOWER_TYPES[rng.choice(3, p=[0.65, 0.2, 0.15])]
        a["shoes"] = _colour(rng, CLOTH, 20.0)
    elif group == "bag":
        a["bag"] = BAGS[rng.choice(3, p=[0.45, 0.3, 0.25])]
        a["bag_colour"] = _colour(rng, CLOTH)
        a["bag_side"] = int(rng.choice([-1, 1]))
    elif group == "hat":
        a["hat"] = bool(rng.random() < 0.2)
        a["hat_colour"] = _colour(rng, CLOTH)
    elif group == "hair":
        a["skin"] = _colour(rng, SKIN, 6.0)
        a["hair"] = _colour(rng, HAIR, 8.0)
        a["long_hair"] = bool(rng.random() < 0.3)
    elif group == "build":
        a["height"] = float(rng.uniform(0.86, 1.0))
        a["build"] = float(rng.uniform(0.82, 1.2))


def random_identity(rng: np.random.Generator) -> dict:
    """A person with every attribute group drawn afresh."""
    a: dict = {}
    for g in _GROUPS:
        _draw_group(rng, a, g)
    return a


def make_identities(n: int, seed: int, lookalike_fraction: float) -> list[dict]:
    """Appearance attributes of identities 1..n (index i is pid i + 1); identity i depends only on ids <= i."""
    people: list[dict] = []
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        if people and rng.random() < lookalike_fraction:
            a = dict(people[rng.integers(len(people))])  # look-alike: re-draw one or two groups
            for g in rng.choice(len(_GROUPS), size=int(rng.integers(1, 3)), replace=False):
                _draw_group(rng, a, _GROUPS[g])
        else:
            a = random_identity(rng)
        people.append(a)
    return people


def make_cameras(cams: int, seed: int) -> list[dict]:
    """Per-camera imaging conditions: background scene, photometry, blur, resolution, framing, usual view."""
    out = []
    for c in range(cams):
        rng = np.random.default_rng([seed, 0, c])
        tint = rng.uniform(-25, 25, 3)
        out.append(
            dict(
                wall=np.clip(rng.uniform(70, 200) + tint, 0, 255),
                floor=np.clip(rng.uniform(50, 170) + rng.uniform(-20, 20, 3), 0, 255),
                horizon=float(rng.uniform(0.35, 0.7)),
                tile=int(rng.integers(6, 16)),
                pole=_colour(rng, CLOTH, 30.0),
                pole_p=float(rng.uniform(0.2, 0.7)),
                window=_colour(rng, CLOTH, 30.0),
                gain=float(rng.uniform(0.85, 1.15)),
                contrast=float(rng.uniform(0.75, 1.15)),
                cast=1.0 + rng.uniform(-0.06, 0.06, 3),
                blur=float(rng.uniform(0.0, 0.9)),
                noise=float(rng.uniform(2.0, 7.0)),
                lowres=bool(rng.random() < 0.3),
                scale=float(rng.uniform(0.88, 0.96)),
                view=c % 3,  # the view this camera mostly sees
                view_p=float(rng.uniform(0.5, 0.75)),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------- rendering


def render_scene(cam: dict, rng: np.random.Generator, h: int, w: int):
    """The camera's background with a pole and a window at random places: a PIL image ``w x h``."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(_background(cam, rng, h, w))
    d = ImageDraw.Draw(img)
    if rng.random() < cam["pole_p"]:  # a pole or door frame
        x = rng.uniform(-0.1, 1.0) * w
        d.rectangle([x, 0, x + w * rng.uniform(0.06, 0.2), h], fill=cam["pole"])
    if rng.random() < 0.3:
        x, y = rng.uniform(-0.2, 0.8) * w, rng.uniform(0, 0.3) * h
        d.rectangle([x, y, x + w * 0.4, y + h * 0.18], fill=cam["window"])
    return img


def _background(cam: dict, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    rows = np.arange(h, dtype=np.float64)[:, None]
    hz = int(h * (cam["horizon"] + rng.uniform(-0.06, 0.06)))
    # Each image varies the camera's scene (time of day, where the crop was cut): mostly brightness, a
    # little hue, so that the background hints at the camera without identifying it.
    wall = np.clip(cam["wall"] + rng.normal(0, 35) + rng.normal(0, 18, 3), 0, 255) * (0.85 + 0.25 * rows / h)
    floor = np.clip(cam["floor"] + rng.normal(0, 35) + rng.normal(0, 18, 3), 0, 255)
    tiles = ((rows - hz + rng.integers(cam["tile"])) // cam["tile"]) % 2 == 0
    col = np.where(rows < hz, wall, floor * np.where(tiles, 1.0, 0.88))  # [h, 3]
    return np.broadcast_to(col[:, None, :], (h, w, 3)).astype(np.uint8)


def _occluder(draw, rng: np.random.Generator, h: int, w: int) -> None:
    colour = tuple(int(v) for v in rng.uniform(30, 220, 3))
    if rng.random() < 0.5:  # something in front of the legs: a bench, a car bonnet
        top = h * rng.uniform(0.62, 0.82)
        draw.rectangle([0, top, w, h], fill=colour)
    else:  # a passer-by or a pillar at one side
        width = w * rng.uniform(0.2, 0.38)
        x0 = 0 if rng.random() < 0.5 else w - width
        draw.rectangle([x0, h * rng.uniform(0.0, 0.3), x0 + width, h], fill=colour)


def render_person(
    a: dict, cam: dict, rng: np.random.Generator, h: int, w: int, occlusion_p: float = 0.0, crop: float = 1.0
) -> np.ndarray:
    """Render identity ``a`` as seen by camera ``cam``: uint8 ``[h, w, 3]`` before camera effects.

    ``crop > 1`` zooms into a random part of the body (badly aligned detections, for junk/distractors).
    """
    from PIL import ImageDraw

    img = render_scene(cam, rng, h, w)
    d = ImageDraw.Draw(img)
    view = VIEWS[cam["view"] if rng.random() < cam["view_p"] else int(rng.integers(3))]
    ph = min(h * cam["scale"] * rng.uniform(0.94, 1.06) * a["height"], 0.98 * h) * crop
    y0 = (h - ph) * rng.uniform(0.2, 0.8) if crop == 1.0 else -rng.uniform(0, max(ph - h, 0.0))
    cx = w / 2 + rng.uniform(-0.07, 0.07) * w
    phase = rng.uniform(-1, 1)  # walking phase: arm swing and stride

    def y(f: float) -> float:
        return y0 + f * ph

    side = view == "side"
    u = ph * a["build"] * (0.22 if side else 0.33) * rng.uniform(0.95, 1.05)  # shoulder width
    rx = 0.055 * ph  # head half-width
    aw, lw = 0.07 * ph, 0.11 * ph * a["build"]  # arm and leg width
    skin, hair, lower = a["skin"], a["hair"], a["lower"]
    bag, bag_c = a["bag"], a["bag_colour"]
    bag_side = a["bag_side"] * (-1 if view == "back" else 1)  # seen from behind, left and right swap

    if a["long_hair"] and view == "front":  # hair falling behind the shoulders
        d.rectangle([cx - rx * 1.15, y(0.05), cx + rx * 1.15, y(0.25)], fill=hair)
    if side and bag == "backpack":
        d.rectangle([cx - u / 2 - 0.1 * ph, y(0.18), cx - u / 2 + 2, y(0.43)], fill=bag_c)

    # Legs (trousers, or skin under shorts/skirt), shoes.
    leg_c = lower if a["lower_type"] == "trousers" else skin
    if side:
        stride = phase * 0.14 * ph
        for s in (-1, 1):
            d.polygon([(cx - lw / 2, y(0.5)), (cx + lw / 2, y(0.5)), (cx + s * stride + lw * 0.4, y(0.93)),
                       (cx + s * stride - lw * 0.4, y(0.93))], fill=leg_c)
            d.ellipse([cx + s * stride - lw * 0.45, y(0.915), cx + s * stride + lw * 0.8, y(0.975)], fill=a["shoes"])
    else:
        stride = phase * 0.02 * ph
        for s in (-1, 1):
            xi, xo = cx + s * 0.01 * ph, cx + s * 0.42 * u
            d.polygon([(xi, y(0.5)), (xo, y(0.5)), (xo + s * stride, y(0.93)), (xi + s * stride, y(0.93))], fill=leg_c)
            xs = sorted((xi + s * stride, xo + s * stride))
            d.ellipse([xs[0] - 1, y(0.91), xs[1] + 1, y(0.975)], fill=a["shoes"])
    if a["lower_type"] == "shorts":
        half = 0.46 * u + (lw / 3 if side else 0)
        d.rectangle([cx - half, y(0.49), cx + half, y(0.68)], fill=lower)
    elif a["lower_type"] == "skirt":
        d.polygon([(cx - 0.45 * u, y(0.48)), (cx + 0.45 * u, y(0.48)), (cx + 0.65 * u + 2, y(0.72)),
                   (cx - 0.65 * u - 2, y(0.72))], fill=lower)
    else:
        d.rectangle([cx - 0.42 * u, y(0.49), cx + 0.42 * u, y(0.56)], fill=lower)

    # Arms (sleeves in the upper colour, then skin).
    sleeve_end = 0.45 if a["long_sleeves"] else 0.26
    if not side:  # (the side view's near arm is drawn over the torso below)
        for xs, s in ((cx - u / 2, -1), (cx + u / 2, 1)):
            swing = -s * phase * 0.03 * ph
            pts = [(xs + s * aw, y(0.17)), (xs, y(0.16)), (xs + swing, y(0.47)), (xs + s * aw + swing, y(0.47))]
            d.polygon(pts, fill=skin)
            f = (sleeve_end - 0.16) / 0.31
            sleeve = [pts[0], pts[1], (xs + swing * f, y(sleeve_end)), (xs + s * aw + swing * f, y(sleeve_end))]
            d.polygon(sleeve, fill=a["upper"])

    # Torso with the identity's pattern, clipped to the torso polygon.
    torso = [(cx - u / 2, y(0.155)), (cx + u / 2, y(0.155)), (cx + 0.42 * u, y(0.5)), (cx - 0.42 * u, y(0.5))]
    d.polygon(torso, fill=a["upper"])
    _pattern(img, a, view, torso, cx, u, y, ph)

    # Straps and bags seen from the front / back.
    if bag == "backpack" and view == "front":
        for s in (-1, 1):
            x = cx + s * 0.3 * u
            d.line([(x, y(0.16)), (x, y(0.4))], fill=bag_c, width=max(1, int(0.025 * ph)))
    elif bag == "shoulder" and not side:
        strap = [(cx - bag_side * 0.35 * u, y(0.16)), (cx + bag_side * 0.45 * u, y(0.47))]
        d.line(strap, fill=bag_c, width=max(1, int(0.015 * ph)))

    # Neck, head, hair, hat.
    d.rectangle([cx - 0.022 * ph, y(0.125), cx + 0.022 * ph, y(0.165)], fill=skin)
    d.ellipse([cx - rx, y(0.0), cx + rx, y(0.14)], fill=hair)
    if view == "front":
        d.ellipse([cx - rx * 0.85, y(0.035) if not a["long_hair"] else y(0.04), cx + rx * 0.85, y(0.142)], fill=skin)
    elif side:
        d.ellipse([cx - rx * 0.3, y(0.04), cx + rx * 1.05, y(0.142)], fill=skin)
    if a["long_hair"] and view == "back":
        d.rectangle([cx - rx * 1.1, y(0.06), cx + rx * 1.1, y(0.26)], fill=hair)
    if a["hat"]:
        d.chord([cx - rx * 1.08, y(-0.015), cx + rx * 1.08, y(0.1)], 180, 360, fill=a["hat_colour"])
        if view != "back":
            x0, x1 = (cx, cx + rx * 1.8) if side else (cx - rx * 1.1, cx + rx * 1.1)
            d.rectangle([x0, y(0.035), x1, y(0.052)], fill=a["hat_colour"])

    if side:  # the near arm swings in front of the torso
        swing = phase * 0.08 * ph
        xs = cx - 0.1 * u
        pts = [(xs, y(0.16)), (xs + aw, y(0.16)), (xs + aw + swing, y(0.46)), (xs + swing, y(0.46))]
        d.polygon(pts, fill=skin)
        f = (sleeve_end - 0.16) / 0.30
        sleeve = [pts[0], pts[1], (xs + aw + swing * f, y(sleeve_end)), (xs + swing * f, y(sleeve_end))]
        d.polygon(sleeve, fill=a["upper"])
    if bag == "backpack" and view == "back":
        d.rectangle([cx - 0.36 * u, y(0.18), cx + 0.36 * u, y(0.44)], fill=bag_c)
        d.line([(cx - 0.36 * u, y(0.27)), (cx + 0.36 * u, y(0.27))], fill=tuple(int(c * 0.7) for c in bag_c), width=1)
    elif bag == "shoulder" and (not side or a["bag_side"] > 0):
        bx = cx + (bag_side * (0.45 * u + 0.05 * ph) if not side else 0.0)
        d.rectangle([bx - 0.055 * ph, y(0.43), bx + 0.055 * ph, y(0.56)], fill=bag_c)

    if occlusion_p > 0 and rng.random() < occlusion_p:
        _occluder(d, rng, h, w)
    pixels = np.asarray(img)
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels  # seen walking the other way


def _pattern(img, a: dict, view: str, torso: list, cx: float, u: float, y, ph: float) -> None:
    """Overlay the upper-clothing pattern (second colour) inside the torso polygon."""
    from PIL import Image, ImageDraw

    pattern = a["pattern"]
    if pattern == "plain":
        return
    if pattern in ("logo", "jacket"):
        if view == "back":  # a chest logo or an open jacket is only visible from the front or side
            return
        d = ImageDraw.Draw(img)
        if pattern == "logo":
            half = 0.22 * u if view == "front" else 0.3 * u
            d.rectangle([cx - half, y(0.22), cx + half, y(0.31)], fill=a["upper2"])
        else:
            half = 0.14 * u
            band = [(cx - half, y(0.16)), (cx + half, y(0.16)), (cx + half * 0.8, y(0.5)), (cx - half * 0.8, y(0.5))]
            d.polygon(band, fill=a["upper2"])
        return
    w, h = img.size
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(torso, fill=255)
    period = max(2.0, a["period"] * ph)
    yy = ((np.arange(h) - torso[0][1]) // period) % 2 == 1
    xx = ((np.arange(w) - cx) // period) % 2 == 1
    if pattern == "hstripes":
        on = np.broadcast_to(yy[:, None], (h, w))
    elif pattern == "vstripes":
        on = np.broadcast_to(xx[None, :], (h, w))
    else:  # checks
        on = yy[:, None] ^ xx[None, :]
    m = np.asarray(mask) & np.where(on, 255, 0).astype(np.uint8)
    img.paste(a["upper2"], mask=Image.fromarray(m))


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian-like blur of a float image ``[h, w, c]``: repeated 3-tap ``[a, 1 - 2a, a]``
    passes whose variances add up to ``sigma ** 2`` (edges replicated). Cheaper than PIL's for small sigma."""
    passes = max(1, int(np.ceil(sigma**2 / (2.0 / 3.0))))  # a <= 1/3 keeps every tap positive
    a = np.float32(sigma**2 / (2.0 * passes))
    for _ in range(passes):
        for axis in (0, 1):
            x = np.moveaxis(x, axis, 0)
            y = x * (1 - 2 * a)
            y[1:] += a * x[:-1]
            y[:-1] += a * x[1:]
            y[0] += a * x[0]
            y[-1] += a * x[-1]
            x = np.moveaxis(y, 0, axis)
    return x


def apply_camera(pixels: np.ndarray, cam: dict, rng: np.random.Generator, noise_bank: np.ndarray):
    """Camera effects on a rendered image: gain, colour cast, contrast, blur, noise, low resolution."""
    from PIL import Image

    h, w, _ = pixels.shape
    x = pixels.astype(np.float32)
    gain = cam["gain"] * rng.uniform(0.92, 1.08)  # per-image lighting change
    x *= (cam["cast"] * gain).astype(np.float32)
    mean = x.mean()
    x = (x - mean) * np.float32(cam["contrast"] * rng.uniform(0.93, 1.07)) + mean
    sigma = cam["blur"] * rng.uniform(0.7, 1.3)
    if sigma > 0.25:
        x = blur(x, sigma)
    oy, ox = rng.integers(noise_bank.shape[0] - h + 1), rng.integers(noise_bank.shape[1] - w + 1)
    x += np.float32(cam["noise"]) * noise_bank[oy : oy + h, ox : ox + w]
    img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    if cam["lowres"]:
        img = img.resize((w // 2, h // 2), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    return img


# ----------------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class _Shot:
    """One image to draw: where it goes, its pid label, who is in it, which camera, how it is cut."""

    folder: str
    pid: int  # label in the file name: > 0 identity, 0 distractor, -1 junk
    person: int  # index into the identities; -1: a stranger (distractors)
    cam: int  # 0-based
    number: int  # per-person image number (seeds the image's randomness)
    crop: float  # 1 normal; > 1 zoomed into part of the body; 0 background only


def _plan(config: SynthConfig) -> list[_Shot]:
    """Every image to draw, in order."""
    c = config
    order = np.random.default_rng([c.seed, 3]).permutation(c.ids) + 1
    train_ids = sorted(order[: c.num_train_ids].tolist())
    test_ids = sorted(order[c.num_train_ids :].tolist())
    train_set, plan = set(train_ids), []
    for pid in train_ids + test_ids:
        rng = np.random.default_rng([c.seed, 4, pid])
        n_cams = int(rng.integers(2, min(c.cams, c.images_per_id // 2) + 1))
        cams = np.sort(rng.choice(c.cams, n_cams, replace=False))
        extra = np.bincount(rng.integers(n_cams, size=c.images_per_id - 2 * n_cams), minlength=n_cams)
        cam_of = np.repeat(cams, 2 + extra)  # at least two images per camera: a query and a gallery match
        query = {int(rng.choice(np.flatnonzero(cam_of == cam))) for cam in cams}  # one per camera (Market)
        for j, cam in enumerate(cam_of.tolist()):
            folder = TRAIN_DIR if pid in train_set else QUERY_DIR if j in query else GALLERY_DIR
            plan.append(_Shot(folder, pid, pid - 1, cam, j, 1.0))
    rng = np.random.default_rng([c.seed, 5])
    n_test = len(test_ids)
    for j in range(n_test if c.distractors < 0 else c.distractors):  # false detections
        crop = float(rng.choice([0.0, 1.6, 2.2]))  # background only, or a stranger cut badly
        plan.append(_Shot(GALLERY_DIR, 0, -1, int(rng.integers(c.cams)), j, crop))
    for j in range(n_test // 10 if c.junk < 0 else c.junk):  # a test identity seen too partially to count
        pid = test_ids[int(rng.integers(n_test))]
        plan.append(_Shot(GALLERY_DIR, -1, pid - 1, int(rng.integers(c.cams)), j, float(rng.uniform(1.8, 2.6))))
    return plan


def render_shot(
    shot: _Shot, config: SynthConfig, people: list[dict], cameras: list[dict], noise_bank: np.ndarray
):
    """The final PIL image of one planned shot (depends only on the seed and the shot)."""
    h, w, cam = config.height, config.width, cameras[shot.cam]
    rng = np.random.default_rng([config.seed, 2, shot.pid + 1, shot.person + 1, shot.number])
    if shot.crop == 0.0:
        pixels = np.asarray(render_scene(cam, rng, h, w))
    else:
        a = people[shot.person] if shot.person >= 0 else random_identity(rng)
        pixels = render_person(a, cam, rng, h, w, config.occlusion_p, crop=shot.crop)
    return apply_camera(pixels, cam, rng, noise_bank)


def _readme(config: SynthConfig, counts: dict[str, int]) -> str:
    c = config
    lines = [
        "Synthetic person re-identification dataset generated by ctfreid (ctfreid.data.synth).",
        "",
        f"Regenerate: ctfreid synth --out DIR --ids {c.ids} --cams {c.cams} --seed {c.seed} "
        f"--images-per-id {c.images_per_id} --height {c.height} --width {c.width} "
        f"--distractors {c.distractors} --junk {c.junk}",
        "",
        "Generator parameters:",
        *[f"  {k} = {v}" for k, v in asdict(c).items()],
        "",
        "Layout (Market-1501): names {pid:04d}_c{camera}s1_{frame:06d}_00.jpg, cameras numbered from 1;",
        "pid 0000 = distractor (background / badly cut stranger), pid -1 = junk (ignored by the metrics).",
        "Train and test identities are disjoint; query holds one image per test identity per camera.",
        "",
        "Images per folder:",
        *[f"  {k}/: {v}" for k, v in counts.items()],
    ]
    return "\n".join(lines) + "\n"


def generate_synthetic(
    out: str | os.PathLike,
    ids: int = 200,
    cams: int = 4,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    **options,
) -> ReIDDataset:
    """Write a synthetic ReID dataset in Market-1501 layout to ``out`` and return it as loaded records.

    ``options`` are the other :class:`SynthConfig` fields (``images_per_id``, ``height``, ``width``,
    ``distractors``, ``junk``...). The same arguments give byte-identical images. The images are written
    to a staging folder inside ``out`` and moved into place at the end, so an interrupted run leaves no
    half dataset. An existing dataset in ``out`` is an error unless ``overwrite``.
    """
    from tqdm import tqdm

    config = SynthConfig(ids=ids, cams=cams, seed=seed, **options)
    out = Path(out)
    targets = [out / TRAIN_DIR, out / QUERY_DIR, out / GALLERY_DIR, out / "README.txt"]
    if any(t.exists() for t in targets) and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset ({TRAIN_DIR}/, {QUERY_DIR}/...): "
                              "use overwrite=True (--overwrite) to replace it")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    h, w = config.height, config.width
    people = make_identities(config.ids, config.seed, config.lookalike_fraction)
    cameras = make_cameras(config.cams, config.seed)
    noise_bank = np.random.default_rng([config.seed, 6]).standard_normal((2 * h, 2 * w, 3), dtype=np.float32)
    plan = _plan(config)

    staging = out / f".synth-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for folder in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR):
            (staging / folder).mkdir(parents=True)
        counts = {TRAIN_DIR: 0, QUERY_DIR: 0, GALLERY_DIR: 0}
        for frame, shot in enumerate(tqdm(plan, desc="synth", unit="img", disable=not progress)):
            img = render_shot(shot, config, people, cameras, noise_bank)
            label = "-1" if shot.pid < 0 else f"{shot.pid:04d}"
            img.save(staging / shot.folder / f"{label}_c{shot.cam + 1}s1_{frame:06d}_00.jpg", "JPEG",
                     quality=config.jpeg_quality)
            counts[shot.folder] += 1

        for t in targets[:3]:
            if t.exists():
                shutil.rmtree(t)
            os.replace(staging / t.name, t)
        with atomic_write(out / "README.txt", "w") as f:
            f.write(_readme(config, counts))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_market_layout(out, name="synthetic")
