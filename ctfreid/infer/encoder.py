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

from collections.abc import Sequence

import numpy as np
import torch

from ctfreid.data.datasets import Record
from ctfreid.data.loader import image_loader
from ctfreid.data.transforms import TransformConfig, build_test_transform
from ctfreid.encoded import EncodedSet
from ctfreid.errors import CtfreidError
from ctfreid.learn.model import AiOModel, resolve_device, sign_codes


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
