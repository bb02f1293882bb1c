"""Person re-identification datasets as plain lists of ``(path, pid, camid)`` records (Sec. 4.1).

Conventions (torchreid / Market-1501 protocol):

- ``camid`` is 0-based: the ``c1`` in a file name becomes camera 0.
- pid ``-1`` is junk (no influence on the metrics), pid ``0`` is a distractor (a false detection).
  Both stay in the gallery, where the metrics handle them; junk is dropped from the training list.
- Loaders keep the original pids everywhere. Training relabels its identities to ``0..C-1`` with
  :func:`relabel_pids` (or ``relabel=True``), after :func:`split_train_val` if a validation split is held
  back (Sec. 4.2: 6 : 4 by identity).

Supported layouts: Market-1501 (``bounding_box_train/``, ``query/``, ``bounding_box_test/``), DukeMTMC-reID
and CUHK03-NP in the same layout, and Market-1501+500k (Market plus an extra folder of distractors that
join the gallery with pid 0).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctfreid.errors import CtfreidError

Record = tuple[str, int, int]

TRAIN_DIR, QUERY_DIR, GALLERY_DIR = "bounding_box_train", "query", "bounding_box_test"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Folder names the Market-1501+500k distractors are found under (torchreid extracts them to ``images/``).
EXTRA_DIRS_500K = ("images", "distractors_500k", "distractors_500k/images", "distractors")

_NAME = re.compile(r"(-?\d+)_c(\d+)")  # '0002_c1s1_000451_03.jpg', '0001_c2_f0046182.jpg', '-1_c3s1_...'
_CAMERA = re.compile(r"_c(\d+)")

MARKET_EXAMPLE = "0002_c1s1_000451_03.jpg"
DUKE_EXAMPLE = "0001_c2_f0046182.jpg"
CUHK03NP_EXAMPLE = "0001_c1s1_000001_00.jpg"


@dataclass
class ReIDDataset:
    """One ReID benchmark: training, query and gallery records ``(path, pid, camid)``."""

    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    name: str = ""
    root: str = ""

    @property
    def num_train_pids(self) -> int:
        """Number of training identities (the classifier size once relabelled)."""
        return len({pid for _, pid, _ in self.train})

    def summary(self) -> str:
        """A small table of identities / images / cameras per split, as torchreid prints it."""
        rows = [("train", self.train), ("query", self.query), ("gallery", self.gallery)]
        lines = [
            f"dataset {self.name or '?'} ({self.root})" if self.root else f"dataset {self.name or '?'}",
            "  ----------------------------------------",
            "  subset   | # ids | # images | # cameras",
            "  ----------------------------------------",
        ]
        for label, records in rows:
            ids = len({pid for _, pid, _ in records})
            cams = len({cam for _, _, cam in records})
            lines.append(f"  {label:<8} | {ids:5d} | {len(records):8d} | {cams:9d}")
        lines.append("  ----------------------------------------")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def parse_name(name: str) -> tuple[int, int] | None:
    """``(pid, camid)`` from a Market/Duke style file name (camid 0-based), or ``None`` if it does not parse."""
    m = _NAME.match(os.path.basename(name))
    if m is None:
        return None
    pid, cam = int(m.group(1)), int(m.group(2))
    if pid < -1 or cam < 1:
        return None
    return pid, cam - 1


def is_image_name(name: str) -> bool:
    """Whether a file name is an image to read: an image extension, and not hidden (``._0002_c1s1_...jpg``,
    the resource forks macOS leaves beside copied files, are skipped as torchreid's ``glob('*.jpg')`` does)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _not_a_folder(path: Path) -> str:
    """What a path that should be a folder is instead (for messages)."""
    if not path.exists():
        return "does not exist"
    return "is a file, not a folder" if path.is_file() else "is not a folder (a device, FIFO or socket)"


def _list_images(folder: Path, example: str) -> list[str]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} {_not_a_folder(folder)}: expected a folder of person crops named like '{example}'"
        )
    names = sorted(
        e.name for e in os.scandir(folder) if e.is_file() and is_image_name(e.name)
    )
    if not names:
        raise CtfreidError(f"image folder {folder} has no images: expected files named like '{example}'")
    return names


def read_folder(folder: str | os.PathLike, example: str = MARKET_EXAMPLE, drop_junk: bool = False) -> list[Record]:
    """Records of every image in ``folder`` whose name gives ``pid`` and camera (``'0002_c1s1_...jpg'``).

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for an empty one or a file name
    that does not parse; both name the folder and an example of the expected name.
    """
    folder = Path(folder)
    records = []
    for name in _list_images(folder, example):
        parsed = parse_name(name)
        if parsed is None:
            raise CtfreidError(
                f"cannot read person id and camera from '{name}' in {folder}: expected names like '{example}'"
                " (pid >= -1, camera >= 1)"
            )
        pid, camid = parsed
        if drop_junk and pid == -1:
            continue
        records.append((str(folder / name), pid, camid))
    if not records:
        raise CtfreidError(f"image folder {folder} has only junk images (pid -1): expected names like '{example}'")
    return records


def read_distractor_folder(folder: str | os.PathLike, default_camid: int = 0) -> list[Record]:
    """Every image in ``folder`` as a distractor (pid 0); the camera is parsed from ``_c<k>`` when present."""
    folder = Path(folder)
    records = []
    for name in _list_images(folder, "00000000_c1s1_000000_00.jpg (any name: all get pid 0)"):
        m = _CAMERA.search(name)
        camid = int(m.group(1)) - 1 if m and int(m.group(1)) >= 1 else default_camid
        records.append((str(folder / name), 0, camid))
    return records


def relabel_pids(records: Sequence[Record]) -> tuple[list[Record], dict[int, int]]:
    """Map the pids of ``records`` to ``0..C-1`` (sorted order) for the classifiers; returns the mapping too."""
    mapping = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in records}))}
    return [(path, mapping[pid], camid) for path, pid, camid in records], mapping


def _find_root(root: Path) -> Path:
    """``root`` itself, or its single sub-folder holding the three Market folders (e.g. an unzipped archive)."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} {_not_a_folder(root)}: expected a folder in Market-1501 "
                                "layout (bounding_box_train/, query/, bounding_box_test/)")
    if (root / TRAIN_DIR).is_dir() or (root / QUERY_DIR).is_dir():
        return root
    nested = [p for p in sorted(root.iterdir()) if p.is_dir() and (p / TRAIN_DIR).is_dir() and (p / QUERY_DIR).is_dir()]
    return nested[0] if len(nested) == 1 else root


def load_market_layout(
    root: str | os.PathLike, name: str = "market1501", example: str = MARKET_EXAMPLE, relabel: bool = False
) -> ReIDDataset:
    """Read ``bounding_box_train/``, ``query/`` and ``bounding_box_test/`` under ``root``.

    Junk (pid -1) is dropped from train only; query and gallery keep every image with its original pid.
    ``relabel=True`` maps the training pids to ``0..C-1``.
    """
    base = _find_root(Path(root))
    missing = [d for d in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR) if not (base / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{base} is not in Market-1501 layout: missing {', '.join(d + '/' for d in missing)}"
            f" (expected {TRAIN_DIR}/, {QUERY_DIR}/, {GALLERY_DIR}/ with images named like '{example}')"
        )
    train = read_folder(base / TRAIN_DIR, example, drop_junk=True)
    if relabel:
        train, _ = relabel_pids(train)
    query = read_folder(base / QUERY_DIR, example)
    gallery = read_folder(base / GALLERY_DIR, example)
    return ReIDDataset(train, query, gallery, name=name, root=str(base))


def load_market1501(root: str | os.PathLike, relabel: bool = False) -> ReIDDataset:
    """Market-1501 (names like ``0002_c1s1_000451_03.jpg``, 6 cameras)."""
    return load_market_layout(root, "market1501", MARKET_EXAMPLE, relabel)


def load_dukemtmcreid(root: str | os.PathLike, relabel: bool = False) -> ReIDDataset:
    """DukeMTMC-reID (names like ``0001_c2_f0046182.jpg``, 8 cameras), same three folders as Market-1501."""
    return load_market_layout(root, "dukemtmcreid", DUKE_EXAMPLE, relabel)


def load_cuhk03np(root: str | os.PathLike, relabel: bool = False) -> ReIDDataset:
    """CUHK03-NP converted to Market-1501 layout (names like ``0001_c1s1_000001_00.jpg``, 2 cameras)."""
    return load_market_layout(root, "cuhk03np", CUHK03NP_EXAMPLE, relabel)


def load_market1501_500k(
    root: str | os.PathLike, relabel: bool = False, extra_dir: str | os.PathLike | None = None
) -> ReIDDataset:
    """Market-1501+500k: Market-1501 plus a folder of extra distractors appended to the gallery with pid 0.

    ``extra_dir`` defaults to the first of ``images/``, ``distractors_500k/``, ``distractors_500k/images/``,
    ``distractors/`` found under ``root`` (torchreid unzips ``distractors_500k.zip`` to ``images/``).
    """
    data = load_market1501(root, relabel)
    base = Path(data.root)
    if extra_dir is None:
        found = [base / d for d in EXTRA_DIRS_500K if (base / d).is_dir()]
        if not found:
            raise FileNotFoundError(
                f"no 500k distractor folder under {base}: expected one of "
                f"{', '.join(d + '/' for d in EXTRA_DIRS_500K)} (from distractors_500k.zip) or pass extra_dir"
            )
        extra_dir = found[0]
    data.gallery = data.gallery + read_distractor_folder(extra_dir)
    data.name = "market1501_500k"
    return data


DATASETS: dict[str, Callable[..., ReIDDataset]] = {
    "market1501": load_market1501,
    "dukemtmcreid": load_dukemtmcreid,
    "cuhk03np": load_cuhk03np,
    "market1501_500k": load_market1501_500k,
}


def load_dataset(root: str | os.PathLike, name: str | None = None, relabel: bool = False, **kwargs) -> ReIDDataset:
    """Load the dataset in ``root``: ``name`` picks a loader from :data:`DATASETS`; ``None`` reads any
    folder in Market-1501 layout (Market, Duke, CUHK03-NP, the synthetic set)."""
    if name is None:
        return load_market_layout(root, name=Path(root).name, relabel=relabel)
    if name not in DATASETS:
        raise CtfreidError(f"unknown dataset {name!r}: expected one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name](root, relabel=relabel, **kwargs)


def split_train_val(
    records: Sequence[Record], val_fraction: float = 0.4, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Split training records by identity (Sec. 4.2: train : val = 6 : 4), deterministically for ``seed``.

    ``round(val_fraction * #ids)`` identities (at least one, and at least one left for training) go to the
    validation list with their original pids and camids, so that it can serve as query + gallery for DTO.
    Record order is preserved within each part.
    """
    if not 0.0 < val_fraction < 1.0:
        raise CtfreidError(f"val_fraction must be in (0, 1), got {val_fraction}")
    pids = np.array(sorted({pid for _, pid, _ in records}), dtype=np.int64)
    if len(pids) < 2:
        raise CtfreidError(f"need at least 2 identities to split by identity, got {len(pids)}")
    n_val = min(max(int(round(val_fraction * len(pids))), 1), len(pids) - 1)
    order = np.random.default_rng(seed).permutation(len(pids))
    val_ids = set(pids[order[:n_val]].tolist())
    train = [r for r in records if r[1] not in val_ids]
    val = [r for r in records if r[1] in val_ids]
    return train, val


# Person crops are small (Market-1501: 128 x 64); a larger picture is refused before it is decoded, so a
# "decompression bomb" (a few KB of PNG that decodes to gigabytes) cannot exhaust memory.
MAX_IMAGE_PIXELS = 40_000_000


def to_rgb(image):
    """A PIL image as 8-bit RGB. 16-bit grey images (modes ``I;16*``, and ``I``, as which older Pillows read
    16-bit PNGs) are scaled from 0..65535 to 0..255 first: Pillow's ``convert("RGB")`` clips them, so that
    every pixel above 255 (nearly all of them) would become white. A mode ``I`` image whose values all lie
    in 0..255 holds 8-bit grey levels (an integer array saved as is): kept, not divided by 257 into black."""
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        from PIL import Image

        values = np.asarray(image).astype(np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values /= 257  # 65535 -> 255, 257 * v -> v
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def read_image(path: str | os.PathLike):
    """Open an image as an RGB ``PIL.Image`` (16-bit ones scaled to 8 bits, :func:`to_rgb`); ``CtfreidError``
    naming the path if it is unreadable, corrupt or larger than ``MAX_IMAGE_PIXELS`` pixels."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path} does not exist")
    if not os.path.isfile(path):  # a folder, a device or a FIFO (reading one would block forever)
        kind = "a directory" if os.path.isdir(path) else "not a regular file (a device, FIFO or socket)"
        raise CtfreidError(f"image {path} is {kind}: expected an image file")
    try:
        with warnings.catch_warnings():  # Pillow warns from 89 megapixels; our own, lower limit speaks instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise CtfreidError(f"image {path} has {w} x {h} pixels, more than the limit of {MAX_IMAGE_PIXELS:,} "
                                   "(ctfreid.data.datasets.MAX_IMAGE_PIXELS): expected a person crop")
            img.load()  # decode now so a truncated file fails here, not inside a DataLoader worker
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, CtfreidError):
            raise
        if isinstance(e, Image.DecompressionBombError):  # refused by Pillow before our size check
            raise CtfreidError(f"image {path} has more pixels than the limit of {MAX_IMAGE_PIXELS:,} "
                               "(ctfreid.data.datasets.MAX_IMAGE_PIXELS): expected a person crop") from None
        raise CtfreidError(f"cannot read image {path}: {e}") from None


def relative_records(records: Sequence[Record], root: str) -> list[list]:
    """Records with paths relative to the data root (the split survives moving the data folder)."""
    return [[os.path.relpath(path, root), int(pid), int(camid)] for path, pid, camid in records]


def resolve_records(records: Sequence[Sequence], root: str | os.PathLike) -> list[Record]:
    """Inverse of the relative form saved in ``split.json`` / checkpoints: paths joined to ``root``."""
    return [(str(Path(root) / path), int(pid), int(camid)) for path, pid, camid in records]


SPLITS = ("query", "gallery", "train", "val")


def split_records(split: str, info: dict, data_root: str | os.PathLike | None = None,
                  dataset: str | None = None) -> list[Record]:
    """Records of ``split``: ``query`` / ``gallery`` / ``train`` (the whole ``bounding_box_train/``) of the
    dataset in ``data_root`` (in Market-1501 layout only that split's folder must exist), or ``val``: the validation identities the run held back (``info`` of
    ``ctfreid.learn.run_dir.load_model`` or of an encoder), read from ``data_root`` (default: the run's data folder)."""
    if split not in SPLITS:
        raise CtfreidError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = data_root if data_root is not None else info.get("data_root")
    if root is None:
        raise CtfreidError("no data folder given (--data) and the model does not record the one it was trained on")
    if split == "val":
        if not info.get("val"):
            raise CtfreidError(
                f"model {info.get('file')} was trained without a validation split: retrain with --val-fraction 0.4 "
                "(Sec. 4.2) to get one"
            )
        return resolve_records(info["val"], load_dataset(root, dataset).root)
    if dataset is None:  # Market-1501 layout: only the split's own folder is needed (a test-only copy works)
        base = _find_root(Path(root))
        folder = {"query": QUERY_DIR, "gallery": GALLERY_DIR, "train": TRAIN_DIR}[split]
        if not (base / folder).is_dir():
            raise FileNotFoundError(f"{base} has no {folder}/ folder, from which the {split} split is read "
                                    f"(Market-1501 layout: {TRAIN_DIR}/, {QUERY_DIR}/, {GALLERY_DIR}/)")
        return read_folder(base / folder, drop_junk=split == "train")  # as load_market_layout reads it
    data = load_dataset(root, dataset)
    return {"query": data.query, "gallery": data.gallery, "train": data.train}[split]
