"""The built-in cost model (read back from its JSON by hand, and a prediction worked out by hand) and the
default targeted fit that ``index build``, the demo and the service use: deterministic, no timing."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from ctfreid.codes import pack_codes
from ctfreid.encoded import EncodedSet
from ctfreid.eval import calibration, cost_model
from ctfreid.eval.calibration import DEFAULT_TOLERANCE, default_fit, fit_target
from ctfreid.eval.cost_model import DEFAULT_COST_MODEL_FILE, default_cost_model

ROOT = Path(__file__).resolve().parents[1]


def raw() -> dict:
    return json.loads(DEFAULT_COST_MODEL_FILE.read_text())


def test_built_in_cost_model_ships_with_the_package_and_predicts_a_hand_worked_case():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "eval/default_cost_model.json" in conf["tool"]["setuptools"]["package-data"]["ctfreid"]
    r = raw()
    m = default_cost_model()
    assert m.lengths == (32, 128, 512, 2048) and m.k == 100 and "command" in m.info
    # 10,000 items scanned, 300 / 40 / 10 candidates ranked at 128 / 512 / 2048 bits, a refill for half
    # the queries, 50 sort bins: the formula of the module docstring, term by term
    want = (r["fixed_ms"] + r["scan_ms"] * 10_000 + r["rerank_ms"]["128"] * 300 + r["rerank_ms"]["512"] * 40
            + r["rerank_ms"]["2048"] * 10 + r["refill_ms"] * 0.5 * 10_000 + r["sort_ms"] * 50)
    got = m.predict_ms(10_000, {128: 300, 512: 40, 2048: 10}, refill=0.5, bins=50)
    assert got == pytest.approx(want, rel=1e-12)
    assert 0 < got < 1.0  # microseconds per item: a 10,000-item search takes well under a millisecond


def test_built_in_cost_model_for_other_lengths_interpolates_by_hand():
    r = raw()["rerank_ms"]
    m = default_cost_model((64, 128, 1024), k=10)
    assert m.k == 10 and m.lengths == (64, 128, 1024)
    assert m.scan_ms == pytest.approx(2 * raw()["scan_ms"])  # 64-bit scan: twice the bytes of 32
    assert m.rerank_ms[128] == pytest.approx(r["128"])
    # 1024 bits: a third of the way from 512 to 2048
    assert m.rerank_ms[1024] == pytest.approx(r["512"] + (r["2048"] - r["512"]) / 3)
    small = default_cost_model((32, 64))  # below 128: along the 128-512 segment, never under the cheapest
    slope = (r["512"] - r["128"]) / 384
    assert small.rerank_ms[64] == pytest.approx(max(r["128"] - 64 * slope, min(r.values())))


def decoy_val(seed: int = 0) -> EncodedSet:
    """Validation codes of a code pyramid (32/64/128 bits, prefixes of one 128-bit code): 24 identities,
    3 cameras, 2 images per camera."""
    rng = np.random.default_rng(seed)
    pids = np.repeat(np.arange(24), 6)
    cams = np.tile([0, 0, 1, 1, 2, 2], 24)
    bits = rng.random((24, 128))[pids] < 0.5
    bits ^= rng.random(bits.shape) < 0.12
    codes = {L: pack_codes(bits[:, :L]) for L in (32, 64, 128)}
    return EncodedSet(codes=codes, pids=pids, camids=cams)


def test_default_fit_is_fit_target_with_the_built_in_model_and_times_nothing(monkeypatch):
    def no_timing(*a, **k):
        raise AssertionError("the default fit must not measure a cost model")

    monkeypatch.setattr(cost_model, "measure_cost_model", no_timing)
    val = decoy_val()
    fit = default_fit(val, 5000)
    want = fit_target(val, "accuracy", DEFAULT_TOLERANCE, cost_model=default_cost_model((32, 64, 128)),
                      gallery_size=5000)
    assert fit.thresholds == want.thresholds and fit.expected_ms == want.expected_ms
    assert fit.target == calibration.DEFAULT_TARGET == "accuracy" and fit.tolerance == 0.5
    assert default_fit(val, 5000).thresholds == fit.thresholds  # deterministic
    assert fit.gallery_size == 5000 and default_fit(val).gallery_size == fit.val_gallery


def test_calibrate_without_a_cost_model_uses_the_built_in_one(tmp_path, monkeypatch, capsys):
    from ctfreid.cli import main
    from ctfreid.encoded import save_encoded

    monkeypatch.setattr(cost_model, "measure_cost_model", lambda *a, **k: pytest.fail("measured a cost model"))
    val = decoy_val(1)
    save_encoded(tmp_path / "val.npz", val)
    assert main(["calibrate", "--val", str(tmp_path / "val.npz"), "--out", str(tmp_path / "th.json")]) == 0
    saved = json.loads((tmp_path / "th.json").read_text())
    want = fit_target(val, "accuracy", 0.5, cost_model=default_cost_model(val.lengths))
    assert saved["thresholds"] == {str(L): t for L, t in want.thresholds.items()} and saved["target"] == "accuracy"
    assert "built-in cost model" in capsys.readouterr().out
    rc = main(["calibrate", "--val", str(tmp_path / "val.npz"), "--measure-cost-model", "--cost-model", "c.json"])
    assert rc == 2 and "exclude each other" in capsys.readouterr().err
