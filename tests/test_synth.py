"""The synthetic ReID dataset: determinism, Market-1501 layout and protocol, README, CLI."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctfreid.cli import main
from ctfreid.data.datasets import load_market1501, parse_name
from ctfreid.data.synth import SynthConfig, generate_synthetic

SMALL = dict(images_per_id=6, height=64, width=32)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    generate_synthetic(tmp_path / "a", ids=10, cams=3, seed=5, **SMALL)
    generate_synthetic(tmp_path / "b", ids=10, cams=3, seed=5, **SMALL)
    generate_synthetic(tmp_path / "c", ids=10, cams=3, seed=6, **SMALL)
    a, b, c = (tree_hashes(tmp_path / x) for x in "abc")
    assert a == b and len(a) > 60
    images_a = {v for k, v in a.items() if k.endswith(".jpg")}
    images_c = {v for k, v in c.items() if k.endswith(".jpg")}
    assert not images_a & images_c  # a new seed draws every image anew


def test_market_layout_and_protocol(synth_root):
    data = load_market1501(synth_root)  # the plain Market-1501 loader reads it
    cfg = SynthConfig(ids=16, cams=3, images_per_id=6, height=64, width=32)
    train_ids = {p for _, p, _ in data.train}
    test_ids = {p for _, p, _ in data.query}
    assert len(train_ids) == cfg.num_train_ids == 8 and len(test_ids) == 8
    assert not train_ids & test_ids and train_ids | test_ids == set(range(1, 17))
    gallery = Counter(p for _, p, _ in data.gallery)
    assert gallery[0] == 4 and gallery[-1] == 2  # distractors and junk as asked by the fixture
    assert all(Counter(p for _, p, _ in data.train)[p] == 6 for p in train_ids)

    # Query: exactly one image per (test identity, camera it appears in), as in Market-1501.
    seen = {(p, c) for _, p, c in data.query + data.gallery if p > 0}
    assert Counter((p, c) for _, p, c in data.query) == Counter(seen)
    for pid in test_ids:
        assert sum(1 for _, p, _ in data.query + data.gallery if p == pid) == 6
    # Every query has a true match in another camera (cross-camera search is possible).
    for _, p, c in data.query:
        assert any(gp == p and gc != c for _, gp, gc in data.gallery)
    # Names are Market-style and unique; images are JPEG of the requested size.
    names = [Path(r[0]).name for r in data.train + data.query + data.gallery]
    assert len(set(names)) == len(names)
    assert all(n.endswith("_00.jpg") and parse_name(n) is not None for n in names)
    assert any(n.startswith("-1_c") for n in names) and any(n.startswith("0000_c") for n in names)
    with Image.open(data.query[0][0]) as img:
        assert img.format == "JPEG" and img.size == (32, 64) and img.mode == "RGB"


def test_readme_lists_parameters(synth_root):
    text = (synth_root / "README.txt").read_text()
    for line in ("ids = 16", "cams = 3", "seed = 0", "images_per_id = 6", "height = 64", "width = 32",
                 "distractors = 4", "junk = 2", "--ids 16 --cams 3 --seed 0"):
        assert line in text


def _descriptor(path: str) -> np.ndarray:
    """Centre columns (mostly the person), grey-world normalised, mean colour of 8 horizontal bands."""
    a = np.asarray(Image.open(path).convert("RGB"), np.float64)
    c = a[:, a.shape[1] // 4 : 3 * a.shape[1] // 4]
    c = c / (c.reshape(-1, 3).mean(0) + 1.0)
    return np.concatenate([b.reshape(-1, 3).mean(0) for b in np.array_split(c, 8)])


def test_identity_signal_beats_camera_and_background(tmp_path):
    # Learnable: under a crude colour descriptor, images of one person across *different* cameras are
    # closer on average than images of different people, look-alikes included.
    data = generate_synthetic(tmp_path / "s", ids=24, cams=3, seed=2, distractors=0, junk=0, **SMALL)
    recs = data.train
    x = np.stack([_descriptor(p) for p, _, _ in recs])
    pids = np.array([p for _, p, _ in recs])
    cams = np.array([c for _, _, c in recs])
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    same = (pids[:, None] == pids[None]) & (cams[:, None] != cams[None])
    diff = pids[:, None] != pids[None]
    assert d[same].mean() < 0.75 * d[diff].mean()
    # ... but not trivially: some different-identity pairs are closer than the median same-identity pair.
    assert (d[diff] < np.median(d[same])).mean() > 0.02


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "s"
    generate_synthetic(out, ids=4, cams=2, seed=0, **SMALL)
    (out / "bounding_box_train" / "stale.jpg").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_synthetic(out, ids=4, cams=2, seed=0, **SMALL)
    data = generate_synthetic(out, ids=6, cams=2, seed=0, overwrite=True, **SMALL)
    assert not (out / "bounding_box_train" / "stale.jpg").exists()
    assert len({p for _, p, _ in data.train + data.query}) == 6
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging folder left


@pytest.mark.parametrize("kwargs, message", [
    (dict(ids=1), "ids"), (dict(cams=1), "cams"), (dict(cams=10), "cams"), (dict(images_per_id=3), "images_per_id"),
    (dict(height=8), "at least"), (dict(train_fraction=1.0), "train_fraction"),
    (dict(distractors=-2), "distractors"), (dict(junk=-3), "junk"),
    (dict(height=100_000, width=100_000), "MAX_IMAGE_PIXELS"),  # was a MemoryError traceback (447 GiB)
])
def test_bad_parameters(tmp_path, kwargs, message):
    args = dict(ids=4, cams=2, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        generate_synthetic(tmp_path / "s", **args)
    assert not (tmp_path / "s" / "query").exists()


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["synth", "--out", str(out), "--ids", "6", "--cams", "2", "--seed", "3", "--images-per-id", "4",
               "--height", "64", "--width", "32"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    data = load_market1501(out)
    assert len(data.train) == 3 * 4
    assert main(["synth", "--out", str(out), "--ids", "6"]) == 2  # exists, no --overwrite
    assert "overwrite" in capsys.readouterr().err
