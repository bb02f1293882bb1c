"""The run directory of ``ctfreid train``: its file names, and reading a trained model back for inference.

A run directory holds ``config.json``, ``split.json``, ``log.jsonl``, ``checkpoint.pt`` (while training)
and ``model.pt`` (the final weights with the model configuration, the input size and normalisation, the
pid map, the training / validation split and an empty ``thresholds`` slot for DTO). ``load_model`` reads
``model.pt`` (else the latest ``checkpoint.pt``) into an :class:`~ctfreid.learn.model.AiOModel` in eval
mode; it never imports the training loop, so inference needs only the model definition.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ctfreid.data.datasets import SPLITS, split_records  # noqa: F401  (re-exported: the run's splits, torch-free)
from ctfreid.data.transforms import TransformConfig
from ctfreid.errors import CtfreidError
from ctfreid.learn.model import AiOModel, resolve_device

CHECKPOINT, MODEL, CONFIG, SPLIT, LOG = "checkpoint.pt", "model.pt", "config.json", "split.json", "log.jsonl"
THRESHOLDS = "thresholds.json"


def model_path(path: Path) -> Path:
    if path.is_dir():
        for name in (MODEL, CHECKPOINT):  # a finished run, else the latest checkpoint of a running one
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds no {MODEL} or {CHECKPOINT}: expected a run directory of 'ctfreid train'")
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist (expected a run directory or its {MODEL})")
    if not path.is_file():  # reading a FIFO would block forever
        raise CtfreidError(f"model {path} is not a regular file (a device, FIFO or socket): expected a run "
                           f"directory of 'ctfreid train' or its {MODEL}")
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[AiOModel, dict]:
    """Load a trained model in eval mode from a run directory (``model.pt``, else ``checkpoint.pt``) or a file.

    Returns ``(model, info)``; ``info`` has ``file``, ``model_config``, ``height``, ``width``, ``mean``,
    ``std``, ``thresholds`` (None before DTO), ``epoch``, ``train_config``, ``pid_map``, ``data_root``,
    ``train`` and ``val`` (records with paths relative to ``data_root``; ``val`` empty without a split).
    """
    file = model_path(Path(path))
    expected = f"expected a run directory of 'ctfreid train' or its {MODEL}"
    with open(file, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive; anything else is not a model
        raise CtfreidError(f"{file} is not a ctfreid model: {expected}")
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged archive: torch's own advice (weights_only...) would mislead
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CtfreidError(f"{file} is damaged or not a ctfreid model ({first[:120]}): {expected}") from None
    if not isinstance(blob, dict) or "model_config" not in blob or not ({"state_dict", "model"} & set(blob)):
        raise CtfreidError(f"{file} is not a ctfreid model or checkpoint (expected keys model_config and state_dict)")
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


def model_fingerprint(model, info: Mapping) -> str:
    """A hex id of a trained model: SHA-256 of its configuration, input size / normalisation, code lengths
    and every tensor of its state dict. Two models give the same codes iff (practically) same fingerprint."""
    h = hashlib.sha256()
    desc = {"model_config": info.get("model_config"), "height": info.get("height"), "width": info.get("width"),
            "mean": list(info.get("mean", ())), "std": list(info.get("std", ())), "lengths": sorted(model.lengths)}
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]
