"""Batches of images for training and encoding: a torch ``DataLoader`` with seeded workers whose
unreadable images become one clear error in the main process, not a worker traceback."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ctfreid.data.datasets import Record, read_image
from ctfreid.errors import CtfreidError


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive NumPy's and Python's from it.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class CheckedImages(Dataset):
    """Images of ``records`` through ``transform``; an unreadable image becomes an error message that
    :func:`collate_checked` raises in the main process (a clean one-line error naming the path, instead of
    a DataLoader worker traceback).

    A key may be ``(index, seed)``: the random augmentation of that item is then drawn from ``seed`` alone,
    so training does not depend on which process (or how many DataLoader workers) loads it.
    """

    def __init__(self, records: Sequence[Record], transform) -> None:
        self.records, self.transform = list(records), transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, pid, camid = self.records[index]
        try:
            image = read_image(path)
            if seed is None:
                return self.transform(image), pid, camid, index
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(image), pid, camid, index
        except (ValueError, FileNotFoundError, OSError) as e:
            return f"{type(e).__name__}\0{e}"


def collate_checked(items: list):
    """Stack a batch, or pass on the first error message (raised by :class:`CheckedLoader` in the main
    process: collate runs inside the worker processes)."""
    for item in items:
        if isinstance(item, str):
            return item
    images, pids, camids, index = zip(*items)
    return torch.stack(images), torch.tensor(pids), torch.tensor(camids), torch.tensor(index)


class CheckedLoader:
    """Iterate a DataLoader of :class:`CheckedImages`, raising an unreadable image's error here."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if isinstance(batch, str):
                kind, message = batch.split("\0", 1)
                raise (FileNotFoundError if kind == "FileNotFoundError" else CtfreidError)(message)
            yield batch


def image_loader(records: Sequence[Record], transform, batch_sampler=None, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, pin_memory: bool = False) -> CheckedLoader:
    """Batches ``(images, pids, camids, indices)`` of ``records``, with seeded workers (deterministic for
    ``seed``); an unreadable image raises ``ValueError`` / ``FileNotFoundError`` naming its path."""
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size, "shuffle": False}
    return CheckedLoader(DataLoader(
        CheckedImages(records, transform), collate_fn=collate_checked, num_workers=num_workers,
        worker_init_fn=_seed_worker, generator=generator, pin_memory=pin_memory, **kwargs,
    ))
