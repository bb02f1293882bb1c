"""``ctfreid serve``: a read-only token beside the full one, and a request rate per client (token buckets),
on the real service (uvicorn in a subprocess on a free loopback port); the limiter against hand-worked cases."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("torch")
pytest.importorskip("fastapi")

from test_serve_api import GOOD, Server, err_of, free_port  # noqa: E402 - the server (run_dir comes from conftest)

from ctfreid.serve.app import RateLimiter  # noqa: E402


def tokens(tmp_path, full="full-token", read="read-token"):
    (tmp_path / "full").write_text(full + "\n")
    (tmp_path / "read").write_text(read + "\n")
    return ("--token-file", tmp_path / "full", "--read-token-file", tmp_path / "read")


def test_read_only_token_searches_and_reads_but_cannot_add_or_erase(run_dir, tmp_path):
    with Server(tmp_path / "store", run_dir, *tokens(tmp_path), token="full-token") as srv:
        full = srv.client
        ids = full.post("/v1/items", json={"codes": {L: v * 2 for L, v in GOOD.items()},
                                           "metadata": [{"pid": 7}, {"pid": 8}]}).json()["ids"]
        want = full.post("/v1/search", json={"codes": GOOD, "k": 2}).json()["queries"][0]["hits"]
        assert {h["id"] for h in want} == set(ids)
        with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": "Bearer read-token"}) as ro:
            assert ro.post("/v1/search", json={"codes": GOOD, "k": 2}).json()["queries"][0]["hits"] == want
            assert ro.get(f"/v1/items/{ids[0]}").json()["pid"] == 7
            assert [i["id"] for i in ro.post("/v1/scroll", json={"pid": 8}).json()["items"]] == [ids[1]]
            assert [i["id"] for i in ro.get("/v1/persons/7").json()["items"]] == [ids[0]]
            hits = ro.post("/v1/search", json={"items": [ids[0]], "k": 1}).json()["queries"][0]["hits"]
            assert [h["id"] for h in hits] == [ids[1]]
            assert ro.head(f"/v1/items/{ids[0]}").status_code == 200
            assert ro.get("/v1/stats").json()["auth"] == {"token": True, "read_only_token": True}
            for r in (ro.post("/v1/items", json={"codes": GOOD}), ro.delete(f"/v1/items/{ids[0]}"),
                      ro.patch(f"/v1/items/{ids[0]}", json={"pid": 9}),
                      ro.delete("/v1/persons/8"), ro.post("/v1/erase", json={"pid": 7})):
                assert "only search and read" in err_of(r, 403, "Authorization")
        with httpx.Client(base_url=srv.url, timeout=30) as bare:
            for value in ("Bearer wrong", "Bearer read-tokenX", "Basic read-token", ""):
                err_of(bare.get("/v1/stats", headers={"Authorization": value}), 401, "Authorization")
        stats = full.get("/v1/stats").json()
        assert stats["items"] == 2 and stats["erased"] == 0  # the refused writes changed nothing
        assert stats["requests"]["POST /v1/items 403"] == 1 and stats["requests"]["DELETE /v1/items/{x} 403"] == 1
        assert full.delete("/v1/persons/8").json()["erased"] == [ids[1]]  # the full token still writes


def test_bad_token_and_rate_options_are_one_line_errors(run_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def start(*argv):
        r = subprocess.run([sys.executable, "-m", "ctfreid", "serve", "--store", str(tmp_path / "s"), "--model",
                            str(run_dir), "--port", str(free_port()), *map(str, argv)],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
        return r.stderr

    (tmp_path / "empty").write_text(" \n")
    assert "needs --token-file" in start("--read-token-file", tokens(tmp_path)[3])
    assert "same token" in start(*tokens(tmp_path, "same", "same"))
    assert "is empty" in start(*tokens(tmp_path)[:2], "--read-token-file", tmp_path / "empty")
    assert "cannot be read" in start("--token-file", tmp_path)  # a folder
    for rate in ("0", "-1", "nan", "inf"):
        assert "--rate-limit" in start("--rate-limit", rate)
    assert "--rate-burst" in start("--rate-limit", 2, "--rate-burst", 0)
    assert "needs --rate-limit" in start("--rate-burst", 3)
    assert not (tmp_path / "s").exists()  # refused before the store was created


def test_rate_limit_is_429_with_retry_after_per_client_and_healthz_stays_open(run_dir, tmp_path):
    rate, burst = 0.5, 3
    with Server(tmp_path / "store", run_dir, "--rate-limit", rate, "--rate-burst", burst) as srv:
        time.sleep(1 / rate)  # the start-up's /healthz polls are not limited, but let any bucket refill anyway
        t0 = time.monotonic()
        answers = [srv.client.get("/v1/stats") for _ in range(8)]
        elapsed = time.monotonic() - t0
        codes = [r.status_code for r in answers]
        assert codes[:burst] == [200] * burst, codes  # a full bucket lets a burst through
        assert codes.count(200) <= burst + int(rate * elapsed), (codes, elapsed)  # then R a second at most
        refused = [r for r in answers if r.status_code == 429]
        assert refused and all(r.json()["error"]["field"] is None and "rate limit" in r.json()["error"]["message"]
                               for r in refused)
        assert all(1 <= int(r.headers["Retry-After"]) <= 1 / rate for r in refused)
        assert srv.client.get("/healthz").status_code == 200  # health checks are never limited
        # another client address (still loopback traffic to 127.0.0.1) has a bucket of its own
        other = httpx.Client(base_url=srv.url, timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        with other:
            assert [other.get("/v1/stats").status_code for _ in range(burst)] == [200] * burst
        time.sleep(int(refused[-1].headers["Retry-After"]))
        stats = srv.client.get("/v1/stats").json()  # the bucket refilled: allowed again
        assert stats["requests"]["GET /v1/stats 429"] == len(refused)
        assert stats["limits"]["rate_limit"] == rate and stats["limits"]["rate_burst"] == burst


def test_rate_limiter_hand_worked():
    lim = RateLimiter(rate=2.0, burst=3)
    assert [lim.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert lim.take("a", 0.0) == pytest.approx(0.5)  # empty: one token comes back in 1 / rate s
    assert lim.take("a", 0.25) == pytest.approx(0.25)  # half a token back, a refusal spends nothing
    assert lim.take("a", 0.5) == 0.0  # one token: allowed, empty again
    assert lim.take("b", 0.5) == 0.0  # another client, its own bucket
    assert lim.take("a", 10.0) == 0.0 and lim.buckets["a"] == (2.0, 10.0)  # refilled to the burst, not beyond
    assert lim.take("a", 9.0) == 0.0  # a clock that goes back gives nothing back (and takes nothing)


def test_rate_limiter_forgets_refilled_buckets_and_stays_bounded():
    lim = RateLimiter(rate=1.0, burst=2, max_clients=3)
    for c in "abc":
        lim.take(c, 0.0)
    lim.take("d", 5.0)  # a, b and c have refilled by now: forgetting them loses nothing
    assert set(lim.buckets) == {"d"}
    for i in range(10):  # a flood of new addresses at one instant: none refilled, the least recent half goes
        lim.take(f"x{i}", 6.0 + i * 1e-3)
        assert len(lim.buckets) <= 3
    assert lim.buckets["x9"] == (1.0, 6.009)  # the most recent client keeps its bucket, one token spent
    assert lim.take("x9", 6.009) == 0.0 and lim.take("x9", 6.009) == pytest.approx(1.0)
