"""Encoding images with a trained AiO model into the ``.npz`` schema of ``ctfreid.encoded`` (Sec. 3.2, Eq. 2).

For each image the model in eval mode gives ``bn(v_k)`` for every code length; the stored codes are
``b_k = sgn(bn(v_k))`` (Eq. 2) packed with ``numpy.packbits`` (bit 1 for +1), exactly the model's eval
``codes`` output. ``features`` is ``bn(v_1)``, the BN-normalised real-valued feature of the *longest* code:
the "R" (real-valued) counterpart of the longest binary code, the upper bound row of Table 5, and the
``float`` row of ``ctfreid evaluate`` (Euclidean distance). ``v0`` would be the backbone's pooled feature
instead; ``bn(v_1)`` is chosen because it is what the 2048-bit code quantises, so float vs hash2048
isolates the quantisation loss.

``flip=True`` is the usual ReID test-time augmentation (torchreid / fast-reid "flip test"): each image and
its mirror go through the model and their ``bn(v_k)`` are averaged before the sign, so the codes and
features become invariant to a horizontal flip. It doubles the encoding time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .datasets import Record
from .encoded import EncodedSet
from .model import AiOModel, sign_codes
from .train import CHECKPOINT, MODEL, image_loader, resolve_device, resolve_records
from .transforms import TransformConfig, build_test_transform


def _model_path(path: Path) -> Path:
    if path.is_dir():
        for name in (MODEL, CHECKPOINT):  # a finished run, else the latest checkpoint of a running one
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds no {MODEL} or {CHECKPOINT}: expected a run directory of 'ctfreid train'")
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist (expected a run directory or its {MODEL})")
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[AiOModel, dict]:
    """Load a trained model in eval mode from a run directory (``model.pt``, else ``checkpoint.pt``) or a file.

    Returns ``(model, info)``; ``info`` has ``file``, ``model_config``, ``height``, ``width``, ``mean``,
    ``std``, ``thresholds`` (None before DTO), ``epoch``, ``train_config``, ``pid_map``, ``data_root``,
    ``train`` and ``val`` (records with paths relative to ``data_root``; ``val`` empty without a split).
    """
    file = _model_path(Path(path))
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {file} as a ctfreid model or checkpoint: {e}") from None
    if not isinstance(blob, dict) or "model_config" not in blob or not ({"state_dict", "model"} & set(blob)):
        raise ValueError(f"{file} is not a ctfreid model or checkpoint (expected keys model_config and state_dict)")
    train_config = blob.get("train_config") or blob.get("config") or {}
    size = blob.get("input") or {"height": train_config.get("height", 256), "width": train_config.get("width", 128)}
    defaults = TransformConfig()
    info = {
        "file": str(file),
        "model_config": dict(blob["model_config"]),
        "height": int(size["height"]),
        "width": int(size["width"]),
        "mean": tuple(size.get("mean", defaults.mean)),
        "std": tuple(size.get("std", defaults.std)),
        "thresholds": blob.get("thresholds"),
        "epoch": blob.get("epoch"),
        "train_config": train_config,
        "pid_map": blob.get("pid_map", {}),
        "data_root": blob.get("data_root"),
        "train": blob.get("train", []),
        "val": blob.get("val", []),
    }
    model = AiOModel(**info["model_config"])
    model.load_state_dict(blob["state_dict"] if "state_dict" in blob else blob["model"])
    return model.to(resolve_device(str(device)) if isinstance(device, str) else device).eval(), info


@torch.no_grad()
def encode_records(model: AiOModel, records: Sequence[Record], batch_size: int | None = None, height: int = 256,
                   width: int = 128, device: str | torch.device = "cpu", num_workers: int = 0,
                   progress: bool = False, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, flip: bool = False) -> EncodedSet:
    """Encode ``(path, pid, camid)`` records: packed ``sgn(bn(v_k))`` codes (Eq. 2) for every length and
    ``features = bn(v_1)`` of the longest code, with the records' pids, camids and paths.

    ``height`` / ``width`` (and ``mean`` / ``std``) must be those the model was trained with (``info`` of
    :func:`load_model`). ``flip`` averages ``bn(v_k)`` of each image and its mirror before the sign (see
    the module docstring). ``batch_size`` defaults to 8 on CPU (large batches of 256 x 128 activations are
    slower there: memory is mapped and unmapped for every batch) and 128 on CUDA. An unreadable image
    raises ``ValueError`` / ``FileNotFoundError`` naming it.
    """
    if not records:
        raise ValueError("no images to encode (empty list of records)")
    dev = resolve_device(device) if isinstance(device, str) else device
    batch_size = batch_size or (128 if dev.type == "cuda" else 8)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    defaults = TransformConfig()
    tc = TransformConfig(height=height, width=width, mean=tuple(mean or defaults.mean), std=tuple(std or defaults.std))
    loader = image_loader(records, build_test_transform(tc), batch_size=batch_size, num_workers=num_workers,
                          pin_memory=dev.type == "cuda")
    was_training = model.training
    model.eval()
    lengths = model.lengths
    codes: dict[int, list[np.ndarray]] = {length: [] for length in lengths}
    features: list[np.ndarray] = []
    from tqdm import tqdm

    with tqdm(total=len(records), desc="encoding", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for images, _, _, _ in loader:
            images = images.to(dev, non_blocking=True)
            bn = model(images)["bn"]
            if flip:
                mirrored = model(images.flip(3))["bn"]
                bn = {length: (bn[length] + mirrored[length]) * 0.5 for length in lengths}
            for length in lengths:  # Eq. 2, as the model's eval codes
                codes[length].append(np.packbits(sign_codes(bn[length]).cpu().numpy() > 0, axis=1))
            features.append(bn[lengths[0]].float().cpu().numpy())
            bar.update(len(images))
    model.train(was_training)
    return EncodedSet(
        codes={length: np.concatenate(parts) for length, parts in codes.items()},
        pids=np.array([pid for _, pid, _ in records], dtype=np.int64),
        camids=np.array([camid for _, _, camid in records], dtype=np.int64),
        features=np.concatenate(features).astype(np.float32),
        paths=np.array([path for path, _, _ in records], dtype=str),
    )


SPLITS = ("query", "gallery", "train", "val")


def split_records(split: str, info: dict, data_root: str | os.PathLike | None = None,
                  dataset: str | None = None) -> list[Record]:
    """Records of ``split``: ``query`` / ``gallery`` / ``train`` (the whole ``bounding_box_train/``) of the
    dataset in ``data_root``, or ``val``: the validation identities the run held back (``info`` of
    :func:`load_model`), read from ``data_root`` (default: the run's data folder)."""
    from .datasets import load_dataset

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = data_root if data_root is not None else info.get("data_root")
    if root is None:
        raise ValueError("no data folder given (--data) and the model does not record the one it was trained on")
    if split == "val":
        if not info.get("val"):
            raise ValueError(
                f"model {info.get('file')} was trained without a validation split: retrain with --val-fraction 0.4 "
                "(Sec. 4.2) to get one"
            )
        return resolve_records(info["val"], load_dataset(root, dataset).root)
    data = load_dataset(root, dataset)
    return {"query": data.query, "gallery": data.gallery, "train": data.train}[split]
