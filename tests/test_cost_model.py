"""The cost model of CtF search: predictions against hand-worked cases, the work it counts against the search
kernel's own counts, the least-squares fit against known coefficients and a brute-force NNLS, the JSON file,
and the measurement end to end (no timed assertions)."""

import itertools
import json

import numpy as np
import pytest

from ctfreid.errors import CtfreidError
from ctfreid.eval.cost_model import (
    CostModel,
    default_sizes,
    expected_ms,
    features,
    fit_coefficients,
    format_cost_model,
    generated_codes,
    measure_cost_model,
    model_from_coefficients,
    nnls,
    stage_work,
)
from ctfreid.search.index import CtFIndex

MODEL = CostModel(lengths=(32, 128, 512), fixed_ms=0.002, scan_ms=1e-6, rerank_ms={128: 1e-5, 512: 4e-5},
                  refill_ms=2e-6, sort_ms=1e-4, k=100)


def test_prediction_of_a_hand_worked_case():
    # 0.002 fixed + 10000 x 1e-6 scan + 300 x 1e-5 (128 bits) + 50 x 4e-5 (512 bits)
    # + 0.25 x 10000 x 2e-6 refill + 20 x 1e-4 sort = 0.002 + 0.01 + 0.003 + 0.002 + 0.005 + 0.002
    ms = MODEL.predict_ms(10_000, {128: 300, 512: 50}, refill=0.25, bins=20)
    assert ms == pytest.approx(0.024, rel=1e-12)
    assert MODEL.predict_ms(10_000, {128: 300, 512: 50}) == pytest.approx(0.017, rel=1e-12)


def test_expected_time_plans_from_keep_fractions():
    fractions = np.array([[0.03, 0.005], [0.001, 0.0005]])
    # n = 10000: counts (300, 50) and (10, 5); mean (155, 27.5); the second query has 10 < k = 100
    # stage-1 candidates: refill share 0.5; bins (20, 0): mean 10
    # 0.002 + 0.01 + 155e-5 + 27.5 x 4e-5 + 0.5 x 10000 x 2e-6 + 10 x 1e-4 = 0.02565
    assert expected_ms(MODEL, fractions, 10_000, bins=np.array([20, 0])) == pytest.approx(0.02565, rel=1e-12)
    # fixed costs do not scale, per-item costs do: n = 1e6, counts (30000, 5000) and (1000, 500), no refill
    # 0.002 + 1 + 15500 x 1e-5 + 2750 x 4e-5 = 0.002 + 1 + 0.155 + 0.11 = 1.267
    assert expected_ms(MODEL, fractions, 1_000_000) == pytest.approx(1.267, rel=1e-12)
    # a gallery smaller than k: refill whenever stage 1 keeps fewer than all n = 50 items
    # counts (1.5, 0.25), (0.05, 0.025): 0.002 + 5e-5 + 0.775e-5 + 0.1375 x 4e-5 + 50 x 2e-6 = 0.00216325
    assert expected_ms(MODEL, fractions, 50) == pytest.approx(0.00216325, rel=1e-12)
    # k given: with k = 5 neither query refills at n = 10000
    assert expected_ms(MODEL, fractions, 10_000, k=5) == pytest.approx(0.02565 - 0.01 - 0.001, rel=1e-12)


def test_stage_work_counts_and_sort_bins_by_hand():
    d32 = np.array([[1, 5, 2, 9]])
    d128 = np.array([[10, 30, 12, 3]])
    d512 = np.array([[40, 99, 60, 7]])
    counts, bins = stage_work([d32, d128, d512], [5, 20])
    # 128 bits ranks items 0, 1, 2 (d32 <= 5); 512 bits items 0 and 2 (d128 <= 20 as well)
    assert counts.tolist() == [[3, 2]]
    # last candidates 0 and 2: ranges 1..2 (2 bins), 10..12 (3), 40..60 (21)
    assert bins.tolist() == [26]
    counts, bins = stage_work([d32, d128, d512], [0, 20])
    assert counts.tolist() == [[0, 0]] and bins.tolist() == [0]


def test_stage_work_counts_equal_the_search_kernels_own():
    lengths = [32, 64, 128, 256]
    codes = generated_codes(lengths, 700, seed=3)
    q = {L: c[:40] for L, c in codes.items()}
    g = {L: c[40:] for L, c in codes.items()}
    index = CtFIndex()
    index.add(g)
    from ctfreid.search.hamming import hamming_distances

    dist = [hamming_distances(q[L], g[L]) for L in lengths]
    for th in ([6, 20, 50], [10, 28, 60], [3, 10, 40], [32, 64, 128]):
        counts, _ = stage_work(dist, th)
        hits = index.search_hits(q, 10, thresholds=dict(zip(lengths, th)), threads=1)
        assert np.array_equal(counts, hits.candidates[:, 1:]), th


def test_fit_recovers_known_coefficients_from_synthetic_timings():
    rng = np.random.default_rng(0)
    truth = np.array([0.003, 4e-7, 6e-6, 1.1e-5, 5e-5, 5e-7, 8e-6])  # fixed, scan, 3 reranks, refill, sort
    rows = []
    for n in (20_000, 200_000):
        for _ in range(15):
            c1 = rng.uniform(0.0005, 0.05) * n
            c2 = c1 * rng.uniform(0.1, 0.9)
            c3 = c2 * rng.uniform(0.1, 0.9)
            rows.append(features(n, [c1, c2, c3], rng.choice([0.0, 0.3, 1.0]), rng.uniform(50, 900)))
    X = np.array(rows)
    c = fit_coefficients(X, X @ truth)
    assert np.allclose(c, truth, rtol=1e-6, atol=0)
    model = model_from_coefficients([32, 128, 512, 2048], c)
    assert model.rerank_ms[2048] == pytest.approx(5e-5, rel=1e-6) and model.sort_ms == pytest.approx(8e-6, rel=1e-6)
    # a cost that is not there (no refill in any row) comes out as exactly 0, never negative
    X[:, 5] = 0.0
    c = fit_coefficients(X, X @ truth)
    assert c[5] == 0.0 and np.allclose(np.delete(c, 5), np.delete(truth, 5), rtol=1e-6)


def brute_force_nnls(A, b):
    """Every subset of free columns solved by least squares; the best solution that is >= 0."""
    best, best_r = np.zeros(A.shape[1]), np.linalg.norm(b)
    for r in range(1, A.shape[1] + 1):
        for cols in itertools.combinations(range(A.shape[1]), r):
            z = np.linalg.lstsq(A[:, cols], b, rcond=None)[0]
            if (z >= 0).all():
                x = np.zeros(A.shape[1])
                x[list(cols)] = z
                res = np.linalg.norm(A @ x - b)
                if res < best_r - 1e-12:
                    best, best_r = x, res
    return best


@pytest.mark.parametrize("seed", range(8))
def test_nnls_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((12, 5))
    b = rng.standard_normal(12)
    x = nnls(A, b)
    assert (x >= 0).all()
    assert np.linalg.norm(A @ x - b) == pytest.approx(np.linalg.norm(A @ brute_force_nnls(A, b) - b), abs=1e-9)


def test_save_and_load(tmp_path):
    path = tmp_path / "cost.json"
    MODEL.save(path)
    assert CostModel.load(path) == MODEL
    obj = json.loads(path.read_text())
    obj["rerank_ms"]["512"] = -1.0
    path.write_text(json.dumps(obj))
    with pytest.raises(CtfreidError, match=r"cost\.json.*rerank_ms\[512\].*>= 0"):
        CostModel.load(path)
    del obj["scan_ms"]
    path.write_text(json.dumps(obj))
    with pytest.raises(CtfreidError, match=r"cost\.json.*expected a JSON object written by CostModel.save"):
        CostModel.load(path)
    path.write_text("{not json")
    with pytest.raises(CtfreidError, match="not readable JSON"):
        CostModel.load(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        CostModel.load(tmp_path / "missing.json")
    with pytest.raises(CtfreidError, match=r"measured for code lengths \[32, 128, 512\].*\[32, 128, 512, 2048\]"):
        MODEL.check_lengths([32, 128, 512, 2048])


def test_bad_models_and_inputs_are_refused():
    with pytest.raises(CtfreidError, match="rerank_ms must give one cost per length"):
        CostModel(lengths=(32, 128), fixed_ms=0, scan_ms=0, rerank_ms={512: 0}, refill_ms=0)
    with pytest.raises(CtfreidError, match="fixed_ms must be a finite number >= 0"):
        CostModel(lengths=(32, 128), fixed_ms=float("nan"), scan_ms=0, rerank_ms={128: 0}, refill_ms=0)
    with pytest.raises(CtfreidError, match=r"fractions must be \[queries, 2\]"):
        expected_ms(MODEL, np.zeros((3, 3)), 100)
    with pytest.raises(CtfreidError, match="gallery size must be a positive integer"):
        expected_ms(MODEL, np.zeros((3, 2)), 0)
    with pytest.raises(CtfreidError, match="two or more different gallery sizes"):
        measure_cost_model([32, 128], sizes=[1000, 1000])


def test_default_sizes_bracket_the_planned_gallery():
    assert default_sizes(1_000_000) == (250_000, 1_000_000)
    assert default_sizes(600, k=100) == (200, 800)  # at least 8 k and 2 k


def test_measure_end_to_end_on_tiny_galleries():
    model = measure_cost_model([32, 64, 128], sizes=[300, 900], queries=30, repeats=1, k=20)
    assert model.lengths == (32, 64, 128) and model.k == 20
    assert (model.coefficients >= 0).all() and np.isfinite(model.coefficients).all()
    assert model.info["configurations"] == 40 and model.info["sizes"] == [300, 900]
    assert "per candidate ranked at 64 bits" in format_cost_model(model)
    assert CostModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model
