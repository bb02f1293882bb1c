"""Shared fixtures: a tiny synthetic ReID dataset in Market-1501 layout, generated once per test session.

Treat it as read-only (write outputs to ``tmp_path``). Contents: 16 identities (8 train, 8 test), 3
cameras, 6 images per identity, 64 x 32 images; the gallery adds 4 distractors (pid 0) and 2 junk crops
(pid -1). Generation takes about 0.1 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SYNTH = dict(ids=16, cams=3, seed=0, images_per_id=6, height=64, width=32, distractors=4, junk=2)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny synthetic dataset (``bounding_box_train/``, ``query/``, ``bounding_box_test/``)."""
    from ctfreid.data.synth import generate_synthetic

    root = tmp_path_factory.mktemp("synth") / "tiny"
    generate_synthetic(root, **TINY_SYNTH)
    return root


@pytest.fixture(scope="session")
def synth_dataset(synth_root: Path):
    """The tiny synthetic dataset loaded as a ``ReIDDataset`` (original pids; relabel for training)."""
    from ctfreid.data.datasets import load_dataset

    return load_dataset(synth_root)


@pytest.fixture
def torch_one_thread():
    """Torch on one thread: two threads on a shared 2-core machine are much slower (OpenMP waits on busy cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_TRAIN = dict(backbone="resnet18", lengths=(128, 64, 32), height=32, width=16, epochs=1, warmup_epochs=0,
                  milestones=(), p=4, k=2, val_fraction=0.4, device="cpu", num_workers=0, seed=0)


@pytest.fixture(scope="module")
def run_dir(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for one epoch on the shared synthetic dataset, with a validation split (one per
    test module: modules may write beside it)."""
    torch = pytest.importorskip("torch")
    from ctfreid.learn.train import TrainConfig, train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig(**TINY_TRAIN), synth_root, out, resume=False, progress=False)
    return out


@pytest.fixture
def every_batch_split(monkeypatch):
    """Split even small test batches over the threads asked for (production needs enough work per thread
    first, ``parallel.MIN_WORK_PER_THREAD``), so that the threaded path is what a test checks."""
    from ctfreid.search import parallel

    monkeypatch.setattr(parallel, "MIN_WORK_PER_THREAD", 0)


def _blocking(monkeypatch, method: str, copies) -> object:
    """A fixture's function that stops ``CtFIndex.<method>`` at its next call for which ``copies(*args)`` is
    true, until released; it returns the events ``(copying, release)`` (set ``release`` to let the copy go
    on; it gives up after 30 s, and the fixture releases every one at the end: ``arm.events``)."""
    import threading

    from ctfreid.search.index import CtFIndex

    def arm() -> tuple:
        copying, release = threading.Event(), threading.Event()
        arm.events.append(release)
        original = getattr(CtFIndex, method)

        def blocked(self, *args):
            if copies(*args) and not copying.is_set():
                copying.set()
                assert release.wait(30), "never released"
            return original(self, *args)

        monkeypatch.setattr(CtFIndex, method, blocked)
        return copying, release

    arm.events = []
    return arm


@pytest.fixture
def block_next_grow(monkeypatch):
    """Stops ``CtFIndex._grow`` inside its next copy (into a larger buffer, or of a read-only map into memory)
    until released (``_blocking``)."""
    arm = _blocking(monkeypatch, "_grow", lambda buf, need, row, dtype: buf.shape[0] < need or not buf.flags.writeable)
    yield arm
    for release in arm.events:
        release.set()


@pytest.fixture
def block_next_compaction(monkeypatch):
    """Stops ``CtFIndex._compacted`` (the copy of the live items) at its next call until released
    (``_blocking``)."""
    arm = _blocking(monkeypatch, "_compacted", lambda: True)
    yield arm
    for release in arm.events:
        release.set()


@pytest.fixture
def block_next_removal(monkeypatch):
    """``(before, after)``: arms that stop ``CtFIndex.remove_ids`` at its next look-up of the ids (before the
    removal becomes visible) or at its next erasure of the removed codes (after), until released
    (``_blocking``)."""
    before = _blocking(monkeypatch, "_lookup", lambda ids, live_only=True: True)
    after = _blocking(monkeypatch, "_erase", lambda pos: True)
    yield before, after
    for release in before.events + after.events:
        release.set()


@pytest.fixture
def search_during():
    """A function ``(copying, release, write, search, during=None) -> (answer, seen)``: runs ``write()`` in a
    thread; once ``copying`` is set (``block_next_grow`` / ``block_next_compaction``), runs ``search()`` in
    another and asserts that it answered within 10 s while the write still waits in its copy; ``seen`` is
    ``during()`` called then (None without it). Then sets ``release`` and joins the write."""
    import threading

    def run(copying, release, write, search, during=None):
        writer = threading.Thread(target=write)
        writer.start()
        try:
            assert copying.wait(30)
            answers: list = []
            searcher = threading.Thread(target=lambda: answers.append(search()))
            searcher.start()
            searcher.join(10)
            assert not searcher.is_alive(), "the search waited for the write's copy"
            assert writer.is_alive()  # still copying: the search ran during the copy
            return answers[0], (None if during is None else during())
        finally:
            release.set()
            writer.join(30)

    return run
