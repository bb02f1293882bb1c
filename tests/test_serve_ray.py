"""``ctfreid serve --ray``: the same HTTP API from a gallery sharded over Ray actors, answering exactly like
an in-process CtFIndex on the same items, before and after erasures, and after restarts (the shard stores
reopened as they are, or rebuilt for another shard count)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("torch")
pytest.importorskip("fastapi")

from test_serve_api import Server, b64, near, oracle_hits, random_codes, served_hits  # noqa: E402

from ctfreid.search.index import CtFIndex  # noqa: E402


def test_serve_ray_answers_like_one_index(run_dir, synth_root, tmp_path):
    rng = np.random.default_rng(4)
    n = 300
    gallery = random_codes(rng, n)
    queries = near(gallery, rng, 8)
    thr = {32: 12, 64: 26}
    with Server(tmp_path / "store", run_dir, "--ray", "--shards", 2, "--weighted", 4) as srv:
        r = srv.client.post("/v1/items", json={"codes": b64(gallery)})
        assert r.status_code == 200, r.text
        ids = np.array(r.json()["ids"])
        oracle = CtFIndex()
        oracle.add(gallery, ids)
        assert served_hits(srv, queries, 12, thresholds={"32": 12, "64": 26}) == oracle_hits(oracle, queries, 12, thr)
        gone = [int(i) for i in ids[:5]]
        for i in gone:
            assert srv.client.delete(f"/v1/items/{i}").status_code == 200
        oracle.remove_ids(np.array(gone))
        after = served_hits(srv, queries, 12, thresholds={"32": 12, "64": 26})
        assert after == oracle_hits(oracle, queries, 12, thr)
        assert not set(gone) & {h[0] for q in after for h in q}
        body = srv.client.post("/v1/search", json={"codes": b64(queries), "k": 3,
                                                   "thresholds": {"32": 12, "64": 26}}).json()
        counts = oracle.search_hits(queries, 1, thr).candidates  # summed over the shards = one index's
        assert "partial" not in body
        assert [[q["candidates"][str(L)] for L in (32, 64, 128)] for q in body["queries"]] == counts.tolist()
        # --weighted: a search by image weights the query's 32-bit code on every shard
        from ctfreid.infer.encoder import encode_records
        from ctfreid.learn.run_dir import load_model
        from ctfreid.search.asymmetric import Weighting

        qf = sorted((synth_root / "query").glob("*.jpg"))[0]
        model, info = load_model(run_dir)
        enc = encode_records(model, [(str(qf), 0, 0)], height=info["height"], width=info["width"], mean=info["mean"],
                             std=info["std"])
        r = srv.client.post("/v1/search", files=[("images", (qf.name, qf.read_bytes(), "image/jpeg"))],
                            data={"k": "12"})
        assert r.status_code == 200, r.text
        answer = r.json()
        wthr = {int(L): t for L, t in answer["thresholds"].items()}
        w = Weighting.from_dict(answer["weights"]).weights(enc.values)
        h = oracle.search_hits(enc.codes, 12, wthr, query_weights=w)
        want = [(int(h.ids[0, j]), int(h.distances[0, j, h.stages[0, j] - 1]), (32, 64, 128)[h.stages[0, j] - 1])
                for j in range(h.ids.shape[1])]
        assert [(x["id"], x["distance"], x["stage_bits"]) for x in answer["queries"][0]["hits"]] == want
    stores = tmp_path / "store" / "shards"
    before = shard_stores_created(stores)
    with Server(tmp_path / "store", run_dir, "--ray", "--shards", 2) as srv:  # a restart reopens the shard stores
        assert served_hits(srv, queries, 12, thresholds={"32": 12, "64": 26}) == oracle_hits(oracle, queries, 12, thr)
    assert shard_stores_created(stores) == before and len(before) == 2
    with Server(tmp_path / "store", run_dir, "--ray", "--shards", 3) as srv:  # another count: rebuilt from the record
        assert served_hits(srv, queries, 12, thresholds={"32": 12, "64": 26}) == oracle_hits(oracle, queries, 12, thr)
    assert len(shard_stores_created(stores)) == 3
    from ctfreid.serve.store import DB_NAME

    for f in (tmp_path / "store").glob(DB_NAME + "*"):  # a store made anew in the same directory: ids start again,
        f.unlink()  # and name other items than the shard stores' same ids
    with Server(tmp_path / "store", run_dir) as srv:  # filled without --ray
        r = srv.client.post("/v1/items", json={"codes": b64(queries)})
    fresh = CtFIndex()
    fresh.add(queries, np.array(r.json()["ids"]))
    with Server(tmp_path / "store", run_dir, "--ray", "--shards", 3) as srv:
        assert srv.client.get("/v1/stats").json()["items"] == 8
        assert served_hits(srv, queries, 12, thresholds={"32": 12, "64": 26}) == oracle_hits(fresh, queries, 12, thr)


def shard_stores_created(stores) -> list[str]:
    """When each shard store under ``stores`` was created (its ``meta`` row): kept when a start reopens it."""
    import sqlite3

    from ctfreid.serve.store import DB_NAME

    out = []
    for d in sorted(stores.glob("shard-*/")):
        db = sqlite3.connect(d / DB_NAME)
        out.append(db.execute("SELECT value FROM meta WHERE key = 'created'").fetchone()[0])
        db.close()
    return out
