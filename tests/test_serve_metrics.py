"""``GET /metrics`` of ``ctfreid serve`` (Prometheus text format) on the real service, parsed with
prometheus_client's parser and checked against the requests the test made."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("torch")
pytest.importorskip("fastapi")
parser = pytest.importorskip("prometheus_client.parser")

from test_serve_api import GOOD, Server  # noqa: E402 - the server (run_dir comes from conftest)


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample."""
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: dict, name: str, **labels) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_what_was_asked_and_answered(run_dir, tmp_path):
    (tmp_path / "t").write_text("full\n")
    (tmp_path / "r").write_text("read\n")
    with Server(tmp_path / "store", run_dir, "--token-file", tmp_path / "t", "--read-token-file", tmp_path / "r",
                token="full") as srv:
        c = srv.client
        codes = {L: v * 3 for L, v in GOOD.items()}
        ids = c.post("/v1/items", json={"codes": codes, "metadata": [{"pid": 1}, {"pid": 2}, {"pid": 2}]}).json()["ids"]
        for _ in range(3):
            assert c.post("/v1/search", json={"codes": GOOD, "k": 2}).status_code == 200
        assert c.post("/v1/search", json={"codes": GOOD, "k": 0}).status_code == 400
        assert c.delete("/v1/persons/2").json()["erased"] == ids[1:]
        for i in range(40):  # a scanner's paths: one "other" series, not forty
            assert c.get(f"/v1/nope-{i}").status_code == 404
        assert c.get(f"/v1/items/{ids[0]}").status_code == 200
        with httpx.Client(base_url=srv.url, timeout=30) as bare:
            assert bare.get("/metrics").status_code == 401  # behind the token, as /v1/
            r = bare.get("/metrics", headers={"Authorization": "Bearer read"})  # a read-only token may scrape
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        got = samples(r.text)
        stats = c.get("/v1/stats").json()

    total = "ctfreid_requests_total"
    assert value(got, total, method="POST", route="/v1/items", status="200") == 1
    assert value(got, total, method="POST", route="/v1/search", status="200") == 3
    assert value(got, total, method="POST", route="/v1/search", status="400") == 1
    assert value(got, total, method="DELETE", route="/v1/persons/{x}", status="200") == 1
    assert value(got, total, method="GET", route="/v1/items/{x}", status="200") == 1
    assert value(got, total, method="GET", route="other", status="404") == 40
    assert not any(name == total and "nope" in str(labels) for name, labels in got)
    hist = "ctfreid_request_duration_seconds"
    assert value(got, hist + "_count", method="POST", route="/v1/search") == 4
    assert value(got, hist + "_bucket", method="POST", route="/v1/search", le="+Inf") == 4
    assert 0 < value(got, hist + "_sum", method="POST", route="/v1/search") < 60
    assert value(got, "ctfreid_items") == 1 == stats["items"]
    assert value(got, "ctfreid_erased_total") == 2 == stats["erased"]
    assert value(got, "ctfreid_requests_in_progress") == 0
    assert value(got, "ctfreid_info", model_fingerprint=stats["model_fingerprint"], lengths="32,64,128",
                  thresholds_source=stats["thresholds_source"]) == 1
    assert value(got, "process_resident_memory_bytes") > 10 << 20
    # the /v1/stats counters use the same route names
    assert stats["requests"]["GET other 404"] == 40 and stats["requests"]["POST /v1/search 400"] == 1
