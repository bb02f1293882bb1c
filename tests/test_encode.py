"""Encoding: ``ctfreid train`` then ``ctfreid encode`` writes the search core's npz schema; codes are the
model's own eval-mode signs (Eq. 2); the validation split is the run's; errors name what is wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ctfreid.cli import main  # noqa: E402
from ctfreid.data.datasets import load_dataset, read_image  # noqa: E402
from ctfreid.data.transforms import TransformConfig, build_test_transform  # noqa: E402
from ctfreid.encoded import load_encoded  # noqa: E402
from ctfreid.infer import encode_records, load_model, split_records  # noqa: E402

LENGTHS = (256, 64, 32)
TRAIN_FLAGS = ["--backbone", "mobilenet_v2", "--lengths", *map(str, LENGTHS), "--height", "64", "--width", "32",
               "--p", "2", "--k", "2", "--epochs", "1", "--warmup-epochs", "0", "--val-fraction", "0.5",
               "--num-workers", "0", "--device", "cpu", "--threads", "1", "--quiet"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def run_dir(synth_root, tmp_path_factory):
    """A run trained through the CLI (1 epoch, half the training identities held back for validation)."""
    out = tmp_path_factory.mktemp("run") / "aio"
    assert main(["train", "--data", str(synth_root), "--out", str(out), *TRAIN_FLAGS]) == 0
    return out


def test_cli_train_then_encode_writes_the_search_schema(run_dir, synth_root, synth_dataset, tmp_path, capsys):
    assert {p.name for p in run_dir.iterdir()} >= {"model.pt", "checkpoint.pt", "config.json", "log.jsonl", "split.json"}
    assert json.loads((run_dir / "config.json").read_text())["lengths"] == list(LENGTHS)
    # Re-running the finished command does not train again.
    assert main(["train", "--data", str(synth_root), "--out", str(run_dir), *TRAIN_FLAGS]) == 0
    assert "already trained" in capsys.readouterr().out

    for split, records in (("query", synth_dataset.query), ("gallery", synth_dataset.gallery)):
        out = tmp_path / f"{split}.npz"
        assert main(["encode", "--model", str(run_dir), "--data", str(synth_root), "--split", split,
                     "--out", str(out), "--batch-size", "5", "--num-workers", "0", "--quiet"]) == 0
        encoded = load_encoded(out)
        assert encoded.lengths == sorted(LENGTHS)
        for length in LENGTHS:
            assert encoded.codes[length].shape == (len(records), length // 8)
        assert encoded.features.shape == (len(records), max(LENGTHS))
        assert encoded.pids.tolist() == [pid for _, pid, _ in records]  # original pids, -1 and 0 included
        assert encoded.camids.tolist() == [camid for _, _, camid in records]
        assert encoded.paths.tolist() == [path for path, _, _ in records]
        # Codes are the signs of the stored real-valued features at the longest length.
        assert np.array_equal(encoded.codes[max(LENGTHS)], np.packbits(encoded.features >= 0, axis=1))


def test_encode_val_uses_the_runs_held_back_identities(run_dir, tmp_path):
    out = tmp_path / "val.npz"
    # No --data: the run's data folder is used.
    assert main(["encode", "--model", str(run_dir), "--split", "val", "--out", str(out), "--quiet",
                 "--num-workers", "0"]) == 0
    val = load_encoded(out)
    split = json.loads((run_dir / "split.json").read_text())
    assert sorted(val.pids.tolist()) == sorted(pid for _, pid, _ in split["val"])
    assert not set(val.pids.tolist()) & {pid for _, pid, _ in split["train"]}


def test_encoded_codes_are_the_models_eval_signs(run_dir, synth_dataset):
    model, info = load_model(run_dir)
    assert not model.training and (info["height"], info["width"]) == (64, 32)
    records = synth_dataset.query[:7]
    encoded = encode_records(model, records, batch_size=3, height=64, width=32)
    transform = build_test_transform(TransformConfig(height=64, width=32))
    with torch.no_grad():  # oracle: one image at a time through forward() in eval mode
        for i, (path, _, _) in enumerate(records):
            out = model(transform(read_image(path))[None])
            for length in LENGTHS:
                signs = out["codes"][length][0].numpy()
                assert set(np.unique(signs)) <= {-1.0, 1.0}
                assert np.array_equal(encoded.codes[length][i], np.packbits(signs > 0))
            assert np.allclose(encoded.features[i], out["bn"][max(LENGTHS)][0].numpy(), atol=1e-4)
            # the query side of weighted stages: bn(v) of the shortest (values) and the middle lengths
            assert np.allclose(encoded.values[i], out["bn"][min(LENGTHS)][0].numpy(), atol=1e-4)
            assert sorted(encoded.later_values) == sorted(LENGTHS)[1:-1]
            for length, v in encoded.later_values.items():
                assert np.allclose(v[i], out["bn"][length][0].numpy(), atol=1e-4)
    # Batch size does not change the result (BN uses running statistics in eval mode).
    again = encode_records(model, records, batch_size=64, height=64, width=32)
    for length in LENGTHS:
        assert np.array_equal(again.codes[length], encoded.codes[length])


def test_flip_test_averages_each_image_with_its_mirror(run_dir, synth_dataset, tmp_path):
    from PIL import Image

    from ctfreid.learn.model import AiOModel

    trained, _ = load_model(run_dir)
    torch.manual_seed(0)  # a fresh model: the 1-epoch one maps every tiny image to nearly the same feature
    model = AiOModel(**trained.config()).eval()
    records = synth_dataset.query[:6]
    mirrored = []
    for i, (path, pid, camid) in enumerate(records):  # lossless mirror images on disk: the oracle's input
        out = tmp_path / f"m{i}.png"
        Image.open(path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out)
        mirrored.append((str(out), pid, camid))
    kw = dict(height=64, width=32, batch_size=4)
    plain, plain_mirror = encode_records(model, records, **kw), encode_records(model, mirrored, **kw)
    flipped = encode_records(model, records, flip=True, **kw)
    scale = np.abs(plain.features).max()  # an untrained model's features are tiny: compare relative to them

    def close(a, b):
        return np.allclose(a / scale, b / scale, atol=1e-4)

    # Oracle: the mean of the image's and the mirror's bn(v), then Eq. 2's sign.
    assert close(flipped.features, (plain.features + plain_mirror.features) / 2)
    assert not close(flipped.features, plain.features)  # the mirror really changed something
    with torch.no_grad():
        transform = build_test_transform(TransformConfig(height=64, width=32))
        a = model(torch.stack([transform(read_image(p)) for p, _, _ in records]))["bn"]
        b = model(torch.stack([transform(read_image(p)) for p, _, _ in mirrored]))["bn"]
    for length in LENGTHS:  # every length's code is the sign of the averaged bn(v_k)
        mean = ((a[length] + b[length]) / 2).numpy()
        scale_k = np.abs(mean).max()
        sure = np.abs(mean) > 1e-4 * scale_k  # the bits of near-zero values may round either way
        assert sure.mean() > 0.9
        bits = np.unpackbits(flipped.codes[length], axis=1)
        assert np.array_equal(bits[sure], (mean >= 0)[sure])
    # A flip-tested image and its mirror get the same features.
    assert close(encode_records(model, mirrored, flip=True, **kw).features, flipped.features)


def test_cli_flip_matches_the_library(run_dir, synth_root, synth_dataset, tmp_path):
    out = tmp_path / "q.npz"
    assert main(["encode", "--model", str(run_dir), "--data", str(synth_root), "--split", "query", "--flip",
                 "--out", str(out), "--num-workers", "0", "--quiet"]) == 0
    model, _ = load_model(run_dir)
    expected = encode_records(model, synth_dataset.query, height=64, width=32, flip=True)
    plain = encode_records(model, synth_dataset.query, height=64, width=32)
    # Same computation in the same batches: bit-identical (and not the un-flipped features).
    assert np.array_equal(load_encoded(out).features, expected.features)
    assert not np.array_equal(plain.features, expected.features)


def test_encode_records_the_encoder_and_evaluate_refuses_a_flip_mismatch(run_dir, synth_root, tmp_path, capsys):
    # before: the .npz had no record of the model or options, and a gallery encoded with --flip was ranked
    # against queries encoded without it (meaningless metrics, no error)
    from ctfreid.learn.run_dir import model_fingerprint

    files = {}
    for split, flip in (("query", False), ("gallery", False), ("gallery", True)):
        files[split, flip] = out = tmp_path / f"{split}{'_flip' if flip else ''}.npz"
        assert main(["encode", "--model", str(run_dir), "--data", str(synth_root), "--split", split, "--out", str(out),
                     "--num-workers", "0", "--quiet"] + (["--flip"] if flip else [])) == 0
    model, info = load_model(run_dir)
    meta = load_encoded(files["gallery", True]).meta
    assert meta["split"] == "gallery"
    assert meta["encoder"] == {"fingerprint": model_fingerprint(model, info), "flip": True, "input_size": [64, 32],
                               "quantization": None, "model": str(run_dir), "runtime": "torch"}
    capsys.readouterr()
    q, g, g_flip = (str(files[k]) for k in (("query", False), ("gallery", False), ("gallery", True)))
    assert main(["evaluate", "--query", q, "--gallery", g]) == 0
    assert "note" not in capsys.readouterr().out
    assert main(["evaluate", "--query", q, "--gallery", g_flip]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--query {q} and --gallery {g_flip} were encoded differently (flip test off vs on)" in err


def test_unreadable_image_is_named(run_dir, synth_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    broken = sorted((data / "query").iterdir())[0]
    broken.write_bytes(b"not a jpeg")
    model, _ = load_model(run_dir)
    records = load_dataset(data).query
    with pytest.raises(ValueError, match=broken.name) as err:
        encode_records(model, records, height=64, width=32, num_workers=1)
    assert "Traceback" not in str(err.value)  # raised in the main process, not a worker's traceback
    code = main(["encode", "--model", str(run_dir), "--data", str(data), "--split", "query",
                 "--out", str(tmp_path / "q.npz"), "--quiet", "--num-workers", "0"])
    assert code == 2 and broken.name in capsys.readouterr().err
    assert not (tmp_path / "q.npz").exists()


def test_errors_name_what_is_missing(run_dir, synth_root, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_model(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_model(tmp_path / "empty")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.pt"):
        load_model(tmp_path / "bad.pt")
    # A run without a validation split cannot encode --split val.
    _, info = load_model(run_dir)
    with pytest.raises(ValueError, match="val-fraction"):
        split_records("val", {**info, "val": []}, synth_root)
    code = main(["encode", "--model", str(tmp_path / "empty"), "--data", str(synth_root), "--split", "query",
                 "--out", str(tmp_path / "q.npz")])
    assert code == 2 and "ctfreid encode: error" in capsys.readouterr().err
