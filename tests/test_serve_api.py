"""``ctfreid serve`` end to end: the real service (uvicorn in a subprocess on a free loopback port) against
an in-process CtFIndex on the same gallery (the oracle), erasure down to the bytes of the SQLite files,
restarts, auth and limits, the image path, a SIGKILL during a stream of writes, and retention."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from ctfreid.eval.calibration import fit_target
from ctfreid.eval.cost_model import default_cost_model
from ctfreid.search.index import CtFIndex
from ctfreid.search.thresholds import fit_thresholds

LENGTHS = [32, 64, 128]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m ctfreid serve`` in a subprocess; ``client`` talks to it."""

    def __init__(self, store: Path, model: Path, *extra, token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctfreid", "serve", "--store", str(store), "--model", str(model),
             "--port", str(self.port), *map(str, extra)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read().decode()}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("server did not start in 60 s")
            time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def b64(codes: dict, rows=None) -> dict:
    rows = range(next(iter(codes.values())).shape[0]) if rows is None else rows
    return {str(L): [base64.b64encode(c[i].tobytes()).decode() for i in rows] for L, c in codes.items()}


def random_codes(rng, n: int) -> dict:
    # correlated lengths (a longer code extends the shorter one) so the stages prune like real codes do
    base = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    return {32: base[:, :4].copy(), 64: base[:, :8].copy(), 128: base.copy()}


def near(codes: dict, rng, n: int, flips: int = 6) -> dict:
    """Queries: gallery codes with a few bits flipped (so there are near matches and ties)."""
    pick = rng.integers(0, codes[128].shape[0], n)
    q = codes[128][pick].copy()
    bits = np.unpackbits(q, axis=1)
    for r in range(n):
        bits[r, rng.choice(128, flips, replace=False)] ^= 1
    q = np.packbits(bits, axis=1)
    return {32: q[:, :4].copy(), 64: q[:, :8].copy(), 128: q}


def served_hits(srv: Server, q: dict, k: int, **fields) -> list[list[tuple[int, int, int]]]:
    r = srv.client.post("/v1/search", json={"codes": b64(q), "k": k, **fields})
    assert r.status_code == 200, r.text
    return [[(h["id"], h["distance"], h["stage_bits"]) for h in qq["hits"]] for qq in r.json()["queries"]]


def oracle_hits(index: CtFIndex, q: dict, k: int, thresholds: dict) -> list[list[tuple[int, int, int]]]:
    if index.ntotal == 0:
        return [[] for _ in range(q[32].shape[0])]
    h = index.search_hits(q, k, thresholds)
    out = []
    for r in range(h.ids.shape[0]):
        out.append([(int(h.ids[r, j]), int(h.distances[r, j, h.stages[r, j] - 1]), LENGTHS[h.stages[r, j] - 1])
                    for j in range(h.ids.shape[1]) if h.ids[r, j] >= 0])
    return out


def validation_codes(run_dir: Path):
    from ctfreid.data.datasets import split_records
    from ctfreid.infer.encoder import load_encoder

    enc = load_encoder(run_dir)
    return enc.encode_records(split_records("val", dict(enc.info)))


def store_bytes(store: Path) -> bytes:
    data = (store / "gallery.sqlite").read_bytes()
    wal = store / "gallery.sqlite-wal"
    return data + (wal.read_bytes() if wal.exists() else b"")


def test_codes_path_equals_ctfindex_filters_are_exact_erasure_is_final_and_restart_keeps_answers(run_dir, tmp_path):
    rng = np.random.default_rng(1)
    n = 400
    gallery = random_codes(rng, n)
    cams = rng.integers(1, 4, n)
    times = 1_700_000_000 + rng.integers(0, 1000, n).astype(float)
    pids = rng.integers(1, 30, n)
    meta = [{"pid": int(p), "camera": int(c), "time": float(t), "source": f"cam{c}/{i}.jpg", "track": f"t{i % 7}"}
            for i, (p, c, t) in enumerate(zip(pids, cams, times))]
    store = tmp_path / "store"
    thr = {32: 12, 64: 26}
    queries = near(gallery, rng, 12)
    with Server(store, run_dir) as srv:
        ids = []
        for a in range(0, n, 100):  # several requests: ids keep increasing across them
            r = srv.client.post("/v1/items", json={"codes": b64(gallery, range(a, a + 100)), "metadata": meta[a:a + 100]})
            assert r.status_code == 200, r.text
            ids += r.json()["ids"]
        assert ids == sorted(ids) and len(set(ids)) == n
        ids = np.array(ids)
        oracle = CtFIndex()
        oracle.add(gallery, ids)
        assert served_hits(srv, queries, 15, thresholds={"32": 12, "64": 26}) == oracle_hits(oracle, queries, 15, thr)
        # the request's stage counts: items within every earlier threshold, by brute force
        r = srv.client.post("/v1/search", json={"codes": b64(queries), "k": 3, "thresholds": {"32": 12, "64": 26}})
        d32 = np.unpackbits(gallery[32] ^ queries[32][0], axis=1).sum(1)
        d64 = np.unpackbits(gallery[64] ^ queries[64][0], axis=1).sum(1)
        assert r.json()["queries"][0]["candidates"] == {"32": n, "64": int((d32 <= 12).sum()),
                                                        "128": int(((d32 <= 12) & (d64 <= 26)).sum())}
        # filters are exact: the ranking of an index holding only the items that pass
        for flt, keep in (({"camera": 2}, cams == 2),
                          ({"time_from": times.min() + 300, "time_to": times.min() + 420},
                           (times >= times.min() + 300) & (times <= times.min() + 420)),
                          ({"camera": 3, "time_to": times.min() + 100}, (cams == 3) & (times <= times.min() + 100))):
            sub = CtFIndex()
            sub.add({L: c[keep] for L, c in gallery.items()}, ids[keep])
            assert served_hits(srv, queries, 10, thresholds={"32": 12, "64": 26}, **flt) == \
                oracle_hits(sub, queries, 10, thr), flt
        # erasure: one item, one person, a camera + time filter
        victim = int(ids[oracle_hits(oracle, queries, 1, thr)[0][0][0] == ids].nonzero()[0][0])
        blob = b"".join(gallery[L][victim].tobytes() for L in LENGTHS)
        assert blob in store_bytes(store)  # the oracle of the byte check: present before
        r = srv.client.delete(f"/v1/items/{ids[victim]}")
        assert r.status_code == 200 and r.json()["erased"] == [int(ids[victim])]
        assert blob not in store_bytes(store)
        person = int(pids[0])
        r = srv.client.delete(f"/v1/persons/{person}")
        expect_person = sorted(set(ids[pids == person].tolist()) - {int(ids[victim])})
        assert r.json()["erased"] == expect_person
        r = srv.client.post("/v1/erase", json={"camera": 1, "time_to": float(times.min() + 200)})
        expect_filter = set(ids[(cams == 1) & (times <= times.min() + 200)].tolist()) - set(expect_person) - {int(ids[victim])}
        assert set(r.json()["erased"]) == expect_filter
        erased = {int(ids[victim]), *expect_person, *expect_filter}
        data = store_bytes(store)
        for i in np.nonzero(np.isin(ids, list(erased)))[0]:
            assert b"".join(gallery[L][i].tobytes() for L in LENGTHS) not in data
        assert srv.client.get(f"/v1/items/{ids[victim]}").status_code == 404
        oracle.remove_ids(np.array(sorted(erased)))
        after = served_hits(srv, queries, 15, thresholds={"32": 12, "64": 26})
        assert after == oracle_hits(oracle, queries, 15, thr)
        assert not erased & {h[0] for q in after for h in q}
        default = served_hits(srv, queries, 15)
        stats = srv.client.get("/v1/stats").json()
        assert stats["items"] == n - len(erased) and stats["erased"] == len(erased)
    with Server(store, run_dir) as srv:  # restart: same gallery, same answers, ids never reused
        assert served_hits(srv, queries, 15, thresholds={"32": 12, "64": 26}) == after
        assert served_hits(srv, queries, 15) == default
        new = srv.client.post("/v1/items", json={"codes": b64(gallery, [victim])}).json()["ids"]
        assert new[0] > int(ids.max())
        assert served_hits(srv, {L: c[victim:victim + 1] for L, c in gallery.items()}, 1)[0][0][:2] == (new[0], 0)


def test_auth_limits_and_bad_input_are_json_errors_naming_the_field(run_dir, tmp_path):
    from PIL import Image

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with Server(tmp_path / "store", run_dir, "--token-file", token_file, "--max-images", 2, "--max-body-mb", 0.5,
                "--beta", 2, token="s3cret-token") as srv:
        bare = httpx.Client(base_url=srv.url, timeout=30)
        assert bare.get("/healthz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            r = bare.get("/v1/stats", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
        r = bare.post("/v1/search", json={}, headers={"Authorization": "Bearer s3cret-tokenX"})
        assert r.status_code == 401
        bare.close()
        c = srv.client
        assert c.get("/v1/stats").status_code == 200

        def err(r, status, field):
            assert r.status_code == status, r.text
            body = r.json()["error"]
            assert body["field"] == field, body
            assert body["message"]
            return body["message"]

        err(c.post("/v1/items", content=b"x" * 600_000, headers={"Content-Type": "application/json"}), 413, "body")
        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(20):
                yield b"x" * 50_000

        err(c.post("/v1/search", content=chunks(), headers={"Content-Type": "application/json"}), 413, "body")
        png = io.BytesIO()
        Image.new("RGB", (20, 40), (10, 200, 30)).save(png, "PNG")
        files = [("images", (f"{i}.png", png.getvalue(), "image/png")) for i in range(3)]
        err(c.post("/v1/search", files=files), 413, "images")
        bomb = io.BytesIO()
        Image.new("L", (5000, 5000)).save(bomb, "PNG")  # 25 Mpixel in ~25 kB
        assert len(bomb.getvalue()) < 500_000
        err(c.post("/v1/search", files=[("images", ("bomb.png", bomb.getvalue(), "image/png"))]), 413, "images[0]")
        msg = err(c.post("/v1/items", files=[("images", ("notes.txt", b"hello, not an image", "text/plain"))]), 400,
                  "images[0]")
        assert "notes.txt" in msg
        jpg = io.BytesIO()
        Image.new("RGB", (32, 64), (1, 2, 3)).save(jpg, "JPEG")
        cut = jpg.getvalue()[: len(jpg.getvalue()) // 2]
        err(c.post("/v1/items", files=[("images", ("cut.jpg", cut, "image/jpeg"))]), 400, "images[0]")
        err(c.post("/v1/search", content=b"{not json", headers={"Content-Type": "application/json"}), 400, "body")
        err(c.post("/v1/search", json={"codes": {"32": ["AAAAAA=="]}}), 400, "codes")
        good = {"32": ["AAAAAA=="], "64": ["AAAAAAAAAAA="], "128": ["AAAAAAAAAAAAAAAAAAAAAA=="]}
        err(c.post("/v1/search", json={"codes": {**good, "64": ["AAAA"]}}), 400, "codes.64[0]")
        err(c.post("/v1/search", json={"codes": good, "k": 0}), 400, "k")
        err(c.post("/v1/search", json={"codes": good, "k": 10**6}), 400, "k")
        err(c.post("/v1/search", json={"codes": good, "k": "ten"}), 400, "k")
        err(c.post("/v1/search", json={"codes": good, "thresholds": {"32": 40, "64": 5}}), 400, "thresholds")
        err(c.post("/v1/search", json={"codes": good, "beta": -1}), 400, "beta")
        err(c.post("/v1/items", json={"codes": good, "metadata": [{"camera": "front"}]}), 400, "metadata[0].camera")
        err(c.post("/v1/items", json={"codes": good, "metadata": [{}, {}]}), 400, "metadata")
        err(c.get("/v1/items/abc"), 422, "item_id")
        err(c.get("/v1/items/12345"), 404, "id")
        err(c.post("/v1/erase", json={}), 400, "filter")
        err(c.post("/v1/erase", json={"path": "/etc/passwd"}), 400, "path")
        r = c.post("/v1/search", json={"codes": good, "beta": 1.5})
        assert r.status_code == 200, r.text  # fits from the val split
        stats = c.get("/v1/stats").json()
        assert stats["items"] == 0 and "POST /v1/search" in stats["latency_ms"]
        # --beta 2: the default thresholds are DTO's on the run's validation codes (the library's fit)
        val = validation_codes(run_dir)
        dto = fit_thresholds(val.codes, val.pids, val.camids, beta=2.0)
        assert {int(k): v for k, v in stats["thresholds"].items()} == dto and "DTO beta=2" in stats["thresholds_source"]


def test_refused_starts_are_one_line_errors(run_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def start(*argv):
        return subprocess.run([sys.executable, "-m", "ctfreid", "serve", *map(str, argv)], capture_output=True,
                              text=True, env=env, timeout=60)

    r = start("--store", tmp_path / "s", "--model", run_dir, "--host", "0.0.0.0", "--port", free_port())
    assert r.returncode == 2 and "--token-file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = start("--store", tmp_path / "s", "--model", run_dir, "--max-batch", 0, "--port", free_port())
    assert r.returncode == 2 and "--max-batch must be >= 1" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    from ctfreid.infer.encoder import load_encoder
    from ctfreid.serve.store import Store

    Store(tmp_path / "s", load_encoder(run_dir).fingerprint, LENGTHS).close()  # a store made for run_dir
    other = tmp_path / "other"
    other.mkdir()
    blob = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    key = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    blob["state_dict"][key] = blob["state_dict"][key] + 1e-3
    torch.save(blob, other / "model.pt")
    r = start("--store", tmp_path / "s", "--model", other, "--port", free_port())
    assert r.returncode == 2 and "fingerprint" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_image_path_answers_equal_encode_records_and_ctfindex(run_dir, synth_root, tmp_path):
    from ctfreid.infer.encoder import encode_records
    from ctfreid.learn.run_dir import load_model

    files = sorted((synth_root / "bounding_box_test").glob("*.jpg"))[:24]
    meta = [{"camera": i % 3 + 1, "pid": 100 + i // 4, "time": 1.7e9 + i} for i in range(len(files))]
    with Server(tmp_path / "store", run_dir, "--weighted", 0) as srv:  # Hamming only (the weighted default: below)
        ids = []
        for a in range(0, len(files), 8):
            r = srv.client.post("/v1/items", files=[("images", (f.name, f.read_bytes(), "image/jpeg"))
                                                    for f in files[a:a + 8]],
                                data={"metadata": json.dumps(meta[a:a + 8])})
            assert r.status_code == 200, r.text
            ids += r.json()["ids"]
        model, info = load_model(run_dir)
        enc = encode_records(model, [(str(f), 0, 0) for f in files], height=info["height"], width=info["width"],
                             mean=info["mean"], std=info["std"])
        oracle = CtFIndex()
        oracle.add(enc.codes, np.array(ids))
        qf = files[5]
        r = srv.client.post("/v1/search", files=[("images", (qf.name, qf.read_bytes(), "image/jpeg"))], data={"k": "8"})
        assert r.status_code == 200, r.text
        q = r.json()["queries"][0]
        thr = {int(k): v for k, v in r.json()["thresholds"].items()}
        # no thresholds with the model, no --beta: the accuracy target (tolerance 0.5) on the validation codes,
        # planned for the default --gallery-size of 1e6 items with the built-in cost model
        val = validation_codes(run_dir)
        want = fit_target(val, "accuracy", 0.5, cost_model=default_cost_model(val.lengths), gallery_size=1_000_000)
        assert thr == want.thresholds
        want = oracle_hits(oracle, {L: c[5:6] for L, c in enc.codes.items()}, 8, thr)[0]
        assert [(h["id"], h["distance"], h["stage_bits"]) for h in q["hits"]] == want
        assert q["hits"][0]["id"] == ids[5] and q["hits"][0]["distance"] == 0
        assert q["hits"][0]["source"] == qf.name and q["hits"][0]["camera"] == meta[5]["camera"]
        item = srv.client.get(f"/v1/items/{ids[5]}").json()
        assert item["pid"] == meta[5]["pid"] and item["thumbnail"] is True
        t = srv.client.get(f"/v1/items/{ids[5]}/thumbnail")
        assert t.status_code == 200 and t.content[:2] == b"\xff\xd8"
        thumb = t.content[-66:-2]  # entropy-coded data of this image (the header tables are in every JPEG)
        assert thumb in store_bytes(tmp_path / "store")
        assert srv.client.delete(f"/v1/items/{ids[5]}").json()["erased"] == [ids[5]]
        assert thumb not in store_bytes(tmp_path / "store")  # the thumbnail's bytes went with the row
        page = srv.client.get("/")
        assert page.status_code == 200 and "app.js" in page.text
        assert srv.client.get("/static/app.js").status_code == 200


def test_weighted_stage1_serves_image_searches_and_survives_a_restart(run_dir, synth_root, tmp_path):
    """By default (--weighted 4) searches by image with the default thresholds use the weighted stage 1 fitted
    on the validation split at the first start (ctfreid.search.asymmetric); the oracle: the library's fit and a
    CtFIndex with the same weighting. Searches by codes, or with their own thresholds, stay Hamming."""
    from ctfreid.infer.encoder import encode_records
    from ctfreid.learn.run_dir import load_model
    from ctfreid.search.asymmetric import Weighting

    files = sorted((synth_root / "bounding_box_test").glob("*.jpg"))[:24]
    val = validation_codes(run_dir)
    want = fit_target(val, "accuracy", 0.5, cost_model=default_cost_model(val.lengths), gallery_size=1_000_000,
                      weight_bits=4)
    model, info = load_model(run_dir)
    enc = encode_records(model, [(str(f), 0, 0) for f in files], height=info["height"], width=info["width"],
                         mean=info["mean"], std=info["std"])
    qf = files[5]
    image = [("images", (qf.name, qf.read_bytes(), "image/jpeg"))]
    for start in range(2):  # the second start reads the fit kept with the store
        with Server(tmp_path / "store", run_dir) as srv:  # the default: 4-bit weights
            if start == 0:
                ids = []
                for a in range(0, len(files), 8):
                    r = srv.client.post("/v1/items", files=[("images", (f.name, f.read_bytes(), "image/jpeg"))
                                                            for f in files[a:a + 8]])
                    assert r.status_code == 200, r.text
                    ids += r.json()["ids"]
            stats = srv.client.get("/v1/stats").json()
            weighted = stats["weighted_stage1"]
            assert weighted["thresholds"] == {str(L): t for L, t in want.thresholds.items()}
            assert weighted["weights"]["bits"] == 4
            assert weighted["weights"]["scale"] == pytest.approx(want.weighting.scale, rel=1e-5)
            r = srv.client.post("/v1/search", files=image, data={"k": "8"})
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["weights"] == weighted["weights"] and answer["thresholds"] == weighted["thresholds"]
            oracle = CtFIndex()
            oracle.add(enc.codes, np.array(ids))
            oracle.weighted_thresholds = {int(L): t for L, t in weighted["thresholds"].items()}
            oracle.weighting = Weighting.from_dict(weighted["weights"])
            h = oracle.search_hits({L: c[5:6] for L, c in enc.codes.items()}, 8,
                                   query_weights=oracle.weighting.weights(enc.values[5:6]))
            want_hits = [(int(h.ids[0, j]), int(h.distances[0, j, h.stages[0, j] - 1]), LENGTHS[h.stages[0, j] - 1])
                         for j in range(h.ids.shape[1])]
            assert [(x["id"], x["distance"], x["stage_bits"]) for x in answer["queries"][0]["hits"]] == want_hits
            # codes (no real values to weight) and a request's own thresholds: the Hamming stage 1
            by_codes = srv.client.post("/v1/search", json={"codes": b64({L: c[5:6] for L, c in enc.codes.items()}),
                                                           "k": 8}).json()
            assert "weights" not in by_codes and by_codes["thresholds"] == stats["thresholds"]
            own = srv.client.post("/v1/search", files=image, data={"k": "8", "thresholds": "32=9,64=20"}).json()
            assert "weights" not in own and own["thresholds"] == {"32": 9, "64": 20}


def test_thresholds_stored_with_the_model_bring_their_weighted_stage1(run_dir, synth_root, tmp_path):
    """A run whose thresholds.json was written by 'ctfreid calibrate' (Hamming thresholds and a weighted
    stage 1 beside them): the service uses both as they are, fitting nothing; --weighted 0 keeps only the
    Hamming ones. Oracle: the file's values, and a CtFIndex with them."""
    from ctfreid.infer.encoder import encode_records
    from ctfreid.learn.run_dir import load_model
    from ctfreid.search.asymmetric import Weighting

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    files = sorted((synth_root / "bounding_box_test").glob("*.jpg"))[:16]
    model, info = load_model(run)
    enc = encode_records(model, [(str(f), 0, 0) for f in files], height=info["height"], width=info["width"],
                         mean=info["mean"], std=info["std"])
    image = [("images", (files[3].name, files[3].read_bytes(), "image/jpeg"))]
    stage1 = ({"bits": 3, "scale": 1.5}, {"32": 60, "64": 23})
    later = ({"bits": 3, "scale": 1.5, "later": {"64": 0.8}}, {"32": 60, "64": 300})  # a weighted 64-bit stage too
    for i, (flag, (weights, wth), want) in enumerate([((), stage1, True), (("--weighted", 0), stage1, False),
                                                      ((), later, True)]):
        (run / "thresholds.json").write_text(json.dumps({"thresholds": {"32": 10, "64": 22}, "weighted_stage1": {
            "thresholds": wth, "weights": weights}}))
        with Server(tmp_path / f"store{i}", run, *flag) as srv:
            r = srv.client.post("/v1/items", files=[("images", (f.name, f.read_bytes(), "image/jpeg")) for f in files])
            assert r.status_code == 200, r.text
            ids = r.json()["ids"]
            stats = srv.client.get("/v1/stats").json()
            assert stats["thresholds"] == {"32": 10, "64": 22} and stats["thresholds_source"] == "stored with the model"
            answer = srv.client.post("/v1/search", files=image, data={"k": "5"}).json()
            oracle = CtFIndex()
            oracle.add(enc.codes, np.array(ids))
            oracle.thresholds = {32: 10, 64: 22}
            if want:
                assert stats["weighted_stage1"]["thresholds"] == wth
                assert stats["weighted_stage1"]["weights"] == weights and "stored with the model" in \
                    stats["weighted_stage1"]["source"]
                assert answer["weights"] == weights and answer["thresholds"] == wth
                oracle.weighted_thresholds = {int(L): t for L, t in wth.items()}
                oracle.weighting = Weighting.from_dict(weights)
                one = enc.take(np.array([3]))
                h = oracle.search_hits(one.codes, 5, query_weights=oracle.weighting.query_weights(
                    one.values, one.later_values))
            else:
                assert stats["weighted_stage1"] is None and "weights" not in answer
                assert answer["thresholds"] == {"32": 10, "64": 22}
                h = oracle.search_hits({L: c[3:4] for L, c in enc.codes.items()}, 5)
            assert [x["id"] for x in answer["queries"][0]["hits"]] == h.ids[0].tolist()
            dist = [int(h.distances[0, j, h.stages[0, j] - 1]) for j in range(h.ids.shape[1])]
            assert [x["distance"] for x in answer["queries"][0]["hits"]] == dist


def test_sigkill_during_acknowledged_writes_loses_nothing_and_resurrects_nothing(run_dir, tmp_path):
    store = tmp_path / "store"
    srv = Server(store, run_dir)
    added: dict[int, dict] = {}  # acknowledged adds
    erased: set[int] = set()  # acknowledged erasures
    tried: set[int] = set()  # erasures sent (one cut by the kill may or may not have committed)
    stop = threading.Event()

    def writer(seed: int) -> None:
        r_ = np.random.default_rng(seed)
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            while not stop.is_set():
                try:
                    if added and r_.random() < 0.3:
                        victim = int(r_.choice(sorted(set(added) - erased) or [0]))
                        tried.add(victim)
                        r = c.delete(f"/v1/items/{victim}")
                        if r.status_code == 200:
                            erased.update(r.json()["erased"])
                    else:
                        codes = random_codes(r_, 3)
                        r = c.post("/v1/items", json={"codes": b64(codes)})
                        if r.status_code == 200:
                            for j, i in enumerate(r.json()["ids"]):
                                added[i] = {L: v[j] for L, v in codes.items()}
                except httpx.TransportError:
                    return

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    time.sleep(2.5)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    srv.stop()
    assert len(added) > 20 and erased, (len(added), len(erased))
    data = store_bytes(store)
    for i in erased:
        assert b"".join(added[i][L].tobytes() for L in LENGTHS) not in data
    with Server(store, run_dir) as srv2:
        live = sorted(set(added) - tried)
        for i in live:
            assert srv2.client.get(f"/v1/items/{i}").status_code == 200, i
        for i in erased:
            assert srv2.client.get(f"/v1/items/{i}").status_code == 404, i
        # every acknowledged live item is found by its own code at distance 0; no erased one ever is
        q = {L: np.stack([added[i][L] for i in live]) for L in LENGTHS}
        hits = served_hits(srv2, q, 3)
        for i, h in zip(live, hits):
            assert (i, 0) in [x[:2] for x in h]
            assert not erased & {x[0] for x in h}


def test_searches_during_writes_see_a_prefix_of_the_serial_order_of_adds(run_dir, tmp_path):
    code = {L: np.full((1, L // 8), 0x5A, np.uint8) for L in LENGTHS}
    acked: list[int] = []
    with Server(tmp_path / "store", run_dir) as srv:
        done = threading.Event()

        def writer():
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                for _ in range(60):
                    acked.append(c.post("/v1/items", json={"codes": b64(code)}).json()["ids"][0])
            done.set()

        t = threading.Thread(target=writer)
        t.start()
        seen = 0
        while not done.is_set():
            before = len(acked)
            got = sorted(h[0] for h in served_hits(srv, code, 100)[0])
            after = list(acked)
            # the hits are the first m acknowledged-or-in-flight adds: all acks before the search, a prefix
            assert len(got) >= before
            assert got == list(range(1, len(got) + 1)), got
            assert len(got) <= len(after) + 1
            seen += 1
        t.join()
        assert seen > 3 and acked == list(range(1, 61))


def test_searches_during_erasures_see_a_prefix_of_the_serial_order_of_erasures(run_dir, tmp_path):
    code = {L: np.full((60, L // 8), 0x3C, np.uint8) for L in LENGTHS}
    erased: list[int] = []
    with Server(tmp_path / "store", run_dir) as srv:
        ids = srv.client.post("/v1/items", json={"codes": b64(code)}).json()["ids"]
        one = {L: c[:1] for L, c in code.items()}
        done = threading.Event()

        def eraser():
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                for i in ids:
                    assert c.delete(f"/v1/items/{i}").json()["erased"] == [i]
                    erased.append(i)
            done.set()

        t = threading.Thread(target=eraser)
        t.start()
        seen = 0
        while not done.is_set():
            before = len(erased)
            got = [h[0] for h in served_hits(srv, one, 100)[0]]  # equal codes: insertion order = id order
            after = len(erased)
            m = len(ids) - len(got)  # the search saw the first m erasures, whole, and none of the others
            assert got == ids[m:], got
            assert before <= m <= after + 1
            seen += 1
        t.join()
        assert seen > 3 and erased == ids and served_hits(srv, one, 100)[0] == []


def test_concurrent_searches_each_get_their_own_answer_and_the_stats_count_them(run_dir, tmp_path):
    """Requests in flight at once (searched together by the service: serve.batcher) with different k, thresholds
    and filters: each answer equals the in-process index's for that request alone."""
    rng = np.random.default_rng(8)
    n = 3000
    gallery = random_codes(rng, n)
    cams = rng.integers(1, 3, n)
    queries = near(gallery, rng, 48)
    thr = [{32: 12, 64: 26}, {32: 10, 64: 24}]
    with Server(tmp_path / "store", run_dir, "--max-concurrency", 64) as srv:
        r = srv.client.post("/v1/items", json={"codes": b64(gallery), "metadata": [{"camera": int(c)} for c in cams]})
        ids = np.array(r.json()["ids"])
        whole, per_cam = CtFIndex(), {}
        whole.add(gallery, ids)
        for c in (1, 2):
            per_cam[c] = CtFIndex()
            per_cam[c].add({L: g[cams == c] for L, g in gallery.items()}, ids[cams == c])
        wrong: list = []
        sent = 16 * (4 * 2 + 8)  # 16 clients, 12 requests each, 4 of them with two queries

        def client(t: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                for j in range(12):
                    i = (t * 12 + j) % 48
                    rows = [i, (i + 5) % 48] if j % 3 == 0 else [i]
                    q = {L: v[rows] for L, v in queries.items()}
                    k, th, cam = 1 + (i * 7) % 40, thr[j % 2], (None, 1, 2)[(t + j) % 3]
                    body = {"codes": b64(q), "k": k, "thresholds": {str(L): v for L, v in th.items()}}
                    if cam is not None:
                        body["camera"] = cam
                    got = c.post("/v1/search", json=body).json()["queries"]
                    got = [[(h["id"], h["distance"], h["stage_bits"]) for h in qq["hits"]] for qq in got]
                    if got != oracle_hits(whole if cam is None else per_cam[cam], q, k, th):
                        wrong.append((t, j))

        threads = [threading.Thread(target=client, args=(t,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not wrong
        batches = srv.client.get("/v1/stats").json()["search_batches"]
        assert batches["queries"] == sent and 1 <= batches["searches"] <= sent
        assert batches["max_queries"] == 64


def test_retention_erases_old_crops_in_the_background(run_dir, tmp_path):
    now = time.time()
    code = {L: np.random.default_rng(3).integers(0, 256, (2, L // 8), dtype=np.uint8) for L in LENGTHS}
    with Server(tmp_path / "store", run_dir, "--retention-seconds", 4) as srv:  # checks every second
        ids = srv.client.post("/v1/items", json={"codes": b64(code),
                                                 "metadata": [{"time": now - 3600}, {"time": now + 3600}]}).json()["ids"]
        deadline = time.time() + 20
        while srv.client.get(f"/v1/items/{ids[0]}").status_code == 200 and time.time() < deadline:
            time.sleep(0.2)
        assert srv.client.get(f"/v1/items/{ids[0]}").status_code == 404
        assert srv.client.get(f"/v1/items/{ids[1]}").status_code == 200
        assert [h[0] for h in served_hits(srv, code, 5)[0]] == [ids[1]]
        assert srv.client.get("/v1/stats").json()["erased_by_retention"] == 1


def test_overload_is_503_and_healthz_stays_open(run_dir, tmp_path):
    TestClient = pytest.importorskip("fastapi.testclient").TestClient

    from ctfreid.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(store=str(tmp_path / "store"), model=str(run_dir), max_concurrency=2))
    with TestClient(app) as c:
        assert c.get("/v1/stats").status_code == 200
        app.svc.inflight = 2  # two requests in progress
        r = c.get("/v1/stats")
        assert r.status_code == 503 and "overloaded" in r.json()["error"]["message"]
        assert c.get("/healthz").status_code == 200
        app.svc.inflight = 0
        assert c.get("/v1/stats").json()["requests"]["GET /v1/stats 503"] == 1


def test_out_of_range_or_unencodable_values_are_4xx_naming_the_field_and_never_stored(run_dir, tmp_path):
    good = {"32": ["AAAAAA=="], "64": ["AAAAAAAAAAA="], "128": ["AAAAAAAAAAAAAAAAAAAAAA=="]}
    with Server(tmp_path / "store", run_dir) as srv:
        c = srv.client
        ids = c.post("/v1/items", json={"codes": good, "metadata": [{"pid": 7, "time": 1.7e9}]}).json()["ids"]

        def err(r, status, field):
            assert r.status_code == status, (r.status_code, r.text)
            assert r.json()["error"]["field"] == field, r.text

        def raw(path, body: bytes):  # JSON a client may send that json.dumps would not write
            return c.post(path, content=body, headers={"Content-Type": "application/json"})

        huge = 2**63  # past SQLite's INTEGER
        for path in (f"/v1/items/{huge}", f"/v1/items/{huge}/thumbnail"):
            err(c.get(path), 422, "item_id")
        err(c.delete(f"/v1/items/{huge}"), 422, "item_id")
        err(c.delete(f"/v1/persons/{huge}"), 422, "pid")
        err(c.post("/v1/erase", json={"pid": huge}), 400, "pid")
        err(c.post("/v1/erase", json={"camera": -huge - 1}), 400, "camera")
        err(c.post("/v1/erase", json={"time_from": 10**400}), 400, "time_from")  # past float
        err(c.post("/v1/erase", json={"track": {"a": 1}}), 400, "track")  # not str()-ed into a filter of nothing
        err(raw("/v1/erase", b'{"track": "\\ud800"}'), 400, "track")  # a lone surrogate: not UTF-8
        err(c.post("/v1/search", json={"codes": good, "time_to": 10**400}), 400, "time_to")
        err(c.post("/v1/search", json={"codes": good, "camera": huge}), 400, "camera")
        for beta in (10**400, 1e300):  # beta squared overflows
            err(c.post("/v1/search", json={"codes": good, "beta": beta}), 400, "beta")
        err(raw("/v1/search", b"[" * 100_000 + b"]" * 100_000), 400, "body")  # too deep for json
        err(raw("/v1/search", b'{"k": ' + b"9" * 5000 + b"}"), 400, "body")  # too many digits for int()
        err(c.post("/v1/search", json={"codes": good, "thresholds": '{"32":' * 100_000}), 400, "thresholds")
        err(c.post("/v1/items", data={"metadata": "[" * 100_000}, files=[("images", ("a.png", b"x", "image/png"))]),
            400, "metadata")
        # metadata that would be stored, then fail every answer that holds it (JSON has no NaN / Infinity)
        for meta, field in (('{"time": Infinity}', "metadata[0].time"), ('{"time": 1e400}', "metadata[0].time"),
                            (f'{{"time": {10**400}}}', "metadata[0].time"),
                            ('{"extra": {"score": NaN}}', "metadata[0].extra"),
                            ('{"source": "\\udc00.jpg"}', "metadata[0].source"),
                            ('{"track": "\\ud800"}', "metadata[0].track"),
                            ('{"extra": {"note": "\\ud800"}}', "metadata[0].extra")):
            err(raw("/v1/items", b'{"codes": %s, "metadata": [%s]}' % (json.dumps(good).encode(), meta.encode())),
                400, field)
        r = c.post("/v1/search", json={"codes": good, "k": 10})
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["queries"][0]["hits"]] == ids
        assert c.get("/v1/stats").json()["items"] == 1
        assert not any(k.endswith(" 500") for k in c.get("/v1/stats").json()["requests"])


def test_erasure_blocked_by_an_outside_reader_is_503_and_the_item_leaves_search_at_once(run_dir, tmp_path):
    import sqlite3

    store = tmp_path / "store"
    code = {L: np.full((1, L // 8), 0x6B, np.uint8) for L in LENGTHS}
    blob = b"".join(code[L][0].tobytes() for L in LENGTHS)
    with Server(store, run_dir) as srv:
        i = srv.client.post("/v1/items", json={"codes": b64(code)}).json()["ids"][0]
        reader = sqlite3.connect(store / "gallery.sqlite", isolation_level=None)  # a backup, an operator's shell
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM items").fetchone()  # holds a read snapshot: no WAL checkpoint
        try:
            t0 = time.time()
            r = srv.client.delete(f"/v1/items/{i}")
            assert r.status_code == 503 and "checkpoint" in r.json()["error"]["message"], r.text
            assert time.time() - t0 < 10  # bounded: the store is not held for minutes
            # the row is deleted (committed): no longer served, by id or by search
            assert srv.client.get(f"/v1/items/{i}").status_code == 404
            assert served_hits(srv, code, 5) == [[]]
            assert srv.client.delete(f"/v1/items/{i}").status_code == 503  # a retry tries the checkpoint again
        finally:
            reader.execute("COMMIT")
            reader.close()
        r = srv.client.delete(f"/v1/items/{i}")  # the retry once the reader is gone: checkpointed
        assert r.status_code == 404, r.text
        assert blob not in store_bytes(store)
    with Server(store, run_dir) as srv:
        assert served_hits(srv, code, 5) == [[]]


GOOD = {"32": ["AAAAAA=="], "64": ["AAAAAAAAAAA="], "128": ["AAAAAAAAAAAAAAAAAAAAAA=="]}


def err_of(r, status: int, field: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["field"] == field, body
    return body["message"]


def test_unknown_top_level_fields_of_items_and_search_are_400_naming_them(run_dir, tmp_path):
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (20, 40), (10, 200, 30)).save(png, "PNG")
    image = [("images", ("a.png", png.getvalue(), "image/png"))]
    with Server(tmp_path / "store", run_dir) as srv:
        c = srv.client
        msg = err_of(c.post("/v1/search", json={"codes": GOOD, "kk": 5}), 400, "kk")  # a typo of k: not dropped
        assert "expected" in msg and all(f in msg for f in ("codes", "k", "thresholds", "beta", "camera"))
        msg = err_of(c.post("/v1/items", json={"codes": GOOD, "metdata": [{"pid": 1}]}), 400, "metdata")
        assert "codes" in msg and "metadata" in msg
        err_of(c.post("/v1/items", json={"codes": GOOD, "k": 5}), 400, "k")  # a search field in an add
        err_of(c.post("/v1/search", files=image, data={"k": "3", "camra": "2"}), 400, "camra")  # multipart too
        err_of(c.post("/v1/items", files=image, data={"metadata": "[{}]", "pid": "3"}), 400, "pid")
        err_of(c.post("/v1/search", files=image, data={"images": "a.png"}), 400, "images")  # a text part, not a file
        # the form fields the page and the README send still work
        r = c.post("/v1/items", files=image, data={"metadata": json.dumps([{"pid": 3, "camera": 1}])})
        assert r.status_code == 200, r.text
        r = c.post("/v1/search", files=image, data={"k": "3", "camera": "1", "candidates": "false"})
        assert r.status_code == 200 and r.json()["queries"][0]["hits"][0]["id"] == 1, r.text
        assert c.get("/v1/stats").json()["items"] == 1


def test_bearer_scheme_is_case_insensitive_and_two_authorization_headers_are_refused(run_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with Server(tmp_path / "store", run_dir, "--token-file", token_file, token="s3cret-token") as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as bare:
            for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):  # RFC 7235: the scheme is case-insensitive
                r = bare.get("/v1/stats", headers={"Authorization": f"{scheme} s3cret-token"})
                assert r.status_code == 200, (scheme, r.text)
            for value in ("Basic s3cret-token", "bearer S3CRET-TOKEN", "bearer", "Bearers3cret-token"):
                assert bare.get("/v1/stats", headers={"Authorization": value}).status_code == 401, value
            for pair in (("Bearer wrong", "Bearer s3cret-token"), ("Bearer s3cret-token", "Bearer wrong"),
                         ("Bearer s3cret-token", "Bearer s3cret-token")):
                r = bare.get("/v1/stats", headers=[("Authorization", v) for v in pair])
                assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization", pair


def test_numbers_ids_and_code_lengths_are_parsed_strictly(run_dir, tmp_path):
    with Server(tmp_path / "store", run_dir) as srv:
        c = srv.client
        i = c.post("/v1/items", json={"codes": GOOD, "metadata": [{"camera": 2, "time": 1.7e9}]}).json()["ids"][0]
        for k in (" 5 ", "5_0", "+5", "٥", 5.0, True):  # int() takes all but 5.0 / True too loosely
            err_of(c.post("/v1/search", json={"codes": GOOD, "k": k}), 400, "k")
        err_of(c.post("/v1/search", files=[("images", ("a.png", b"x", "image/png"))], data={"k": " 5"}), 400, "k")
        for beta in (True, False, " 1.5", "1_5", "infinity"):
            err_of(c.post("/v1/search", json={"codes": GOOD, "beta": beta}), 400, "beta")
        err_of(c.post("/v1/search", json={"codes": GOOD, "camera": "2_0"}), 400, "camera")
        err_of(c.post("/v1/search", json={"codes": GOOD, "camera": 2.0}), 400, "camera")
        err_of(c.post("/v1/search", json={"codes": GOOD, "time_from": " 1e9"}), 400, "time_from")
        err_of(c.post("/v1/erase", json={"pid": "1_0"}), 400, "pid")
        for flag in ("nope", 2, [], {"a": 1}):  # used to count as true
            err_of(c.post("/v1/search", json={"codes": GOOD, "candidates": flag}), 400, "candidates")
        for flag, shown in ((False, False), ("false", False), ("0", False), (True, True), ("yes", True)):
            r = c.post("/v1/search", json={"codes": GOOD, "candidates": flag})
            assert (r.json()["queries"][0]["candidates"] is not None) == shown, (flag, r.text)
        # a code length has one spelling: "032" or " 32" is no second way to say 32 (one of them silently lost)
        for key in ("032", " 32", "32.0", "+32"):
            codes = {key if L == "32" else L: v for L, v in GOOD.items()}
            err_of(c.post("/v1/search", json={"codes": codes}), 400, f"codes.{key}")
            err_of(c.post("/v1/items", json={"codes": codes}), 400, f"codes.{key}")
            err_of(c.post("/v1/search", json={"codes": GOOD, "thresholds": {key: 12, "64": 26}}), 400, "thresholds")
        err_of(c.post("/v1/search", json={"codes": {**GOOD, "032": GOOD["32"]}}), 400, "codes.032")
        err_of(c.post("/v1/search", json={"codes": GOOD, "thresholds": {"32": 12, "032": 0, "64": 26}}), 400,
               "thresholds")
        for path in (f"/v1/items/{i}.0", f"/v1/items/%20{i}", f"/v1/items/+{i}", f"/v1/items/{i}.0/thumbnail"):
            err_of(c.get(path), 422, "item_id")
        err_of(c.delete(f"/v1/items/{i}.0"), 422, "item_id")
        err_of(c.delete("/v1/persons/1_0"), 422, "pid")
        # what is legitimate still works: integers, decimal digit strings (form fields), numbers as text
        assert c.get(f"/v1/items/{i}").json()["camera"] == 2
        assert c.get("/v1/items/-1").status_code == 404
        for fields in ({"k": 5}, {"k": "5"}, {"k": "05", "camera": "2"}, {"camera": -3}, {"beta": "1.5"},
                       {"beta": 2}, {"time_from": "1.7e9", "time_to": 1.8e9}, {"time_from": "-5", "time_to": ".5e10"},
                       {"thresholds": {"32": 12, "64": 26}}, {"thresholds": "32=12,64=26"}):
            r = c.post("/v1/search", json={"codes": GOOD, **fields})
            assert r.status_code == 200, (fields, r.text)
        assert not any(k.endswith(" 500") for k in c.get("/v1/stats").json()["requests"])


def test_head_works_where_get_does(run_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with Server(tmp_path / "store", run_dir, "--token-file", token_file, token="s3cret-token") as srv:
        i = srv.client.post("/v1/items", json={"codes": GOOD}).json()["ids"][0]
        with httpx.Client(base_url=srv.url, timeout=30) as bare:
            r = bare.head("/healthz")  # load balancers' health checks: open, no token
            assert r.status_code == 200 and r.content == b"" and r.headers["content-type"] == "application/json"
            assert bare.head("/").status_code == 200 and bare.head("/static/app.js").status_code == 200
            assert bare.head("/v1/stats").status_code == 401
        for path, status in (("/v1/stats", 200), (f"/v1/items/{i}", 200), (f"/v1/items/{i + 1}", 404),
                             (f"/v1/items/{i}/thumbnail", 404)):
            r = srv.client.head(path)
            assert r.status_code == status and r.content == b"", (path, r.status_code)
        assert srv.client.get("/healthz").json() == {"ok": True, "items": 1}


def test_rows_with_nan_or_infinity_from_older_versions_read_as_null(run_dir, tmp_path):
    import sqlite3

    store = tmp_path / "store"
    code = {L: np.full((2, L // 8), 0x2D, np.uint8) for L in LENGTHS}
    with Server(store, run_dir) as srv:
        r = srv.client.post("/v1/items", json={"codes": b64(code), "metadata": [{"pid": 1}, {"pid": 2}]})
        ids = r.json()["ids"]
    db = sqlite3.connect(store / "gallery.sqlite", isolation_level=None)  # as an older version wrote them
    db.execute("UPDATE items SET time = ?, extra = ? WHERE id = ?",
               (float("inf"), '{"score": NaN, "big": 1e400, "low": -Infinity, "ok": [1.5, "NaN"]}', ids[0]))
    db.execute("UPDATE items SET time = ? WHERE id = ?", (float("-inf"), ids[1]))
    assert db.execute("SELECT time FROM items ORDER BY id").fetchall() == [(float("inf"),), (float("-inf"),)]
    db.close()
    with Server(store, run_dir) as srv:
        r = srv.client.get(f"/v1/items/{ids[0]}")
        assert r.status_code == 200, r.text
        assert r.json()["time"] is None and r.json()["pid"] == 1
        assert r.json()["extra"] == {"score": None, "big": None, "low": None, "ok": [1.5, "NaN"]}
        assert srv.client.get(f"/v1/items/{ids[1]}").json()["time"] is None
        r = srv.client.post("/v1/search", json={"codes": b64(code, [0]), "k": 5})
        assert r.status_code == 200, r.text
        hits = r.json()["queries"][0]["hits"]
        assert [h["id"] for h in hits] == ids and [h["time"] for h in hits] == [None, None]
        assert served_hits(srv, code, 5, time_from=0)[0] == []  # no capture time: no time filter passes
        assert not any(k.endswith(" 500") for k in srv.client.get("/v1/stats").json()["requests"])


def test_retention_counts_its_erasures_when_the_checkpoint_is_blocked(run_dir, tmp_path):
    import sqlite3

    store = tmp_path / "store"
    code = {L: np.full((1, L // 8), 0x71, np.uint8) for L in LENGTHS}
    with Server(store, run_dir, "--retention-seconds", 4) as srv:  # checks every second
        reader = sqlite3.connect(store / "gallery.sqlite", isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM items").fetchone()  # a read snapshot: no WAL checkpoint
        try:
            i = srv.client.post("/v1/items", json={"codes": b64(code), "metadata": [{"time": time.time() - 3600}]}
                                ).json()["ids"][0]
            deadline = time.time() + 20
            while srv.client.get("/v1/stats").json()["erased_by_retention"] < 1 and time.time() < deadline:
                time.sleep(0.2)
            stats = srv.client.get("/v1/stats").json()
            # deleted (committed) and out of search, though its bytes wait for the checkpoint: counted
            assert stats["erased_by_retention"] == 1 and stats["erased"] == 1 and stats["items"] == 0, stats
            assert srv.client.get(f"/v1/items/{i}").status_code == 404
            assert served_hits(srv, code, 5) == [[]]
        finally:
            reader.execute("COMMIT")
            reader.close()
        time.sleep(2.5)  # the next rounds checkpoint; the item is not counted twice
        assert srv.client.get("/v1/stats").json()["erased_by_retention"] == 1
        assert b"".join(code[L][0].tobytes() for L in LENGTHS) not in store_bytes(store)


def test_scroll_person_listing_and_search_by_stored_items_against_the_added_records(run_dir, tmp_path):
    rng = np.random.default_rng(7)
    n = 60
    gallery = random_codes(rng, n)
    pids, cams = rng.integers(1, 6, n), rng.integers(1, 4, n)
    times = 1_700_000_000 + rng.permutation(n).astype(float)
    meta = [{"pid": int(p), "camera": int(c), "time": float(t), "track": f"t{i % 4}"}
            for i, (p, c, t) in enumerate(zip(pids, cams, times))]
    thr = {"32": 12, "64": 26}
    with Server(tmp_path / "store", run_dir) as srv:
        c = srv.client
        ids = np.array(c.post("/v1/items", json={"codes": b64(gallery), "metadata": meta}).json()["ids"])

        def pages(path_or_body, page):
            got, offset = [], None
            while True:
                if isinstance(path_or_body, str):
                    r = c.get(path_or_body, params={"limit": page, **({"offset": offset} if offset else {})})
                else:
                    r = c.post("/v1/scroll", json={**path_or_body, "limit": page,
                                                   **({"offset": offset} if offset else {})})
                assert r.status_code == 200, r.text
                body = r.json()
                assert len(body["items"]) <= page
                got += body["items"]
                offset = body["next_offset"]
                if offset is None:
                    return got

        # the records added are the oracle: ids in order, each as GET /v1/items/ID gives it
        for flt, keep in (({}, np.ones(n, bool)), ({"pid": 3}, pids == 3), ({"camera": 2, "track": "t1"},
                          (cams == 2) & (np.arange(n) % 4 == 1)),
                          ({"time_from": times.min() + 10, "time_to": times.min() + 30},
                           (times >= times.min() + 10) & (times <= times.min() + 30))):
            got = pages(flt, 7)
            assert [g["id"] for g in got] == ids[keep].tolist(), flt
        assert got == [c.get(f"/v1/items/{i}").json() for i in ids[keep]]
        person = pages("/v1/persons/3", 2)
        assert person == pages({"pid": 3}, 100) and {g["pid"] for g in person} == {3}
        assert c.get("/v1/persons/999").json() == {"items": [], "next_offset": None}
        err_of(c.post("/v1/scroll", json={"limit": 0}), 400, "limit")
        err_of(c.post("/v1/scroll", json={"limit": 1001}), 400, "limit")
        err_of(c.post("/v1/scroll", json={"pid": 3, "kk": 1}), 400, "kk")
        err_of(c.get("/v1/persons/3", params={"offset": "x"}), 400, "offset")

        # search by stored items: the ranking of the item's own codes, without the item itself
        oracle = CtFIndex()
        oracle.add(gallery, ids)
        picks = [5, 17, 42]
        r = c.post("/v1/search", json={"items": [int(ids[p]) for p in picks], "k": 6, "thresholds": thr})
        assert r.status_code == 200, r.text
        got = [[(h["id"], h["distance"], h["stage_bits"]) for h in q["hits"]] for q in r.json()["queries"]]
        own = oracle_hits(oracle, {L: v[picks] for L, v in gallery.items()}, 7, {32: 12, 64: 26})
        assert got == [[h for h in row if h[0] != ids[p]][:6] for row, p in zip(own, picks)]
        assert all(ids[p] not in {h[0] for h in row} for row, p in zip(got, picks))
        err_of(c.post("/v1/search", json={"items": [int(ids[0]), 10_000]}), 404, "items[1]")
        err_of(c.post("/v1/search", json={"items": [int(ids[0])], "codes": b64(gallery, [0])}), 400, "codes")
        err_of(c.post("/v1/search", json={"items": []}), 400, "items")
        err_of(c.post("/v1/search", json={"items": ["1_0"]}), 400, "items[0]")
        for bad in ("", None):  # used to be a 500
            err_of(c.post("/v1/search", json={"items": [int(ids[0]), bad]}), 400, "items[1]")
        # erased items leave the listing and cannot be queries
        c.delete("/v1/persons/3")
        assert pages({"pid": 3}, 5) == [] and len(pages({}, 50)) == n - int((pids == 3).sum())
        erased = int(ids[pids == 3][0])
        err_of(c.post("/v1/search", json={"items": [erased]}), 404, "items[0]")


def test_patch_sets_metadata_that_filters_listing_and_erasure_then_use(run_dir, tmp_path):
    rng = np.random.default_rng(11)
    n = 40
    gallery = random_codes(rng, n)
    cams = rng.integers(1, 4, n)
    meta = [{"camera": int(c), "time": 1.7e9 + i, "extra": {"k": i}} for i, c in enumerate(cams)]
    q = near(gallery, rng, 5)
    thr = {"32": 12, "64": 26}
    store = tmp_path / "store"
    with Server(store, run_dir) as srv:
        c = srv.client
        ids = np.array(c.post("/v1/items", json={"codes": b64(gallery), "metadata": meta}).json()["ids"])
        a, b = int(ids[3]), int(ids[9])
        # a pid confirmed later, a camera corrected, a track set, extra cleared; the rest stays
        r = c.patch(f"/v1/items/{a}", json={"pid": 7, "camera": 9, "track": "t-1", "extra": None})
        assert r.status_code == 200, r.text
        assert {k: r.json()[k] for k in ("id", "pid", "camera", "time", "track", "extra")} == \
            {"id": a, "pid": 7, "camera": 9, "time": 1.7e9 + 3, "track": "t-1", "extra": {}}
        assert c.get(f"/v1/items/{a}").json() == r.json()
        assert c.patch(f"/v1/items/{b}", json={"pid": 7}).json()["camera"] == int(cams[9])
        assert [i["id"] for i in c.get("/v1/persons/7").json()["items"]] == [a, b]
        # the search filter sees the new camera at once: the ranking of an index of exactly those items
        cams[3] = 9
        keep = cams == 9
        sub = CtFIndex()
        sub.add({L: v[keep] for L, v in gallery.items()}, ids[keep])
        assert served_hits(srv, q, 5, thresholds=thr, camera=9) == oracle_hits(sub, q, 5, {32: 12, 64: 26})
        # refused: unknown item, unknown field, bad values, an empty body, images
        err_of(c.patch("/v1/items/999999", json={"pid": 1}), 404, "id")
        err_of(c.patch(f"/v1/items/{a}", json={"pidd": 1}), 400, "pidd")
        err_of(c.patch(f"/v1/items/{a}", json={"pid": "7"}), 400, "pid")
        err_of(c.patch(f"/v1/items/{a}", json={"time": "soon"}), 400, "time")
        err_of(c.patch(f"/v1/items/{a}", json={}), 400, "body")
        err_of(c.patch(f"/v1/items/{a}", files=[("images", ("x.png", b"x", "image/png"))]), 400, "images")
        assert c.get(f"/v1/items/{a}").json() == r.json()  # the refused patches changed nothing
    with Server(store, run_dir) as srv:  # durable, and erasing the person now finds both crops
        assert srv.client.get(f"/v1/items/{a}").json()["pid"] == 7
        assert served_hits(srv, q, 5, thresholds=thr, camera=9) == oracle_hits(sub, q, 5, {32: 12, 64: 26})
        assert srv.client.delete("/v1/persons/7").json()["erased"] == [a, b]
