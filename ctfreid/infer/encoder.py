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

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ctfreid.data.datasets import Record, to_rgb
from ctfreid.encoded import EncodedSet
from ctfreid.errors import CtfreidError

if TYPE_CHECKING:  # torch is imported lazily: the ONNX path of load_encoder must work without it
    import torch

    from ctfreid.learn.model import AiOModel
    from ctfreid.search.asymmetric import WeightedFit


def encode_records(model: AiOModel, records: Sequence[Record], batch_size: int | None = None, height: int = 256,
                   width: int = 128, device: str | torch.device = "cpu", num_workers: int = 0,
                   progress: bool = False, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, flip: bool = False) -> EncodedSet:
    """Encode ``(path, pid, camid)`` records: packed ``sgn(bn(v_k))`` codes (Eq. 2) for every length,
    ``features = bn(v_1)`` of the longest code, ``values = bn(v)`` of the shortest and ``later_values`` of the
    lengths between (for weighted stages), with the records' pids, camids and paths.

    ``height`` / ``width`` (and ``mean`` / ``std``) must be those the model was trained with (``info`` of
    :func:`load_model`). ``flip`` averages ``bn(v_k)`` of each image and its mirror before the sign (see
    the module docstring). ``batch_size`` defaults to 8 on CPU (large batches of 256 x 128 activations are
    slower there: memory is mapped and unmapped for every batch) and 128 on CUDA. An unreadable image
    raises ``ValueError`` / ``FileNotFoundError`` naming it.
    """
    import torch

    from ctfreid.data.loader import image_loader
    from ctfreid.data.transforms import TransformConfig, build_test_transform
    from ctfreid.learn.model import resolve_device, sign_codes

    if not records:
        raise CtfreidError("no images to encode (empty list of records)")
    dev = resolve_device(device) if isinstance(device, str) else device
    batch_size = batch_size or (128 if dev.type == "cuda" else 8)
    if batch_size < 1:
        raise CtfreidError(f"batch_size must be >= 1, got {batch_size}")
    defaults = TransformConfig()
    tc = TransformConfig(height=height, width=width, mean=tuple(mean or defaults.mean), std=tuple(std or defaults.std))
    loader = image_loader(records, build_test_transform(tc), batch_size=batch_size, num_workers=num_workers,
                          pin_memory=dev.type == "cuda")
    was_training = model.training
    model.eval()
    lengths = model.lengths
    codes: dict[int, list[np.ndarray]] = {length: [] for length in lengths}
    features: list[np.ndarray] = []
    values: dict[int, list[np.ndarray]] = {length: [] for length in _valued(lengths)}  # weighted stages' query side
    from tqdm import tqdm

    with torch.no_grad(), tqdm(total=len(records), desc="encoding", unit="img", disable=not progress,
                               dynamic_ncols=True) as bar:
        for images, _, _, _ in loader:
            images = images.to(dev, non_blocking=True)
            bn = model(images)["bn"]
            if flip:
                mirrored = model(images.flip(3))["bn"]
                bn = {length: (bn[length] + mirrored[length]) * 0.5 for length in lengths}
            for length in lengths:  # Eq. 2, as the model's eval codes
                codes[length].append(np.packbits(sign_codes(bn[length]).cpu().numpy() > 0, axis=1))
            features.append(bn[max(lengths)].float().cpu().numpy())  # the longest code's bn(v)
            for length in values:
                values[length].append(bn[length].float().cpu().numpy())
            bar.update(len(images))
    model.train(was_training)
    return EncodedSet(
        codes={length: np.concatenate(parts) for length, parts in codes.items()},
        pids=np.array([pid for _, pid, _ in records], dtype=np.int64),
        camids=np.array([camid for _, _, camid in records], dtype=np.int64),
        features=np.concatenate(features).astype(np.float32),
        paths=np.array([path for path, _, _ in records], dtype=str),
        **_values_of({length: np.concatenate(parts) for length, parts in values.items()}),
    )


# --- one entry point for torch run directories and ONNX exports -----------------------------------------------


class Encoder(Protocol):
    """What :func:`load_encoder` returns, for a torch run directory and for an ONNX export alike.

    ``fingerprint`` is the run's :func:`ctfreid.learn.run_dir.model_fingerprint` (an ONNX export carries its
    run's, so indexes built with the run accept the export); ``lengths`` shortest first; ``thresholds`` the
    DTO thresholds (Sec. 3.3) stored with the model, or None (a run's ``thresholds.json`` is read when first
    used), and ``thresholds_source`` the file they come from; ``info`` everything else (file, backbone, mean,
    std, ...). Codes are packed ``sgn(bn(v_k))`` (Eq. 2); ``features`` is ``bn(v_1)`` of the longest code.
    """

    fingerprint: str
    lengths: list[int]
    height: int
    width: int
    flip: bool
    thresholds: dict[int, int] | None
    weighted: WeightedFit | None  # stored thresholds of a weighted stage 1 and their Weighting
    thresholds_source: str
    info: dict

    def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> EncodedSet: ...

    def encode_records(self, records: Sequence[Record], batch_size: int = 32, progress: bool = False) -> EncodedSet: ...


def encoded_from_bn(bn: dict[int, np.ndarray], records: Sequence[Record] | None = None) -> EncodedSet:
    """``{L: bn(v_L)}`` float arrays -> an :class:`EncodedSet`: packed ``sgn`` codes (Eq. 2, ``sgn(0) = +1`` as
    :func:`ctfreid.learn.model.sign_codes`) and ``features = bn(v_1)`` of the longest length; labels from
    ``records`` or -1 (and no paths) for bare images."""
    n = next(iter(bn.values())).shape[0]
    return EncodedSet(
        codes={length: np.packbits(values >= 0, axis=1) for length, values in bn.items()},
        pids=np.array([pid for _, pid, _ in records], dtype=np.int64) if records is not None else np.full(n, -1),
        camids=np.array([c for _, _, c in records], dtype=np.int64) if records is not None else np.full(n, -1),
        features=np.ascontiguousarray(bn[max(bn)], dtype=np.float32),
        paths=np.array([path for path, _, _ in records], dtype=str) if records is not None else None,
        **_values_of({length: bn[length] for length in _valued(sorted(bn))}),
    )


def _valued(lengths: list[int]) -> list[int]:
    """The lengths whose bn(v) an encoded set keeps as values: the shortest and the middle ones (weighted
    stages; the longest's is ``features``)."""
    return [lengths[0], *lengths[1:-1]]


def _values_of(bn: dict[int, np.ndarray]) -> dict:
    """``EncodedSet``'s ``values`` (the shortest length's bn(v)) and ``later_values`` (the others') from ``{L:
    bn(v_L)}``."""
    v = {L: np.ascontiguousarray(a, dtype=np.float32) for L, a in sorted(bn.items())}
    return {"values": v.pop(min(v)), "later_values": v}


def stored_fits(info: dict, path: str | os.PathLike | None = None
                ) -> tuple[dict[int, int] | None, WeightedFit | None]:
    """The thresholds kept with a model and the weighted stage 1 beside them (a
    ``ctfreid.search.asymmetric.WeightedFit``, or None): the model file's ``thresholds`` (with none), else the
    ``thresholds.json`` (written by ``ctfreid calibrate`` / ``ctfreid demo``) in the run directory ``path``,
    read once: its Hamming thresholds and its ``"weighted_stage1"``; ``(None, None)`` if neither exists."""
    thr = info.get("thresholds")
    if thr:
        return {int(k): int(v) for k, v in thr.items()}, None
    file = thresholds_file(info, path)
    if file is None:
        return None, None
    from ctfreid.search.thresholds import read_thresholds_file

    fits = read_thresholds_file(file)
    return fits.hamming_thresholds(file), fits.weighted_fit


def thresholds_file(info: dict, path: str | os.PathLike | None = None) -> Path | None:
    """The ``thresholds.json`` that :func:`stored_fits` reads (the model file has none), or None."""
    if info.get("thresholds") or path is None:
        return None
    file = (Path(path) if Path(path).is_dir() else Path(path).parent) / "thresholds.json"
    return file if file.is_file() else None


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CtfreidError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


class TorchEncoder:
    """A trained run directory (or its ``model.pt``) as an :class:`Encoder` on torch."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", flip: bool | None = None) -> None:
        from ctfreid.learn.run_dir import load_model, model_fingerprint

        self.model, info = load_model(path, device=device)
        self.device = next(self.model.parameters()).device
        self.fingerprint: str = model_fingerprint(self.model, info)
        self.lengths: list[int] = sorted(self.model.lengths)
        self.height: int = int(info["height"])
        self.width: int = int(info["width"])
        self.flip: bool = bool(flip)  # a run directory has no flip setting of its own
        self._path = path
        self.info = {**info, "backbone": self.model.backbone_name, "runtime": "torch", "device": str(self.device)}

    @functools.cached_property
    def _stored(self) -> tuple:
        """Read when first used, so that a malformed ``thresholds.json`` fails only the commands that use it."""
        return stored_fits(self.info, self._path)

    @property
    def thresholds(self) -> dict[int, int] | None:
        """The thresholds stored with the run (:func:`stored_fits`), or None."""
        return self._stored[0]

    @property
    def weighted(self) -> WeightedFit | None:
        """The stored weighted stage 1 beside :attr:`thresholds` (:func:`stored_fits`), or None."""
        return self._stored[1]

    @property
    def thresholds_source(self) -> str:
        """Where :attr:`thresholds` come from: the model file or the run's ``thresholds.json``."""
        return str(thresholds_file(self.info, self._path) or self.info["file"])

    def _transform(self):
        from ctfreid.data.transforms import TransformConfig, build_test_transform

        return build_test_transform(TransformConfig(height=self.height, width=self.width,
                                                    mean=tuple(self.info["mean"]), std=tuple(self.info["std"])))

    def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> EncodedSet:
        """Codes (Eq. 2) and features of decoded images (converted to RGB); pids / camids -1, no paths."""
        import torch

        _check_batch_size(batch_size)
        if len(images) == 0:
            raise CtfreidError("no images to encode (empty list of images)")
        tf = self._transform()
        parts: dict[int, list[np.ndarray]] = {length: [] for length in self.lengths}
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = torch.stack([tf(to_rgb(im)) for im in images[i:i + batch_size]]).to(self.device)
                bn = self.model(x)["bn"]
                if self.flip:
                    mirrored = self.model(x.flip(3))["bn"]
                    bn = {length: (bn[length] + mirrored[length]) * 0.5 for length in self.lengths}
                for length in self.lengths:
                    parts[length].append(bn[length].float().cpu().numpy())
        return encoded_from_bn({length: np.concatenate(p) for length, p in parts.items()})

    def encode_records(self, records: Sequence[Record], batch_size: int = 32, progress: bool = False) -> EncodedSet:
        """Codes and features of ``(path, pid, camid)`` records read from disk (errors name the file)."""
        return encode_records(self.model, records, batch_size=_check_batch_size(batch_size), height=self.height,
                              width=self.width, device=self.device, progress=progress, mean=self.info["mean"],
                              std=self.info["std"], flip=self.flip)


def is_onnx_file(path: str | os.PathLike) -> bool:
    """A ``*.onnx`` path (the ONNX encoder of ``ctfreid export``) rather than a run directory / model.pt."""
    return Path(path).suffix.lower() == ".onnx"


def load_encoder(path: str | os.PathLike, *, device: str = "cpu", flip: bool | None = None,
                 threads: int | None = None) -> Encoder:
    """A run directory / ``model.pt`` -> a torch encoder; a ``*.onnx`` file written by ``ctfreid export`` -> an
    onnxruntime encoder (imports no torch; CUDA provider when ``device`` asks for it and it is available).

    ``flip=None``: the file's own setting (an ONNX export made with ``--flip`` has the flip test in its
    graph; a run directory has none, so False). ``threads`` bounds onnxruntime's intra-op threads (torch:
    ``torch.set_num_threads`` is the caller's).
    """
    if is_onnx_file(path):
        from ctfreid.infer.onnx_encoder import OnnxEncoder

        return OnnxEncoder(path, device=device, flip=flip, threads=threads)
    return TorchEncoder(path, device=device, flip=flip)
