"""DTO (Sec. 3.3): closed form against brute force, against counted TP/FP/FN, pairs, degenerate input."""

import json
import math

import numpy as np
import pytest

from ctfreid.codes import pack_codes
from ctfreid.errors import CtfreidError
from ctfreid.search.thresholds import (
    _negative_pairs,
    check_thresholds,
    fit_dto,
    fit_threshold,
    fit_thresholds,
    pair_distances,
    parse_thresholds,
    read_thresholds,
    save_thresholds,
)


def phi(t, mu, sigma):
    return 0.5 * (1 + math.erf((t - mu) / (sigma * math.sqrt(2))))


def brute_force_threshold(mu_r, s_r, mu_n, s_n, L, beta, rho):
    """Eq. 6 with TP = Phi_r, FP = rho Phi_n, FN = 1 - Phi_r, maximised by trying every t."""
    best_t, best_f = None, -1.0
    for t in range(L + 1):
        tp, fp, fn = phi(t, mu_r, s_r), rho * phi(t, mu_n, s_n), 1 - phi(t, mu_r, s_r)
        if tp == 0:  # P undefined, F = 0
            continue
        p, r = tp / (tp + fp), tp / (tp + fn)
        f = (1 + beta**2) * p * r / (beta**2 * p + r)
        if f > best_f + 1e-15:
            best_t, best_f = t, f
    return best_t, best_f


def two_point(mean, std, n=50):
    """Samples whose mean and (population) std are exactly ``mean`` and ``std``."""
    return np.tile([mean - std, mean + std], n)


@pytest.mark.parametrize(
    "mu_r,s_r,mu_n,s_n,L,beta,rho",
    [
        (8.0, 2.0, 16.0, 2.5, 32, 2.0, 1.0),
        (8.0, 2.0, 16.0, 2.5, 32, 0.1, 1.0),
        (40.0, 6.0, 64.0, 5.0, 128, 1.0, 1.0),
        (40.0, 6.0, 64.0, 5.0, 128, 2.0, 30.0),
        (150.0, 12.0, 256.0, 11.0, 512, 10.0, 1.0),
    ],
)
def test_fit_threshold_matches_brute_force_over_t(mu_r, s_r, mu_n, s_n, L, beta, rho):
    fit = fit_threshold(two_point(mu_r, s_r), two_point(mu_n, s_n), L, beta=beta, rho=rho)
    assert (fit.pos_mean, fit.pos_std, fit.neg_mean, fit.neg_std) == pytest.approx((mu_r, s_r, mu_n, s_n))
    t, f = brute_force_threshold(mu_r, s_r, mu_n, s_n, L, beta, rho)
    assert fit.threshold == t
    assert fit.f_beta == pytest.approx(f, rel=1e-9)
    assert fit.curve.shape == (L + 1,)
    assert fit.recall == pytest.approx(phi(t, mu_r, s_r))
    assert fit.neg_rate == pytest.approx(phi(t, mu_n, s_n))


def test_hand_worked_value_at_the_positive_mean():
    # At t = mu_r, Phi_r = 1/2 and Phi_n = Phi(-3) for mu_n = mu_r + 3 sigma_n: F = 5 * 0.5 / (4 + 0.5 + Phi(-3)).
    fit = fit_threshold(two_point(10, 2), two_point(16, 2), 32, beta=2.0)
    expected = 2.5 / (4.5 + 0.5 * (1 + math.erf(-3 / math.sqrt(2))))
    assert fit.curve[10] == pytest.approx(expected, rel=1e-12)


def test_closed_form_with_real_ratio_equals_counted_f_beta():
    """rho = N_n / N_r makes Eq. 8 the F_beta of the counted candidate set (Eq. 6)."""
    rng = np.random.default_rng(0)
    pos = rng.normal(20, 4, 100_000)
    neg = rng.normal(36, 5, 1_000_000)
    beta = 2.0
    fit = fit_threshold(pos, neg, 64, beta=beta, rho="auto")
    assert fit.rho == pytest.approx(10.0)
    ps, ns = np.sort(pos), np.sort(neg)
    t = np.arange(65)
    tp = np.searchsorted(ps, t, side="right").astype(float)  # distance <= t is a candidate
    fp = np.searchsorted(ns, t, side="right").astype(float)
    fn = pos.size - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        counted = np.nan_to_num((1 + beta**2) * tp / ((1 + beta**2) * tp + beta**2 * fn + fp))
    assert np.max(np.abs(counted - fit.curve)) < 0.01
    assert abs(int(np.argmax(counted)) - fit.threshold) <= 1
    # rho = 1 (the paper's default) weights negatives less and so keeps a larger threshold
    assert fit_threshold(pos, neg, 64, beta=beta).threshold > fit.threshold


def make_codes(pids, camids, lengths=(32, 64, 128), seed=0, noise=0.8):
    """Codes with identity structure: sign of an identity centre plus noise, shorter = prefix."""
    rng = np.random.default_rng(seed)
    ids = np.unique(pids)
    centres = {p: rng.standard_normal(max(lengths)) for p in ids}
    feats = np.stack([centres[p] for p in pids]) + noise * rng.standard_normal((len(pids), max(lengths)))
    feats += 0.3 * np.asarray(camids)[:, None]  # camera bias: same-camera pairs are closer
    return {L: pack_codes(feats[:, :L] > 0) for L in lengths}


def brute_pairs(codes, pids, camids):
    bits = np.unpackbits(codes, axis=1).astype(int)
    pos, neg = [], []
    for i in range(len(pids)):
        for j in range(i + 1, len(pids)):
            if pids[i] == -1 or pids[j] == -1:
                continue
            d = int(np.sum(bits[i] != bits[j]))
            if pids[i] == pids[j]:
                if camids is None or camids[i] != camids[j]:
                    pos.append(d)
            else:
                neg.append(d)
    return np.sort(pos), np.sort(neg)


def test_pair_distances_equal_brute_force_with_camera_rule_and_junk():
    rng = np.random.default_rng(1)
    pids = np.repeat(np.arange(1, 9), 5)
    pids[[3, 17, 30]] = -1  # junk is ignored
    camids = rng.integers(0, 3, pids.size)
    codes = make_codes(pids, camids)
    for cams in (camids, None):
        got = pair_distances(codes, pids, cams)
        assert sorted(got) == [32, 64]  # every length but the longest
        for L, d in got.items():
            pos, neg = brute_pairs(codes[L], pids, cams)
            assert np.array_equal(np.sort(d.positive), pos)
            assert np.array_equal(np.sort(d.negative), neg)
            assert (d.num_positive, d.num_negative) == (pos.size, neg.size)
    # the camera rule drops same-camera positives
    assert pair_distances(codes, pids, camids)[32].num_positive < pair_distances(codes, pids)[32].num_positive


def test_fit_thresholds_equals_fit_threshold_on_brute_force_pairs():
    rng = np.random.default_rng(2)
    pids = np.repeat(np.arange(10, 30), 4)
    camids = rng.integers(0, 4, pids.size)
    codes = make_codes(pids, camids, seed=3)
    th = fit_thresholds(codes, pids, camids, beta=1.5)
    assert sorted(th) == [32, 64]
    for L in (32, 64):
        pos, neg = brute_pairs(codes[L], pids, camids)
        assert th[L] == fit_threshold(pos, neg, L, beta=1.5).threshold
    auto = fit_dto(codes, pids, camids, rho="auto")
    pos, neg = brute_pairs(codes[32], pids, camids)
    assert auto[32].rho == pytest.approx(neg.size / pos.size)


def test_negative_sampling_is_uniform_deterministic_and_counts_all_pairs():
    pids = np.array([5, 7, 7, 9, 9, 9, -1])
    i, j, total = _negative_pairs(pids, max_pairs=1000, rng=np.random.default_rng(0))
    assert total == 11 and i.size == 11  # all pairs fit: enumerated exactly
    i, j, total = _negative_pairs(pids, max_pairs=5, rng=np.random.default_rng(0))
    assert total == 11 and i.size == 5
    i, j, _ = _negative_pairs(pids, max_pairs=110_000, rng=np.random.default_rng(4))
    assert np.all(i < j) and np.all(pids[i] != pids[j]) and np.all(pids[i] != -1) and np.all(pids[j] != -1)
    freq = np.unique(i * 10 + j, return_counts=True)[1] / i.size
    assert freq.size == 11 and np.allclose(freq, 1 / 11, rtol=0.05)
    i2, j2, _ = _negative_pairs(pids, max_pairs=110_000, rng=np.random.default_rng(4))
    assert np.array_equal(i, i2) and np.array_equal(j, j2)


def test_subsampled_fit_is_close_and_deterministic():
    rng = np.random.default_rng(5)
    pids = np.repeat(np.arange(40), 6)
    camids = rng.integers(0, 3, pids.size)
    codes = make_codes(pids, camids, seed=6)
    full = fit_dto(codes, pids, camids)
    a = fit_dto(codes, pids, camids, max_pairs=3000, seed=1)
    b = fit_dto(codes, pids, camids, max_pairs=3000, seed=1)
    assert a[32].num_neg == 3000 and a[32].num_pos <= 3000
    assert {L: f.threshold for L, f in a.items()} == {L: f.threshold for L, f in b.items()}
    assert abs(a[64].neg_mean - full[64].neg_mean) < 0.5
    assert abs(a[64].threshold - full[64].threshold) <= 2


def test_degenerate_inputs_raise_clear_errors():
    codes = make_codes(np.arange(6), np.zeros(6, int))
    with pytest.raises(ValueError, match="no relevant pairs"):
        fit_thresholds(codes, np.arange(6))  # every image its own identity
    pids = np.array([1, 1, 2, 2, 3, 3])
    with pytest.raises(ValueError, match="different cameras"):
        fit_thresholds(codes, pids, np.array([0, 0, 1, 1, 2, 2]))  # matches only within a camera
    with pytest.raises(ValueError, match="1 identity"):
        fit_thresholds(codes, np.array([4, 4, 4, 4, -1, -1]))
    same = {L: np.zeros((6, L // 8), np.uint8) for L in (32, 64)}
    with pytest.raises(ValueError, match="32-bit codes: all .* equal 0"):
        fit_thresholds(same, pids)
    with pytest.raises(ValueError, match="beta"):
        fit_thresholds(codes, pids, beta=0)
    with pytest.raises(ValueError, match="rho"):
        fit_thresholds(codes, pids, rho=-1)
    with pytest.raises(ValueError, match="at least two code lengths"):
        fit_thresholds({32: codes[32]}, pids)
    with pytest.raises(ValueError, match="no relevant"):
        fit_threshold([], [3, 4], 32)


def test_threshold_strings_and_files(tmp_path):
    assert parse_thresholds("32=9, 128=41,512=190") == {32: 9, 128: 41, 512: 190}
    for bad in ("", "32:9", "32=9,128", "a=b", "32=9=1"):
        with pytest.raises(ValueError, match="32=9,128=41,512=190"):
            parse_thresholds(bad)
    fits = fit_dto(make_codes(np.repeat(np.arange(8), 4), np.tile([0, 1], 16)), np.repeat(np.arange(8), 4),
                   np.tile([0, 1], 16))
    path = tmp_path / "th.json"
    save_thresholds(path, fits)
    data = json.loads(path.read_text())
    assert set(data) >= {"thresholds", "beta", "fits"} and data["beta"] == 2.0
    assert read_thresholds(str(path)) == {L: f.threshold for L, f in fits.items()}
    (tmp_path / "plain.json").write_text('{"32": 3, "64": 20}')
    assert read_thresholds(tmp_path / "plain.json") == {32: 3, 64: 20}
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_thresholds(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json"):
        read_thresholds(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("text, fragment", [
    ('{"32": 1e400, "64": 20}', r"thresholds\[32\] must be an integer Hamming distance in \[0, 32\], got inf"),
    ('{"32": 9.7, "64": 20}', r"thresholds\[32\] must be an integer .* got 9.7"),
    ('{"32": 11.5, "64": 20}', r"got 11.5"),
    ('{"32": true, "64": 20}', r"got True"),
    ('{"32": 9, "32": 10, "64": 20}', "given twice"),
    ('{"32": -1, "64": 20}', r"got -1"),
])
def test_thresholds_files_are_never_coerced(tmp_path, text, fragment):
    path = tmp_path / "th.json"
    path.write_text(text)
    with pytest.raises(CtfreidError, match=fragment):
        read_thresholds(path)


def test_threshold_strings_refuse_a_repeated_length():
    with pytest.raises(CtfreidError, match="given twice"):
        parse_thresholds("32=9,32=10")


def test_check_thresholds_is_the_one_contract():
    assert check_thresholds({"32": 9, 64: 20.0}, [64, 32, 128]) == {32: 9, 64: 20}
    with pytest.raises(CtfreidError, match=r"thresholds\[64\] must be an integer Hamming distance in \[0, 64\], got 65"):
        check_thresholds({32: 9, 64: 65}, [32, 64, 128])
    with pytest.raises(CtfreidError, match=r"missing \[64\]"):
        check_thresholds({32: 9}, [32, 64, 128])
