"""Training the AiO model (Sec. 3.2, Eq. 5) with the recipe of Sec. 4.2, checkpoints, resume and a fast CPU path.

``train(config, data_root, out_dir)`` trains on the ``bounding_box_train/`` records of a Market-1501-layout
folder and writes to ``out_dir`` (the "run directory"):

- ``config.json``: the :class:`TrainConfig` of the run;
- ``split.json``: the training and (when ``val_fraction > 0``) validation records, by identity, with paths
  relative to the data root, so that ``ctfreid encode --split val`` and DTO use exactly the held-out ids;
- ``log.jsonl``: JSON lines with a ``type``: ``"epoch"`` (mean loss terms of Eq. 5, lr, images/s, time,
  and the part of it spent waiting for input batches: near ``time_s`` means input-bound, add workers; the
  tanh scale s of the epoch and ``mean_abs_code``, the mean ``|tanh(s * bn(v))|`` per code length: 1 for
  saturated codes),
  ``"iter"`` (every ``log_every`` iterations) and ``"cache"`` (building or loading the stem cache);
- ``checkpoint.pt``: model, optimiser, epoch, RNG states, config, pid relabel map and split, rewritten
  atomically after every epoch; re-running the same command continues from it;
- ``model.pt``: the final weights with the model configuration, the input size and an empty
  ``thresholds`` slot for DTO (read by :func:`ctfreid.infer.encoder.load_model`).

Recipe (Sec. 4.2, the defaults): ResNet-50, codes 2048/512/128/32 in a pyramid with self-distillation,
lambda1 = 1, lambda2 = 1000, T = 1, margin 0.3; Adam, lr 3.5e-4, weight decay 5e-4; linear warm-up over 10
epochs from ``lr * warmup_factor`` (0.01) to ``lr``, then x0.1 at epochs 40 and 70 (so 0.01x after 70),
120 epochs; PK batches of 16 identities x 4 images; 256 x 128 input, flip, pad + crop, random erasing.
The lr is a pure function of the epoch (:func:`learning_rate`), set at the start of every epoch.

Determinism. Every epoch starts by seeding Python's ``random``, NumPy and torch from ``(seed, epoch)``, the
PK sampler's order depends only on ``(seed, epoch)`` and DataLoader workers are seeded from a generator
seeded the same way. A run is thus a function of its config, and stopping after epoch e and resuming
gives the same parameters as an uninterrupted run (the RNG states are saved in the checkpoint as well).

Fast CPU path (``frozen_stages > 0`` with ``cache_stem=True``). The first ``frozen_stages`` backbone stages
(``model.stem``) are frozen and in eval mode, so their output for an image never changes. It is computed
once per training image, for the image and its horizontal mirror (flip is the main augmentation of Sec.
4.2), and kept in memory as float16 (and on disk in ``cache_dir``, default ``RUN_DIR/cache``, keyed by a
hash of the stem weights, input size and image list, so resumed runs and ablations sharing ``cache_dir``
skip it). Training then runs only the body and the code pyramid on cached maps: each step costs a
fraction of a full forward/backward and no JPEG is decoded. Pixel-level pad + crop and random erasing are
replaced by their feature-map equivalents: a random translation by up to ``feature_shift`` cells (zero
padding, then crop back) and random erasing of a rectangle of the map (set to 0). Trade-off: the frozen
layers are not adapted to person images, a translation step is a whole stem stride (8 or 16 px) rather
than any pixel offset, and an erased cell removes a receptive field rather than a sharp pixel block; in
exchange an epoch is many times faster, which on a 2-core CPU buys far more epochs. Lower ``height`` /
``width`` cut the cost of either path further. On a CPU shared with other jobs, ``threads=1`` is often
several times faster than two threads (OpenMP threads wait for each other on busy cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctfreid._atomic import atomic_write
from ctfreid.codes import check_length
from ctfreid.data.datasets import (
    Record,
    load_dataset,
    relabel_pids,
    relative_records,
    resolve_records,
    split_train_val,
)
from ctfreid.data.loader import image_loader
from ctfreid.data.sampler import PKSampler
from ctfreid.data.transforms import (
    TransformConfig,
    build_test_transform,
    build_train_transform,
)
from ctfreid.errors import CtfreidError, count
from ctfreid.learn.losses import LossConfig, aio_loss
from ctfreid.learn.model import AiOModel, resolve_device
from ctfreid.learn.run_dir import CHECKPOINT, CONFIG, LOG, MODEL, SPLIT, THRESHOLDS
from ctfreid.learn.self_distillation import PROB_TEACHERS, SIM_TEACHERS

# Settings that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = frozenset({"epochs", "device", "num_workers", "log_every", "cache_dir", "threads"})


def _f(default, help: str, **kw):
    """A dataclass field with CLI help text (``ctfreid train`` builds its flags from these)."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the paper's recipe (Sec. 4.2)."""

    # model (Sec. 3.2)
    backbone: str = _f("resnet50", "backbone: resnet50 (paper), resnet18 or mobilenet_v2", choices=("resnet50", "resnet18", "mobilenet_v2"))
    lengths: tuple[int, ...] = _f((2048, 512, 128, 32), "code lengths in bits (multiples of 32)")
    pyramid: bool = _f(True, "code pyramid v_k = FC_k(v_{k-1}) (Eq. 1); off = independent heads on v0 (Table 5)")
    weights: str | None = _f(None, "backbone weights: a torchvision state dict file, 'imagenet' (download) or none")
    frozen_stages: int = _f(0, "freeze the first N backbone stages (kept in eval mode)")
    last_stride: int | None = _f(None, "stride of the last backbone stage (default: 1 for ResNet, 2 for MobileNetV2)")
    # loss (Eq. 5)
    self_distillation: bool = _f(True, "probability and similarity self-distillation (Eqs. 3-4; Table 5 SD)")
    lambda1: float = _f(1.0, "weight of the probability distillation (Eq. 5)")
    lambda2: float = _f(1000.0, "weight of the similarity distillation (Eq. 5)")
    temperature: float = _f(1.0, "temperature T of Eq. 3")
    margin: float = _f(0.3, "batch-hard triplet margin")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy (0 = the paper's)")
    triplet_distance: str = _f("hamming", "triplet distance on the relaxed codes", choices=("hamming", "euclidean"))
    prob_teacher: str = _f("next", "teacher of Eq. 3: next (code k teaches k+1, the paper) or longest (teaches all)",
                           choices=PROB_TEACHERS)
    sim_teacher: str = _f("next", "teacher of Eq. 4: next (the paper), longest, or v0 (the real-valued feature "
                          "teaches every code)", choices=SIM_TEACHERS)
    quantization_weight: float = _f(0.0, "weight of the quantisation loss mean (|tanh code| - 1)^2, summed over codes")
    balance_weight: float = _f(0.0, "weight of the bit-balance loss mean_bit (batch mean of the bit)^2, summed over codes")
    decorrelation_weight: float = _f(0.0, "weight of the bit-decorrelation loss (off-diagonal of t^T t / B), summed over codes")
    shortest_weight: float = _f(1.0, "weight of the shortest code's cross-entropy and triplet terms (1 = Eq. 5; more "
                                 "gives the code that carries CtF's first stage a larger share of the gradient)")
    tanh_scale_end: float = _f(1.0, "HashNet-style continuation: the training codes are tanh(s * bn(v)) with s growing "
                               "geometrically from 1 at the first epoch to this value at the last (1 = off, the "
                               "paper's tanh(bn(v))); pushes the relaxed codes towards their signs")
    detach_heads: bool = _f(False, "every code head but the longest takes its input detached (light-reid): the "
                            "shorter codes' losses train their own heads only, the backbone learns from the "
                            "longest code's losses alone")
    # optimisation (Sec. 4.2)
    lr: float = _f(3.5e-4, "Adam learning rate after warm-up")
    weight_decay: float = _f(5e-4, "Adam weight decay (L2)")
    decay_bn: bool = _f(True, "weight decay on every trained parameter (the paper); --no-decay-bn: none on "
                        "BatchNorm weights and biases nor on any bias (the usual practice)")
    warmup_epochs: int = _f(10, "linear warm-up epochs, from lr * warmup_factor to lr")
    warmup_factor: float = _f(0.01, "lr multiplier of the first warm-up epoch")
    milestones: tuple[int, ...] = _f((40, 70), "epochs at which the lr is multiplied by gamma")
    gamma: float = _f(0.1, "lr decay factor at each milestone")
    epochs: int = _f(120, "number of epochs (an epoch = every PK batch the sampler forms once)")
    # data (Sec. 4.2)
    p: int = _f(16, "identities per batch (P)")
    k: int = _f(4, "images per identity in a batch (K)")
    height: int = _f(256, "input height in pixels")
    width: int = _f(128, "input width in pixels")
    flip_p: float = _f(0.5, "horizontal flip probability")
    padding: int = _f(10, "pixels of padding before the random crop (0 = off; not used with --cache-stem)")
    erasing_p: float = _f(0.5, "random erasing probability (on the feature map with --cache-stem)")
    val_fraction: float = _f(0.0, "hold this fraction of the training identities back as a validation split (paper: 0.4)")
    # fast CPU path
    cache_stem: bool = _f(False, "cache the frozen stem's outputs (needs --frozen-stages > 0) and train on them")
    cache_dir: str | None = _f(None, "folder of the stem cache (default RUN_DIR/cache; may be shared by runs)")
    feature_shift: int = _f(1, "random translation of cached feature maps, in cells (0 = off)")
    # run
    seed: int = _f(0, "random seed (model init, sampler, augmentation, split)")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    num_workers: int = _f(2, "DataLoader worker processes for image decoding (0 = in the main process)")
    log_every: int = _f(20, "write a log line every N iterations (0 = per epoch only)")
    threads: int = _f(0, "torch CPU threads while training (0 = torch's default; 1 is fastest on a busy machine)")

    def __post_init__(self) -> None:
        self.lengths = tuple(int(x) for x in self.lengths)
        self.milestones = tuple(int(x) for x in self.milestones)
        c = self
        checks = [
            (c.epochs >= 1, f"epochs must be >= 1, got {c.epochs}"),
            (c.p >= 2 and c.k >= 1, f"P must be >= 2 and K >= 1 (batch-hard triplet needs negatives), got P={c.p}, K={c.k}"),
            (c.lr > 0 and c.weight_decay >= 0, f"lr must be > 0 and weight_decay >= 0, got {c.lr} and {c.weight_decay}"),
            (c.warmup_epochs >= 0 and 0 < c.warmup_factor <= 1,
             f"warmup_epochs must be >= 0 and warmup_factor in (0, 1], got {c.warmup_epochs} and {c.warmup_factor}"),
            (list(c.milestones) == sorted(c.milestones), f"milestones must be ascending, got {list(c.milestones)}"),
            (0 < c.gamma <= 1, f"gamma must be in (0, 1], got {c.gamma}"),
            (0.0 <= c.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {c.val_fraction}"),
            (c.height >= 16 and c.width >= 16, f"height and width must be >= 16 pixels, got {c.height} x {c.width}"),
            (min(c.feature_shift, c.num_workers, c.log_every, c.threads, c.frozen_stages) >= 0,
             "feature_shift, num_workers, log_every, threads and frozen_stages must be >= 0"),
            (not c.cache_stem or c.frozen_stages > 0,
             "cache_stem needs frozen_stages > 0 (only a frozen stem can be cached)"),
            (len(c.lengths) > 0 and len(set(c.lengths)) == len(c.lengths),
             f"lengths must be one or more distinct values, got {list(c.lengths)}"),
            (0 <= c.seed < 2**32, f"seed must be an integer in [0, 2**32) (NumPy's seeds), got {c.seed}"),
            (all(m >= 0 for m in c.milestones), f"milestones must be epochs >= 0, got {list(c.milestones)}"),
            # the loss weights of Eq. 5 and T of Eq. 3: refused now, not as a NaN loss after the data is ready
            (c.temperature > 0 and c.margin >= 0 and c.lambda1 >= 0 and c.lambda2 >= 0,
             f"temperature must be > 0 and margin, lambda1, lambda2 >= 0, got {c.temperature}, {c.margin}, "
             f"{c.lambda1}, {c.lambda2}"),
            (min(c.quantization_weight, c.balance_weight, c.decorrelation_weight) >= 0,
             "quantization_weight, balance_weight and decorrelation_weight must be >= 0"),
            (c.shortest_weight > 0, "shortest_weight must be > 0"),
            (c.tanh_scale_end >= 1.0, f"tanh_scale_end must be >= 1 (1 = off), got {c.tanh_scale_end}"),
            (c.prob_teacher in PROB_TEACHERS and c.sim_teacher in SIM_TEACHERS,
             (f"prob_teacher must be one of {list(PROB_TEACHERS)} and sim_teacher one of {list(SIM_TEACHERS)}, "
              f"got {c.prob_teacher!r} and {c.sim_teacher!r}")),
            (0.0 <= c.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {c.label_smoothing}"),
        ]
        nonfinite = [f.name for f in dataclasses.fields(c)
                     if isinstance(getattr(c, f.name), float) and not math.isfinite(getattr(c, f.name))]
        if nonfinite:
            raise CtfreidError(f"{', '.join(nonfinite)} must be finite numbers, got "
                               + ", ".join(str(getattr(c, n)) for n in nonfinite))
        for ok, message in checks:
            if not ok:
                raise CtfreidError(message)
        for length in c.lengths:
            check_length(length, "code length (--lengths)")
        TransformConfig(self.height, self.width, self.flip_p, self.padding, self.erasing_p)  # validates those
        if self.weights is not None and self.weights.lower() == "none":
            self.weights = None
        resolve_device(self.device)

    def loss_config(self) -> LossConfig:
        return LossConfig(
            margin=self.margin, lambda1=self.lambda1, lambda2=self.lambda2, temperature=self.temperature,
            self_distillation=self.self_distillation, label_smoothing=self.label_smoothing,
            triplet_distance=self.triplet_distance, prob_teacher=self.prob_teacher, sim_teacher=self.sim_teacher,
            quantization_weight=self.quantization_weight, balance_weight=self.balance_weight,
            decorrelation_weight=self.decorrelation_weight, shortest_weight=self.shortest_weight,
        )

    def transform_config(self) -> TransformConfig:
        return TransformConfig(self.height, self.width, self.flip_p, self.padding, self.erasing_p)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lengths"], d["milestones"] = list(self.lengths), list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise CtfreidError(f"unknown training settings {unknown}; known: {sorted(names)}")
        return cls(**values)


def config_field_types() -> dict[str, object]:
    """Resolved type hints of :class:`TrainConfig` (used to build CLI flags)."""
    return typing.get_type_hints(TrainConfig)


# ---------------------------------------------------------------------------------------------- helpers
def learning_rate(config: TrainConfig, epoch: int) -> float:
    """lr of 0-based ``epoch`` (Sec. 4.2): linear warm-up, then x gamma at each milestone reached."""
    factor = config.gamma ** sum(epoch >= m for m in config.milestones)
    if epoch < config.warmup_epochs:
        alpha = epoch / config.warmup_epochs
        factor *= config.warmup_factor * (1.0 - alpha) + alpha
    return config.lr * factor


def tanh_scale(config: TrainConfig, epoch: int) -> float:
    """s of the training codes ``tanh(s * bn(v))`` in 0-based ``epoch``: ``S ** (epoch / (epochs - 1))`` with
    ``S = config.tanh_scale_end``, so 1 in the first epoch and S in the last (HashNet's continuation, Cao et al.
    2017, on an epoch grid and geometric; 1 throughout with the default S = 1 or a 1-epoch run). The schedule
    follows ``epochs``: resuming with another ``--epochs`` changes the scales of the epochs still to come."""
    if config.tanh_scale_end == 1.0 or config.epochs <= 1:
        return 1.0
    fraction = min(max(epoch, 0), config.epochs - 1) / (config.epochs - 1)
    return float(config.tanh_scale_end ** fraction)


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_bn: bool = True) -> list[dict]:
    """Adam parameter groups of the trained (``requires_grad``) parameters of ``model``, in model order.

    ``decay_bn=True``: one group, every parameter with ``weight_decay`` (the paper; the optimiser state of runs
    saved before this option). ``decay_bn=False``: ``weight_decay`` on the other parameters (conv and linear
    weights), 0 on the parameters of BatchNorm layers and on every parameter named ``bias``.
    """
    if decay_bn:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed for epoch ``epoch`` of a run with ``seed`` (independent streams per epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_states() -> dict:
    np_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_json(path: Path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _torch_save(path: Path, obj) -> None:
    with atomic_write(path) as f:
        torch.save(obj, f)


def _progress(iterable=None, **kw):
    from tqdm import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kw)


def _write(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)


# ---------------------------------------------------------------------------------------------- stem cache
def _stem_key(model: AiOModel, config: TrainConfig, records: Sequence[Record]) -> str:
    h = hashlib.sha1()
    for name, tensor in sorted(model.stem.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(f"{config.backbone}|{config.height}x{config.width}|{model.last_stride}".encode())
    for path, _, _ in records:
        h.update(path.encode() + b"\n")
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_stem_cache(model: AiOModel, records: Sequence[Record], config: TrainConfig, device: torch.device,
                       progress: bool = False, batch_size: int | None = None) -> torch.Tensor:
    """``float16[2, N, C, h, w]``: the frozen stem's output for each image (index 0) and its mirror (1).

    The images go through the test transform (resize + normalise): flip is reproduced exactly by the
    mirrored copy, the other augmentations act on the feature maps during training. ``batch_size``
    defaults to 8 on CPU (large batches of high-resolution activations are slower there) and 128 on CUDA.
    """
    batch_size = batch_size or (128 if device.type == "cuda" else 8)
    model.stem.eval()
    # channels_last runs MobileNet/ResNet convolutions about 1.5x faster on CPU; undone below.
    model.stem.to(memory_format=torch.channels_last)
    loader = image_loader(records, build_test_transform(config.transform_config()), batch_size=batch_size,
                          num_workers=config.num_workers, seed=config.seed, pin_memory=device.type == "cuda")
    cache = None
    bar = _progress(total=len(records), desc="caching stem", unit="img", disable=not progress)
    for images, _, _, index in loader:
        x = images.to(device).contiguous(memory_format=torch.channels_last)
        both = torch.stack([model.stem(x), model.stem(torch.flip(x, dims=[3]))]).half()
        if cache is None:
            cache = torch.empty((2, len(records), *both.shape[2:]), dtype=torch.float16, device=device)
        cache[:, index.to(device)] = both
        bar.update(len(index))
    bar.close()
    model.stem.to(memory_format=torch.contiguous_format)
    return cache


def load_or_compute_stem_cache(model: AiOModel, records: Sequence[Record], config: TrainConfig, device: torch.device,
                               cache_dir: Path, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """The stem cache from ``cache_dir`` if a matching one is there, else computed and saved there."""
    key = _stem_key(model, config, records)
    path = cache_dir / f"stem-{key}.pt"
    start = time.perf_counter()
    if path.is_file():
        try:
            cache = torch.load(path, map_location=device, weights_only=True)
            if cache.shape[:2] == (2, len(records)):
                return cache, {"type": "cache", "source": str(path), "loaded": True, "time_s": time.perf_counter() - start}
        except Exception:  # a damaged cache file is just recomputed
            pass
    # an unusable cache folder is found now, not after minutes of computing the cache
    if cache_dir.exists() and not cache_dir.is_dir():
        raise NotADirectoryError(f"stem cache folder {cache_dir} is a file: expected a folder (--cache-dir)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the stem cache in {cache_dir}: permission denied (--cache-dir)")
    cache = compute_stem_cache(model, records, config, device, progress)
    seconds = time.perf_counter() - start
    _torch_save(path, cache.cpu())
    info = {"type": "cache", "source": str(path), "loaded": False, "time_s": seconds,
            "images_per_s": 2 * len(records) / max(seconds, 1e-9), "shape": list(cache.shape),
            "megabytes": cache.numel() * 2 / 2**20}
    return cache, info


def shift_feature_maps(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Random translation of each map by up to ``max_shift`` cells each way (zero padding, then crop):
    the feature-map counterpart of pixel pad + random crop."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    oy = torch.randint(0, 2 * max_shift + 1, (b,)).to(x.device)
    ox = torch.randint(0, 2 * max_shift + 1, (b,)).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def erase_feature_maps(x: torch.Tensor, p: float, scale: tuple[float, float] = (0.02, 0.4),
                       ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al.) on feature maps: with probability ``p`` per map, a rectangle covering
    a ``scale`` fraction of the map with aspect ``ratio`` is set to 0 (clipped to the map instead of
    re-drawn)."""
    if p <= 0:
        return x
    b, _, h, w = x.shape
    area = torch.empty(b).uniform_(*scale) * h * w
    aspect = torch.exp(torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    eh = torch.sqrt(area * aspect).round().clamp(1, h).long()
    ew = torch.sqrt(area / aspect).round().clamp(1, w).long()
    top = (torch.rand(b) * (h - eh + 1)).long()
    left = (torch.rand(b) * (w - ew + 1)).long()
    apply = torch.rand(b) < p
    rows, cols = torch.arange(h), torch.arange(w)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + eh)[:, None])
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < (left + ew)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :]) & apply[:, None, None]
    return x.masked_fill(mask[:, None].to(x.device), 0.0)


# ---------------------------------------------------------------------------------------------- run state
@dataclass
class _Data:
    train: list[Record]  # relabelled pids 0..C-1
    train_original: list[Record]  # original pids
    val: list[Record]
    pid_map: dict[int, int]
    root: str


def _prepare_data(config: TrainConfig, data_root: str | os.PathLike) -> _Data:
    data = load_dataset(data_root)
    records, val = data.train, []
    if config.val_fraction > 0:
        records, val = split_train_val(records, config.val_fraction, config.seed)
    relabelled, pid_map = relabel_pids(records)
    if len(pid_map) < config.p:
        raise CtfreidError(f"{data_root}: {count(len(pid_map), 'training identity', 'training identities')}, "
                           f"fewer than P = {config.p} per batch")
    return _Data(relabelled, list(records), val, pid_map, data.root)


def _data_from_checkpoint(ckpt: dict, data_root: str | os.PathLike) -> _Data:
    root = load_dataset(data_root).root
    original = resolve_records(ckpt["train"], root)
    pid_map = {int(k): int(v) for k, v in ckpt["pid_map"].items()}
    relabelled = [(path, pid_map[pid], camid) for path, pid, camid in original]
    return _Data(relabelled, original, resolve_records(ckpt["val"], root), pid_map, root)


_CHECKPOINT_KEYS = ("config", "model", "optimizer", "epoch", "rng", "pid_map", "train", "val")


def _load_checkpoint(path: Path) -> dict:
    """The checkpoint of an interrupted run; a damaged one is named, with what to do."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
            raise ValueError("it lacks the keys of a ctfreid checkpoint")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise CtfreidError(f"checkpoint {path} is damaged ({first}): pass --no-resume to start the run again") from None
    return ckpt


def _finished_run(model_path: Path, config: TrainConfig, run_dir: Path) -> dict:
    """The summary of a finished run (model.pt, no checkpoint) trained with ``config``, else an error."""
    try:
        blob = torch.load(model_path, map_location="cpu", weights_only=True)
        saved, epoch = dict(blob["train_config"]), int(blob["epoch"])
    except Exception:
        raise CtfreidError(f"{model_path} is damaged or not a ctfreid model: use another --out, or --no-resume "
                           "to train again (the old file is kept as model.previous.pt)") from None
    _check_resumable(saved, config, run_dir)
    if epoch < config.epochs:
        raise CtfreidError(f"{run_dir} holds a run finished after {epoch} epochs whose checkpoint is gone: it cannot "
                           f"continue to {config.epochs}; use --no-resume to train again (the old model is kept as "
                           "model.previous.pt) or another --out")
    return {"run_dir": str(run_dir), "model": str(model_path), "resumed_from_epoch": epoch, "epochs": config.epochs,
            "images_per_s": None, "last": None}


def _check_resumable(saved: dict, config: TrainConfig, run_dir: Path) -> None:
    new = config.to_dict()
    # a setting added after the run was saved has its default value there (new fields keep old behaviour)
    saved = {**TrainConfig().to_dict(), **saved}
    diff = {k: (saved.get(k), new[k]) for k in new if k not in RESUMABLE_CHANGES and saved.get(k) != new[k]}
    if diff:
        shown = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CtfreidError(
            f"{run_dir} holds a run with other settings ({shown}): use another --out, the same settings, "
            "or --no-resume to start it again"
        )


def _rewrite_log(path: Path, last_epoch: int) -> None:
    """Drop log lines of epochs after ``last_epoch`` (an interrupted epoch is replayed on resume)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line).get("epoch", 0) <= last_epoch:
                kept.append(line)
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in kept))


class _Log:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _model_file(model: AiOModel, config: TrainConfig, data: _Data, epoch: int) -> dict:
    tc = config.transform_config()
    return {
        "format": "ctfreid-model/1",
        "state_dict": model.state_dict(),
        "model_config": model.config(),
        "input": {"height": config.height, "width": config.width, "mean": list(tc.mean), "std": list(tc.std)},
        "thresholds": None,  # filled by DTO (ctfreid calibrate)
        "train_config": config.to_dict(),
        "epoch": epoch,
        "pid_map": data.pid_map,
        "data_root": data.root,
        "train": relative_records(data.train_original, data.root),
        "val": relative_records(data.val, data.root),
    }


# ---------------------------------------------------------------------------------------------- training
def _batches(config: TrainConfig, sampler: PKSampler, epoch: int, device: torch.device,
             data: _Data, stem_cache: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input, labels) of each PK batch of ``epoch``: images, or augmented cached stem maps."""
    batches = sampler.batches(epoch)
    if stem_cache is None:
        # Each item's augmentation seed follows from (seed, epoch, position in the epoch).
        base = epoch_seed(config.seed, epoch) << 20
        keyed = [[(int(i), base + b * len(batch) + j) for j, i in enumerate(batch)] for b, batch in enumerate(batches)]
        loader = image_loader(data.train, build_train_transform(config.transform_config()), batch_sampler=keyed,
                              num_workers=config.num_workers, seed=epoch_seed(config.seed, epoch),
                              pin_memory=device.type == "cuda")
        for images, pids, _, _ in loader:
            yield images.to(device, non_blocking=True), pids.to(device)
        return
    labels = torch.tensor([pid for _, pid, _ in data.train])
    for batch in batches:
        idx = torch.from_numpy(batch)
        flip = (torch.rand(len(idx)) < config.flip_p).long()
        x = stem_cache[flip.to(stem_cache.device), idx.to(stem_cache.device)].to(device).float()
        x = erase_feature_maps(shift_feature_maps(x, config.feature_shift), config.erasing_p)
        yield x, labels[idx].to(device)


def train(config: TrainConfig, data_root: str | os.PathLike, out_dir: str | os.PathLike, resume: bool = True,
          progress: bool = True) -> dict:
    """Train an AiO model (Eq. 5) on ``data_root``'s training identities, writing the run to ``out_dir``.

    With ``resume`` (default) an existing ``out_dir/checkpoint.pt`` of the same settings is continued from
    its last completed epoch (a finished run is left as it is); ``resume=False`` starts the run again.
    Returns a summary: epochs, final loss terms, images/s, paths.
    """
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, Path(out_dir), data_root, resume, progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, run_dir: Path, data_root: str | os.PathLike, resume: bool, progress: bool) -> dict:
    """The body of :func:`train` (which sets the thread count around it)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run directory {run_dir} exists and is not a folder")
    device = resolve_device(config.device)
    ckpt_path, log_path = run_dir / CHECKPOINT, run_dir / LOG

    ckpt = None
    model_path = run_dir / MODEL
    if resume and ckpt_path.is_file():
        ckpt = _load_checkpoint(ckpt_path)
        _check_resumable(ckpt["config"], config, run_dir)
        data = _data_from_checkpoint(ckpt, data_root)
    elif resume and model_path.is_file():  # a finished run whose checkpoint was cleaned up: leave it as it is
        return _finished_run(model_path, config, run_dir)
    else:
        data = _prepare_data(config, data_root)

    # the model first: settings it refuses (--weights, --frozen-stages...) fail before anything is written
    seed_everything(config.seed)
    model = AiOModel(len(data.pid_map), backbone=config.backbone, lengths=config.lengths, pyramid=config.pyramid,
                     weights=None if ckpt else config.weights, frozen_stages=config.frozen_stages,
                     last_stride=config.last_stride).to(device)
    if ckpt is not None:
        _rewrite_log(log_path, ckpt["epoch"])
    else:
        run_dir.mkdir(parents=True, exist_ok=True)  # after the data checks: a wrong --data leaves no empty run
        # Start again, keeping nothing stale: the log and checkpoint of an earlier run go; its model and
        # thresholds are kept aside (never deleted), so that they cannot be mistaken for the new run's.
        for stale in (ckpt_path, log_path):
            stale.unlink(missing_ok=True)
        for name in (MODEL, THRESHOLDS):
            if (run_dir / name).is_file():
                os.replace(run_dir / name, run_dir / f"{Path(name).stem}.previous{Path(name).suffix}")
    _save_json(run_dir / CONFIG, config.to_dict())
    _save_json(run_dir / SPLIT, {"data_root": data.root, "val_fraction": config.val_fraction, "seed": config.seed,
                                 "train": relative_records(data.train_original, data.root),
                                 "val": relative_records(data.val, data.root)})
    model.detach_heads = config.detach_heads  # a training setting, not part of the saved model
    optimizer = torch.optim.Adam(parameter_groups(model, config.weight_decay, config.decay_bn), lr=config.lr,
                                 weight_decay=config.weight_decay)
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_states(ckpt["rng"])
        start_epoch = int(ckpt["epoch"])
    log = _Log(log_path)
    summary = {"run_dir": str(run_dir), "model": str(run_dir / MODEL), "num_classes": len(data.pid_map),
               "num_train_images": len(data.train), "num_val_images": len(data.val),
               "resumed_from_epoch": start_epoch, "epochs": config.epochs, "device": str(device)}
    if start_epoch >= config.epochs:
        if not (run_dir / MODEL).is_file():
            _torch_save(run_dir / MODEL, _model_file(model, config, data, start_epoch))
        return {**summary, "images_per_s": None, "last": None}

    stem_cache = None
    if config.cache_stem:
        cache_dir = Path(config.cache_dir) if config.cache_dir else run_dir / "cache"
        stem_cache, info = load_or_compute_stem_cache(model, data.train, config, device, cache_dir, progress)
        log.write({**info, "epoch": start_epoch})
        summary["stem_cache"] = info

    sampler = PKSampler([pid for _, pid, _ in data.train], p=config.p, k=config.k, seed=config.seed)
    loss_config = config.loss_config()
    batch_size = config.p * config.k
    speeds, last = [], None
    for epoch in range(start_epoch, config.epochs):
        seed_everything(epoch_seed(config.seed, epoch))
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.tanh_scale = tanh_scale(config, epoch)
        model.train()
        sums: dict[str, float] = {}
        abs_sums: dict[int, float] = {}  # sum over batches of mean |t| per code: how saturated the codes are
        seen, start = 0, time.perf_counter()
        waited, ready = 0.0, start  # time spent waiting for batches (input-bound when close to time_s)
        bar = _progress(total=sampler.num_batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                        disable=not progress, leave=False)
        for it, (inputs, pids) in enumerate(_batches(config, sampler, epoch, device, data, stem_cache)):
            waited += time.perf_counter() - ready
            outputs = model.forward_from_stem(inputs) if stem_cache is not None else model(inputs)
            total, terms = aio_loss(outputs, pids, loss_config)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if not math.isfinite(terms["total"]):
                raise CtfreidError(f"training diverged at epoch {epoch + 1}, iteration {it + 1}: loss {terms} (try a lower --lr)")
            seen += len(pids)
            with torch.no_grad():
                for length, t in outputs["codes"].items():
                    abs_sums[length] = abs_sums.get(length, 0.0) + float(t.abs().mean())
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
            speed = seen / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix({**{n: f"{v:.3g}" for n, v in terms.items()}, "img/s": f"{speed:.0f}"}, refresh=False)
            bar.update(1)
            if config.log_every and (it + 1) % config.log_every == 0:
                log.write({"type": "iter", "epoch": epoch + 1, "iter": it + 1, "lr": lr, **terms})
            ready = time.perf_counter()
        bar.close()
        seconds = time.perf_counter() - start
        iterations = max(seen // batch_size, 1)
        last = {"type": "epoch", "epoch": epoch + 1, "lr": lr, **{n: v / iterations for n, v in sums.items()},
                "iterations": iterations, "images": seen, "images_per_s": seen / max(seconds, 1e-9), "time_s": seconds,
                "data_wait_s": waited, "tanh_scale": model.tanh_scale,
                "mean_abs_code": {str(length): v / iterations for length, v in sorted(abs_sums.items())}}
        speeds.append(last["images_per_s"])
        log.write(last)
        if progress:
            terms_text = " ".join(f"{n}={v:.4g}" for n, v in last.items() if n in sums)
            _write(f"epoch {epoch + 1}/{config.epochs} lr={lr:.3g} {terms_text} "
                   f"{last['images_per_s']:.0f} img/s {seconds:.1f} s ({100 * waited / max(seconds, 1e-9):.0f} % waiting for data)")
        _torch_save(ckpt_path, {
            "format": "ctfreid-checkpoint/1", "epoch": epoch + 1, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "config": config.to_dict(), "model_config": model.config(),
            "pid_map": data.pid_map, "data_root": data.root, "train": relative_records(data.train_original, data.root),
            "val": relative_records(data.val, data.root), "rng": _rng_states(),
        })
    _torch_save(run_dir / MODEL, _model_file(model, config, data, config.epochs))
    return {**summary, "images_per_s": float(np.mean(speeds)), "last": last}
