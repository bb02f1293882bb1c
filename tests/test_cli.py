"""The command line end to end on tiny generated data: encode -> calibrate -> evaluate, index build -> add
-> search (same answers as the Python API), help texts, and the error paths (one line, non-zero exit)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctfreid.cli import COMMANDS, main

torch = pytest.importorskip("torch")

@pytest.fixture(scope="module")
def other_run(run_dir, tmp_path_factory) -> Path:
    """The same model with one weight changed: another fingerprint, same architecture."""
    out = tmp_path_factory.mktemp("cli") / "other"
    out.mkdir()
    blob = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    key = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    blob["state_dict"][key] = blob["state_dict"][key] + 1e-3
    torch.save(blob, out / "model.pt")
    return out


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]


def hamming(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.count_nonzero(np.unpackbits(a) != np.unpackbits(b)))


def _split_gallery(synth_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    images = sorted((synth_root / "bounding_box_test").iterdir())
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i, p in enumerate(images):
        shutil.copy(p, (a if i % 2 == 0 else b) / p.name)
    return a, b


def test_index_build_add_search_equals_python_api(run_dir, synth_root, tmp_path, capsys):
    from ctfreid.infer import encode_records, load_model
    from ctfreid.infer.gallery import folder_records
    from ctfreid.search.index import CtFIndex

    a, b = _split_gallery(synth_root, tmp_path)
    index_path = tmp_path / "g.ctf"
    rc, out, err = cli(capsys, "index", "build", "--model", run_dir, "--images", a, "--out", index_path,
                       "--beta", 2, "--quiet")
    assert rc == 0, err
    rc, out, err = cli(capsys, "index", "add", "--index", index_path, "--model", run_dir, "--images", b, "--quiet")
    assert rc == 0, err
    assert "added" in out
    rc, out, _ = cli(capsys, "index", "add", "--index", index_path, "--model", run_dir, "--images", b, "--quiet")
    assert rc == 0 and "added 0 images" in out  # nothing new: nothing re-encoded or duplicated

    queries = sorted((synth_root / "query").iterdir())[:4]
    rc, out, err = cli(capsys, "search", "--index", index_path, "--model", run_dir, *queries, "--k", 7, "--json")
    assert rc == 0, err
    got = json.loads(out)["queries"]

    # the Python API on the same images: encode a then b, one CtFIndex, the index's thresholds
    model, info = load_model(run_dir)
    kw = dict(height=info["height"], width=info["width"])
    records = folder_records(a) + folder_records(b)
    ref = CtFIndex()
    gallery = encode_records(model, records, **kw)
    ref.add(gallery.codes)
    saved = CtFIndex.load(index_path)
    ref.thresholds = dict(saved.thresholds)
    q = encode_records(model, [(str(p), 0, 0) for p in queries], **kw)
    D, I = ref.search(q.codes, 7)
    assert saved.ntotal == len(records)
    for i, item in enumerate(got):
        assert item["query"] == str(queries[i].resolve())
        assert [h["path"] for h in item["results"]] == [records[j][0] for j in I[i]]
        assert [h["distance"] for h in item["results"]] == D[i].tolist()
        assert [h["pid"] for h in item["results"]] == [records[j][1] for j in I[i]]
        # "bits" = the finest CtF stage reached: every shorter stage passed its threshold, that stage's
        # threshold failed (unless it is the longest), and the distance is measured at that length
        th = ref.thresholds
        for h in item["results"]:
            d = {L: hamming(q.codes[L][i], gallery.codes[L][h["id"]]) for L in q.codes}
            stage = h["stage_bits"]
            assert all(d[L] <= th[L] for L in th if L < stage)
            assert stage == max(q.codes) or d[stage] > th[stage]
            assert h["distance"] == d[stage]

    # the table output and the picture
    show = tmp_path / "ranked.png"
    rc, out, err = cli(capsys, "search", "--index", index_path, "--model", run_dir, queries[0], "--k", 3,
                       "--show", show)
    assert rc == 0, err
    assert out.count("\n") >= 5 and str(records[I[0][0]][0]) in out
    assert show.read_bytes()[:4] == b"\x89PNG"


def test_index_build_thresholds_default_to_the_accuracy_target_and_beta_gives_dto(run_dir, synth_root, tmp_path,
                                                                                     capsys):
    """Without --thresholds or --beta (and none stored with the model): fit_target(accuracy, tolerance 0.5,
    the built-in cost model, planned for the images indexed) on the run's validation codes; --beta 2: DTO."""
    from ctfreid.data.datasets import split_records
    from ctfreid.eval.calibration import fit_target
    from ctfreid.eval.cost_model import default_cost_model
    from ctfreid.infer.encoder import load_encoder
    from ctfreid.search.index import CtFIndex
    from ctfreid.search.thresholds import fit_thresholds

    images = synth_root / "bounding_box_test"
    n = len(list(images.iterdir()))
    enc = load_encoder(run_dir)
    assert not enc.thresholds
    val = enc.encode_records(split_records("val", dict(enc.info)))
    target = fit_target(val, "accuracy", 0.5, cost_model=default_cost_model(val.lengths), gallery_size=n)
    dto = fit_thresholds(val.codes, val.pids, val.camids, beta=2.0)
    for extra, want, source in (([], target.thresholds, "target accuracy (tolerance 0.5)"),
                                (["--beta", 2], dto, "DTO beta=2")):
        out_file = tmp_path / f"g{len(extra)}.ctf"
        rc, out, err = cli(capsys, "index", "build", "--model", run_dir, "--images", images, "--out", out_file,
                           "--quiet", *extra)
        assert rc == 0, err
        index = CtFIndex.load(out_file)
        assert {int(k): int(v) for k, v in index.thresholds.items()} == want
        assert source in index.metadata["thresholds_source"] and source in out


def test_index_built_with_flip_encodes_added_images_and_queries_the_same_way(run_dir, synth_root, tmp_path, capsys):
    from ctfreid.infer import encode_records, load_model
    from ctfreid.infer.gallery import folder_records
    from ctfreid.search.index import CtFIndex

    a, b = _split_gallery(synth_root, tmp_path)
    index_path = tmp_path / "g.ctf"
    rc, out, err = cli(capsys, "index", "build", "--model", run_dir, "--images", a, "--out", index_path,
                       "--flip", "--quiet")
    assert rc == 0 and "flip test" in out, err
    rc, _, err = cli(capsys, "index", "add", "--index", index_path, "--model", run_dir, "--images", b, "--quiet")
    assert rc == 0, err
    queries = sorted((synth_root / "query").iterdir())[:4]
    rc, out, err = cli(capsys, "search", "--index", index_path, "--model", run_dir, *queries, "--k", 5, "--json")
    assert rc == 0, err
    got = json.loads(out)["queries"]

    model, info = load_model(run_dir)
    records = folder_records(a) + folder_records(b)
    kw = dict(height=info["height"], width=info["width"])
    gallery = encode_records(model, records, flip=True, **kw)
    saved = CtFIndex.load(index_path)
    assert saved.metadata["model"]["flip"] is True
    for L, codes in gallery.codes.items():  # the added half was flip-encoded too
        assert np.array_equal(saved.codes(L), codes)
    plain = encode_records(model, records, **kw)
    assert any(not np.array_equal(plain.codes[L], codes) for L, codes in gallery.codes.items())
    ref = CtFIndex()
    ref.add(gallery.codes)
    ref.thresholds = dict(saved.thresholds)
    # the default index keeps a weighted stage 1 for image queries: their flip-test bn(v) weights the 32 bits
    assert saved.weighting is not None and saved.weighted_thresholds is not None
    ref.weighted_thresholds, ref.weighting = dict(saved.weighted_thresholds), saved.weighting
    q = encode_records(model, [(str(p), 0, 0) for p in queries], flip=True, **kw)
    D, I = ref.search(q.codes, 5, query_weights=saved.weighting.weights(q.values))
    for i, item in enumerate(got):
        assert [h["path"] for h in item["results"]] == [records[j][0] for j in I[i]]
        assert [h["distance"] for h in item["results"]] == D[i].tolist()


def test_encode_calibrate_evaluate_and_index_with_those_thresholds(run_dir, synth_root, tmp_path, capsys):
    from ctfreid.encoded import load_encoded
    from ctfreid.eval.evaluate import evaluate_sets
    from ctfreid.search.index import CtFIndex

    for split in ("query", "gallery", "val"):
        rc, _, err = cli(capsys, "encode", "--model", run_dir, "--split", split, "--out", tmp_path / f"{split}.npz",
                         "--device", "cpu", "--num-workers", 0, "--quiet")
        assert rc == 0, err
    th_file = tmp_path / "th.json"
    rc, out, err = cli(capsys, "calibrate", "--val", tmp_path / "val.npz", "--beta", 2, "--out", th_file)
    assert rc == 0, err
    thresholds = {int(k): v for k, v in json.loads(th_file.read_text())["thresholds"].items()}
    assert sorted(thresholds) == [32, 64]
    res_file = tmp_path / "res.json"
    rc, out, err = cli(capsys, "evaluate", "--query", tmp_path / "query.npz", "--gallery", tmp_path / "gallery.npz",
                       "--thresholds", th_file, "--json", res_file)
    assert rc == 0, err
    res = json.loads(res_file.read_text())
    expected = evaluate_sets(load_encoded(tmp_path / "query.npz"), load_encoded(tmp_path / "gallery.npz"), thresholds)
    for m in ("float", "hash32", "hash64", "hash128", "ctf"):
        for key in ("rank1", "rank5", "mAP"):
            assert res["methods"][m][key] == pytest.approx(expected["methods"][m][key])
    # index build takes the calibrate output
    rc, _, err = cli(capsys, "index", "build", "--model", run_dir, "--images", synth_root / "bounding_box_test",
                     "--out", tmp_path / "g.ctf", "--thresholds", th_file, "--quiet")
    assert rc == 0, err
    assert {int(k): int(v) for k, v in CtFIndex.load(tmp_path / "g.ctf").thresholds.items()} == thresholds


def test_weighted_thresholds_from_encode_to_index_build_and_search(run_dir, synth_root, tmp_path, capsys):
    """A weighted stage 1 (ctfreid.search.asymmetric) through the command line: encode writes values_32, an
    index built with a weighted thresholds file keeps the weighting, and 'ctfreid search' weights its
    queries; oracle: the Python API with the same weights."""
    from ctfreid.encoded import load_encoded
    from ctfreid.search.asymmetric import Weighting, weight_scale
    from ctfreid.search.index import CtFIndex

    rc, _, err = cli(capsys, "encode", "--model", run_dir, "--split", "val", "--out", tmp_path / "val.npz",
                     "--device", "cpu", "--num-workers", 0, "--quiet")
    assert rc == 0, err
    val = load_encoded(tmp_path / "val.npz")
    assert val.values.shape == (len(val), 32) and ((val.values >= 0) == np.unpackbits(val.codes[32], axis=1)).all()
    weighting = Weighting(scale=weight_scale(val.values), bits=3)
    th_file = tmp_path / "weighted.json"
    th_file.write_text(json.dumps({"thresholds": {"32": 9, "64": 21}, "weighted_stage1": {
        "thresholds": {"32": 40, "64": 22}, "weights": weighting.to_dict()}}))
    rc, out, err = cli(capsys, "index", "build", "--model", run_dir, "--images", synth_root / "bounding_box_test",
                       "--out", tmp_path / "g.ctf", "--thresholds", th_file)
    assert rc == 0, err
    assert "weighted stage 1 (3-bit weights" in out
    saved = CtFIndex.load(tmp_path / "g.ctf")
    assert saved.weighting == weighting and saved.weighted_thresholds == {32: 40, 64: 22}
    assert saved.thresholds == {32: 9, 64: 21}  # for searches by codes alone
    queries = sorted((synth_root / "query").iterdir())[:5]
    rc, out, err = cli(capsys, "search", "--index", tmp_path / "g.ctf", "--model", run_dir, *queries, "--k", 9, "--json")
    assert rc == 0, err
    got = json.loads(out)["queries"]
    from ctfreid.infer import encode_records, load_model

    model, info = load_model(run_dir)
    q = encode_records(model, [(str(p), 0, 0) for p in queries], height=info["height"], width=info["width"])
    D, I = saved.search(q.codes, 9, query_weights=weighting.weights(q.values))
    for i, item in enumerate(got):
        assert [h["id"] for h in item["results"]] == I[i].tolist()
        assert [h["distance"] for h in item["results"]] == D[i].tolist()


def test_encode_needs_only_the_folder_of_its_split(run_dir, synth_root, tmp_path, capsys):
    """A test-only copy of a dataset (query/ and bounding_box_test/, no bounding_box_train/) encodes its
    query and gallery splits as the full dataset does; the missing split is a one-line error naming it."""
    from ctfreid.encoded import load_encoded

    part = tmp_path / "test_only"
    for d in ("query", "bounding_box_test"):
        shutil.copytree(synth_root / d, part / d)
    for split in ("query", "gallery"):
        for name, root in (("part", part), ("full", synth_root)):
            rc, _, err = cli(capsys, "encode", "--model", run_dir, "--data", root, "--split", split,
                             "--out", tmp_path / f"{name}_{split}.npz", "--device", "cpu", "--quiet")
            assert rc == 0, err
        a, b = load_encoded(tmp_path / f"part_{split}.npz"), load_encoded(tmp_path / f"full_{split}.npz")
        assert [p.split("/")[-1] for p in a.paths] == [p.split("/")[-1] for p in b.paths]
        assert (a.pids == b.pids).all() and all((a.codes[L] == b.codes[L]).all() for L in a.codes)
    rc, _, err = cli(capsys, "encode", "--model", run_dir, "--data", part, "--split", "train",
                     "--out", tmp_path / "t.npz", "--device", "cpu", "--quiet")
    assert rc == 2 and "no bounding_box_train/ folder" in err and len(err.strip().splitlines()) == 1, err


def test_error_paths_are_one_line(run_dir, other_run, synth_root, tmp_path, capsys):
    missing = tmp_path / "nope"
    rc, _, err = cli(capsys, "index", "build", "--model", run_dir, "--images", missing, "--out", tmp_path / "x.ctf")
    assert_one_line_error(rc, err, str(missing), "does not exist")
    rc, _, err = cli(capsys, "index", "build", "--model", tmp_path / "no_run", "--images", synth_root / "query",
                     "--out", tmp_path / "x.ctf")
    assert_one_line_error(rc, err, "no_run")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = cli(capsys, "index", "build", "--model", run_dir, "--images", empty, "--out", tmp_path / "x.ctf")
    assert_one_line_error(rc, err, "no images")

    index_path = tmp_path / "q.ctf"
    rc, _, err = cli(capsys, "index", "build", "--model", run_dir, "--images", synth_root / "query",
                     "--out", index_path, "--thresholds", "32=10,64=20", "--quiet")
    assert rc == 0, err
    rc, _, err = cli(capsys, "index", "build", "--model", run_dir, "--images", synth_root / "query",
                     "--out", index_path, "--quiet")
    assert_one_line_error(rc, err, "exists", "--overwrite")
    query = sorted((synth_root / "query").iterdir())[0]
    # another model (different weights -> different fingerprint) is refused by search and by add
    rc, _, err = cli(capsys, "search", "--index", index_path, "--model", other_run, query)
    assert_one_line_error(rc, err, "another model", "fingerprint")
    rc, _, err = cli(capsys, "index", "add", "--index", index_path, "--model", other_run, "--images",
                     synth_root / "bounding_box_test", "--quiet")
    assert_one_line_error(rc, err, "another model")
    # a query image that does not exist, a missing index
    rc, _, err = cli(capsys, "search", "--index", index_path, "--model", run_dir, tmp_path / "ghost.jpg")
    assert_one_line_error(rc, err, "ghost.jpg")
    rc, _, err = cli(capsys, "search", "--index", tmp_path / "none.ctf", "--model", run_dir, query)
    assert_one_line_error(rc, err, "none.ctf")
    # a damaged index (bytes flipped in the middle; then a truncated copy) is an error, never results
    data = bytearray(index_path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    damaged = tmp_path / "damaged.ctf"
    damaged.write_bytes(bytes(data))
    rc, out, err = cli(capsys, "search", "--index", damaged, "--model", run_dir, query)
    assert_one_line_error(rc, err)
    assert out == ""
    truncated = tmp_path / "truncated.ctf"
    truncated.write_bytes(index_path.read_bytes()[: len(data) // 3])
    rc, out, err = cli(capsys, "search", "--index", truncated, "--model", run_dir, query)
    assert_one_line_error(rc, err)
    # bad thresholds for this model's lengths
    rc, _, err = cli(capsys, "index", "build", "--model", run_dir, "--images", synth_root / "query",
                     "--out", tmp_path / "y.ctf", "--thresholds", "32=10")
    assert_one_line_error(rc, err, "thresholds")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help_with_an_example(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"ctfreid {name}" in text and "example" in text


def test_top_level_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in COMMANDS) and "example" in text
    with pytest.raises(SystemExit) as e:
        main(["search", "--index"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_missing_torch_is_a_one_line_install_hint(run_dir, synth_root, tmp_path):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "
            "from ctfreid.cli import main; sys.exit(main(sys.argv[1:]))")
    # a run directory needs torch (an ONNX export does not: tests/test_onnx.py)
    for argv in (["demo", "--out", str(tmp_path / "d")], ["train", "--help"],
                 ["index", "build", "--model", str(run_dir), "--images", str(synth_root / "query"),
                  "--out", str(tmp_path / "x.ctf")]):
        p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert p.returncode == 1, (argv, p.stderr)
        assert_one_line_error(p.returncode, p.stderr, 'pip install "ctfreid[train]"')


# --------------------------------------------------------------------------- hardening: races and hostile input
def test_two_index_add_processes_keep_both_additions(run_dir, synth_root, tmp_path, capsys):
    a, b = _split_gallery(synth_root, tmp_path)
    c = tmp_path / "c"
    c.mkdir()
    for p in sorted(a.iterdir())[:3]:  # the index starts with 3 images; each process adds its own folder
        shutil.move(str(p), c / p.name)
    index_path = tmp_path / "g.ctf"
    rc, _, err = cli(capsys, "index", "build", "--model", run_dir, "--images", c, "--out", index_path,
                     "--thresholds", "32=10,64=20", "--quiet")
    assert rc == 0, err
    procs = [subprocess.Popen([sys.executable, "-m", "ctfreid", "index", "add", "--index", str(index_path),
                               "--model", str(run_dir), "--images", str(folder), "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for folder in (a, b)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    from ctfreid.search.index import CtFIndex

    saved = CtFIndex.load(index_path)
    names = {Path(p).name for p in saved.metadata["paths"]}
    assert names == {p.name for folder in (a, b, c) for p in folder.iterdir()}
    assert saved.ntotal == len(names)


def test_bad_outputs_and_parameters_fail_before_any_work(run_dir, synth_root, tmp_path, capsys):
    images = synth_root / "bounding_box_test"
    (tmp_path / "adir").mkdir()
    cases = [
        (["index", "build", "--model", run_dir, "--images", images, "--out", tmp_path / "adir"], "is a directory"),
        (["index", "build", "--model", run_dir, "--images", images, "--out", tmp_path / "no" / "g.ctf"], "does not exist"),
        (["index", "build", "--model", run_dir, "--images", images, "--out", tmp_path / "g.ctf", "--beta", "0"],
         "finite number > 0"),
        (["index", "build", "--model", run_dir, "--images", images, "--out", tmp_path / "g.ctf", "--batch-size", "0"],
         "positive integer"),
        (["encode", "--model", run_dir, "--split", "query", "--out", tmp_path / "no" / "q.npz"], "does not exist"),
        (["encode", "--model", run_dir, "--split", "query", "--out", tmp_path / "q.npz", "--batch-size", "0"],
         "positive integer"),
        (["calibrate", "--val", tmp_path / "v.npz", "--beta", "nan"], "finite number > 0"),
        (["evaluate", "--query", tmp_path / "q.npz", "--gallery", tmp_path / "g.npz", "--json", tmp_path / "adir"],
         "is a directory"),
    ]
    for argv, fragment in cases:
        start = time.perf_counter()
        with pytest.raises(SystemExit) as info:  # argparse refuses while parsing: nothing is encoded
            main([str(x) for x in argv])
        err = capsys.readouterr().err
        assert info.value.code == 2 and fragment in err, (argv, err)
        assert time.perf_counter() - start < 5


def test_hostile_inputs_are_one_line_errors(run_dir, synth_root, tmp_path, capsys):
    from PIL import Image

    index_path = tmp_path / "g.ctf"
    rc, _, err = cli(capsys, "index", "build", "--model", run_dir, "--images", synth_root / "bounding_box_test",
                     "--out", index_path, "--thresholds", "32=10,64=20", "--quiet")
    assert rc == 0, err
    query = sorted((synth_root / "query").iterdir())[0]
    # k far beyond the index: clamped, every image listed once
    rc, out, err = cli(capsys, "search", "--index", index_path, "--model", run_dir, query, "--k", 10**9, "--json")
    assert rc == 0, err
    from ctfreid.search.index import CtFIndex

    assert len(json.loads(out)["queries"][0]["results"]) == CtFIndex.load(index_path).ntotal
    # a decompression bomb: a few KB of PNG that would decode to 400 megapixels
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 100_000
    rc, _, err = cli(capsys, "search", "--index", index_path, "--model", run_dir, bomb)
    assert_one_line_error(rc, err, "bomb.png", "pixels", "MAX_IMAGE_PIXELS")
    # files that are not what the option expects
    (tmp_path / "model.json").write_text("{}")
    rc, _, err = cli(capsys, "search", "--index", index_path, "--model", tmp_path / "model.json", query)
    assert_one_line_error(rc, err, "model.json is not a ctfreid model", "expected a run directory")
    assert "weights_only" not in err
    rc, _, err = cli(capsys, "search", "--index", index_path, "--model", index_path, query)
    assert_one_line_error(rc, err, "is not a ctfreid model")
    for index_arg, fragment in ((tmp_path, "is a directory"), ("/dev/null", "not a regular file")):
        rc, _, err = cli(capsys, "search", "--index", index_arg, "--model", run_dir, query)
        assert_one_line_error(rc, err, fragment)


def test_index_build_refuses_empty_thresholds_and_search_show_draws_only_the_results(
        run_dir, synth_root, tmp_path, capsys, monkeypatch):
    """--k beyond the index is clamped for the results, and so for the picture: not one empty column per
    missing result (--k 700 on a 31-image index took over 5 minutes drawing 700 empty panels)."""
    import ctfreid.eval.report as report

    index_path = tmp_path / "g.ctf"
    # an empty --thresholds ("$TH" unset) is refused, not replaced by the run's or fitted thresholds
    rc, _, err = cli(capsys, "index", "build", "--model", run_dir, "--images", synth_root / "bounding_box_test",
                     "--out", index_path, "--thresholds", "", "--quiet")
    assert_one_line_error(rc, err, "LENGTH=DISTANCE")
    assert not index_path.exists()
    rc, _, err = cli(capsys, "index", "build", "--model", run_dir, "--images", synth_root / "bounding_box_test",
                     "--out", index_path, "--thresholds", "32=10,64=20", "--quiet")
    assert rc == 0, err
    drawn = {}
    monkeypatch.setattr(report, "plot_ranked_lists", lambda path, *a, k, **kw: drawn.update(k=k, rankings=a[6]))
    query = sorted((synth_root / "query").iterdir())[0]
    rc, _, err = cli(capsys, "search", "--index", index_path, "--model", run_dir, query, "--k", 700,
                     "--show", tmp_path / "ranked.png")
    assert rc == 0, err
    from ctfreid.search.index import CtFIndex

    n = CtFIndex.load(index_path).ntotal
    assert n < 700 and drawn["k"] == n and drawn["rankings"].shape == (1, n)


def test_a_malformed_thresholds_json_fails_only_the_commands_that_use_thresholds(run_dir, synth_root, tmp_path,
                                                                                  capsys):
    # before: search and index add (which use the index's thresholds) failed on RUN_DIR/thresholds.json too,
    # and index build said the thresholds were "stored with model.pt" when they came from thresholds.json
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.pt", "config.json", "split.json"):
        shutil.copy(run_dir / name, run / name)
    a, b = _split_gallery(synth_root, tmp_path)
    index_path = tmp_path / "g.ctf"
    rc, _, err = cli(capsys, "index", "build", "--model", run, "--images", a, "--out", index_path,
                     "--thresholds", "32=10,64=20", "--quiet")
    assert rc == 0, err
    (run / "thresholds.json").write_text("{not json")
    rc, out, err = cli(capsys, "index", "add", "--index", index_path, "--model", run, "--images", b, "--quiet")
    assert rc == 0 and "added" in out, err
    query = sorted((synth_root / "query").iterdir())[0]
    rc, out, err = cli(capsys, "search", "--index", index_path, "--model", run, query, "--k", 3)
    assert rc == 0 and "rank" in out, err
    rc, _, err = cli(capsys, "index", "build", "--model", run, "--images", a, "--out", tmp_path / "g2.ctf", "--quiet")
    assert_one_line_error(rc, err, "thresholds.json", "not readable JSON")  # it needs them: refused
    (run / "thresholds.json").write_text(json.dumps({"thresholds": {"32": 9, "64": 21}}))
    rc, out, err = cli(capsys, "index", "build", "--model", run, "--images", a, "--out", tmp_path / "g3.ctf", "--quiet")
    assert rc == 0, err
    assert f"32-bit <= 9, 64-bit <= 21 (stored with {run / 'thresholds.json'})" in out


def test_an_early_ctrl_c_is_one_line(monkeypatch, capsys):
    import ctfreid.cli as cli_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "build_parser", interrupted)  # Ctrl-C while the command is being set up
    assert main(["evaluate", "--help"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "ctfreid: interrupted" and "Traceback" not in err


def test_index_remove_erases_a_persons_images_and_given_images_from_search_and_file(run_dir, synth_root, tmp_path,
                                                                                   capsys):
    from ctfreid.search.index import CtFIndex

    images = synth_root / "bounding_box_test"
    index_path = tmp_path / "g.ctf"
    rc, _, err = cli(capsys, "index", "build", "--model", run_dir, "--images", images, "--out", index_path,
                     "--beta", 2, "--quiet")
    assert rc == 0, err
    before = CtFIndex.load(index_path, mmap=False)
    meta = before.metadata
    person = next(p for p in meta["pids"] if p > 0)
    one = next(path for path, p in zip(meta["paths"], meta["pids"]) if p != person)
    want = sorted({i for i, p in enumerate(meta["pids"]) if p == person} | {meta["paths"].index(one)})
    codes = {i: b"".join(before.codes(L)[i].tobytes() for L in before.lengths) for i in want}
    rc, out, err = cli(capsys, "index", "remove", "--index", index_path, "--pid", person, "--image", one)
    assert rc == 0, err
    assert f"removed {len(want)} images" in out and f"ids {want}" in out
    after = CtFIndex.load(index_path)
    assert after.ntotal == before.ntotal - len(want) and not np.isin(want, after.ids).any()
    m = after.metadata
    assert all(m["paths"][i] is None and m["pids"][i] == -1 for i in want) and one not in m["paths"]
    # no search answers them, and the file holds neither their codes nor their paths
    rc, out, err = cli(capsys, "search", "--index", index_path, "--model", run_dir, *sorted(images.iterdir())[:3],
                       "--k", 500, "--json")
    assert rc == 0, err
    hit_ids = {h["id"] for q in json.loads(out)["queries"] for h in q["results"]}
    assert len(hit_ids) == after.ntotal and not hit_ids & set(want)
    data = index_path.read_bytes()
    assert one.encode() not in data
    assert not any(blob in data for blob in codes.values() if blob not in
                   {b"".join(after.codes(L)[j].tobytes() for L in after.lengths) for j in range(after.ntotal)})
    # refused: nothing to select, an image the index does not hold (nothing removed then)
    rc, _, err = cli(capsys, "index", "remove", "--index", index_path)
    assert_one_line_error(rc, err, "--pid or --image")
    rc, _, err = cli(capsys, "index", "remove", "--index", index_path, "--image", tmp_path / "nope.jpg")
    assert_one_line_error(rc, err, "nope.jpg", "not in the index")
    assert CtFIndex.load(index_path).ntotal == after.ntotal
    # the removed image can be added again (a new id)
    rc, out, err = cli(capsys, "index", "add", "--index", index_path, "--model", run_dir, "--images", images,
                       "--quiet")
    assert rc == 0 and f"added {len(want)} images" in out, (out, err)
