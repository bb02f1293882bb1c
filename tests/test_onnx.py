"""ONNX encoders: ``ctfreid export`` then onnxruntime gives the torch model's codes (the oracle), for any batch
size, with the run's metadata, with the flip test in the graph, refuses foreign files, and works where
torch cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ctfreid.cli import main  # noqa: E402
from ctfreid.encoded import load_encoded  # noqa: E402
from ctfreid.errors import CtfreidError  # noqa: E402
from ctfreid.infer.encoder import TorchEncoder, load_encoder  # noqa: E402
from ctfreid.infer.export import check_export, export_onnx, generated_images  # noqa: E402
from ctfreid.infer.onnx_encoder import OnnxEncoder  # noqa: E402
from ctfreid.search.index import CtFIndex  # noqa: E402

LENGTHS = (256, 64, 32)
TRAIN_FLAGS = ["--backbone", "mobilenet_v2", "--lengths", *map(str, LENGTHS), "--height", "64", "--width", "32",
               "--p", "2", "--k", "2", "--epochs", "1", "--warmup-epochs", "0", "--val-fraction", "0.5",
               "--num-workers", "0", "--device", "cpu", "--threads", "1", "--quiet"]
THRESHOLDS = {32: 7, 64: 21}
WEIGHTED = {"thresholds": {"32": 50, "64": 22}, "weights": {"bits": 4, "scale": 2.0}}  # 'ctfreid calibrate' writes both

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _spread_codes(run: os.PathLike, records) -> None:
    """Re-estimate the BN statistics of ``run``'s model on real images (cumulative average, one batch).

    A one-epoch tiny run gives every image nearly the same ``bn(v_k)`` and code, so agreement tests on it
    would be vacuous; with BN statistics of the images the codes differ per image and bits are balanced."""
    from ctfreid.data.datasets import read_image
    from ctfreid.data.transforms import TransformConfig, build_test_transform
    from ctfreid.learn.run_dir import load_model

    model, info = load_model(run)
    tf = build_test_transform(TransformConfig(height=info["height"], width=info["width"]))
    x = torch.stack([tf(read_image(path)) for path, _, _ in records[:64]])
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    blob = torch.load(info["file"], weights_only=True)
    blob["state_dict"] = model.eval().state_dict()
    torch.save(blob, info["file"])


@pytest.fixture(scope="module")
def run_dir(synth_root, synth_dataset, tmp_path_factory):
    """A run trained through the CLI, with DTO thresholds in RUN_DIR/thresholds.json (as the demo writes)."""
    out = tmp_path_factory.mktemp("run") / "aio"
    assert main(["train", "--data", str(synth_root), "--out", str(out), *TRAIN_FLAGS]) == 0
    _spread_codes(out, synth_dataset.train)
    (out / "thresholds.json").write_text(json.dumps({"thresholds": {str(k): v for k, v in THRESHOLDS.items()},
                                                     "weighted_stage1": WEIGHTED}))
    return out


@pytest.fixture(scope="module")
def onnx_file(run_dir):
    out = run_dir.parent / "encoder.onnx"
    assert main(["export", "--model", str(run_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def torch_encoder(run_dir):
    return TorchEncoder(run_dir)


def _bit_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.unpackbits(a, axis=1) == np.unpackbits(b, axis=1)).mean())


def test_onnx_codes_equal_torch_codes_and_rank_alike(onnx_file, torch_encoder, synth_dataset):
    encoder = load_encoder(onnx_file)
    assert isinstance(encoder, OnnxEncoder)
    gallery, query = synth_dataset.gallery, synth_dataset.query
    ref_g, got_g = torch_encoder.encode_records(gallery, batch_size=16), encoder.encode_records(gallery, batch_size=16)
    ref_q, got_q = torch_encoder.encode_records(query), encoder.encode_records(query)
    assert len({code.tobytes() for code in ref_g.codes[64]}) > len(gallery) // 2  # not one code for all
    for ref, got, records in ((ref_g, got_g, gallery), (ref_q, got_q, query)):
        for length in LENGTHS:
            assert got.codes[length].shape == ref.codes[length].shape == (len(records), length // 8)
            assert _bit_agreement(got.codes[length], ref.codes[length]) >= 0.999
        assert np.abs(got.features - ref.features).max() < 1e-3
        assert got.pids.tolist() == [p for _, p, _ in records] and got.paths.tolist() == [p for p, _, _ in records]
    # The same top-10 on the gallery (CtF search with the run's thresholds).
    top = []
    for gal, qry in ((ref_g, ref_q), (got_g, got_q)):
        index = CtFIndex()
        index.add(gal.codes)
        index.thresholds = THRESHOLDS
        top.append(index.search(qry.codes, 10)[1])
    assert np.array_equal(top[0], top[1])


def test_batch_axis_is_dynamic_and_batches_agree(onnx_file):
    encoder = OnnxEncoder(onnx_file)
    assert isinstance(encoder.info["input_shape"][0], str)  # a named (symbolic) dimension, not a fixed 1 or 2
    images = generated_images(33, 64, 32, seed=3)
    x = encoder.preprocess(images[:32])
    one = [encoder.run_bn(x[i:i + 1]) for i in range(32)]
    many = encoder.run_bn(x)
    for length in LENGTHS:
        assert many[length].shape == (32, length)
        np.testing.assert_allclose(np.concatenate([o[length] for o in one]), many[length], atol=1e-5, rtol=0)
    by_one, by_32 = encoder.encode_images(images, batch_size=1), encoder.encode_images(images, batch_size=32)
    for length in LENGTHS:
        assert _bit_agreement(by_one.codes[length], by_32.codes[length]) >= 0.999
    # the values of weighted stages are the graph's bn(v): the shortest's and the middle lengths'
    lengths = sorted(LENGTHS)
    np.testing.assert_allclose(by_32.values[:32], many[lengths[0]], atol=1e-5, rtol=0)
    assert sorted(by_32.later_values) == lengths[1:-1]
    for length, v in by_32.later_values.items():
        np.testing.assert_allclose(v[:32], many[length], atol=1e-5, rtol=0)


def test_metadata_round_trip(onnx_file, torch_encoder, run_dir):
    encoder = load_encoder(onnx_file)
    assert encoder.fingerprint == torch_encoder.fingerprint  # indexes built by the run accept the export
    assert encoder.lengths == torch_encoder.lengths == sorted(LENGTHS)
    assert (encoder.height, encoder.width) == (torch_encoder.height, torch_encoder.width) == (64, 32)
    assert encoder.thresholds == torch_encoder.thresholds == THRESHOLDS
    from ctfreid.search.asymmetric import Weighting

    want = ({32: 50, 64: 22}, Weighting.from_dict(WEIGHTED["weights"]))  # the weighted stage 1 travels too
    assert encoder.weighted == torch_encoder.weighted == want
    assert encoder.flip is False and torch_encoder.flip is False
    assert tuple(encoder.info["mean"]) == pytest.approx(tuple(torch_encoder.info["mean"]))
    assert tuple(encoder.info["std"]) == pytest.approx(tuple(torch_encoder.info["std"]))
    assert encoder.info["backbone"] == "mobilenet_v2"
    assert encoder.info["model_config"]["lengths"] == list(LENGTHS)
    # the run's validation split travels with the export (DTO thresholds can be fitted from the export)
    from ctfreid.data.datasets import split_records

    assert split_records("val", encoder.info) == split_records("val", torch_encoder.info) != []


def test_flip_graph_equals_torch_flip_encoding(run_dir, onnx_file, synth_dataset, capsys):
    flip_file = run_dir.parent / "encoder_flip.onnx"
    assert main(["export", "--model", str(run_dir), "--out", str(flip_file), "--flip", "--check"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "FAILED" not in out
    records = synth_dataset.query
    ref = TorchEncoder(run_dir, flip=True).encode_records(records)
    in_graph = load_encoder(flip_file)
    assert in_graph.flip is True
    mirrored_here = load_encoder(onnx_file, flip=True)  # plain graph, mirror run by the encoder
    plain = load_encoder(run_dir).encode_records(records)
    for got in (in_graph.encode_records(records), mirrored_here.encode_records(records)):
        for length in LENGTHS:
            assert _bit_agreement(got.codes[length], ref.codes[length]) >= 0.999
        assert np.abs(got.features - ref.features).max() < 1e-3
    # The flip test changes the features by far more than the tolerance above: the comparison can fail.
    assert np.abs(ref.features - plain.features).max() > 1e-2
    with pytest.raises(CtfreidError, match="exported with --flip"):
        load_encoder(flip_file, flip=False)


def test_check_fails_on_an_encoder_that_differs(run_dir, tmp_path):
    from ctfreid.learn.run_dir import load_model, model_fingerprint

    model, info = load_model(run_dir)
    fingerprint = model_fingerprint(model, info)
    with torch.no_grad():
        for norm in model.bns:  # every bit flipped
            norm.weight.neg_()
    bad = tmp_path / "flipped_bits.onnx"
    export_onnx(model, info, bad, fingerprint=fingerprint)
    report = check_export(run_dir, bad, n=40)
    assert not report.ok
    assert all(share < 0.01 for share in report.bit_agreement.values())
    assert any("agree on" in line for line in report.failures)


def test_damaged_or_foreign_onnx_is_one_line(onnx_file, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_file.read_bytes()[:5000])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(3000))
    foreign = tmp_path / "foreign.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph), foreign)
    for path in (truncated, garbage, foreign):
        with pytest.raises(CtfreidError) as e:
            load_encoder(path)
        message = str(e.value)
        assert "\n" not in message and str(path) in message
        assert "not a ctfreid encoder: expected an .onnx file written by 'ctfreid export'" in message
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        load_encoder(tmp_path / "missing.onnx")
    code = main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "x.onnx")])
    assert code == 2  # a folder without a model: one line, exit 2


def test_out_must_be_onnx(run_dir, tmp_path, capsys):
    assert main(["export", "--model", str(run_dir), "--out", str(tmp_path / "encoder.pt")]) == 2
    assert "ending in .onnx" in capsys.readouterr().err


PRELUDE = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name.startswith("torchvision"):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
"""

CHILD = """
import numpy as np
from ctfreid.infer.encoder import load_encoder
from ctfreid.infer.gallery import folder_records
from ctfreid.search.index import CtFIndex
try:
    import torch
    raise SystemExit("torch imported")
except ImportError:
    pass
encoder = load_encoder(sys.argv[1], threads=1)
records = folder_records(sys.argv[2])
encoded = encoder.encode_records(records, batch_size=7)
index = CtFIndex()
index.add(encoded.codes)
index.thresholds = encoder.thresholds
D, I = index.search(encoded.codes, 5)
assert "torch" not in sys.modules
np.savez(sys.argv[3], I=I, D=D, **{f"codes_{L}": c for L, c in encoded.codes.items()})
"""


def test_torch_free_path_in_a_subprocess(onnx_file, torch_encoder, synth_root, tmp_path):
    folder = synth_root / "query"
    out = tmp_path / "child.npz"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(CHILD), str(onnx_file),
                           str(folder), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    child = np.load(out)
    from ctfreid.infer.gallery import folder_records

    ref = torch_encoder.encode_records(folder_records(folder), batch_size=7)
    for length in LENGTHS:
        assert _bit_agreement(child[f"codes_{length}"], ref.codes[length]) >= 0.999
    index = CtFIndex()
    index.add(ref.codes)
    index.thresholds = THRESHOLDS
    D, I = index.search(ref.codes, 5)
    assert np.array_equal(child["I"], I) and np.array_equal(child["D"], D)


def test_torch_encoder_members(torch_encoder, synth_dataset):
    images = [__import__("ctfreid.data.datasets", fromlist=["read_image"]).read_image(p)
              for p, _, _ in synth_dataset.query[:5]]
    got = torch_encoder.encode_images(images, batch_size=2)
    ref = torch_encoder.encode_records(synth_dataset.query[:5])
    for length in LENGTHS:
        assert np.array_equal(got.codes[length], ref.codes[length])
    assert got.pids.tolist() == [-1] * 5 and got.paths is None
    with pytest.raises(CtfreidError, match="batch_size"):
        torch_encoder.encode_images(images, batch_size=0)


CLI_CHILD = """
from ctfreid.cli import main
rc = main(sys.argv[1:])
assert "torch" not in sys.modules, "torch was imported"
sys.exit(rc)
"""


def _cli_without_torch(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(CLI_CHILD),
                           *map(str, argv)], capture_output=True, text=True, timeout=300)


def test_commands_take_an_onnx_encoder_without_torch(run_dir, onnx_file, synth_root, tmp_path, capsys):
    gallery, query = synth_root / "bounding_box_test", sorted((synth_root / "query").iterdir())[:3]
    built = tmp_path / "onnx.ctf"
    r = _cli_without_torch("index", "build", "--model", onnx_file, "--images", gallery, "--out", built, "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli_without_torch("search", "--index", built, "--model", onnx_file, *query, "--k", 5, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    onnx_answer = json.loads(r.stdout)["queries"]
    # the same index searched with the run directory that was exported: accepted (same fingerprint), same ids
    assert main(["search", "--index", str(built), "--model", str(run_dir), *map(str, query), "--k", "5", "--json"]) == 0
    torch_answer = json.loads(capsys.readouterr().out)["queries"]
    assert [[h["id"] for h in q["results"]] for q in onnx_answer] == [[h["id"] for h in q["results"]] for q in torch_answer]
    # an unrelated encoder is refused: an export of another model (one weight changed)
    other = tmp_path / "other"
    other.mkdir()
    blob = __import__("torch").load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    key = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    blob["state_dict"][key] = blob["state_dict"][key] + 1e-3
    __import__("torch").save(blob, other / "model.pt")
    assert main(["export", "--model", str(other), "--out", str(tmp_path / "other.onnx")]) == 0
    capsys.readouterr()
    r = _cli_without_torch("search", "--index", built, "--model", tmp_path / "other.onnx", query[0])
    assert r.returncode == 2 and "built by another model" in r.stderr and "Traceback" not in r.stderr
    r = _cli_without_torch("encode", "--model", onnx_file, "--split", "query", "--out", tmp_path / "q.npz", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]


def test_serve_with_an_onnx_encoder_finds_a_gallery_crop_first(onnx_file, synth_root, tmp_path):
    pytest.importorskip("fastapi")
    from test_serve_api import Server

    files = sorted((synth_root / "bounding_box_test").glob("*.jpg"))[:10]
    with Server(tmp_path / "store", onnx_file) as srv:
        r = srv.client.post("/v1/items", files=[("images", (f.name, f.read_bytes(), "image/jpeg")) for f in files])
        assert r.status_code == 200, r.text
        ids = r.json()["ids"]
        r = srv.client.post("/v1/search", files=[("images", (files[3].name, files[3].read_bytes(), "image/jpeg"))],
                            data={"k": "3"})
        assert r.status_code == 200, r.text
        first = r.json()["queries"][0]["hits"][0]
        assert first["id"] == ids[3] and first["distance"] == 0
        assert srv.client.get("/v1/stats").json()["model_fingerprint"] == load_encoder(onnx_file).fingerprint


# --- int8 (static quantisation) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_file(run_dir, onnx_file):
    out = run_dir.parent / "encoder.int8.onnx"
    assert main(["export", "--model", str(run_dir), "--out", str(out), "--int8", "--max-images", "24"]) == 0
    return out


def test_int8_keeps_the_float_encoders_bits(tmp_path):
    """A freshly initialised AiO encoder (its features vary across images as a trained one's do; the one-epoch
    tiny run's barely do, so rounding would dominate them), quantised with 32 calibration images: the codes
    of 64 other images keep >= 97 % of the float export's bits (the oracle), and batches agree. The weights are
    in 7 bits: with 8, a CPU without VNNI saturates (an AMD Zen 2 kept 91 % of the bits; see quantize.py)."""
    import onnx

    from ctfreid.infer.quantize import quantize_onnx
    from ctfreid.learn.model import AiOModel

    torch.manual_seed(0)
    model = AiOModel(num_classes=10, backbone="mobilenet_v2", lengths=LENGTHS).eval()
    info = {"height": 64, "width": 32, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    export_onnx(model, info, tmp_path / "f.onnx", fingerprint="fp")
    entry = quantize_onnx(tmp_path / "f.onnx", tmp_path / "q.onnx", generated_images(32, 64, 32, seed=1))
    f, q = OnnxEncoder(tmp_path / "f.onnx"), OnnxEncoder(tmp_path / "q.onnx")
    assert q.info["quantization"] == entry and entry["calibration_images"] == 32
    assert (q.fingerprint, q.lengths) == (f.fingerprint, f.lengths) == ("fp", sorted(LENGTHS))
    proto = onnx.load(str(tmp_path / "q.onnx"))
    init = {t.name: t for t in proto.graph.initializer}
    assert [n.op_type for n in proto.graph.node].count("QuantizeLinear") > 10
    assert entry["float_first_convs"] == 4  # the stem stays float (FLOAT_FIRST_CONVS)
    int8_weights = [t for t in init.values() if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == 52 - 4  # the other convolutions
    assert all(np.abs(onnx.numpy_helper.to_array(t).astype(int)).max() <= 64 for t in int8_weights)
    assert max(np.abs(onnx.numpy_helper.to_array(t).astype(int)).max() for t in int8_weights) >= 60  # range used
    for node in proto.graph.node:  # the code heads stay float32: their signs are the codes (Eq. 2)
        if node.op_type in ("Gemm", "BatchNormalization"):
            assert all(init[i].data_type == onnx.TensorProto.FLOAT for i in node.input[1:] if i in init)
    images = generated_images(64, 64, 32, seed=7)
    a, b = f.encode_images(images), q.encode_images(images)
    for length in LENGTHS:
        assert 0.97 <= _bit_agreement(a.codes[length], b.codes[length]) < 1.0
    x = q.preprocess(images[:8])
    one = np.concatenate([q.run_bn(x[i:i + 1])[256] for i in range(8)])
    np.testing.assert_allclose(one, q.run_bn(x)[256], atol=1e-5, rtol=0)


def test_int8_export_of_a_run_queries_its_index(int8_file, onnx_file, run_dir, synth_root, tmp_path, capsys):
    q, f = OnnxEncoder(int8_file), OnnxEncoder(onnx_file)
    # calibrated on 24 of the run's training images (the default source), recorded in the metadata
    assert q.info["quantization"]["calibration_images"] == 24
    assert (q.fingerprint, q.lengths, q.thresholds) == (f.fingerprint, f.lengths, f.thresholds)
    built = tmp_path / "gallery.ctf"
    gallery = synth_root / "bounding_box_test"
    assert main(["index", "build", "--model", str(run_dir), "--images", str(gallery), "--out", str(built), "--quiet"]) == 0
    query = sorted(gallery.iterdir())[:3]
    capsys.readouterr()
    # accepted (same fingerprint as the run); each gallery crop finds itself first (distance 0 but for rounding)
    assert main(["search", "--index", str(built), "--model", str(int8_file), *map(str, query), "--k", "5", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)["queries"]
    assert len(answers) == 3 and all(len(a["results"]) == 5 for a in answers)


def test_int8_bad_input(run_dir, int8_file, tmp_path, capsys):
    from ctfreid.infer.quantize import quantize_onnx

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--model", str(run_dir), "--out", str(tmp_path / "a.onnx"), "--calibration", str(empty)]) == 2
    assert "--calibration is for --int8" in capsys.readouterr().err
    assert main(["export", "--model", str(run_dir), "--out", str(tmp_path / "b.onnx"), "--int8",
                 "--calibration", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no images" in err and str(empty) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.onnx").exists()
    with pytest.raises(CtfreidError, match="already quantised"):
        quantize_onnx(int8_file, tmp_path / "c.onnx", generated_images(2, 64, 32))


def test_sets_encoded_by_a_run_and_its_exports_count_as_one_model(run_dir, onnx_file, int8_file, synth_root,
                                                                  tmp_path, capsys):
    """encode records the run's fingerprint for the run and its exports alike (they give the same codes,
    test_onnx_codes_equal_torch_codes_and_rank_alike), so evaluate ranks one against the other; an int8
    export is the same model too (as for indexes), with a note."""
    files = {}
    for name, model, split in (("q", run_dir, "query"), ("g", onnx_file, "gallery"), ("g8", int8_file, "gallery")):
        files[name] = tmp_path / f"{name}.npz"
        assert main(["encode", "--model", str(model), "--data", str(synth_root), "--split", split,
                     "--out", str(files[name]), "--num-workers", "0", "--quiet"]) == 0
    records = {name: load_encoded(path).meta["encoder"] for name, path in files.items()}
    assert records["q"]["fingerprint"] == records["g"]["fingerprint"] == records["g8"]["fingerprint"]
    assert [r["runtime"] for r in records.values()] == ["torch", "onnxruntime", "onnxruntime"]
    assert [r["quantization"] for r in records.values()] == [None, None, "int8"]
    capsys.readouterr()
    assert main(["evaluate", "--query", str(files["q"]), "--gallery", str(files["g"])]) == 0
    assert "note" not in capsys.readouterr().out
    assert main(["evaluate", "--query", str(files["q"]), "--gallery", str(files["g8"])]) == 0
    assert f"--gallery {files['g8']} by the int8 one" in capsys.readouterr().out


def test_export_check_on_an_empty_folder_writes_no_encoder(run_dir, tmp_path, capsys):
    # before: the .onnx was written, then --images was found empty
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "e.onnx"
    assert main(["export", "--model", str(run_dir), "--out", str(out), "--check", "--images", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "holds no images" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["export", "--model", str(run_dir), "--out", str(out), "--images", str(empty)]) == 2
    assert "--images is for --check" in capsys.readouterr().err and not out.exists()
