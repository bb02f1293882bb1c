"""Dataset loaders, identity split and image reading, on folders generated inside each test."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctfreid.data.datasets import (
    DATASETS,
    ReIDDataset,
    load_cuhk03np,
    load_dataset,
    load_dukemtmcreid,
    load_market1501,
    load_market1501_500k,
    parse_name,
    read_image,
    relabel_pids,
    split_train_val,
)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 16), (200, 30, 40)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def make_folder(root: Path, folder: str, names: list[str]) -> Path:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(JPEG)
    return d


def make_market(root: Path, train=None, query=None, gallery=None) -> Path:
    make_folder(root, "bounding_box_train", train or ["0002_c1s1_000451_03.jpg", "0002_c2s1_000500_01.jpg",
                                                     "0007_c6s2_000100_00.jpg", "-1_c1s1_000001_00.jpg"])
    make_folder(root, "query", query or ["0003_c1s1_000010_00.jpg", "0003_c4s1_000011_00.jpg"])
    make_folder(root, "bounding_box_test", gallery or ["0003_c2s1_000020_00.jpg", "0000_c3s1_000030_00.jpg",
                                                      "-1_c5s1_000040_00.jpg", "0003_c1s1_000050_00.jpg"])
    return root


def test_market_records_pids_camids_junk_and_distractors(tmp_path):
    root = make_market(tmp_path / "m")
    (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"x")  # not an image: ignored
    data = load_market1501(root)
    t, q, g = root / "bounding_box_train", root / "query", root / "bounding_box_test"
    # Hand-written expectation: camid 0-based, junk (-1) dropped from train only, distractor (0) kept.
    assert data.train == [(str(t / "0002_c1s1_000451_03.jpg"), 2, 0), (str(t / "0002_c2s1_000500_01.jpg"), 2, 1),
                          (str(t / "0007_c6s2_000100_00.jpg"), 7, 5)]
    assert data.query == [(str(q / "0003_c1s1_000010_00.jpg"), 3, 0), (str(q / "0003_c4s1_000011_00.jpg"), 3, 3)]
    assert sorted(data.gallery) == sorted([
        (str(g / "0003_c2s1_000020_00.jpg"), 3, 1), (str(g / "0000_c3s1_000030_00.jpg"), 0, 2),
        (str(g / "-1_c5s1_000040_00.jpg"), -1, 4), (str(g / "0003_c1s1_000050_00.jpg"), 3, 0)])
    assert data.num_train_pids == 2
    assert data.name == "market1501"
    text = str(data)
    assert "train" in text and "gallery" in text and "|     3 |" in text  # 3 gallery ids: 3, 0, -1


def test_hidden_resource_forks_are_skipped_as_torchreid_does(tmp_path):
    """macOS leaves '._NAME.jpg' files (AppleDouble, not images) beside copied crops; torchreid's and fast-reid's
    glob('*.jpg') skips them, so the dataset loader and an image folder (index build, search) do too."""
    from ctfreid.infer.gallery import folder_records

    root = make_market(tmp_path / "m")
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        for p in list((root / folder).iterdir()):
            (root / folder / f"._{p.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    data = load_market1501(root)
    assert not any(Path(p).name.startswith(".") for p, _, _ in data.train + data.query + data.gallery)
    assert (len(data.train), len(data.query), len(data.gallery)) == (3, 2, 4)
    assert [Path(p).name for p, _, _ in folder_records(root / "query")] == ["0003_c1s1_000010_00.jpg",
                                                                            "0003_c4s1_000011_00.jpg"]


def test_relabel_train_only(tmp_path):
    root = make_market(tmp_path / "m", train=["0010_c1s1_000001_00.jpg", "0004_c2s1_000002_00.jpg",
                                              "0010_c3s1_000003_00.jpg", "0950_c1s1_000004_00.jpg"])
    data = load_market1501(root, relabel=True)
    labels = {Path(path).name: pid for path, pid, _ in data.train}
    assert labels == {"0004_c2s1_000002_00.jpg": 0, "0010_c1s1_000001_00.jpg": 1, "0010_c3s1_000003_00.jpg": 1,
                      "0950_c1s1_000004_00.jpg": 2}
    assert {pid for _, pid, _ in data.query} == {3}  # query / gallery keep original pids
    records, mapping = relabel_pids([("a", 7, 0), ("b", 3, 1), ("c", 7, 2)])
    assert mapping == {3: 0, 7: 1} and records == [("a", 1, 0), ("b", 0, 1), ("c", 1, 2)]


def test_parse_name_market_duke_cuhk():
    assert parse_name("0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_name("-1_c3s1_000001_00.jpg") == (-1, 2)
    assert parse_name("0000_c6s1_000001_00.jpg") == (0, 5)
    assert parse_name("0001_c2_f0046182.jpg") == (1, 1)
    assert parse_name("/some/dir/0005_c8_f0000001.jpg") == (5, 7)
    for bad in ("img_001.jpg", "0002c1s1.jpg", "-2_c1s1_000001_00.jpg", "0001_c0s1_000001_00.jpg"):
        assert parse_name(bad) is None


def test_duke_and_cuhk03np_loaders(tmp_path):
    duke = make_market(tmp_path / "duke", train=["0001_c2_f0046182.jpg", "0001_c8_f0046999.jpg"],
                       query=["0005_c1_f0000001.jpg"], gallery=["0005_c3_f0000002.jpg", "0000_c7_f0000003.jpg"])
    d = load_dukemtmcreid(duke)
    assert [(p, c) for _, p, c in d.train] == [(1, 1), (1, 7)]
    assert sorted((p, c) for _, p, c in d.gallery) == [(0, 6), (5, 2)]
    cuhk = make_market(tmp_path / "cuhk", train=["0004_c1s1_000030_00.jpg", "0004_c2s1_000031_00.jpg"],
                       query=["0001_c1s1_000003_00.jpg"], gallery=["0001_c2s1_000001_00.jpg"])
    c = load_cuhk03np(cuhk)
    assert [(p, cam) for _, p, cam in c.train] == [(4, 0), (4, 1)] and c.name == "cuhk03np"
    assert load_dataset(cuhk, "cuhk03np").train == c.train
    assert set(DATASETS) == {"market1501", "dukemtmcreid", "cuhk03np", "market1501_500k"}


def test_missing_folder_names_folder_and_example(tmp_path):
    root = tmp_path / "m"
    make_folder(root, "bounding_box_train", ["0002_c1s1_000451_03.jpg"])
    make_folder(root, "bounding_box_test", ["0002_c2s1_000451_03.jpg"])
    with pytest.raises(FileNotFoundError, match=r"missing query/.*0002_c1s1_000451_03\.jpg"):
        load_market1501(root)
    with pytest.raises(FileNotFoundError, match=r"0001_c2_f0046182\.jpg"):
        load_dukemtmcreid(root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_empty_folder_names_folder_and_example(tmp_path):
    root = make_market(tmp_path / "m")
    for f in (root / "query").iterdir():
        f.unlink()
    (root / "query" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"query has no images.*0002_c1s1_000451_03\.jpg"):
        load_market1501(root)


def test_bad_names_name_file_folder_and_example(tmp_path):
    root = make_market(tmp_path / "m", gallery=["0003_c2s1_000020_00.jpg", "person_17.jpg"])
    with pytest.raises(ValueError, match=r"'person_17\.jpg' in .*bounding_box_test.*'0002_c1s1_000451_03\.jpg'"):
        load_market1501(root)
    duke = make_market(tmp_path / "d", train=["cam2_0001.jpg"])
    with pytest.raises(ValueError, match=r"cam2_0001\.jpg.*bounding_box_train.*0001_c2_f0046182\.jpg"):
        load_dukemtmcreid(duke)


def test_market_500k_adds_distractors_to_gallery(tmp_path):
    root = make_market(tmp_path / "m")
    base = load_market1501(root)
    make_folder(root, "images", ["00000000_c3s1_000000_00.jpg", "0005_c1s1_000001_00.jpg", "abc.jpg"])
    data = load_market1501_500k(root)
    extra = data.gallery[len(base.gallery):]
    assert data.gallery[: len(base.gallery)] == base.gallery and data.query == base.query
    assert data.train == base.train and data.name == "market1501_500k"
    # All extra images are distractors (pid 0); the camera is parsed when the name has one, else camera 0.
    img = root / "images"
    assert sorted(extra) == sorted([(str(img / "00000000_c3s1_000000_00.jpg"), 0, 2),
                                    (str(img / "0005_c1s1_000001_00.jpg"), 0, 0), (str(img / "abc.jpg"), 0, 0)])
    other = make_folder(tmp_path, "elsewhere", ["x_c2.jpg"])
    data = load_dataset(root, "market1501_500k", extra_dir=other)
    assert data.gallery[-1] == (str(other / "x_c2.jpg"), 0, 1)


def test_market_500k_without_extra_folder(tmp_path):
    root = make_market(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"500k.*images/"):
        load_market1501_500k(root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_market1501_500k(root, extra_dir=tmp_path / "missing")


def test_load_dataset_autodetect_nested_and_unknown(tmp_path):
    make_market(tmp_path / "dl" / "Market-1501-v15.09.15")
    data = load_dataset(tmp_path / "dl")  # the single sub-folder holding the layout is used
    assert isinstance(data, ReIDDataset) and len(data.train) == 3
    assert data.root == str(tmp_path / "dl" / "Market-1501-v15.09.15")
    with pytest.raises(ValueError, match="unknown dataset 'msmt17'.*market1501"):
        load_dataset(tmp_path / "dl", "msmt17")


def _records(n_ids: int, per_id: int = 3) -> list:
    rng = np.random.default_rng(1)
    pids = rng.choice(np.arange(1, 2000), n_ids, replace=False)
    return [(f"{p}_{j}.jpg", int(p), j % 2) for p in pids for j in range(per_id)]


def test_split_train_val_by_identity():
    records = _records(50)
    train, val = split_train_val(records, val_fraction=0.4, seed=3)
    tr_ids, va_ids = {r[1] for r in train}, {r[1] for r in val}
    assert len(va_ids) == 20 and len(tr_ids) == 30 and not tr_ids & va_ids
    assert sorted(train + val) == sorted(records)  # nothing lost, pids/camids untouched
    assert [r for r in records if r[1] in va_ids] == val  # order preserved
    assert split_train_val(records, 0.4, seed=3) == (train, val)  # deterministic
    assert {r[1] for r in split_train_val(records, 0.4, seed=4)[1]} != va_ids
    assert len({r[1] for r in split_train_val(records, 0.1, seed=0)[1]}) == 5
    # Extreme fractions still leave one identity on each side.
    assert len({r[1] for r in split_train_val(_records(3), 0.01)[1]}) == 1
    assert len({r[1] for r in split_train_val(_records(3), 0.99)[0]}) == 1


def test_split_train_val_bad_input():
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(_records(5), 1.0)
    with pytest.raises(ValueError, match="at least 2 identities"):
        split_train_val(_records(1), 0.4)


def test_read_image_rgb_and_errors(tmp_path):
    gray = tmp_path / "g.png"
    Image.new("L", (5, 7), 100).save(gray)
    img = read_image(gray)
    assert img.mode == "RGB" and img.size == (5, 7) and img.getpixel((0, 0)) == (100, 100, 100)
    corrupt = tmp_path / "0001_c1s1_000001_00.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=r"0001_c1s1_000001_00\.jpg"):
        read_image(corrupt)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated.jpg"):
        read_image(truncated)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg")


def test_synth_fixture_is_a_market_dataset(synth_dataset):
    # The shared fixture loads through the generic loader: disjoint train / test identities.
    train_ids = {p for _, p, _ in synth_dataset.train}
    test_ids = {p for _, p, _ in synth_dataset.query}
    assert len(train_ids) == 8 and len(test_ids) == 8 and not train_ids & test_ids
    assert {p for _, p, _ in synth_dataset.gallery} == test_ids | {0, -1}


def test_read_image_refuses_pictures_beyond_the_pixel_limit(tmp_path):
    from PIL import Image

    from ctfreid.data import datasets
    from ctfreid.errors import CtfreidError

    big = tmp_path / "big.png"
    Image.new("1", (8000, 6000)).save(big)  # 48 megapixels: below Pillow's own limit, above ours
    with pytest.raises(CtfreidError, match=r"big.png has 8000 x 6000 pixels, more than the limit"):
        datasets.read_image(big)
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 128)).save(small)
    assert datasets.read_image(small).size == (64, 128)
