"""evaluate_sets / beta_sweep end to end, and the `evaluate` / `calibrate` commands on tmp .npz files."""

import json

import numpy as np
import pytest

from ctfreid.cli import main
from ctfreid.codes import binarize
from ctfreid.encoded import EncodedSet, save_encoded
from ctfreid.eval.evaluate import (
    beta_sweep,
    candidate_counts,
    evaluate_sets,
    format_sweep,
    format_table,
)
from ctfreid.eval.metrics import evaluate_ranking
from ctfreid.search.thresholds import fit_thresholds

LENGTHS = (32, 64, 128)


def make_set(ids, per_id, seed, centres, features=True, cams=3, noise=1.2):
    """Identity centres + noise; codes of every length are signs of a prefix (shorter = coarser)."""
    rng = np.random.default_rng(seed)
    pids = np.repeat(np.asarray(ids), per_id)
    camids = rng.integers(0, cams, pids.size)
    f = (centres[pids] + noise * rng.standard_normal((pids.size, centres.shape[1]))).astype(np.float32)
    codes = {L: binarize(f[:, :L]) for L in LENGTHS}
    return EncodedSet(codes, pids, camids, features=f if features else None)


@pytest.fixture(scope="module")
def sets():
    centres = np.random.default_rng(0).standard_normal((80, 128)).astype(np.float32)
    val = make_set(range(1, 20), 5, 1, centres)
    query = make_set(range(20, 60), 1, 2, centres)
    gallery = make_set(range(20, 80), 4, 3, centres)
    gallery.pids[:5] = -1  # junk
    return val, query, gallery


def brute_hamming_ranking(q, g):
    """Stable ranking by Hamming distance computed on unpacked bits."""
    qb, gb = np.unpackbits(q, axis=1).astype(np.int16), np.unpackbits(g, axis=1).astype(np.int16)
    d = (qb[:, None, :] != gb[None, :, :]).sum(-1)
    return np.argsort(d, axis=1, kind="stable")


def test_rows_equal_metrics_of_brute_force_rankings(sets):
    _, query, gallery = sets
    res = evaluate_sets(query, gallery, None)
    assert list(res["methods"]) == ["float", "hash32", "hash64", "hash128"]  # no ctf without thresholds
    assert res["ctf_thresholds"] == {}
    labels = (query.pids, query.camids, gallery.pids, gallery.camids)
    for L in LENGTHS:
        ref = evaluate_ranking(brute_hamming_ranking(query.codes[L], gallery.codes[L]), *labels)
        row = res["methods"][f"hash{L}"]
        assert row["rank1"] == pytest.approx(ref.rank1) and row["mAP"] == pytest.approx(ref.mAP)
        assert row["rank5"] == pytest.approx(ref.rank5) and row["rank10"] == pytest.approx(ref.rank10)
        assert row["query_ms"] > 0
    d = ((query.features[:, None, :].astype(np.float64) - gallery.features[None]) ** 2).sum(-1)
    ref = evaluate_ranking(np.argsort(d, axis=1, kind="stable"), *labels)
    assert res["methods"]["float"]["mAP"] == pytest.approx(ref.mAP)
    assert res["skipped_queries"] == ref.num_skipped


def test_ctf_with_full_thresholds_ranks_by_the_longest_code(sets):
    _, query, gallery = sets
    res = evaluate_sets(query, gallery, {32: 32, 64: 64})
    # Every item reaches the last stage; ties at 128 bits keep the 64-bit order, then 32-bit, then gallery.
    d = {L: (np.unpackbits(query.codes[L], axis=1)[:, None, :] != np.unpackbits(gallery.codes[L], axis=1)[None])
         .sum(-1) for L in LENGTHS}
    pos = np.broadcast_to(np.arange(len(gallery)), d[32].shape)
    ranking = np.stack([np.lexsort((pos[i], d[32][i], d[64][i], d[128][i])) for i in range(len(query))])
    ref = evaluate_ranking(ranking, query.pids, query.camids, gallery.pids, gallery.camids)
    ctf = res["methods"]["ctf"]
    assert ctf["rank1"] == pytest.approx(ref.rank1) and ctf["mAP"] == pytest.approx(ref.mAP)
    assert ctf["candidates"] == {"32": len(gallery), "64": len(gallery)}
    assert res["ctf_thresholds"] == {"32": 32, "64": 64}


def test_ctf_with_full_thresholds_equals_longest_code_row_without_ties():
    # Gallery item k differs from the (single) query code in k bits: no ties at any stage's final length.
    rng = np.random.default_rng(11)
    base = rng.integers(0, 2, 128).astype(bool)
    flips = rng.permutation(100)
    bits = np.tile(base, (100, 1))
    for row, k in enumerate(flips):
        bits[row, rng.choice(128, k, replace=False)] ^= True
    g_codes = {L: binarize(np.where(bits[:, :L], 1.0, -1.0)) for L in LENGTHS}
    q_codes = {L: np.repeat(binarize(np.where(base[None, :L], 1.0, -1.0)), 3, axis=0) for L in LENGTHS}
    gallery = EncodedSet(g_codes, rng.integers(1, 6, 100), rng.integers(0, 3, 100))
    query = EncodedSet(q_codes, np.array([1, 2, 3]), np.array([0, 1, 2]))
    res = evaluate_sets(query, gallery, {32: 32, 64: 64})["methods"]
    for key in ("rank1", "rank5", "rank10", "mAP"):
        assert res["ctf"][key] == pytest.approx(res["hash128"][key])


def test_candidate_counts_match_brute_force(sets):
    _, query, gallery = sets
    th = {32: 12, 64: 26}
    bits = {L: (np.unpackbits(query.codes[L], axis=1)[:, None, :] != np.unpackbits(gallery.codes[L], axis=1)[None])
            .sum(-1) for L in (32, 64)}
    stage1 = bits[32] <= 12
    stage2 = stage1 & (bits[64] <= 26)
    got = candidate_counts(query.codes, gallery.codes, th, block_size=7)
    assert got[32] == pytest.approx(stage1.sum(1).mean()) and got[64] == pytest.approx(stage2.sum(1).mean())
    assert 0 < got[64] < got[32] < len(gallery)


def test_features_row_only_with_features_and_bad_inputs(sets):
    _, query, gallery = sets
    no_feat = EncodedSet(query.codes, query.pids, query.camids)
    assert "float" not in evaluate_sets(no_feat, gallery)["methods"]
    with pytest.raises(ValueError, match="every code length but the longest"):
        evaluate_sets(query, gallery, {32: 5})
    with pytest.raises(ValueError, match=r"\[0, 64\]"):
        evaluate_sets(query, gallery, {32: 5, 64: 70})
    short = EncodedSet({32: query.codes[32], 64: query.codes[64]}, query.pids, query.camids)
    with pytest.raises(ValueError, match="lengths"):
        evaluate_sets(short, gallery)


def test_table_and_sweep(sets):
    val, query, gallery = sets
    th = fit_thresholds(val.codes, val.pids, val.camids)
    res = evaluate_sets(query, gallery, th)
    text = format_table(res)
    for name in ("float", "hash32", "hash64", "hash128", "ctf", "speed-up vs hash128", "skipped queries"):
        assert name in text
    rows = beta_sweep(val, query, gallery, betas=[0.1, 2.0])
    assert [r["beta"] for r in rows] == [0.1, 2.0]
    for r in rows:
        expected = fit_thresholds(val.codes, val.pids, val.camids, beta=r["beta"])
        assert r["thresholds"] == {str(L): t for L, t in expected.items()}
        assert {"rank1", "mAP", "query_ms", "candidates"} <= set(r)
    assert rows[1]["thresholds"] == {str(L): t for L, t in th.items()}
    assert rows[1]["mAP"] == pytest.approx(res["methods"]["ctf"]["mAP"])
    assert "beta" in format_sweep(rows)
    only_th = beta_sweep(val, betas=[1.0])
    assert "rank1" not in only_th[0] and "expected_recall" in only_th[0]


def test_search_k_times_the_serving_path_of_binary_rows(sets):
    val, query, gallery = sets
    th = fit_thresholds(val.codes, val.pids, val.camids)
    plain = evaluate_sets(query, gallery, th)
    res = evaluate_sets(query, gallery, th, search_k=10)
    assert res["search_k"] == 10 and "search_k" not in plain
    assert "search_ms" not in res["methods"]["float"]
    for name in ("hash32", "hash64", "hash128", "ctf"):
        assert res["methods"][name]["search_ms"] > 0
        assert "search_ms" not in plain["methods"][name]
        # the accuracy columns come from the full rankings either way
        assert res["methods"][name]["mAP"] == plain["methods"][name]["mAP"]
    text = format_table(res)
    assert "top-10 ms" in text and "top-10 ms" not in format_table(plain)
    with pytest.raises(ValueError, match="k"):
        evaluate_sets(query, gallery, th, search_k=0)
    again = evaluate_sets(query, gallery, th, search_k=10, repeats=3)
    for name, row in again["methods"].items():
        assert (row["rank1"], row["mAP"]) == (res["methods"][name]["rank1"], res["methods"][name]["mAP"])
        assert row["query_ms"] > 0
    with pytest.raises(ValueError, match="repeats"):
        evaluate_sets(query, gallery, th, repeats=0)


@pytest.fixture
def files(tmp_path, sets):
    val, query, gallery = sets
    paths = {}
    for name, s in (("val", val), ("q", query), ("g", gallery)):
        paths[name] = tmp_path / f"{name}.npz"
        save_encoded(paths[name], s)
    return tmp_path, paths


def test_cli_evaluate_with_thresholds_and_json(files, capsys):
    tmp, p = files
    out = tmp / "res.json"
    rc = main(["evaluate", "--query", str(p["q"]), "--gallery", str(p["g"]), "--thresholds", "32=12,64=28",
               "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"methods", "ctf_thresholds", "skipped_queries"}
    assert list(data["methods"]) == ["float", "hash32", "hash64", "hash128", "ctf"]
    for row in data["methods"].values():
        assert set(row) >= {"rank1", "rank5", "rank10", "mAP", "query_ms"}
        assert 0 <= row["mAP"] <= 1
    assert data["ctf_thresholds"] == {"32": 12, "64": 28}
    assert "ctf" in capsys.readouterr().out
    assert main(["evaluate", "--query", str(p["q"]), "--gallery", str(p["g"]), "--thresholds", "32=12,64=28",
                 "--search-k", "5", "--repeats", "2"]) == 0
    assert "top-5 ms" in capsys.readouterr().out


def test_cli_calibrate_then_evaluate(files, capsys):
    tmp, p = files
    th_file = tmp / "th.json"
    assert main(["calibrate", "--val", str(p["val"]), "--beta", "1", "--out", str(th_file)]) == 0
    saved = json.loads(th_file.read_text())
    assert set(saved) >= {"thresholds", "beta", "fits"} and saved["beta"] == 1.0
    val = np.load(p["val"])
    codes = {L: val[f"codes_{L}"] for L in LENGTHS}
    expected = fit_thresholds(codes, val["pids"], val["camids"], beta=1.0)
    assert saved["thresholds"] == {str(L): t for L, t in expected.items()}
    out = tmp / "a.json"
    assert main(["evaluate", "--query", str(p["q"]), "--gallery", str(p["g"]), "--thresholds", str(th_file),
                 "--json", str(out)]) == 0
    out2 = tmp / "b.json"
    assert main(["evaluate", "--query", str(p["q"]), "--gallery", str(p["g"]), "--calibrate", str(p["val"]),
                 "--beta", "1", "--json", str(out2)]) == 0
    a, b = json.loads(out.read_text()), json.loads(out2.read_text())
    assert a["ctf_thresholds"] == b["ctf_thresholds"] == saved["thresholds"]
    assert a["methods"]["ctf"]["mAP"] == b["methods"]["ctf"]["mAP"]
    capsys.readouterr()
    assert main(["calibrate", "--val", str(p["val"]), "--beta-sweep", "--betas", "0.1,1",
                 "--query", str(p["q"]), "--gallery", str(p["g"])]) == 0
    text = capsys.readouterr().out
    assert "beta sweep" in text and "Rank-1" in text


def test_cli_errors_are_one_line(files, capsys):
    tmp, p = files
    base = ["evaluate", "--query", str(p["q"]), "--gallery", str(p["g"])]
    assert main(base + ["--thresholds", "32:12"]) == 2
    err = capsys.readouterr().err
    assert "32=9,128=41,512=190" in err and err.count("\n") == 1
    assert main(["evaluate", "--query", str(tmp / "nope.npz"), "--gallery", str(p["g"])]) == 2
    err = capsys.readouterr().err
    assert "nope.npz" in err and "no such file" in err and err.count("\n") == 1
    assert main(base + ["--beta", "2"]) == 2
    assert "--calibrate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(base + ["--thresholds", "32=1,64=2", "--calibrate", str(p["val"])])
    assert e.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    # query and gallery with different code lengths
    q = np.load(p["q"])
    save_encoded(tmp / "q2.npz", EncodedSet({32: q["codes_32"]}, q["pids"], q["camids"]))
    assert main(["evaluate", "--query", str(tmp / "q2.npz"), "--gallery", str(p["g"])]) == 2
    assert "code lengths" in capsys.readouterr().err
    assert main(["calibrate", "--val", str(p["val"]), "--rho", "x"]) == 2
    assert "--rho" in capsys.readouterr().err


def test_cli_outputs_that_are_inputs_and_an_empty_thresholds_spec_are_refused(files, capsys):
    """--json / --out naming an input file would replace it by the results (a typo destroys encoded sets);
    --thresholds "" (an unset shell variable) used to evaluate without CtF, saying nothing."""
    tmp, p = files
    before = {name: path.read_bytes() for name, path in p.items()}
    q, g, val = str(p["q"]), str(p["g"]), str(p["val"])
    link = tmp / "link.npz"
    link.symlink_to(p["g"])
    cases = [
        (["evaluate", "--query", q, "--gallery", g, "--json", q], "--json", "is the --query file"),
        (["evaluate", "--query", q, "--gallery", g, "--json", str(link)], "--json", "is the --gallery file"),
        (["evaluate", "--query", q, "--gallery", g, "--calibrate", val, "--json", val], "is the --calibrate file"),
        (["calibrate", "--val", val, "--beta", "1", "--out", val], "--out", "is the --val file"),
        (["calibrate", "--val", val, "--beta-sweep", "--betas", "1", "--query", q, "--gallery", g, "--out", g],
         "is the --gallery file"),
        (["evaluate", "--query", q, "--gallery", g, "--thresholds", ""], "thresholds", "LENGTH=DISTANCE"),
    ]
    for argv, *fragments in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert all(f in err for f in fragments), (argv, err)
    assert {name: path.read_bytes() for name, path in p.items()} == before


def test_encoded_set_round_trip_with_meta(tmp_path, sets):
    from ctfreid.encoded import load_encoded

    _, query, _ = sets
    meta = {"model": {"fingerprint": "abc123", "lengths": [32, 64, 128]}, "split": "query", "flip": False}
    s = EncodedSet(query.codes, query.pids, query.camids, features=query.features,
                   paths=np.array([f"q/{i}.jpg" for i in range(len(query))]), meta=meta)
    save_encoded(tmp_path / "q.npz", s)
    back = load_encoded(tmp_path / "q.npz")
    assert back.meta == meta
    for L in LENGTHS:
        assert np.array_equal(back.codes[L], s.codes[L])
    assert np.array_equal(back.pids, s.pids) and np.array_equal(back.camids, s.camids)
    assert np.array_equal(back.features, s.features) and list(back.paths) == list(s.paths)
    with np.load(tmp_path / "q.npz", allow_pickle=False) as z:  # plain arrays only: the JSON is a string
        assert json.loads(str(z["meta"][()])) == meta
    save_encoded(tmp_path / "plain.npz", EncodedSet(query.codes, query.pids, query.camids))
    assert load_encoded(tmp_path / "plain.npz").meta == {}
    with pytest.raises(ValueError, match="JSON"):
        save_encoded(tmp_path / "bad.npz", EncodedSet(query.codes, query.pids, query.camids, meta={"x": object()}))


def test_evaluate_refuses_non_finite_features(files, capsys):
    tmp, p = files
    q = dict(np.load(p["q"]))
    for bad in (np.nan, np.inf):
        q["features"] = q["features"].copy()
        q["features"][3, 7] = bad
        np.savez(tmp / "nan.npz", **q)
        assert main(["evaluate", "--query", str(tmp / "nan.npz"), "--gallery", str(p["g"])]) == 2
        out = capsys.readouterr()
        assert "nan.npz" in out.err and "'features'" in out.err and "non-finite" in out.err
        assert out.err.count("\n") == 1 and "float" not in out.out


def test_evaluate_names_files_that_are_not_encoded_sets(files, capsys):
    tmp, p = files
    np.save(tmp / "array.npy", np.zeros((4, 4)))
    (tmp / "array.npy").rename(tmp / "array.npz")  # a .npy array named .npz
    (tmp / "text.npz").write_text("hello")  # 5 bytes of text
    np.savez(tmp / "objects.npz", pids=np.array([1, "x"], dtype=object), camids=np.zeros(2, int),
             codes_32=np.zeros((2, 4), np.uint8))
    for name in ("array.npz", "text.npz", "objects.npz"):
        assert main(["evaluate", "--query", str(tmp / name), "--gallery", str(p["g"])]) == 2
        err = capsys.readouterr().err
        assert f"{tmp / name} is not an .npz of encoded images (expected" in err, err
        assert "pickle" not in err and err.count("\n") == 1


def _with_encoder(path, data, **record):
    from ctfreid.encoded import encoder_record

    fields = dict(fingerprint="aaaa", flip=False, height=64, width=32)
    fields.update(record)
    save_encoded(path, EncodedSet(data.codes, data.pids, data.camids, features=data.features,
                                  meta={"encoder": encoder_record(**fields), "split": "x"}))
    return str(path)


def test_sets_encoded_by_different_models_or_flip_settings_are_refused(tmp_path, sets, capsys):
    # before: evaluate / calibrate ranked a query set against a gallery of another model, or one encoded with
    # the flip test against one without, and printed meaningless metrics
    val, query, gallery = sets
    q = _with_encoder(tmp_path / "q.npz", query)
    g = _with_encoder(tmp_path / "g.npz", gallery)
    v = _with_encoder(tmp_path / "v.npz", val)
    g_flip = _with_encoder(tmp_path / "g_flip.npz", gallery, flip=True)
    g_other = _with_encoder(tmp_path / "g_other.npz", gallery, fingerprint="bbbb", height=128, width=64)
    v_flip = _with_encoder(tmp_path / "v_flip.npz", val, flip=True)
    cases = [
        (["evaluate", "--query", q, "--gallery", g_flip], ["--query " + q, "--gallery " + g_flip, "flip test off vs on"]),
        (["evaluate", "--query", q, "--gallery", g_other],
         ["--gallery " + g_other, "model fingerprint aaaa vs bbbb", "input size 64x32 vs 128x64"]),
        (["evaluate", "--query", q, "--gallery", g, "--calibrate", v_flip], ["--calibrate " + v_flip, "flip test"]),
        (["calibrate", "--val", v_flip, "--beta-sweep", "--query", q, "--gallery", g], ["--val " + v_flip, "flip test"]),
    ]
    for argv, fragments in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert all(f in err for f in fragments), (fragments, err)
    # the same encoder: no error, no note
    assert main(["evaluate", "--query", q, "--gallery", g, "--calibrate", v]) == 0
    assert "note" not in capsys.readouterr().out
    # int8 and float encoders of one model are accepted (as by indexes), with a note
    g8 = _with_encoder(tmp_path / "g8.npz", gallery, quantization="int8")
    assert main(["evaluate", "--query", q, "--gallery", g8]) == 0
    assert "note: --query " + q + " was encoded by the float encoder, --gallery " + g8 in capsys.readouterr().out
    # files of older versions (no record) are still read, with a note, not checked
    old = tmp_path / "old.npz"
    save_encoded(old, gallery)
    assert main(["evaluate", "--query", q, "--gallery", str(old)]) == 0
    out = capsys.readouterr().out
    assert f"note: --gallery {old} has no record of its encoder" in out and "mAP" in out


def test_max_rank_beyond_the_gallery_is_a_one_line_note(files, capsys, recwarn):
    # before: a two-line UserWarning of ctfreid/eval/evaluate.py on stderr (once per method)
    tmp, p = files
    n = len(np.load(p["g"])["pids"])
    out = tmp / "r.json"
    assert main(["evaluate", "--query", str(p["q"]), "--gallery", str(p["g"]), "--max-rank", str(n + 5),
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and not [w for w in recwarn if "gallery has only" in str(w.message)]
    assert f"note: --max-rank {n + 5} is more than the {n} gallery items: CMC up to rank {n}\n" in captured.out
    assert 0 <= json.loads(out.read_text())["methods"]["float"]["mAP"] <= 1
