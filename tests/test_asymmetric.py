"""Weighted (asymmetric) stage 1: distances, rankings and CtF against NumPy brute force and the literal
CtF reference of tests/reference.py fed with brute-force weighted distances."""

import numpy as np
import pytest

from ctfreid.encoded import EncodedSet
from ctfreid.errors import CtfreidError
from ctfreid.search.asymmetric import (Weighting, bit_weights, max_distance, weight_scale, weighted_distances,
                                       weighted_rank)
from ctfreid.search.coarse_to_fine import ctf_rank, ctf_search
from ctfreid.search.hamming import hamming_distances
from tests.reference import correlated_code_sets, ref_ctf_rank_one, ref_distances


def brute_weighted(q: np.ndarray, w: np.ndarray, g: np.ndarray) -> np.ndarray:
    L = g.shape[1] * 8
    qb = np.unpackbits(q, axis=1)[:, :L].astype(np.int64)
    gb = np.unpackbits(g, axis=1)[:, :L].astype(np.int64)
    return ((qb[:, None, :] != gb[None, :, :]) * w[:, None, :].astype(np.int64)).sum(-1)


def test_hand_worked_distance():
    # query bits 1100 0000 ..., gallery bits 1010 0000 ...: they differ in bits 1 and 2
    q = np.zeros((1, 4), np.uint8)
    q[0, 0] = 0b11000000
    g = np.zeros((1, 4), np.uint8)
    g[0, 0] = 0b10100000
    w = np.zeros((1, 32), np.uint8)
    w[0, :4] = [9, 5, 3, 15]
    assert weighted_distances(q, w, g)[0, 0] == 5 + 3


@pytest.mark.parametrize("L", [32, 64, 96])
def test_distances_match_brute_force(L):
    rng = np.random.default_rng(L)
    q = rng.integers(0, 256, (7, L // 8), dtype=np.uint8)
    g = rng.integers(0, 256, (301, L // 8), dtype=np.uint8)
    w = rng.integers(0, 16, (7, L), dtype=np.uint8)
    np.testing.assert_array_equal(weighted_distances(q, w, g), brute_weighted(q, w, g))
    np.testing.assert_array_equal(weighted_distances(q[3], w[3], g), brute_weighted(q[3:4], w[3:4], g)[0])
    # unit weights: the Hamming distance
    np.testing.assert_array_equal(weighted_distances(q, np.ones_like(w), g), hamming_distances(q, g))


def test_weighted_rank_is_a_stable_sort():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 256, (5, 4), dtype=np.uint8)
    g = rng.integers(0, 256, (500, 4), dtype=np.uint8)
    w = rng.integers(0, 4, (5, 32), dtype=np.uint8)  # small weights: many ties
    D, I = weighted_rank(q, w, g)
    ref = brute_weighted(q, w, g)
    order = np.argsort(ref, axis=1, kind="stable")
    np.testing.assert_array_equal(I, order)
    np.testing.assert_array_equal(D, np.take_along_axis(ref, order, axis=1))


def ref_weighted_ctf(qc: dict, w: np.ndarray, gc: dict, th: dict) -> tuple[np.ndarray, np.ndarray]:
    """The reference with a weighted stage 1 (``ref_weighted_stages``)."""
    return ref_weighted_stages(qc, {min(gc): w}, gc, th)[:2]


@pytest.mark.parametrize("t1", [0, 20, 60, 140, max_distance(32)])
def test_ctf_rank_and_search_match_reference(t1):
    rng = np.random.default_rng(t1)
    qc, gc = correlated_code_sets(rng, 400, 6)
    w = rng.integers(0, 8, (6, 32), dtype=np.uint8)
    th = {32: t1, 128: 50}
    D_ref, I_ref = ref_weighted_ctf(qc, w, gc, th)
    D, I = ctf_rank(qc, gc, th, query_weights=w)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_array_equal(D, D_ref)
    for k in (1, 7, 100, 400, 405):  # k > candidates: the weighted stage-1 ranking continues
        Dk, Ik = ctf_search(qc, gc, th, k, query_weights=w)
        m = min(k, 400)
        np.testing.assert_array_equal(Ik[:, :m], I_ref[:, :m])
        np.testing.assert_array_equal(Dk[:, :m], D_ref[:, :m])
        assert (Ik[:, m:] == -1).all() and (Dk[:, m:] == np.iinfo(np.int32).max).all()
    D1, I1 = ctf_search({L: c[2] for L, c in qc.items()}, gc, th, 10, query_weights=w[2])
    np.testing.assert_array_equal(I1, I_ref[2, :10])


def test_unit_weights_give_the_symmetric_search():
    rng = np.random.default_rng(5)
    qc, gc = correlated_code_sets(rng, 700, 20)
    th = {32: 9, 128: 45}
    ones = np.ones((20, 32), np.uint8)
    for k in (5, 100):
        a, b = ctf_search(qc, gc, th, k), ctf_search(qc, gc, th, k, query_weights=ones)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(ctf_rank(qc, gc, th)[1], ctf_rank(qc, gc, th, query_weights=ones)[1])


def test_single_length_weighted():
    rng = np.random.default_rng(9)
    q = rng.integers(0, 256, (3, 4), dtype=np.uint8)
    g = rng.integers(0, 256, (50, 4), dtype=np.uint8)
    w = rng.integers(0, 16, (3, 32), dtype=np.uint8)
    D, I = ctf_search({32: q}, {32: g}, {}, 60, query_weights=w)
    ref = brute_weighted(q, w, g)
    order = np.argsort(ref, axis=1, kind="stable")
    np.testing.assert_array_equal(I[:, :50], order)
    assert (I[:, 50:] == -1).all()


def test_bit_weights_hand_worked():
    v = np.array([[0.0, 0.5, -1.0, -2.0, 0.1]], np.float32)
    np.testing.assert_array_equal(bit_weights(v, 1.0, bits=2), [[0, 2, 3, 3, 0]])  # round(|v| * 3), at most 3
    np.testing.assert_array_equal(bit_weights(v, 2.0, bits=1), [[0, 0, 1, 1, 0]])
    assert weight_scale(np.arange(1, 101, dtype=np.float32)[None], 0.5) == pytest.approx(50.5)


def test_bad_input_is_named():
    rng = np.random.default_rng(0)
    qc, gc = correlated_code_sets(rng, 100, 2)
    w = np.ones((2, 32), np.uint8)
    with pytest.raises(CtfreidError, match="query_weights must be integers \\[2, 32\\]"):
        ctf_search(qc, gc, {32: 5, 128: 40}, 5, query_weights=w[:, :16])
    with pytest.raises(CtfreidError, match="in \\[0, 15\\]"):
        ctf_search(qc, gc, {32: 5, 128: 40}, 5, query_weights=w * 16)
    with pytest.raises(CtfreidError, match="weighted distance in \\[0, 480\\]"):
        ctf_rank(qc, gc, {32: 481, 128: 40}, query_weights=w)
    with pytest.raises(CtfreidError, match="Hamming distance in \\[0, 32\\]"):
        ctf_rank(qc, gc, {32: 33, 128: 40})
    with pytest.raises(CtfreidError, match="bits"):
        bit_weights(np.ones((1, 32), np.float32), 1.0, bits=5)
    with pytest.raises(CtfreidError, match="scale"):
        bit_weights(np.ones((1, 32), np.float32), 0.0)
    with pytest.raises(CtfreidError, match="finite"):
        bit_weights(np.full((1, 32), np.nan, np.float32), 1.0)
    with pytest.raises(CtfreidError, match="all zero"):
        weight_scale(np.zeros((4, 32), np.float32))


# ------------------------------------------------------------------ calibration, files, command line
def weighted_decoy_set(n_ids: int = 30, seed: int = 0):
    """tests/test_calibration_targets.py's decoy set with values_32: the P[32] bits that differ between an
    identity's cameras have |bn(v)| near 0 in every image (weight 0), all others 1 (top weight). The match
    is then at weighted distance 0 and the decoy (D[32] other bits) at 7 with 3-bit weights, where the
    Hamming distances are 4 and 1: a weighted stage 1 can drop every decoy, a Hamming one none."""
    from tests.test_calibration_targets import D, LENGTHS, P, decoy_set

    base = decoy_set(n_ids, seed)
    rng = np.random.default_rng(seed)
    bits = np.unpackbits(base.codes[32], axis=1).astype(np.float32)
    mag = np.ones_like(bits)
    for i in range(n_ids):  # the bits that differ between images 0 and 2 of identity i: its P[32] camera bits
        rows = slice(5 * i, 5 * i + 5)
        flipped = bits[5 * i] != bits[5 * i + 2]
        assert flipped.sum() == P[32]
        mag[rows][:, flipped] = 0.01
    values = (2 * bits - 1) * mag * rng.uniform(0.9, 1.0, bits.shape).astype(np.float32)
    return EncodedSet(codes=base.codes, pids=base.pids, camids=base.camids, values=values), LENGTHS, D


def test_weighted_fit_drops_the_decoys_a_hamming_fit_keeps():
    from ctfreid.eval.calibration import fit_target
    from tests.test_calibration_targets import model_for

    val, lengths, D = weighted_decoy_set()
    model = model_for(lengths)
    ham = fit_target(val, "accuracy", tolerance=0.5, cost_model=model)
    wfit = fit_target(val, "accuracy", tolerance=0.5, cost_model=model, weight_bits=3)
    assert wfit.weighting.bits == 3 and wfit.weighting.scale == pytest.approx(np.quantile(np.abs(val.values), 0.99))
    assert wfit.val_map == 1.0 and wfit.val_rank1 == 1.0
    assert wfit.thresholds[32] < 7 * D[32]  # below every decoy's weighted distance
    assert ham.thresholds[32] >= 4  # the Hamming fit must keep the matches (4 bits away), and so the decoys
    assert wfit.keep_fractions[64] < ham.keep_fractions[64]
    assert wfit.to_dict()["weights"] == {"bits": 3, "scale": wfit.weighting.scale}
    # expected time: the cost model on the weighted stage-1 work, plus the weighted scan's extra cost per item
    from ctfreid.eval.calibration import WEIGHTED_SCAN_EXTRA_MS, split_validation
    from ctfreid.eval.cost_model import expected_ms, stage_work

    n = 10_000
    fit_n = fit_target(val, "accuracy", tolerance=0.5, cost_model=model, weight_bits=3, gallery_size=n)
    fractions, bins = [], []
    for j in range(4):
        q, g = split_validation(val, 0, j)
        dist = [weighted_distances(q.codes[32], wfit.weighting.weights(q.values), g.codes[32])]
        dist += [hamming_distances(q.codes[L], g.codes[L]) for L in lengths[1:]]
        c, b = stage_work(dist, [fit_n.thresholds[L] for L in lengths[:-1]])
        fractions.append(c / len(g))
        bins.append(b)
    base = expected_ms(model, np.concatenate(fractions), n, bins=np.concatenate(bins))
    assert fit_n.expected_ms == pytest.approx(base + n * WEIGHTED_SCAN_EXTRA_MS, rel=1e-12)


def test_values_round_trip_and_take(tmp_path):
    from ctfreid.encoded import load_encoded, save_encoded

    val, _, _ = weighted_decoy_set(4)
    save_encoded(tmp_path / "v.npz", val)
    back = load_encoded(tmp_path / "v.npz")
    np.testing.assert_array_equal(back.values, val.values)
    sub = back.take(np.array([1, 3]))
    np.testing.assert_array_equal(sub.values, val.values[[1, 3]])
    with pytest.raises(CtfreidError, match="values must be float32\\[20, 32\\]"):
        EncodedSet(codes=val.codes, pids=val.pids, camids=val.camids, values=val.values[:, :16])


def test_cli_calibrate_writes_both_fits_and_evaluate_uses_the_weighted_one_for_queries_with_values(tmp_path, capsys):
    import json

    from ctfreid.cli import main
    from ctfreid.encoded import save_encoded
    from ctfreid.eval.calibration import fit_target
    from ctfreid.search.thresholds import read_thresholds, read_thresholds_file
    from tests.test_calibration_targets import model_for

    val, lengths, _ = weighted_decoy_set()
    save_encoded(tmp_path / "val.npz", val)
    model = model_for(lengths)
    model.save(tmp_path / "cost.json")
    assert main(["calibrate", "--val", str(tmp_path / "val.npz"), "--weighted", "3", "--cost-model",
                 str(tmp_path / "cost.json"), "--out", str(tmp_path / "th.json")]) == 0
    assert "weighted stage 1: 3-bit weights" in capsys.readouterr().out
    saved = json.loads((tmp_path / "th.json").read_text())
    fits = read_thresholds_file(tmp_path / "th.json")
    # the two fits of the library, one Hamming and one weighted, side by side in one file
    ham = fit_target(val, "accuracy", tolerance=0.5, cost_model=model)
    wfit = fit_target(val, "accuracy", tolerance=0.5, cost_model=model, weight_bits=3)
    assert fits.hamming == ham.thresholds == read_thresholds(tmp_path / "th.json")
    assert fits.weighted == wfit.thresholds and fits.weighting == wfit.weighting
    assert saved["weighted_stage1"]["weights"] == {"bits": 3, "scale": wfit.weighting.scale}
    assert fits.weighted[32] != fits.hamming[32]
    # the default: 4-bit weights; --weighted 0: the Hamming fit alone
    assert main(["calibrate", "--val", str(tmp_path / "val.npz"), "--cost-model", str(tmp_path / "cost.json"),
                 "--out", str(tmp_path / "th4.json")]) == 0
    assert read_thresholds_file(tmp_path / "th4.json").weighting.bits == 4
    assert main(["calibrate", "--val", str(tmp_path / "val.npz"), "--weighted", "0", "--cost-model",
                 str(tmp_path / "cost.json"), "--out", str(tmp_path / "th0.json")]) == 0
    assert read_thresholds_file(tmp_path / "th0.json").weighted is None
    capsys.readouterr()
    assert main(["evaluate", "--query", str(tmp_path / "val.npz"), "--gallery", str(tmp_path / "val.npz"),
                 "--thresholds", str(tmp_path / "th.json"), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["ctf_weights"] == fits.weighting.to_dict()
    # the ctf row is the weighted CtF ranking (oracle: ctf_rank with the weights, evaluated independently)
    from ctfreid.eval.metrics import evaluate_ranking

    I = ctf_rank(val.codes, val.codes, fits.weighted, query_weights=fits.weighting.weights(val.values))[1]
    m = evaluate_ranking(I, val.pids, val.camids, val.pids, val.camids)
    assert result["methods"]["ctf"]["mAP"] == pytest.approx(m.mAP)
    # queries without values: the Hamming thresholds of the same file
    without_values = EncodedSet(codes=val.codes, pids=val.pids, camids=val.camids)
    save_encoded(tmp_path / "q.npz", without_values)
    assert main(["evaluate", "--query", str(tmp_path / "q.npz"), "--gallery", str(tmp_path / "val.npz"),
                 "--thresholds", str(tmp_path / "th.json"), "--json", str(tmp_path / "r2.json")]) == 0
    result = json.loads((tmp_path / "r2.json").read_text())
    I = ctf_rank(val.codes, val.codes, fits.hamming)[1]
    m = evaluate_ranking(I, val.pids, val.camids, val.pids, val.camids)
    assert "ctf_weights" not in result and result["methods"]["ctf"]["mAP"] == pytest.approx(m.mAP)
    # an older weighted-only file: evaluate needs the values, the Hamming readers refuse it with the reason
    legacy = {"thresholds": saved["weighted_stage1"]["thresholds"], "weights": saved["weighted_stage1"]["weights"]}
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    with pytest.raises(CtfreidError, match="only a fit for a weighted stage 1"):
        read_thresholds(tmp_path / "old.json")
    assert main(["evaluate", "--query", str(tmp_path / "q.npz"), "--gallery", str(tmp_path / "val.npz"),
                 "--thresholds", str(tmp_path / "old.json")]) == 2
    assert "values_32" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- the index
@pytest.mark.parametrize("side", [-37, 37])
def test_weighted_topk_on_either_side_of_the_kept_distances_matches_reference(side):
    """Up to ``_kernels.WEIGHTED_KEEP_MAX_N`` codes, one query's weighted stage 1 computes every distance once and
    takes from them both its candidates and, when they are fewer than k, the ranking beyond them; above, it
    scans the codes for each. Either way the answers are the reference's, removed codes skipped."""
    from ctfreid import CtFIndex
    from ctfreid.search import _kernels

    n = _kernels.WEIGHTED_KEEP_MAX_N + side  # not a multiple of 64: a partial last block
    rng = np.random.default_rng(n)
    qc, gc = correlated_code_sets(rng, n, 4)
    qc = {L: np.vstack([c, np.zeros_like(c[:1])]) for L, c in qc.items()}  # at distance 0 from removed codes (zeroed)
    w = rng.integers(0, 8, (5, 32), dtype=np.uint8)
    t1 = int(np.quantile(brute_weighted(qc[32], w, gc[32]), 0.003))  # about 50 candidates a query
    th = {32: t1, 128: 50}
    index = CtFIndex()
    index.add(gc)
    removed = rng.choice(n, n // 5, replace=False)
    removed = np.union1d(removed, np.arange(n - 20, n))  # in the partial block too
    index.remove_ids(removed, compact=False)  # dead slots stay, on the same side of the limit
    keep = np.setdiff1d(np.arange(n), removed)
    D_ref, I_ref = ref_weighted_ctf(qc, w, gc, th)
    Dk_ref, Ik_ref = ref_weighted_ctf(qc, w, {L: c[keep] for L, c in gc.items()}, th)
    for k in (5, 100, 400):
        D, I = ctf_search(qc, gc, th, k, query_weights=w)
        np.testing.assert_array_equal(I, I_ref[:, :k])
        np.testing.assert_array_equal(D, D_ref[:, :k])
        D, I = index.search(qc, k, threads=1, thresholds=th, query_weights=w)
        np.testing.assert_array_equal(I, keep[Ik_ref[:, :k]])
        np.testing.assert_array_equal(D, Dk_ref[:, :k])
    c1 = (brute_weighted(qc[32], w, gc[32][keep]) <= t1).sum(1)
    assert (c1[:4] > 5).all() and (c1 < 100).any()  # k = 100 needs the ranking beyond the candidates


def test_index_weighted_search_with_removals_matches_reference():
    from ctfreid import CtFIndex

    rng = np.random.default_rng(11)
    qc, gc = correlated_code_sets(rng, 300, 40)
    w = rng.integers(0, 8, (40, 32), dtype=np.uint8)
    th = {32: 60, 128: 50}
    index = CtFIndex()
    index.add(gc, ids=np.arange(300) * 10)
    index.weighted_thresholds = th  # the default of searches with query_weights
    index.weighting = Weighting(scale=1.0, bits=3)
    removed = np.arange(0, 300, 7)
    index.remove_ids(removed * 10)
    keep = np.setdiff1d(np.arange(300), removed)
    sub = {L: c[keep] for L, c in gc.items()}
    D_ref, I_ref = ref_weighted_ctf(qc, w, sub, th)
    ids_ref = keep[I_ref] * 10
    for k in (1, 10, 150, 400):  # 150, 400: more than the candidates: the weighted ranking continues
        m = min(k, keep.size)
        for threads in (1, 2):
            D, I = index.search(qc, k, threads=threads, query_weights=w)
            np.testing.assert_array_equal(I, ids_ref[:, :m])
            np.testing.assert_array_equal(D, D_ref[:, :m])
        hits = index.search_hits(qc, k, query_weights=w)
        np.testing.assert_array_equal(hits.ids, ids_ref[:, :m])
        np.testing.assert_array_equal(hits.finest_distances, D_ref[:, :m])
    D, I = index.rank(qc, query_weights=w)
    np.testing.assert_array_equal(I, ids_ref)
    np.testing.assert_array_equal(D, D_ref)
    # range_search: brute-force distances decide who is in, the reference ranking the order
    wd = brute_weighted(qc[32], w, sub[32])
    d128, d512 = ref_distances(qc[128], sub[128]), ref_distances(qc[512], sub[512])
    found = 0
    for radius in (200, 240, 512):
        lims, D, I = index.range_search(qc, radius, query_weights=w)
        for i in range(40):
            ok = (wd[i] <= th[32]) & (d128[i] <= th[128]) & (d512[i] <= radius)
            want = [j for j in I_ref[i] if ok[j]]
            np.testing.assert_array_equal(I[lims[i]:lims[i + 1]], keep[want] * 10)
            np.testing.assert_array_equal(D[lims[i]:lims[i + 1]], d512[i, want])
        found += int(lims[-1])
    assert found > 0
    with pytest.raises(CtfreidError, match="weighted distance"):
        index.search(qc, 5, thresholds={32: 500, 128: 50}, query_weights=w)
    with pytest.raises(CtfreidError, match="query_weights must be integers \\[40, 32\\]"):
        index.search(qc, 5, query_weights=w[:3])


def test_thresholds_file_with_weights(tmp_path):
    import json

    from ctfreid.search.thresholds import read_thresholds, read_thresholds_file

    path = tmp_path / "th.json"
    both = {"thresholds": {"32": 9, "128": 40},
            "weighted_stage1": {"thresholds": {"32": 200, "128": 41}, "weights": {"bits": 4, "scale": 2.5}}}
    path.write_text(json.dumps(both))
    fits = read_thresholds_file(path)
    assert fits.hamming == {32: 9, 128: 40} == read_thresholds(path)
    assert fits.weighted == {32: 200, 128: 41}  # weighted: up to 32 x 15
    assert fits.weighting.to_dict() == {"bits": 4, "scale": 2.5}
    both["weighted_stage1"]["thresholds"]["32"] = 481
    path.write_text(json.dumps(both))
    with pytest.raises(CtfreidError, match="'weighted_stage1': thresholds\\[32\\] must be an integer weighted "
                                           "distance in \\[0, 480\\]"):
        read_thresholds_file(path)
    both["weighted_stage1"] = {"thresholds": {"32": 20, "128": 40}, "weights": {"bits": 6, "scale": 2.5}}
    path.write_text(json.dumps(both))
    with pytest.raises(CtfreidError, match="'weights': weights: bits must be an integer in \\[1, 4\\]"):
        read_thresholds_file(path)
    both["weighted_stage1"] = {"thresholds": {"32": 20, "512": 40}, "weights": {"bits": 4, "scale": 2.5}}
    path.write_text(json.dumps(both))
    with pytest.raises(CtfreidError, match="lengths \\[32, 512\\], the Hamming ones for \\[32, 128\\]"):
        read_thresholds_file(path)
    both["weighted_stage1"] = [1, 2]
    path.write_text(json.dumps(both))
    with pytest.raises(CtfreidError, match="'weighted_stage1': expected an object"):
        read_thresholds_file(path)
    # a weighted fit alone (an older 'calibrate --weighted'): read as such, never as Hamming thresholds
    path.write_text(json.dumps({"thresholds": {"32": 200, "128": 40}, "weights": {"bits": 4, "scale": 2.5}}))
    fits = read_thresholds_file(path)
    assert fits.hamming is None and fits.weighted == {32: 200, 128: 40} and fits.weighting.bits == 4
    path.write_text(json.dumps({"thresholds": {"32": 20, "128": 40}}))
    assert read_thresholds_file(path).weighted is None and read_thresholds_file("32=9,128=40").weighted is None


def test_index_keeps_hamming_and_weighted_defaults(tmp_path, monkeypatch):
    from ctfreid import CtFIndex

    rng = np.random.default_rng(3)
    qc, gc = correlated_code_sets(rng, 200, 5)
    w = rng.integers(0, 8, (5, 32), dtype=np.uint8)
    index = CtFIndex()
    index.add(gc)
    index.thresholds = {32: 9, 128: 45}  # Hamming
    with pytest.raises(CtfreidError, match="index.weighted_thresholds is None"):
        index.search(qc, 5, query_weights=w)  # a Hamming threshold is not read as a weighted one
    index.weighted_thresholds, index.weighting = {32: 70, 128: 45}, Weighting(scale=2.0, bits=3)
    want = index.search(qc, 20, query_weights=w)  # the weighted default
    ref = ref_weighted_ctf(qc, w, gc, {32: 70, 128: 45})
    np.testing.assert_array_equal(want[1], ref[1][:, :20])
    ham = index.search(qc, 20)  # the Hamming default
    np.testing.assert_array_equal(ham[1], ctf_search(qc, gc, {32: 9, 128: 45}, 20)[1])
    index.save(tmp_path / "w.ctf")
    for back in (CtFIndex.load(tmp_path / "w.ctf"), CtFIndex.from_bytes(index.to_bytes())):
        assert back.weighting == index.weighting and back.thresholds == {32: 9, 128: 45}
        assert back.weighted_thresholds == {32: 70, 128: 45}
        got = back.search(qc, 20, query_weights=w)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(back.search(qc, 20)[1], ham[1])
    index.weighted_thresholds = {32: 481, 128: 45}
    with pytest.raises(CtfreidError, match="weighted distance in \\[0, 480\\]"):
        index.save(tmp_path / "bad.ctf")
    index.weighted_thresholds, index.weighting = {32: 70, 128: 45}, None
    with pytest.raises(CtfreidError, match="need index.weighting"):
        index.save(tmp_path / "bad.ctf")
    # a file of the format before both were kept: its only thresholds, with "weights", were the weighted ones
    index.weighting = Weighting(scale=2.0, bits=3)
    real = CtFIndex._header

    def old_header(self):
        header, arrays = real(self)
        header["thresholds"] = header.pop("weighted_thresholds")
        return header, arrays

    monkeypatch.setattr(CtFIndex, "_header", old_header)
    index.save(tmp_path / "old.ctf")
    monkeypatch.undo()
    old = CtFIndex.load(tmp_path / "old.ctf")
    assert old.weighted_thresholds == {32: 70, 128: 45} and old.thresholds == {}
    np.testing.assert_array_equal(old.search(qc, 20, query_weights=w)[1], want[1])
    with pytest.raises(CtfreidError, match="thresholds for weighted stages only"):
        old.search(qc, 5)
    with pytest.raises(CtfreidError, match="thresholds for weighted stages only"):
        old.range_search(qc, 100)


def noisy_copies(rng: np.random.Generator, n: int, nq: int, lengths: tuple) -> tuple[dict, dict, np.ndarray]:
    """Random gallery codes ``{L: uint8 [n, L // 8]}``, and queries that are copies of gallery items ``src``
    with 15 % of their bits flipped, so that some keep many candidates and some few."""
    g = {L: rng.integers(0, 256, (n, L // 8), dtype=np.uint8) for L in lengths}
    src = rng.integers(0, n, nq)
    q = {}
    for L, c in g.items():
        bits = np.unpackbits(c[src], axis=1)
        bits ^= (rng.random(bits.shape) < 0.15).astype(np.uint8)
        q[L] = np.packbits(bits, axis=1)
    return g, q, src


def test_batch_tile_scan_equals_the_one_query_path_across_tiles_and_the_stage2_filter(monkeypatch):
    # 70,000 codes: several scan tiles and the batch's stage-2 filter (BATCH_FILTER_MIN_N); 24 queries take
    # the tile scan (BATCH_MIN_QUERIES), one query at a time ctf_topk with weights (checked against the reference
    # above; forced: on byte-plane hosts one weighted query takes the tile scan too). Queries are noisy copies
    # of gallery items, so that some keep many candidates and some few.
    from ctfreid.search import _kernels

    rng = np.random.default_rng(21)
    n, nq = 70_000, 24
    assert n > _kernels.BATCH_FILTER_MIN_N and nq >= _kernels.BATCH_MIN_QUERIES
    g, q, src = noisy_copies(rng, n, nq, (32, 128, 512))
    w = rng.integers(0, 16, (nq, 32), dtype=np.uint8)
    d = weighted_distances(q[32], w, g[32])
    t1 = int(np.quantile(d, 0.01))
    # t2 = 64 keeps about half of the stage-1 candidates: the batch finishes most queries from its buffers;
    # t2 = 50 keeps about one, and k = 2000 more than any keeps: those queries are searched on their own
    assert t1 <= 254  # AVX2 hosts: the byte-plane masks (_kernels.BYTE_PLANES); 255 takes the other masks
    for th, k in (({32: t1, 128: 64}, 10), ({32: t1, 128: 64}, 100), ({32: t1, 128: 50}, 10), ({32: t1, 128: 64}, 2000),
                  ({32: 255, 128: 64}, 10)):
        D, I = ctf_search(q, g, th, k, query_weights=w)
        with monkeypatch.context() as m:
            m.setattr(_kernels, "BATCH_MIN_QUERIES", 1 << 40)  # ctf_topk
            for i in range(nq):
                Di, Ii = ctf_search({L: c[i] for L, c in q.items()}, g, th, k, query_weights=w[i])
                np.testing.assert_array_equal(I[i], Ii)
                np.testing.assert_array_equal(D[i], Di)
    # the same through an index with removed items (the live mask in the tile scan)
    from ctfreid import CtFIndex

    index = CtFIndex()
    index.add(g)
    index.remove_ids(np.concatenate([src[::2], rng.choice(n, 5_000, replace=False)]))
    th = {32: t1, 128: 64}
    D, I = index.search(q, 100, th, threads=1, query_weights=w)
    monkeypatch.setattr(_kernels, "BATCH_MIN_QUERIES", 1 << 40)
    for i in range(nq):
        Di, Ii = index.search({L: c[i] for L, c in q.items()}, 100, th, threads=1, query_weights=w[i])
        np.testing.assert_array_equal(I[i], Ii)
        np.testing.assert_array_equal(D[i], Di)


@pytest.mark.parametrize("n", [6_000, 20_000])
def test_weighted_batches_on_small_galleries_equal_the_one_query_path(monkeypatch, n):
    # galleries below WEIGHTED_TILE_MIN_N: on byte-plane hosts (AVX2 without AVX-512) a weighted batch of 32
    # takes the tile scan from 2^17 queries x codes on (one partial tile at 6,000 codes, three at 20,000;
    # _kernels.tile_scan) in ctf_search, elsewhere ctf_topk query by query; CtFIndex keeps byte planes on such
    # hosts and searches these batches query by query from them (below PLANES_WEIGHTED_TILE_MIN_N). Either way
    # the answers are those of one query at a time through ctf_topk, removed items included.
    from ctfreid import CtFIndex
    from ctfreid.search import _kernels

    rng = np.random.default_rng(n)
    nq = 32
    g, q, src = noisy_copies(rng, n, nq, (32, 128, 512))
    w = rng.integers(0, 16, (nq, 32), dtype=np.uint8)
    t1 = int(np.quantile(weighted_distances(q[32], w, g[32]), 0.02))
    assert _kernels.tile_scan(nq, 32, n, True, t1) == _kernels.BYTE_PLANES
    index = CtFIndex()
    index.add(g)
    index.remove_ids(np.concatenate([src[::3], rng.choice(n, n // 10, replace=False)]))
    for th, k in (({32: t1, 128: 60}, 10), ({32: t1, 128: 40}, 100)):
        D, I = index.search(q, k, th, threads=1, query_weights=w)
        Df, If = ctf_search(q, g, th, k, query_weights=w)
        with monkeypatch.context() as m:
            m.setattr(_kernels, "BATCH_MIN_QUERIES", 1 << 40)  # ctf_topk
            for i in range(nq):
                one = {L: c[i] for L, c in q.items()}
                Di, Ii = index.search(one, k, th, threads=1, query_weights=w[i])
                np.testing.assert_array_equal(I[i], Ii)
                np.testing.assert_array_equal(D[i], Di)
                Di, Ii = ctf_search(one, g, th, k, query_weights=w[i])
                np.testing.assert_array_equal(If[i], Ii)
                np.testing.assert_array_equal(Df[i], Di)


@pytest.mark.parametrize("weighted", [(512,), (32, 512), (512, 2048), (32, 128)])
def test_batch_with_weighted_later_stages_equals_the_one_query_path(weighted):
    # as above, with weights at later stages: weighted stages after stage 2 take the tile scan (stage 2 is
    # computed inside it, Hamming), a weighted stage 2 runs query by query; one query at a time (ctf_topk) is
    # checked against the literal reference in test_weighted_later_stages_match_the_reference
    from ctfreid.search.asymmetric import stage_weights
    from ctfreid.search.coarse_to_fine import batched

    rng = np.random.default_rng(22)
    n, nq = 70_000, 24
    g, q, src = noisy_copies(rng, n, nq, (32, 128, 512, 2048))
    w = {L: rng.integers(0, 16, (nq, L), dtype=np.uint8) for L in weighted}
    assert batched(nq, sorted(g), n, stage_weights(w, nq, sorted(g)), np.zeros(3, np.int64)) == (128 not in w)
    dist = {L: weighted_distances(q[L], w[L], g[L]) if L in w else hamming_distances(q[L], g[L])
            for L in (32, 128, 512)}
    t1 = int(np.quantile(dist[32], 0.01))
    alive = dist[32] <= t1
    t2 = [int(np.quantile(dist[128][alive], f)) for f in (0.5, 0.001)]  # about half kept; about one
    t3 = int(np.quantile(dist[512][alive & (dist[128] <= t2[0])], 0.5))
    for th, k in (({32: t1, 128: t2[0], 512: t3}, 10), ({32: t1, 128: t2[0], 512: t3}, 100),
                  ({32: t1, 128: t2[1], 512: t3}, 10), ({32: t1, 128: t2[0], 512: t3}, 2000)):
        D, I = ctf_search(q, g, th, k, query_weights=w)
        for i in range(nq):
            Di, Ii = ctf_search({L: c[i] for L, c in q.items()}, g, th, k,
                                query_weights={L: x[i] for L, x in w.items()})
            np.testing.assert_array_equal(I[i], Ii)
            np.testing.assert_array_equal(D[i], Di)
    from ctfreid import CtFIndex  # and through an index with removed items, on 1 and 2 threads

    index = CtFIndex()
    index.add(g)
    index.remove_ids(np.concatenate([src[::2], rng.choice(n, 5_000, replace=False)]))
    th = {32: t1, 128: t2[0], 512: t3}
    for threads in (1, 2):
        D, I = index.search(q, 100, th, threads=threads, query_weights=w)
        for i in range(nq):
            Di, Ii = index.search({L: c[i] for L, c in q.items()}, 100, th, threads=1,
                                  query_weights={L: x[i] for L, x in w.items()})
            np.testing.assert_array_equal(I[i], Ii)
            np.testing.assert_array_equal(D[i], Di)


def ref_weighted_stages(qc: dict, ws: dict, gc: dict, th: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """The literal CtF reference fed with brute-force distances, weighted at the lengths of ``ws``; and the
    per-length distances."""
    dists = {L: brute_weighted(qc[L], ws[L], gc[L]) if L in ws else ref_distances(qc[L], gc[L]) for L in sorted(gc)}
    nq = next(iter(qc.values())).shape[0]
    out = [ref_ctf_rank_one({L: d[i] for L, d in dists.items()}, th) for i in range(nq)]
    return np.array([d for _, d in out], np.int32), np.array([o for o, _ in out], np.int64), dists


@pytest.mark.parametrize("weighted", [(128,), (32, 128), (512,), (32, 128, 512)])
def test_weighted_later_stages_match_the_reference(weighted):
    """Weights at any stages (``query_weights={length: weights}``): functional search and ranking, and the
    index's search, hits, ranking and range search, against the literal reference with brute-force weighted
    distances; 20 queries (batches keep to the one-query kernel, as documented), 1 and 2 threads."""
    from ctfreid import CtFIndex

    rng = np.random.default_rng(sum(weighted))
    qc, gc = correlated_code_sets(rng, 400, 20)
    ws = {L: rng.integers(0, 16, (20, L), dtype=np.uint8) for L in weighted}
    # thresholds in weighted units where weighted (about 7.5 x the Hamming ones for uniform weights)
    th = {32: 80 if 32 in ws else 10, 128: 400 if 128 in ws else 52}
    D_ref, I_ref, dists = ref_weighted_stages(qc, ws, gc, th)
    assert ((dists[32] <= th[32]) & (dists[128] <= th[128])).any(axis=1).mean() >= 0.8  # most reach stage 3
    D, I = ctf_rank(qc, gc, th, query_weights=ws)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_array_equal(D, D_ref)
    index = CtFIndex()
    index.add(gc)
    for k in (1, 7, 100, 400, 405):
        m = min(k, 400)
        Dk, Ik = ctf_search(qc, gc, th, k, query_weights=ws)
        np.testing.assert_array_equal(Ik[:, :m], I_ref[:, :m])
        np.testing.assert_array_equal(Dk[:, :m], D_ref[:, :m])
        for threads in (1, 2):
            Dk, Ik = index.search(qc, k, th, threads=threads, query_weights=ws)
            np.testing.assert_array_equal(Ik, I_ref[:, :m])
            np.testing.assert_array_equal(Dk, D_ref[:, :m])
        hits = index.search_hits(qc, k, th, query_weights=ws)
        np.testing.assert_array_equal(hits.ids, I_ref[:, :m])
        for s, L in enumerate(hits.lengths):  # every length's distance of every hit that reached it
            reached = hits.stages > s
            np.testing.assert_array_equal(hits.distances[..., s][reached],
                                          np.take_along_axis(dists[L], I_ref[:, :m], 1)[reached])
    np.testing.assert_array_equal(index.rank(qc, th, query_weights=ws)[1], I_ref)
    lims, D, I = index.range_search(qc, 3000, th, query_weights=ws)
    for i in range(20):
        ok = (dists[32][i] <= th[32]) & (dists[128][i] <= th[128]) & (dists[512][i] <= 3000)
        want = [j for j in I_ref[i] if ok[j]]
        np.testing.assert_array_equal(I[lims[i]:lims[i + 1]], want)
        np.testing.assert_array_equal(D[lims[i]:lims[i + 1]], dists[512][i, want])
    assert lims[-1] > 0


def test_unit_weights_at_the_later_stages_give_the_hamming_search():
    rng = np.random.default_rng(12)
    qc, gc = correlated_code_sets(rng, 500, 8)
    th = {32: 9, 128: 48}
    ones = {L: np.ones((8, L), np.uint8) for L in (128, 512)}
    for k in (5, 100):
        a, b = ctf_search(qc, gc, th, k), ctf_search(qc, gc, th, k, query_weights=ones)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])


def test_bad_weights_for_the_later_stages_are_named():
    from ctfreid import CtFIndex

    rng = np.random.default_rng(13)
    qc, gc = correlated_code_sets(rng, 100, 3)
    index = CtFIndex()
    index.add(gc)
    index.thresholds = {32: 9, 128: 48}
    w = rng.integers(0, 16, (3, 128), dtype=np.uint8)
    with pytest.raises(CtfreidError, match=r"keys must be code lengths of the index \[32, 128, 512\], got 64"):
        index.search(qc, 5, query_weights={64: w})
    with pytest.raises(CtfreidError, match="at least one code length"):
        index.search(qc, 5, query_weights={})
    with pytest.raises(CtfreidError, match=r"query_weights\[128\] must be integers \[3, 128\]"):
        index.search(qc, 5, {32: 9, 128: 48}, query_weights={128: w[:, :32]})
    with pytest.raises(CtfreidError, match=r"thresholds\[128\] must be an integer weighted distance in \[0, 1920\]"):
        index.search(qc, 5, {32: 9, 128: 1921}, query_weights={128: w})
    with pytest.raises(CtfreidError, match="no thresholds for weighted stages"):
        index.search(qc, 5, query_weights={128: w})  # the index has Hamming defaults only
    lengths96 = {32: gc[32], 96: np.zeros((100, 12), np.uint8)}
    with pytest.raises(CtfreidError, match=r"query_weights\[96\]: a weighted later code must be a multiple of 64"):
        ctf_search({32: qc[32], 96: np.zeros((3, 12), np.uint8)}, lengths96, {32: 9}, 5,
                   query_weights={96: np.ones((3, 96), np.uint8)})


# ------------------------------------------------- weighted later stages: values, fits, files, defaults
def test_weighting_of_later_stages_hand_worked_and_bad_input():
    w = Weighting(scale=1.0, bits=2, later={"128": 2.0})
    assert w.later == {128: 2.0} and w.lengths(32) == [32, 128] and w.maxima(32) == {32: 480, 128: 1920}
    assert Weighting.from_dict(w.to_dict()) == w
    assert w.to_dict() == {"bits": 2, "scale": 1.0, "later": {"128": 2.0}}
    assert Weighting(scale=1.0).to_dict() == {"bits": 4, "scale": 1.0}  # files without later read as before
    v32 = np.zeros((1, 32), np.float32)
    v32[0, :3] = [0.5, -1.0, 0.1]
    v128 = np.zeros((1, 128), np.float32)
    v128[0, :3] = [1.0, -4.0, 0.2]  # scale 2: round(|v| / 2 * 3) -> 2 (1.5 rounds up), 3 (capped), 0
    got = w.query_weights(v32, {128: v128})
    assert sorted(got) == [32, 128]
    np.testing.assert_array_equal(got[32][0, :3], [2, 3, 0])
    np.testing.assert_array_equal(got[128][0, :3], [2, 3, 0])
    assert isinstance(Weighting(scale=1.0).query_weights(v32), np.ndarray)  # stage 1 alone: an array
    with pytest.raises(CtfreidError, match="weight the 128-bit code too: the queries need its values"):
        w.query_weights(v32)
    with pytest.raises(CtfreidError, match="values_128 must be float \\[1, 128\\]"):
        w.query_weights(v32, {128: v128[:, :64]})
    for bad in ({96: 1.0}, {"x": 1.0}, {True: 1.0}, {0: 1.0}):
        with pytest.raises(CtfreidError, match="later keys must be code lengths, multiples of 64 bits"):
            Weighting(scale=1.0, later=bad)
    with pytest.raises(CtfreidError, match="later\\[128\\] must be a positive number"):
        Weighting(scale=1.0, later={128: 0.0})
    with pytest.raises(CtfreidError, match="weights must be an object"):
        Weighting.from_dict({"scale": 1.0, "later": {"128": 1.0}, "other": 1})


def test_later_values_round_trip_take_and_bad_input(tmp_path):
    from ctfreid.encoded import load_encoded, save_encoded

    rng = np.random.default_rng(2)
    codes = {L: rng.integers(0, 256, (6, L // 8), dtype=np.uint8) for L in (32, 64, 256)}
    later = {64: rng.normal(size=(6, 64)).astype(np.float32)}
    e = EncodedSet(codes=codes, pids=np.arange(6), camids=np.zeros(6, int),
                   values=rng.normal(size=(6, 32)).astype(np.float32), later_values=later)
    save_encoded(tmp_path / "e.npz", e)
    with np.load(tmp_path / "e.npz") as z:
        assert {"values_32", "values_64"} <= set(z.files)
    back = load_encoded(tmp_path / "e.npz")
    np.testing.assert_array_equal(back.values, e.values)
    np.testing.assert_array_equal(back.later_values[64], later[64])
    np.testing.assert_array_equal(back.take(np.array([4, 1])).later_values[64], later[64][[4, 1]])
    with pytest.raises(CtfreidError, match="later_values\\[64\\] must be float32\\[6, 64\\]"):
        EncodedSet(codes=codes, pids=e.pids, camids=e.camids, later_values={64: later[64][:, :32]})
    with pytest.raises(CtfreidError, match="later_values keys must be code lengths after the shortest \\[64, 256\\]"):
        EncodedSet(codes=codes, pids=e.pids, camids=e.camids, later_values={32: e.values})
    np.savez(tmp_path / "bad.npz", pids=e.pids, camids=e.camids, values_128=np.zeros((6, 128), np.float32),
             **{f"codes_{L}": c for L, c in codes.items()})
    with pytest.raises(CtfreidError, match="'values_128' should be named values_<L> for a code length L of the set"):
        load_encoded(tmp_path / "bad.npz")


def later_decoy_set(n_ids: int = 30, seed: int = 0):
    """tests/test_calibration_targets.py's decoy set with values where only the 64-bit stage can tell: at 32
    bits every |bn(v)| is about 1 (weights all at the top: weighted = 7 x Hamming, so the match at 4 bits is
    behind the decoy at 1), at 64 bits the P[64] bits that differ between an identity's cameras have |bn(v)|
    near 0 (weight 0). A weighted 64-bit stage then puts the match at 0 and the decoy (D[64] bits) at 21:
    it can drop every decoy after stage 2, a Hamming 64-bit stage (match 9 bits away, decoy 3) none."""
    from tests.test_calibration_targets import LENGTHS, P, decoy_set

    base = decoy_set(n_ids, seed)
    rng = np.random.default_rng(seed)
    sign = {L: 2 * np.unpackbits(base.codes[L], axis=1).astype(np.float32) - 1 for L in (32, 64)}
    mag = np.ones_like(sign[64])
    for i in range(n_ids):
        flipped = sign[64][5 * i] != sign[64][5 * i + 2]
        assert flipped.sum() == P[64]
        mag[5 * i: 5 * i + 5][:, flipped] = 0.01
    noise = lambda x: rng.uniform(0.9, 1.0, x.shape).astype(np.float32)  # noqa: E731
    return EncodedSet(codes=base.codes, pids=base.pids, camids=base.camids, values=sign[32] * noise(sign[32]),
                      later_values={64: sign[64] * mag * noise(mag)}), LENGTHS


def test_a_weighted_later_stage_drops_the_decoys_a_weighted_stage1_keeps():
    from ctfreid.eval.calibration import (WEIGHTED_ROW_EXTRA_MS, WEIGHTED_SCAN_EXTRA_MS, fit_target,
                                          split_validation)
    from ctfreid.eval.cost_model import expected_ms, stage_work
    from tests.test_calibration_targets import D, model_for

    val, lengths = later_decoy_set()
    model = model_for(lengths)
    one = fit_target(val, "accuracy", tolerance=0.5, cost_model=model, weight_bits=3)
    both = fit_target(val, "accuracy", tolerance=0.5, cost_model=model, weight_bits=3, weight_later=(64,))
    assert one.weighting.later == {} and sorted(both.weighting.later) == [64]
    assert both.weighting.later[64] == pytest.approx(np.quantile(np.abs(val.later_values[64]), 0.99))
    assert both.val_map == 1.0 and both.val_rank1 == 1.0
    assert both.thresholds[64] < 7 * D[64]  # below every decoy's weighted 64-bit distance
    assert one.thresholds[64] >= 9  # a Hamming 64-bit stage must keep the matches (9 bits), so the decoys
    assert both.keep_fractions[256] < one.keep_fractions[256]
    assert both.to_dict()["weights"]["later"] == {"64": both.weighting.later[64]}
    # expected time: the cost model on this work, plus the weighted scan and the weighted 64-bit rows
    n = 10_000
    fit_n = fit_target(val, "accuracy", tolerance=0.5, cost_model=model, weight_bits=3, weight_later=(64,),
                       gallery_size=n)
    fractions, bins = [], []
    for j in range(4):
        q, g = split_validation(val, 0, j)
        w = fit_n.weighting.query_weights(q.values, q.later_values)
        dist = [weighted_distances(q.codes[L], w[L], g.codes[L]) for L in (32, 64)]
        dist.append(hamming_distances(q.codes[256], g.codes[256]))
        c, b = stage_work(dist, [fit_n.thresholds[L] for L in lengths[:-1]])
        fractions.append(c / len(g))
        bins.append(b)
    f = np.concatenate(fractions)
    base = expected_ms(model, f, n, bins=np.concatenate(bins))
    extra = n * (WEIGHTED_SCAN_EXTRA_MS + f[:, 0].mean() * WEIGHTED_ROW_EXTRA_MS)  # one 64-bit word a row
    assert fit_n.expected_ms == pytest.approx(base + extra, rel=1e-12)
    with pytest.raises(CtfreidError, match="weight_later must name lengths between the shortest and the longest"):
        fit_target(val, cost_model=model, weight_bits=3, weight_later=(256,))
    with pytest.raises(CtfreidError, match="weight_later needs weight_bits"):
        fit_target(val, cost_model=model, weight_later=(64,))
    no_later = EncodedSet(codes=val.codes, pids=val.pids, camids=val.camids, values=val.values)
    with pytest.raises(CtfreidError, match="a weighted 64-bit stage needs the validation images' values_64"):
        fit_target(no_later, cost_model=model, weight_bits=3, weight_later=(64,))


def test_thresholds_file_with_later_weights(tmp_path):
    import json

    from ctfreid.search.thresholds import read_thresholds_file

    path = tmp_path / "th.json"
    doc = {"thresholds": {"32": 9, "128": 40},
           "weighted_stage1": {"thresholds": {"32": 200, "128": 900},
                               "weights": {"bits": 4, "scale": 2.5, "later": {"128": 1.5}}}}
    path.write_text(json.dumps(doc))
    fits = read_thresholds_file(path)
    assert fits.weighted == {32: 200, 128: 900} and fits.weighting.later == {128: 1.5}
    assert fits.weighted_fit.weighting.lengths(32) == [32, 128]
    doc["weighted_stage1"]["thresholds"]["128"] = 1921
    path.write_text(json.dumps(doc))
    with pytest.raises(CtfreidError, match="thresholds\\[128\\] must be an integer weighted distance in \\[0, 1920\\]"):
        read_thresholds_file(path)
    doc["weighted_stage1"]["thresholds"]["128"] = 900  # without later weights: a Hamming 128-bit threshold
    del doc["weighted_stage1"]["weights"]["later"]
    path.write_text(json.dumps(doc))
    with pytest.raises(CtfreidError, match="thresholds\\[128\\] must be an integer Hamming distance in \\[0, 128\\]"):
        read_thresholds_file(path)
    doc["weighted_stage1"]["weights"]["later"] = {"512": 1.0}  # a length without a threshold
    doc["weighted_stage1"]["thresholds"]["128"] = 40
    path.write_text(json.dumps(doc))
    with pytest.raises(CtfreidError, match="'weights' weight lengths \\[512\\] that have no threshold"):
        read_thresholds_file(path)


def test_index_default_for_weighted_later_stages(tmp_path):
    from ctfreid import CtFIndex

    rng = np.random.default_rng(17)
    qc, gc = correlated_code_sets(rng, 500, 5)
    values = rng.normal(size=(5, 32)).astype(np.float32)
    later = {128: rng.normal(size=(5, 128)).astype(np.float32)}
    weighting = Weighting(scale=1.5, bits=3, later={128: 1.2})
    th = {32: 70, 128: 300}
    index = CtFIndex()
    index.add(gc)
    index.thresholds = {32: 9, 128: 45}
    index.weighted_thresholds, index.weighting = dict(th), weighting
    w = weighting.query_weights(values, later)
    ref = ref_weighted_stages(qc, w, gc, th)
    D, I = index.search(qc, 30, query_weights=w)  # the default: thresholds fitted with these stages weighted
    np.testing.assert_array_equal(I, ref[1][:, :30])
    np.testing.assert_array_equal(D, ref[0][:, :30])
    with pytest.raises(CtfreidError, match="query_weights weight the lengths \\[32\\], the index's weighted "
                                           "thresholds were fitted weighting \\[32, 128\\]"):
        index.search(qc, 5, query_weights=w[32])
    np.testing.assert_array_equal(index.search(qc, 30, th, query_weights=w)[1], I)  # per call, the same
    index.save(tmp_path / "w.ctf")
    back = CtFIndex.load(tmp_path / "w.ctf")
    assert back.weighting == weighting and back.weighted_thresholds == th
    np.testing.assert_array_equal(back.search(qc, 30, query_weights=w)[1], I)
    back.weighting = Weighting(scale=1.5, bits=3)  # stage 1 alone: 300 is no Hamming 128-bit threshold
    with pytest.raises(CtfreidError, match="thresholds\\[128\\] must be an integer Hamming distance in \\[0, 128\\]"):
        back.save(tmp_path / "bad.ctf")


def test_cli_calibrate_weight_later_and_evaluate_use_the_weighted_later_stage(tmp_path, capsys):
    from ctfreid.cli import main
    from ctfreid.encoded import save_encoded
    from ctfreid.eval.calibration import fit_target
    from ctfreid.eval.evaluate import evaluate_sets
    from ctfreid.search.thresholds import read_thresholds_file
    from tests.test_calibration_targets import model_for

    val, lengths = later_decoy_set()
    save_encoded(tmp_path / "val.npz", val)
    model = model_for(lengths)
    model.save(tmp_path / "cost.json")
    args = ["calibrate", "--val", str(tmp_path / "val.npz"), "--weighted", "3", "--cost-model",
            str(tmp_path / "cost.json")]
    assert main(args + ["--weight-later", "64", "--out", str(tmp_path / "th.json")]) == 0
    assert "weighted 32/64-bit stages: 3-bit weights" in capsys.readouterr().out
    fits = read_thresholds_file(tmp_path / "th.json")
    want = fit_target(val, "accuracy", tolerance=0.5, cost_model=model, weight_bits=3, weight_later=(64,))
    assert fits.weighted == want.thresholds and fits.weighting == want.weighting
    # evaluate: queries with values take the weighted stages; the oracle is evaluate_sets with the weighting
    q, g = val.take(np.arange(0, len(val), 5)), val
    save_encoded(tmp_path / "q.npz", q)
    assert main(["evaluate", "--query", str(tmp_path / "q.npz"), "--gallery", str(tmp_path / "val.npz"),
                 "--thresholds", str(tmp_path / "th.json"), "--json", str(tmp_path / "r.json")]) == 0
    assert "weighted 32/64-bit stages (3-bit weights" in capsys.readouterr().out
    import json

    got = json.loads((tmp_path / "r.json").read_text())["methods"]["ctf"]
    ref = evaluate_sets(q, g, fits.weighted, weighting=fits.weighting)["methods"]["ctf"]
    assert got["mAP"] == ref["mAP"] and got["candidates"] == ref["candidates"]
    assert main(args[:-4] + ["--weighted", "0", "--weight-later", "64"]) == 2
    assert "--weight-later weights later stages beside a weighted stage 1" in capsys.readouterr().err


def test_search_images_weights_every_stage_of_the_index_weighting_or_falls_back_to_hamming():
    from ctfreid import CtFIndex
    from ctfreid.infer.gallery import search_images

    rng = np.random.default_rng(23)
    qc, gc = correlated_code_sets(rng, 300, 4)
    values = rng.normal(size=(4, 32)).astype(np.float32)
    later = {128: rng.normal(size=(4, 128)).astype(np.float32)}
    index = CtFIndex()
    index.add(gc)
    index.weighted_thresholds = {32: 70, 128: 300}
    index.weighting = Weighting(scale=1.5, bits=3, later={128: 1.2})
    full = EncodedSet(codes=qc, pids=np.zeros(4, int), camids=np.zeros(4, int), values=values, later_values=later)
    want = index.search_hits(qc, 10, query_weights=index.weighting.query_weights(values, later))
    got = search_images(index, full, 10)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.distances, want.distances)
    stage1_only = EncodedSet(codes=qc, pids=np.zeros(4, int), camids=np.zeros(4, int), values=values)
    with pytest.raises(CtfreidError, match="need the values \\(bn\\(v\\)\\) of its weighted 32/128-bit stages"):
        search_images(index, stage1_only, 10)
    index.thresholds = {32: 9, 128: 45}  # with Hamming thresholds beside them: queries without values use those
    np.testing.assert_array_equal(search_images(index, stage1_only, 10).ids, index.search_hits(qc, 10).ids)
