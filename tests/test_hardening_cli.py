"""Hardening of the command line: a full disk while 'ctfreid train' saves, and parameters refused before any
file is read or any work starts (one rule: counts are >= 1, weights are finite)."""

from __future__ import annotations

import errno
import os

import pytest

from ctfreid.cli import main

torch = pytest.importorskip("torch")

TINY = ["--backbone", "resnet18", "--lengths", "64", "32", "--height", "32", "--width", "16", "--epochs", "1",
        "--warmup-epochs", "0", "--milestones", "--p", "4", "--k", "2", "--num-workers", "0", "--device", "cpu",
        "--quiet"]


def one_line(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_a_full_disk_while_train_saves_its_checkpoint_is_one_line(synth_root, tmp_path, capsys, monkeypatch):
    import ctfreid._atomic

    real = os.fdopen

    class FullDisk:  # the temporary checkpoint file: every write fails as on a full disk
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, mode="r", *args, **kw):
        f = real(fd, mode, *args, **kw)
        return FullDisk(f) if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(ctfreid._atomic.os, "fdopen", fdopen)
    run = tmp_path / "run"
    torch.set_num_threads(1)
    rc = main(["train", "--data", str(synth_root), "--out", str(run), *TINY])
    err = capsys.readouterr().err
    assert rc == 2
    one_line(err, "checkpoint.pt", "No space left on device")
    assert ".tmp" not in err
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name == "checkpoint.pt"]


@pytest.mark.parametrize("flag, value, fragment", [
    ("--lr", "inf", "lr must be finite"),
    ("--lambda2", "nan", "lambda2 must be finite"),
    ("--temperature", "0", "temperature must be > 0"),
    ("--margin", "-0.3", "margin"),
    ("--label-smoothing", "1", "label_smoothing must be in [0, 1)"),
    ("--seed", "-1", "seed must be an integer in [0, 2**32)"),
    ("--milestones", "-5", "milestones must be epochs >= 0"),
])
def test_training_settings_that_cannot_train_are_refused_before_any_work(tmp_path, capsys, flag, value, fragment):
    # before: a NaN loss (or a raw error) once the data was read and the model built
    run = tmp_path / "run"
    rc = main(["train", "--data", str(tmp_path / "no-data"), "--out", str(run), *TINY, flag, value])
    err = capsys.readouterr().err
    assert rc == 2
    one_line(err, fragment)
    assert not run.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["calibrate", "--val", "V", "--beta-sweep", "--betas", "0,-1"], "expected finite betas > 0"),
    (["calibrate", "--val", "V", "--beta-sweep", "--betas", "1,nan"], "expected finite betas > 0"),
    (["calibrate", "--val", "V", "--max-pairs", "0"], "positive integer"),
    (["evaluate", "--query", "Q", "--gallery", "G", "--max-rank", "0"], "positive integer"),
    # before: a raw ValueError traceback from NumPy's seeding, after the data was read
    (["calibrate", "--val", "V", "--seed", "-1"], "expected an integer in [0, 2**32)"),
    (["synth", "--out", "V", "--seed", "-1"], "expected an integer in [0, 2**32)"),
])
def test_counts_and_betas_are_refused_while_parsing(tmp_path, capsys, argv, fragment):
    # V, Q, G do not exist: an error about them would mean the value was checked too late
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / a) if a in ("V", "Q", "G") else a for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and fragment in err, err


@pytest.mark.parametrize("rho", ["-1", "0", "nan", "inf"])
def test_evaluate_refuses_a_bad_rho_before_loading_the_sets(tmp_path, capsys, rho):
    rc = main(["evaluate", "--query", str(tmp_path / "q.npz"), "--gallery", str(tmp_path / "g.npz"),
               "--calibrate", str(tmp_path / "v.npz"), "--rho", rho])
    err = capsys.readouterr().err
    assert rc == 2
    one_line(err, "--rho", "finite number > 0")


def test_a_file_as_data_is_named_and_leaves_no_empty_run_directory(tmp_path, capsys):
    data = tmp_path / "market.zip"
    data.write_bytes(b"PK")
    run = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--out", str(run), *TINY])
    err = capsys.readouterr().err
    assert rc == 2
    one_line(err, "market.zip is a file, not a folder", "Market-1501 layout")  # before: "does not exist"
    assert not run.exists()  # before: an empty run directory was left behind


def test_an_unusable_stem_cache_folder_is_refused_before_the_cache_is_computed(synth_root, tmp_path, capsys,
                                                                               monkeypatch):
    import ctfreid.learn.train as train_module

    def never(*args, **kw):
        raise AssertionError("the stem cache was computed before its folder was checked")

    monkeypatch.setattr(train_module, "compute_stem_cache", never)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    rc = main(["train", "--data", str(synth_root), "--out", str(tmp_path / "run"), *TINY, "--frozen-stages", "2",
               "--cache-stem", "--cache-dir", str(blocker)])
    err = capsys.readouterr().err
    assert rc == 2
    one_line(err, "stem cache folder", "is a file")


@pytest.fixture(scope="module")
def tiny_run(synth_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("hardening") / "run"
    torch.set_num_threads(1)
    assert main(["train", "--data", str(synth_root), "--out", str(run), *TINY]) == 0
    return run


def test_an_output_that_is_the_model_file_is_refused(tiny_run, synth_root, tmp_path, capsys):
    model = tiny_run / "model.pt"
    before = model.read_bytes()
    link = tmp_path / "link.pt"
    link.symlink_to(model)
    for argv in (["encode", "--model", str(tiny_run), "--split", "query", "--out", str(model), "--num-workers", "0",
                  "--device", "cpu", "--quiet"],
                 ["index", "build", "--model", str(tiny_run), "--images", str(synth_root / "query"),
                  "--out", str(link), "--overwrite", "--thresholds", "32=10", "--quiet"]):
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, err
        one_line(err, "is the model file", "would destroy the model")
    assert model.read_bytes() == before  # before: replaced by an .npz of codes, or by an index


@pytest.mark.parametrize("flag, value, fragment", [
    ("--weights", "/nonexistent/weights.pth", "weights file /nonexistent/weights.pth does not exist"),
    ("--frozen-stages", "9", "frozen_stages for resnet18 must be an integer in [0, 4]"),
    ("--last-stride", "3", "last_stride must be 1 or 2"),
])
def test_settings_the_model_refuses_leave_no_run_files(synth_root, tmp_path, capsys, flag, value, fragment):
    # before: config.json and split.json were written, then the model refused the setting
    run = tmp_path / "run"
    rc = main(["train", "--data", str(synth_root), "--out", str(run), *TINY, flag, value])
    assert rc == 2
    one_line(capsys.readouterr().err, fragment)
    assert not run.exists()


def test_settings_the_model_refuses_keep_the_old_run_as_it_was(tiny_run, synth_root, tmp_path, capsys):
    # --no-resume with a bad --weights: the old model.pt is not moved aside, nothing is rewritten
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    rc = main(["train", "--data", str(synth_root), "--out", str(run), *TINY, "--no-resume", "--weights",
               str(tmp_path / "nope.pth")])
    assert rc == 2
    one_line(capsys.readouterr().err, "nope.pth does not exist")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_one_training_identity_is_singular(tmp_path, capsys):
    from ctfreid.data.synth import generate_synthetic

    data = tmp_path / "data"
    generate_synthetic(data, ids=2, cams=2, seed=0, images_per_id=4, height=32, width=16)
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--val-fraction", "0"])
    assert rc == 2
    one_line(capsys.readouterr().err, "1 training identity, fewer than P = 4")  # before: "1 identities"


@pytest.mark.parametrize("tail", ["/", "/.", "/.."])
def test_an_output_path_ending_in_a_separator_is_refused_before_any_work(tmp_path, tail):
    import argparse

    from ctfreid.cli._args import output_file

    with pytest.raises(argparse.ArgumentTypeError, match="expected a file path"):
        output_file(str(tmp_path / "g.npz") + tail)  # Path() would drop the tail and write tmp_path/g.npz
    assert output_file(str(tmp_path / "g.npz")) == str(tmp_path / "g.npz")
    assert list(tmp_path.iterdir()) == []
