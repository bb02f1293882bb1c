#!/usr/bin/env python3
"""``ctfreid serve`` under open-loop load: latency percentiles and error rate of ``POST /v1/search`` with
codes at fixed request rates, start-up time and memory per item, and the overhead over in-process
``CtFIndex.search_hits`` on the same queries (the baseline, measured in the same run).

    python3 benchmarks/bench_serve.py                      # 1e4 and 1e5 items, a tiny model trained here
    python3 benchmarks/bench_serve.py --sizes 10000 100000 1000000 --rates 50 200 --seconds 10
    python3 benchmarks/bench_serve.py --write-rate 20     # adds and erasures (alternating) during the loads
    python3 benchmarks/bench_serve.py --sizes 1000000 --keep 0.02 --max-batch 1 64   # concurrent searches alone
                                                            # and searched together, at a selective stage 1

Open loop: request i is due at ``t0 + i / rate`` whether or not earlier ones have answered (64 keep-alive
connections; a request waiting for one still counts from its due time), and its latency counts from then (so queueing inside the service is measured, not hidden as a
closed-loop client would). Errors: any answer other than 200 (503 when over ``--max-concurrency``) or a
transport error. One query per request, top-10, the service's default thresholds (DTO fits of the model's
validation split), candidate counts included (``--no-candidates`` to leave them out).

Back to back: 512 requests on one keep-alive connection, each sent when the last has answered: wall ms and the
server process's CPU ms a request (``/proc/PID/stat``), what one request costs the service when nothing queues.

The gallery is written straight into the SQLite store with ``ctfreid.serve.store.Store`` (codes of the
model's lengths: random bytes, queries are gallery codes with 6 % of their bits flipped), then the service
is started as ``python -m ctfreid serve`` on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def tiny_model(root: Path) -> Path:
    import torch

    from ctfreid.data.synth import generate_synthetic
    from ctfreid.learn.train import TrainConfig, train

    torch.set_num_threads(1)
    generate_synthetic(root / "synth", ids=16, cams=3, seed=0, images_per_id=6, height=64, width=32, distractors=4,
                       junk=2)
    train(TrainConfig(backbone="resnet18", lengths=(128, 64, 32), height=32, width=16, epochs=1, warmup_epochs=0,
                      milestones=(), p=4, k=2, val_fraction=0.4, device="cpu", num_workers=0, seed=0),
          root / "synth", root / "run", resume=False, progress=False)
    return root / "run"


def correlated_codes(rng, n: int, lengths: list[int]) -> dict[int, np.ndarray]:
    """Longer codes extend the shorter ones (as real multi-length codes correlate), so stages prune."""
    base = rng.integers(0, 256, (n, max(lengths) // 8), dtype=np.uint8)
    return {L: np.ascontiguousarray(base[:, : L // 8]) for L in lengths}


def queries_near(codes, rng, nq: int, lengths: list[int]) -> dict[int, np.ndarray]:
    L = max(lengths)
    q = codes[L][rng.integers(0, codes[L].shape[0], nq)].copy()
    bits = np.unpackbits(q, axis=1)
    flip = rng.random(bits.shape) < 0.06
    q = np.packbits(bits ^ flip, axis=1)
    return {m: np.ascontiguousarray(q[:, : m // 8]) for m in lengths}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(store: Path, model: Path, max_concurrency: int, max_batch: int = 64):
    import httpx

    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ctfreid", "serve", "--store", str(store), "--model", str(model),
                             "--port", str(port), "--max-concurrency", str(max_concurrency),
                             *(["--max-batch", str(max_batch)] if max_batch != 64 else [])],  # 64: the default
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.TransportError:
            time.sleep(0.05)


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float, connections: int = 64) -> dict:
    """Send ``rate x seconds`` requests at fixed times over ``connections`` keep-alive HTTP/1.1 connections
    (a minimal client on asyncio streams: httpx's per-request CPU cost would throttle the generator on a
    small machine). A request waiting for a free connection keeps its scheduled time: that wait is latency."""
    host, port = url.split("//")[1].split(":")
    n = int(rate * seconds)
    lat = np.full(n, np.nan)
    errors = 0
    queue: asyncio.Queue = asyncio.Queue()
    heads = [(f"POST /v1/search HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        while True:
            item = await queue.get()
            if item is None:
                writer.close()
                return
            i, due = item
            try:
                writer.write(heads[i % len(heads)])
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                errors += 1
                reader, writer = await asyncio.open_connection(host, int(port))
                continue
            if status == 200:
                lat[i] = (time.perf_counter() - due) * 1e3
            else:
                errors += 1

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    t0 = time.perf_counter() + 0.2
    for i in range(n):
        due = t0 + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        queue.put_nowait((i, due))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    good = lat[~np.isnan(lat)]
    pct = {f"p{p}": float(np.percentile(good, p)) if good.size else float("nan") for p in (50, 95, 99)}
    return {"rate": rate, "requests": n, "error_rate": errors / n, **pct}


def back_to_back(url: str, bodies: list[bytes], pid: int, n: int = 512) -> tuple[float, float]:
    """(wall ms, the server process's CPU ms) a request, for ``n`` requests sent back to back on one keep-alive
    connection, after an untimed pass over ``bodies``: what one request costs the service when nothing queues."""
    import http.client
    import os

    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port))

    def cpu() -> float:  # utime + stime of the server process (/proc/PID/stat fields 14 and 15)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def send(body: bytes) -> None:
        conn.request("POST", "/v1/search", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"search answered {r.status}")

    for body in bodies:
        send(body)
    c0, t0 = cpu(), time.perf_counter()
    for i in range(n):
        send(bodies[i % len(bodies)])
    wall, used = time.perf_counter() - t0, cpu() - c0
    conn.close()
    return wall / n * 1e3, used / n * 1e3


def in_process(codes, queries, thresholds: dict, k: int = 10) -> float:
    """Median ms of one-query ``CtFIndex.search_hits`` (the baseline)."""
    from ctfreid.search.index import CtFIndex

    index = CtFIndex()
    index.add(codes, np.arange(1, next(iter(codes.values())).shape[0] + 1, dtype=np.int64))
    nq = next(iter(queries.values())).shape[0]
    one = [{L: q[i:i + 1] for L, q in queries.items()} for i in range(nq)]
    index.search_hits(one[0], k, thresholds)
    times = []
    for _ in range(3):
        for q in one:
            t = time.perf_counter()
            index.search_hits(q, k, thresholds)
            times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


class Writer:
    """Adds and erasures at a fixed rate while searches run (a thread with its own connection): each
    operation adds one item or erases the oldest item this writer added, alternately; an erasure is
    acknowledged only after the service has deleted the row, checkpointed the WAL and updated the index."""

    def __init__(self, url: str, lengths: list[int], rate: float, seed: int = 7) -> None:
        import threading

        self.url, self.lengths, self.rate = url, lengths, rate
        self.rng = np.random.default_rng(seed)
        self.lat: dict[str, list[float]] = {"add": [], "erase": []}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Writer":
        if self.rate > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.rate > 0:
            self._thread.join()

    def _run(self) -> None:
        import httpx

        mine: list[int] = []
        with httpx.Client(base_url=self.url, timeout=30) as c:
            t0, i = time.perf_counter(), 0
            while not self._stop.is_set():
                due = t0 + i / self.rate
                time.sleep(max(0.0, due - time.perf_counter()))
                try:
                    if i % 2 == 0 or not mine:
                        code = correlated_codes(self.rng, 1, self.lengths)
                        r = c.post("/v1/items", json={"codes": {str(L): [base64.b64encode(v[0].tobytes()).decode()]
                                                                for L, v in code.items()}})
                        kind = "add"
                        if r.status_code == 200:
                            mine += r.json()["ids"]
                    else:
                        r = c.delete(f"/v1/items/{mine.pop(0)}")
                        kind = "erase"
                    if r.status_code == 200:
                        self.lat[kind].append((time.perf_counter() - due) * 1e3)
                    else:
                        self.errors += 1
                except httpx.HTTPError:
                    self.errors += 1
                i += 1

    def summary(self) -> dict:
        out = {"write_rate": self.rate, "write_errors": self.errors}
        for kind, lat in self.lat.items():
            if lat:
                out[f"{kind}_p50"] = float(np.percentile(lat, 50))
                out[f"{kind}_p99"] = float(np.percentile(lat, 99))
                out[f"{kind}s"] = len(lat)
        return out


def measure(args, n: int, store_dir: Path, model: Path, max_batch: int, codes, queries, bodies: list[bytes],
            fitted: dict | None, fill_s: float, base_rss: int, lengths: list[int]) -> dict:
    """Start the service on the store (a restart: what an operator waits), then its loads."""
    import httpx

    proc, url, start_s = start(store_dir, model, args.max_concurrency, max_batch)
    try:
        stats = httpx.get(url + "/v1/stats").json()
        thr = fitted or {int(k): v for k, v in stats["thresholds"].items()}
        rss = stats["memory"]["max_rss_bytes"]
        row = {"items": n, "max_batch": max_batch, "thresholds": thr, "fill_store_s": fill_s, "start_s": start_s,
               "load_s": stats["start_s"],
               "rss_mb": rss / 2**20, "bytes_per_item": (rss - base_rss) / n,
               "in_process_ms": in_process(codes, queries, thr), "loads": []}
        row["back_to_back_ms"], row["server_cpu_ms"] = back_to_back(url, bodies, proc.pid)
        for rate in args.rates:
            with Writer(url, lengths, args.write_rate) as writer:
                res = asyncio.run(open_loop(url, bodies, rate, args.seconds))
            res.update(writer.summary())
            res["overhead_p50_ms"] = res["p50"] - row["in_process_ms"]
            row["loads"].append(res)
            print(json.dumps({"items": n, "max_batch": max_batch, **res}), flush=True)
        # the peak after the loads: search scratch and worker threads on top of the index
        row["rss_after_mb"] = httpx.get(url + "/v1/stats").json()["memory"]["max_rss_bytes"] / 2**20
    finally:
        proc.terminate()
        proc.wait()
    print(json.dumps({k: v for k, v in row.items() if k != "loads"}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="run directory (default: a tiny model trained here in ~3 s)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--rates", type=float, nargs="+", default=[50, 200, 500])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--max-concurrency", type=int, default=64)
    ap.add_argument("--no-candidates", action="store_true")
    ap.add_argument("--keep", type=float, help="send thresholds with which stage 1 keeps about this fraction of the "
                                               "gallery (bench_search's fit; default: the service's thresholds)")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[64],
                    help="the service's --max-batch; several values: one start and the same loads for each")
    ap.add_argument("--write-rate", type=float, default=0.0,
                    help="adds + erasures per second (alternating) running during every search load (default 0)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from ctfreid.infer.encoder import load_encoder
    from ctfreid.serve.store import ItemMeta, Store

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model = args.model or tiny_model(tmp)
    enc = load_encoder(model)
    lengths = sorted(enc.lengths)
    rng = np.random.default_rng(0)
    results = []
    empty_store = tmp / "empty"
    proc, url, _ = start(empty_store, model, args.max_concurrency)
    import httpx

    base_rss = httpx.get(url + "/v1/stats").json()["memory"]["max_rss_bytes"]
    proc.terminate()
    proc.wait()
    for n in args.sizes:
        codes = correlated_codes(rng, n, lengths)
        store_dir = tmp / f"store{n}"
        store = Store(store_dir, enc.fingerprint, lengths)
        t = time.perf_counter()
        for a in range(0, n, 20_000):
            part = {L: c[a:a + 20_000] for L, c in codes.items()}
            store.add(part, [ItemMeta(camera=int(i % 6)) for i in range(part[lengths[0]].shape[0])])
        fill_s = time.perf_counter() - t
        store.close()
        queries = queries_near(codes, rng, 200, lengths)
        fitted = None
        if args.keep is not None:  # thresholds of the request: stage 1 keeps about args.keep of the gallery
            from bench_search import fit_thresholds

            fitted, _ = fit_thresholds(queries_near(codes, rng, 50, lengths), codes, args.keep)
        bodies = [json.dumps({"codes": {str(L): [base64.b64encode(queries[L][i].tobytes()).decode()]
                                        for L in lengths}, "k": 10,
                              **({"thresholds": {str(L): int(t) for L, t in fitted.items()}} if fitted else {}),
                              **({"candidates": False} if args.no_candidates else {})}).encode()
                  for i in range(200)]
        proc, _, _ = start(store_dir, model, args.max_concurrency)  # first start: fits DTO statistics once
        proc.terminate()
        proc.wait()
        for max_batch in args.max_batch:
            results.append(measure(args, n, store_dir, model, max_batch, codes, queries, bodies, fitted, fill_s,
                                   base_rss, lengths))
    print()
    print("| items | --max-batch | start-up (s) | RSS (MiB) | bytes / item | in-process search_hits (ms) | rate (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | errors | writes/s | add p50 / p99 (ms) | erase p50 / p99 (ms) | write errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        for res in row["loads"]:
            adds = f"{res['add_p50']:.1f} / {res['add_p99']:.1f}" if "add_p50" in res else "-"
            erases = f"{res['erase_p50']:.1f} / {res['erase_p99']:.1f}" if "erase_p50" in res else "-"
            print(f"| {row['items']:,} | {row['max_batch']} | {row['start_s']:.2f} | {row['rss_mb']:.0f} | {row['bytes_per_item']:.0f} | "
                  f"{row['in_process_ms']:.3f} | {res['rate']:g} | {res['p50']:.2f} | {res['p95']:.2f} | "
                  f"{res['p99']:.2f} | {res['error_rate']:.1%} | {res['write_rate']:g} | {adds} | {erases} | "
                  f"{res['write_errors']} |")
    print()
    print("| items | --max-batch | in-process search_hits (ms) | back to back: wall / server CPU (ms a request) | requests a second "
          "of server CPU | peak RSS after the loads (MiB) |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['items']:,} | {row['max_batch']} | {row['in_process_ms']:.3f} | {row['back_to_back_ms']:.3f} / "
              f"{row['server_cpu_ms']:.3f} | {1e3 / row['server_cpu_ms']:,.0f} | {row['rss_after_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
