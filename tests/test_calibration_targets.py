"""Thresholds aimed at a target (ctfreid.eval.calibration, ``ctfreid calibrate --target``): codes built so that
the thresholds that keep the accuracy are known, a time budget checked by recomputing the expected time and
the accuracy independently, the validation split by hand, and the command line's errors. A hand-made cost
model stands in for a measured one (no timing anywhere)."""

import json

import numpy as np
import pytest

from ctfreid.cli import main
from ctfreid.encoded import EncodedSet, save_encoded
from ctfreid.errors import CtfreidError
from ctfreid.eval.calibration import fit_target, fit_thresholds, format_fit, split_validation
from ctfreid.eval.cost_model import CostModel, expected_ms, stage_work
from ctfreid.eval.metrics import evaluate_ranking
from ctfreid.search.coarse_to_fine import ctf_rank
from ctfreid.search.hamming import hamming_distances
from ctfreid.search.thresholds import fit_thresholds as dto_thresholds
from ctfreid.search.thresholds import read_thresholds

LENGTHS = (32, 64, 256)
P = {32: 4, 64: 9, 256: 20}  # distance between an identity's two cameras at each length
D = {32: 1, 64: 3}  # distance of its decoy (another person) at the thresholded lengths; far at 256 bits


def model_for(lengths) -> CostModel:
    lengths = tuple(lengths)
    return CostModel(lengths=lengths, fixed_ms=0.002, scan_ms=1e-6,
                     rerank_ms={L: 1e-6 * L / 32 for L in lengths[1:]}, refill_ms=1e-6, sort_ms=1e-5, k=100)


def flip(code_bits: np.ndarray, positions: np.ndarray) -> np.ndarray:
    out = code_bits.copy()
    out[positions] ^= 1
    return out


def decoy_set(n_ids: int = 40, seed: int = 0) -> EncodedSet:
    """Per identity: two identical images from camera 0 (``X``), two from camera 1 (``X`` with ``P[L]`` bits
    flipped) and a decoy from camera 2 (another pid: ``X`` with ``D[L]`` other bits flipped, half the bits at
    256). A query from camera 0 keeps its match ahead of the decoy iff every threshold is >= ``P[L]``: a
    lower one stops the match at that stage while the decoy goes on and is ranked first."""
    rng = np.random.default_rng(seed)
    bits = {L: [] for L in LENGTHS}
    pids, cams = [], []
    for i in range(n_ids):
        for L in LENGTHS:
            x = rng.integers(0, 2, L, dtype=np.uint8)
            perm = rng.permutation(L)
            b = flip(x, perm[: P[L]])
            decoy = flip(x, perm[P[L]: P[L] + D[L]] if L in D else perm[: L // 2])
            bits[L] += [x, x, b, b, decoy]
        pids += [i + 1, i + 1, i + 1, i + 1, 1000 + i]
        cams += [0, 0, 1, 1, 2]
    return EncodedSet(codes={L: np.packbits(np.array(v), axis=1) for L, v in bits.items()},
                      pids=np.array(pids), camids=np.array(cams))


def folds_of(val, folds=4):
    return [split_validation(val, 0, j) for j in range(folds)]


def work(splits, th):
    """Per query of all folds: keep fractions and sort bins."""
    fractions, bins = [], []
    for query, gallery in splits:
        dist = [hamming_distances(query.codes[L], gallery.codes[L]) for L in gallery.lengths]
        c, b = stage_work(dist, [th[L] for L in gallery.lengths[:-1]])
        fractions.append(c / len(gallery))
        bins.append(b)
    return np.concatenate(fractions), np.concatenate(bins)


def val_accuracy(splits, th):
    """mAP and Rank-1 pooled over the queries of all folds (evaluate_ranking per fold, weighted by the
    number of valid queries)."""
    ms = []
    for query, gallery in splits:
        I = ctf_rank(query.codes, gallery.codes, th)[1]
        ms.append(evaluate_ranking(I, query.pids, query.camids, gallery.pids, gallery.camids))
    w = np.array([m.num_valid for m in ms], float)
    return float(np.dot(w, [m.mAP for m in ms]) / w.sum()), float(np.dot(w, [m.rank1 for m in ms]) / w.sum())


def test_split_validation_by_hand():
    codes = {32: np.zeros((9, 4), np.uint8), 64: np.zeros((9, 8), np.uint8)}
    codes[32][:, 0] = np.arange(9)  # image i has first byte i: which images are queries
    pids = np.array([1, 1, 1, 2, 2, 3, 3, -1, 1])
    cams = np.array([0, 0, 1, 0, 0, 1, 2, 1, 2])
    val = EncodedSet(codes=codes, pids=pids, camids=cams)
    q, g = split_validation(val, seed=0)
    # identity 1: one query per camera (0, 1, 2); identity 2 is seen by one camera: gallery only;
    # identity 3: both images are queries; pid -1 dropped
    assert sorted(zip(q.pids.tolist(), q.camids.tolist())) == [(1, 0), (1, 1), (1, 2), (3, 1), (3, 2)]
    assert sorted(zip(g.pids.tolist(), g.camids.tolist())) == [(1, 0), (2, 0), (2, 0)]
    # fold 1 takes identity 1's other camera-0 image as the query, the same images otherwise; fold 2 = fold 0
    def images(s):
        return sorted(s.codes[32][:, 0].tolist())

    q1, g1 = split_validation(val, seed=0, fold=1)
    assert {images(q)[0], images(q1)[0]} == {0, 1} and images(q)[1:] == images(q1)[1:] == [2, 5, 6, 8]
    assert images(split_validation(val, seed=0, fold=2)[0]) == images(q)
    assert sorted(images(q1) + images(g1)) == [0, 1, 2, 3, 4, 5, 6, 8]
    with pytest.raises(CtfreidError, match="two or more cameras"):
        split_validation(EncodedSet(codes=codes, pids=pids, camids=np.zeros(9, int)))


def test_accuracy_target_picks_the_cheapest_thresholds_that_keep_every_match():
    val = decoy_set()
    model = model_for(LENGTHS)
    fit = fit_target(val, "accuracy", tolerance=0.5, cost_model=model)
    assert fit.reference == {"mAP": 1.0, "rank1": 1.0, "length": 256}
    assert fit.val_map == 1.0 and fit.val_rank1 == 1.0
    # every threshold at least the match distance: a lower one loses half of the camera-0 queries' AP
    assert all(fit.thresholds[L] >= P[L] for L in (32, 64)), fit.thresholds
    # and the cheapest such: the same candidates as the known best thresholds P
    splits = folds_of(val)
    best = {32: P[32], 64: P[64]}
    f_best, bins_best = work(splits, best)
    f_fit, _ = work(splits, fit.thresholds)
    assert np.array_equal(f_fit, f_best)
    n = len(splits[0][1])
    assert fit.expected_ms == pytest.approx(expected_ms(model, f_best, n, bins=bins_best), rel=1e-12)
    assert fit.expected_ms < fit.no_pruning_ms
    assert fit.keep_fractions == pytest.approx(dict(zip((64, 256), f_best.mean(axis=0))))
    # one step below P at either length loses accuracy (the construction works as intended)
    assert val_accuracy(splits, {32: P[32] - 1, 64: P[64]})[0] < 0.9
    assert val_accuracy(splits, {32: P[32], 64: P[64] - 1})[0] < 0.9
    assert fit_thresholds(val.codes, val.pids, val.camids, "accuracy", 0.5, cost_model=model) == fit.thresholds
    assert "target accuracy" in format_fit(fit)


def test_a_larger_tolerance_buys_a_cheaper_search():
    val = decoy_set()
    model = model_for(LENGTHS)
    strict = fit_target(val, "accuracy", tolerance=0.5, cost_model=model)
    loose = fit_target(val, "accuracy", tolerance=60.0, cost_model=model)  # Rank-1 drops by 50
    assert loose.expected_ms < strict.expected_ms
    assert loose.val_map >= 1.0 - 0.60 and loose.val_rank1 >= 1.0 - 0.60
    assert any(loose.thresholds[L] < P[L] for L in (32, 64))


def benchmark_like_set(n_ids: int = 90, per_id: int = 8, lengths=(32, 128, 512), seed: int = 0) -> EncodedSet:
    """As benchmarks/bench_search.py: each length is the sign of its own projection of a shared latent
    (identity clusters of look-alikes, images with their own noise level); two cameras."""
    rng = np.random.default_rng(seed)
    clusters = rng.standard_normal((n_ids // 10 + 1, 64))
    ids = np.sqrt(0.7) * clusters[np.arange(n_ids) // 10] + np.sqrt(0.3) * rng.standard_normal((n_ids, 64))
    pids = np.repeat(np.arange(1, n_ids + 1), per_id)
    lat = ids[pids - 1] + rng.uniform(0.3, 1.2, (pids.size, 1)) * rng.standard_normal((pids.size, 64))
    codes = {L: np.packbits(lat @ rng.standard_normal((64, L)) > 0, axis=1) for L in lengths}
    return EncodedSet(codes=codes, pids=pids, camids=np.tile(np.arange(per_id) % 2, n_ids))


def test_time_budget_is_respected_and_spent_on_accuracy():
    val = benchmark_like_set()
    model = model_for(val.lengths)
    n = 100_000
    generous = fit_target(val, "time", budget_ms=1e9, cost_model=model, gallery_size=n)
    budget = 0.5 * generous.no_pruning_ms
    tight = fit_target(val, "time", budget_ms=budget, cost_model=model, gallery_size=n)
    splits = folds_of(val)
    for fit in (generous, tight):
        # the expected time and the accuracy, recomputed from the thresholds alone
        fractions, bins = work(splits, fit.thresholds)
        assert expected_ms(model, fractions, n, bins=bins) == pytest.approx(fit.expected_ms, rel=1e-12)
        mAP, rank1 = val_accuracy(splits, fit.thresholds)
        assert (mAP, rank1) == (pytest.approx(fit.val_map, abs=1e-12), pytest.approx(fit.val_rank1, abs=1e-12))
    assert tight.expected_ms <= budget < generous.no_pruning_ms
    assert tight.val_map <= generous.val_map
    # the budget buys at least the accuracy of no pruning when that fits, and of any DTO fit that fits
    no_pruning = {L: L for L in val.lengths[:-1]}
    assert generous.val_map >= val_accuracy(splits, no_pruning)[0] - 1e-12
    for beta in (0.3, 1.0, 2.0, 10.0):
        th = dto_thresholds(val.codes, val.pids, val.camids, beta=beta)
        f, b = work(splits, th)
        if expected_ms(model, f, n, bins=b) <= budget:
            assert tight.val_map >= val_accuracy(splits, th)[0] - 1e-12, beta
    with pytest.raises(CtfreidError, match=r"budget 0\.001 ms per query is unreachable for a gallery of 100000"):
        fit_target(val, "time", budget_ms=0.001, cost_model=model, gallery_size=n)


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "speed"}, r"target must be one of \['accuracy', 'time'\], got 'speed'"),
    ({"target": "accuracy", "tolerance": -0.1}, "tolerance must be a finite number >= 0"),
    ({"target": "time", "budget_ms": 0}, "budget_ms must be a finite number > 0"),
    ({"target": "time"}, "budget_ms must be a finite number > 0"),
    ({"target": "accuracy", "budget_ms": 1.0}, "budget_ms applies to target='time'"),
    ({"target": "accuracy", "gallery_size": 0}, "gallery_size must be a positive integer"),
])
def test_bad_targets_are_refused(kwargs, message):
    with pytest.raises(CtfreidError, match=message):
        fit_target(decoy_set(4), cost_model=model_for(LENGTHS), **kwargs)


def test_a_cost_model_of_other_lengths_is_refused():
    with pytest.raises(CtfreidError, match=r"measured for code lengths \[32, 128, 512\].*\[32, 64, 256\]"):
        fit_target(decoy_set(4), "accuracy", cost_model=model_for((32, 128, 512)))


# ------------------------------------------------------------------------------------------ command line
def cli(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refuses while parsing
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def files(tmp_path):
    save_encoded(tmp_path / "val.npz", decoy_set())
    save_encoded(tmp_path / "bench.npz", benchmark_like_set(lengths=LENGTHS))
    model_for(LENGTHS).save(tmp_path / "cost.json")
    return tmp_path


def test_cli_accuracy_target_writes_thresholds_that_evaluate_reads(files, capsys):
    rc, out, err = cli(capsys, "calibrate", "--val", files / "val.npz", "--target", "accuracy", "--tolerance", "0.5",
                       "--cost-model", files / "cost.json", "--gallery-size", 50_000, "--out", files / "th.json")
    assert rc == 0, err
    assert "thresholds: 32=4,64=" in out and "expected" in out and "50000 items" in out
    saved = json.loads((files / "th.json").read_text())
    assert saved["target"] == "accuracy" and saved["fit"]["tolerance"] == 0.5
    assert saved["cost_model"]["lengths"] == list(LENGTHS)
    th = read_thresholds(files / "th.json")
    assert th[32] == 4 and th[64] >= 9
    rc, _, err = cli(capsys, "evaluate", "--query", files / "val.npz", "--gallery", files / "val.npz",
                       "--thresholds", files / "th.json")
    assert rc == 0, err


def test_cli_time_target_dto_and_the_default(files, capsys):
    rc, _, err = cli(capsys, "calibrate", "--val", files / "val.npz", "--budget-ms", "1",
                       "--cost-model", files / "cost.json", "--out", files / "th.json")
    assert rc == 0, err
    saved = json.loads((files / "th.json").read_text())
    assert saved["target"] == "time" and saved["fit"]["expected_ms"] <= 1.0
    rc, _, err = cli(capsys, "calibrate", "--val", files / "bench.npz", "--beta", "2", "--out", files / "dto.json")
    assert rc == 0, err
    saved = json.loads((files / "dto.json").read_text())
    assert saved["target"] == "dto" and saved["beta"] == 2.0 and "fits" in saved
    # without a target or --beta: the accuracy target (tolerance 0.5)
    rc, _, err = cli(capsys, "calibrate", "--val", files / "val.npz", "--cost-model", files / "cost.json",
                     "--out", files / "default.json")
    assert rc == 0, err
    saved = json.loads((files / "default.json").read_text())
    assert saved["target"] == "accuracy" and saved["fit"]["tolerance"] == 0.5
    # --beta-sweep alone is still DTO's sweep
    rc, out, err = cli(capsys, "calibrate", "--val", files / "bench.npz", "--beta-sweep")
    assert rc == 0 and "DTO on" in out and "beta sweep" in out, err


@pytest.mark.parametrize("args, fragments", [
    (["--target", "accuracy", "--tolerance", "-1"], ["--tolerance", ">= 0"]),
    (["--budget-ms", "0"], ["--budget-ms", "> 0"]),
    (["--target", "time", "--budget-ms", "-2"], ["--budget-ms", "> 0"]),
    (["--target", "fastest"], ["--target", "invalid choice: 'fastest'"]),
    (["--target", "time"], ["--target time needs --budget-ms"]),
    (["--target", "time", "--budget-ms", "0.0001", "--cost-model", "COST"], ["budget 0.0001 ms", "unreachable"]),
    (["--target", "accuracy", "--beta", "2"], ["--beta applies to --target dto"]),
    (["--beta", "2", "--tolerance", "1"], ["--tolerance applies to --target accuracy, not dto"]),
    (["--target", "accuracy", "--budget-ms", "1"], ["--budget-ms applies to --target time"]),
    (["--target", "accuracy", "--cost-model", "MISSING"], ["no such file"]),
])
def test_cli_bad_input_is_one_line_exit_2(files, capsys, args, fragments):
    args = [str(files / "cost.json") if a == "COST" else str(files / "none.json") if a == "MISSING" else a
            for a in args]
    rc, _out, err = cli(capsys, "calibrate", "--val", files / "val.npz", *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("ctfreid calibrate: error:"), err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_assess_reports_given_thresholds_like_a_fit():
    val = decoy_set()
    model = model_for(LENGTHS)
    fit = fit_target(val, "accuracy", tolerance=0.5, cost_model=model)
    from ctfreid.eval.calibration import assess

    same = assess(val, fit.thresholds, model)
    assert same.target == "given" and same.thresholds == fit.thresholds
    assert (same.expected_ms, same.val_map, same.val_rank1) == (fit.expected_ms, fit.val_map, fit.val_rank1)
    assert same.keep_fractions == fit.keep_fractions and same.no_pruning_ms == fit.no_pruning_ms
    lower = assess(val, {32: P[32] - 1, 64: P[64]}, model)
    assert lower.val_map < 0.9 and lower.expected_ms < fit.expected_ms
    assert "thresholds as given" in format_fit(lower)
