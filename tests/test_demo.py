"""The demo pipeline: its pure helpers on hand-made codes, and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctfreid.demo import (
    DemoConfig,
    gallery_size_points,
    gallery_size_sweep,
    pick_queries,
)
from ctfreid.encoded import EncodedSet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _set(bits_by_len: dict, pids, camids) -> EncodedSet:
    codes = {L: np.packbits(np.asarray(b, dtype=bool), axis=1) for L, b in bits_by_len.items()}
    return EncodedSet(codes=codes, pids=np.asarray(pids), camids=np.asarray(camids))


def _people(n_ids: int, per_id: int, rng, cam0: int = 0, flip: float = 0.05):
    """Codes of 32 and 64 bits: one random prototype per identity, each image flips a few bits."""
    protos = {L: rng.random((n_ids, L)) < 0.5 for L in (32, 64)}
    pids = np.repeat(np.arange(1, n_ids + 1), per_id)
    bits = {L: protos[L][pids - 1] ^ (rng.random((len(pids), L)) < flip) for L in (32, 64)}
    camids = np.tile(np.arange(per_id), n_ids) + cam0
    return bits, pids, camids


def test_gallery_size_points_are_geometric_and_reach_the_pool():
    assert gallery_size_points(100, 900, 5) == [100, 178, 316, 562, 1000]
    sizes = gallery_size_points(3, 4, 10)  # fewer distinct sizes than points: unique, ascending
    assert sizes == sorted(set(sizes)) and sizes[0] == 3 and sizes[-1] == 7


def test_gallery_size_sweep_with_far_and_near_distractors():
    rng = np.random.default_rng(0)
    qb, qp, qc = _people(6, 1, rng, cam0=0)
    gb, gp, gc = _people(6, 2, rng, cam0=1)
    # the gallery and queries must share prototypes: rebuild the gallery from the query prototypes
    # each gallery image differs from its identity's query in exactly 2 bits at every length
    mask = {L: np.arange(L) < 2 for L in qb}
    gb = {L: np.repeat(qb[L], 2, axis=0) ^ mask[L] for L in qb}
    gp = np.repeat(qp, 2)
    query, gallery = _set(qb, qp, qc), _set(gb, gp, gc)
    th = {32: 32}  # keep every candidate: CtF = the 64-bit ranking
    # far distractors (complement of each query code: distance = L) never outrank a true match
    far = _set({L: ~np.repeat(qb[L], 5, axis=0) for L in qb}, np.zeros(30, int), np.full(30, 5))
    rows = gallery_size_sweep(query, gallery, far, th, points=4)
    assert [r["gallery_size"] for r in rows] == gallery_size_points(12, 30, 4)
    assert [r["num_distractors"] for r in rows] == [s - 12 for s in gallery_size_points(12, 30, 4)]
    base = rows[0]["methods"]
    for r in rows:
        for m in ("hash32", "hash64", "ctf"):
            assert r["methods"][m]["rank1"] == base[m]["rank1"]
    # near distractors: exact copies of the queries (distance 0 at every length) come first -> Rank-1 = 0
    near = _set({L: np.repeat(qb[L], 2, axis=0) for L in qb}, np.zeros(12, int), np.full(12, 5))
    rows = gallery_size_sweep(query, gallery, near, th, points=3)
    assert rows[0]["methods"]["hash64"]["rank1"] == 1.0
    assert rows[-1]["gallery_size"] == 24 and rows[-1]["methods"]["hash64"]["rank1"] == 0.0
    with pytest.raises(ValueError, match="pid 0"):
        gallery_size_sweep(query, gallery, query, th)


def test_pick_queries_distinct_ids_with_cross_camera_matches():
    bits = {32: np.zeros((5, 32), bool)}
    query = _set(bits, [1, 1, 2, 3, 4], [0, 1, 0, 0, 0])
    g_bits = {32: np.zeros((5, 32), bool)}
    # pid 1 has a match in camera 2; pid 2 only in its own camera 0 (not valid); pid 3 in camera 1; pid 4 none
    gallery = _set(g_bits, [1, 2, 3, 0, -1], [2, 0, 1, 1, 1])
    picked = pick_queries(query, gallery, 4)
    assert picked.tolist() == [0, 3]
    assert pick_queries(query, gallery, 1).tolist() == [0]


def test_config_validation():
    with pytest.raises(ValueError, match="gallery_sizes"):
        DemoConfig(gallery_sizes=1)
    with pytest.raises(ValueError, match="beta"):
        DemoConfig(betas=(0.0, 1.0))
    # too few identities for one PK batch of training identities: refused before any image is drawn
    with pytest.raises(ValueError, match=r"ids=2 leaves 0 identities to train on .* p=16: use --ids \d+"):
        DemoConfig(ids=2)
    with pytest.raises(ValueError, match="ids must be in"):
        DemoConfig(ids=0)
    with pytest.raises(ValueError, match="cams"):
        DemoConfig(cams=1)
    with pytest.raises(ValueError, match="val_fraction"):
        DemoConfig(val_fraction=0.0)
    DemoConfig(ids=2, model="any/run")  # no training: two identities are enough for the synthetic data


def test_suggested_minimum_of_ids_is_the_minimum():
    import re

    with pytest.raises(ValueError) as e:
        DemoConfig(ids=20, p=8)
    least = int(re.search(r"--ids (\d+)", str(e.value)).group(1))
    DemoConfig(ids=least, p=8)
    with pytest.raises(ValueError):
        DemoConfig(ids=least - 1, p=8)


def test_cli_demo_checks_paths_before_any_work(tmp_path, capsys, monkeypatch):
    """--model / --data / --weights that do not exist fail at once: nothing is generated or trained."""
    from ctfreid import demo
    from ctfreid.cli import main

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started working before checking its inputs")

    monkeypatch.setattr(demo, "_synthetic_data", no_work)
    monkeypatch.setattr(demo, "_run_demo", no_work)
    out = tmp_path / "out"
    for flags, name in ((["--model", str(tmp_path / "missing")], "missing"),
                        (["--data", str(tmp_path / "nodata")], "nodata"),
                        (["--weights", str(tmp_path / "w.pth")], "w.pth")):
        assert main(["demo", "--out", str(out), "--quiet", *flags]) == 2
        err = capsys.readouterr().err
        assert name in err and err.count("\n") == 1, err
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file"), "--quiet"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--quiet", "--ids", "2"]) == 2
    assert "--ids" in capsys.readouterr().err
    assert not out.exists()


def _brute_rank1(q: EncodedSet, g: EncodedSet, length: int) -> float:
    """Loop-based reference: Rank-1 of Hamming ranking at one length under the Market-1501 protocol."""
    qb = np.unpackbits(q.codes[length], axis=1).astype(int)
    gb = np.unpackbits(g.codes[length], axis=1).astype(int)
    hits, valid = 0, 0
    for i in range(len(q)):
        d = np.abs(gb - qb[i]).sum(1)
        order = np.argsort(d, kind="stable")
        keep = [j for j in order
                if g.pids[j] != -1 and not (g.pids[j] == q.pids[i] and g.camids[j] == q.camids[i])]
        if not any(g.pids[j] == q.pids[i] for j in keep):
            continue
        valid += 1
        hits += g.pids[keep[0]] == q.pids[i]
    return hits / valid


def tiny_config(out, **kw) -> DemoConfig:
    base = dict(out=str(out), ids=16, cams=3, images_per_id=6, image_height=64, image_width=32, height=32,
                width=16, padding=1, threads=1, epochs=1, warmup_epochs=0,
                milestones=(), p=4, k=2, betas=(0.1, 1.0, 10.0), distractor_ids=4, gallery_sizes=4,
                ranked_queries=2, batch_size=64, progress=False, lengths=(128, 64, 32), timing_repeats=2)
    base.update(kw)
    return DemoConfig(**base)


def test_tiny_demo_end_to_end(tmp_path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from ctfreid.data.datasets import load_dataset, split_records
    from ctfreid.eval.calibration import fit_target
    from ctfreid.eval.cost_model import default_cost_model
    from ctfreid.infer import encode_records, load_model
    from ctfreid.search.index import CtFIndex
    from ctfreid.search.thresholds import fit_thresholds

    out = tmp_path / "demo"
    summary = run_demo_quiet(tiny_config(out))
    for name in ("results.json", "results.md", "beta_sweep.png", "gallery_size.png", "ranked_lists.png",
                 "gallery.ctf", "thresholds.json", "run/model.pt"):
        assert (out / name).is_file(), name
    for png in ("beta_sweep.png", "gallery_size.png", "ranked_lists.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    doc = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in doc["table"]] == ["float", "hash32", "hash64", "hash128", "ctf"]
    assert len(doc["beta_sweep"]) == 3
    sizes = [r["gallery_size"] for r in doc["gallery_size_sweep"]]
    assert len(sizes) == 4 and sizes == sorted(sizes)
    md = (out / "results.md").read_text()
    assert "| CtF" in md and "speed-up vs 128-bit" in md and "median of 2 timed runs" in md

    # independent check of the wiring: re-encode with the saved model, brute-force Rank-1 of the longest code
    data = load_dataset(out / "data")
    model, info = load_model(out / "run")
    kw = dict(height=info["height"], width=info["width"])
    q, g = encode_records(model, data.query, **kw), encode_records(model, data.gallery, **kw)
    assert doc["evaluation"]["methods"]["hash128"]["rank1"] == pytest.approx(_brute_rank1(q, g, 128))
    # the thresholds: the accuracy target (tolerance 0.5) on the validation codes with the built-in cost
    # model, planned for the gallery (the library's fit on an independent encoding)
    val = encode_records(model, split_records("val", info, out / "data"), **kw)
    want = fit_target(val, "accuracy", 0.5, cost_model=default_cost_model(val.lengths), gallery_size=len(g))
    assert summary["thresholds"] == want.thresholds
    assert json.loads((out / "thresholds.json").read_text())["fit"]["thresholds"] == \
        {str(L): t for L, t in want.thresholds.items()}
    # the weighted stage 1 beside it: the library's weighted fit on the independent encoding, evaluated there
    from ctfreid.eval.evaluate import evaluate_sets

    wfit = fit_target(val, "accuracy", 0.5, cost_model=default_cost_model(val.lengths), gallery_size=len(g),
                      weight_bits=4)
    weighted = doc["weighted_stage1"]
    assert weighted["thresholds"] == {str(L): t for L, t in wfit.thresholds.items()}
    assert weighted["weights"]["bits"] == 4  # the scale up to float32 noise of the two encodings' batch sizes
    assert weighted["weights"]["scale"] == pytest.approx(wfit.weighting.scale, rel=1e-5)
    row = evaluate_sets(q, g, wfit.thresholds, methods=["ctf"], weighting=wfit.weighting)["methods"]["ctf"]
    assert weighted["mAP"] == pytest.approx(row["mAP"])
    assert weighted["stage1_keep_percent"] == pytest.approx(100 * row["candidates"]["32"] / len(g))
    # the saved index holds the gallery, its thresholds are those, its metadata the paths
    index = CtFIndex.load(out / "gallery.ctf")
    assert index.ntotal == len(data.gallery)
    assert {int(k): int(v) for k, v in index.thresholds.items()} == {int(k): v for k, v in summary["thresholds"].items()}
    # ... and the weighted stage 1 for image queries, in the index and in the run's thresholds.json
    assert index.weighted_thresholds == wfit.thresholds and index.weighting.bits == 4
    from ctfreid.search.thresholds import read_thresholds_file

    for path in (out / "thresholds.json", out / "run" / "thresholds.json"):
        fits = read_thresholds_file(path)
        assert fits.hamming == want.thresholds and fits.weighted == wfit.thresholds
    assert index.metadata["paths"] == [p for p, _, _ in data.gallery]
    assert index.metadata["pids"] == [pid for _, pid, _ in data.gallery]

    # a second run reuses data and the finished training run, and gives the same accuracy; --beta 2: DTO's
    again = run_demo_quiet(tiny_config(out, beta=2.0))
    assert again["results"]["methods"]["hash128"]["mAP"] == summary["results"]["methods"]["hash128"]["mAP"]
    assert again["thresholds"] == fit_thresholds(val.codes, val.pids, val.camids, beta=2.0)


def run_demo_quiet(cfg: DemoConfig) -> dict:
    from ctfreid.demo import run_demo

    return run_demo(cfg)
