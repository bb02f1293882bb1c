"""``ctfreid serve --ray``: the same HTTP API from a gallery sharded over Ray actors, answering exactly like
an in-process CtFIndex on the same items, before and after erasures."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("torch")
pytest.importorskip("fastapi")

from test_serve_api import Server, b64, near, oracle_hits, random_codes, served_hits  # noqa: E402

from ctfreid.search.index import CtFIndex  # noqa: E402


def test_serve_ray_answers_like_one_index(run_dir, tmp_path):
    rng = np.random.default_rng(4)
    n = 300
    gallery = random_codes(rng, n)
    queries = near(gallery, rng, 8)
    thr = {32: 12, 64: 26}
    with Server(tmp_path / "store", run_dir, "--ray", "--shards", 2) as srv:
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
