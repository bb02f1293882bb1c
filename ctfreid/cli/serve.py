"""``ctfreid serve``: the HTTP search service (FastAPI + uvicorn) over a durable gallery."""

from __future__ import annotations

import argparse
import ipaddress
import math
import socket
import sys
from pathlib import Path

from ctfreid.errors import CtfreidError

HELP = "HTTP search service over a durable gallery (add, search, erase; a web page at /)"
DESCRIPTION = """Serve coarse-to-fine search (Sec. 3.1) over a gallery kept in an SQLite store.

The store (--store DIR, created on first start) is bound to the model's fingerprint. Items are added
as images (encoded by --model) or as packed codes; erasures (DELETE /v1/items/ID, DELETE /v1/persons/PID,
POST /v1/erase) are final: rows deleted with secure_delete, the WAL checkpointed, the index updated,
then the receipt. API: POST /v1/items, POST /v1/search (by images, codes or stored items), POST /v1/scroll
and GET /v1/persons/PID (the stored items, a page at a time), GET /v1/items/ID[/thumbnail], PATCH
/v1/items/ID (set metadata, e.g. a pid confirmed later), GET /v1/stats, GET /healthz, GET /metrics
(Prometheus); a page at /. --token-file puts /v1/ behind a bearer token (--read-token-file: a second one
that may only search and read); --rate-limit bounds each client's requests a second (429 beyond). The
API: docs/serve-api.md.

example:
  ctfreid serve --store gallery/ --model runs/aio --port 8080
  curl -F images=@query.jpg -F k=5 http://127.0.0.1:8080/v1/search"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, type=Path, help="the gallery's store folder (created on first start)")
    p.add_argument("--model", required=True, help="a run directory of 'ctfreid train' (or its model.pt / an .onnx export)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback; others need --token-file)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token-file", type=Path, help="file holding the bearer token every request must carry")
    p.add_argument("--read-token-file", type=Path, help="file holding a second token that may only search and "
                   "read (GET, POST /v1/search and /v1/scroll), not add, patch or erase (403); needs --token-file")
    p.add_argument("--rate-limit", type=float, metavar="R",
                   help="at most R requests a second on /v1/ per client address, on average; more get 429 with "
                        "Retry-After (default: no limit)")
    p.add_argument("--rate-burst", type=int, metavar="B",
                   help="with --rate-limit: requests a client may send at once (default: R rounded up)")
    p.add_argument("--beta", type=float, help="default thresholds by DTO with this beta (needs the model's validation "
                   "split); default: the thresholds stored with the model, else the fastest within 0.5 mAP and "
                   "Rank-1 points of the longest code on the validation split ('ctfreid calibrate' --target accuracy)")
    p.add_argument("--gallery-size", type=int, default=1_000_000, metavar="N",
                   help="the gallery size the default thresholds' search time is planned for (default 1000000; "
                   "the fit is kept in the store and redone when N changes)")
    p.add_argument("--retention-days", type=float, help="erase crops older than this many days, automatically")
    p.add_argument("--retention-seconds", type=float, help=argparse.SUPPRESS)  # tests: tiny retention
    p.add_argument("--no-thumbnails", action="store_true", help="do not keep a small JPEG of each added crop")
    p.add_argument("--flip", action="store_true", default=None, help="flip test when encoding images")
    p.add_argument("--max-concurrency", type=int, default=16, help="requests in progress before 503 (default 16)")
    p.add_argument("--max-images", type=int, default=64, help="images (or codes) per request (default 64)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="at most one search per core runs at once; searches that arrive meanwhile go out together, "
                        "up to this many queries (default 64; 1: each request alone)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="shard the gallery over Ray actors: a local Ray without ADDRESS, or 'auto' / 'ray://HOST:PORT' "
                        "to join a cluster (the ray extra)")
    p.add_argument("--shards", type=int, default=2, help="with --ray: number of shards (default 2)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit in MiB (default 32)")
    p.add_argument("--weighted", type=int, choices=range(0, 5), metavar="BITS", default=4,
                   help="searches by image with the default thresholds use a weighted (asymmetric) stage 1: each "
                   "bit of the query's shortest code weighted by its confidence, BITS bits a weight (1-4; default "
                   "4, the best on CUHK03): the one stored beside the model's thresholds ('ctfreid calibrate' "
                   "writes it), else fitted on the model's validation split at the first start; 0: Hamming only. "
                   "Searches by codes or items, or with their own thresholds or beta, stay Hamming")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def _sharded(args: argparse.Namespace):
    """``--ray``: the gallery's index sharded over Ray actors, each shard with a durable store of its own under
    ``STORE/shards`` (so that Ray can restart a dead shard). The service's SQLite store stays the record: at a start
    the shards reopen their stores, and the gallery sends them only what they lack and removes what the record no
    longer holds (``Gallery``). Shard stores that cannot be reopened as they are (another shard count or model, a
    record made anew, a shard store missing or unreadable) are rebuilt from the record."""

    def factory(fingerprint: str, store):
        import shutil

        from ctfreid.distributed import ShardedIndex

        shard_dir = Path(args.store) / "shards"
        # bound to this very store too (its creation time), so that shard stores never outlive a store made anew
        # in the same directory, whose ids would name other items
        fingerprint = f"{fingerprint} store:{store.get_meta('created')}"

        def open_shards() -> ShardedIndex:
            return ShardedIndex(shards=args.shards, address=args.ray or None, store=shard_dir, fingerprint=fingerprint)

        try:
            index = open_shards()
            if index.fingerprint == fingerprint:
                return index
            index.close()
            why = f"they hold the codes of model {index.fingerprint}"
        except CtfreidError as e:
            why = str(e)
        print(f"ctfreid serve: rebuilding the shard stores in {shard_dir} from the gallery's store ({why})",
              file=sys.stderr)
        shutil.rmtree(shard_dir, ignore_errors=True)
        return open_shards()

    return factory


def _read_token(path: Path | None, option: str) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CtfreidError(f"{option} {path} cannot be read ({e})") from None
    if not token:
        raise CtfreidError(f"{option} {path} is empty")
    return token


def run(args: argparse.Namespace) -> int:
    from ctfreid.serve.app import ServeConfig, create_app

    token = _read_token(args.token_file, "--token-file")
    read_token = _read_token(args.read_token_file, "--read-token-file")
    if read_token is not None and token is None:
        raise CtfreidError("--read-token-file needs --token-file: without it every request may add and erase")
    if read_token is not None and read_token == token:
        raise CtfreidError("--read-token-file holds the same token as --token-file: give the read-only token "
                           "its own value")
    rate, burst = args.rate_limit, args.rate_burst
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise CtfreidError(f"--rate-limit must be a number of requests a second > 0, got {rate:g}")
    if burst is not None and (rate is None or burst < 1):
        raise CtfreidError("--rate-burst must be >= 1, with --rate-limit" if rate is not None else
                           "--rate-burst needs --rate-limit")
    if rate is not None and burst is None:
        burst = math.ceil(rate)
    if not _is_loopback(args.host) and token is None:
        raise CtfreidError(f"--host {args.host} is not a loopback address: give --token-file so that "
                           "only holders of the token can search and erase")
    if not 0 <= args.port < 65536:
        raise CtfreidError(f"--port must be in 0..65535, got {args.port}")
    retention = args.retention_seconds
    if args.retention_days is not None:
        if args.retention_days <= 0:
            raise CtfreidError(f"--retention-days must be > 0, got {args.retention_days:g}")
        retention = args.retention_days * 86400.0
    if args.gallery_size < 1:
        raise CtfreidError(f"--gallery-size must be >= 1, got {args.gallery_size}")
    if args.shards < 1:
        raise CtfreidError(f"--shards must be >= 1, got {args.shards}")
    for name in ("max_concurrency", "max_images", "max_batch"):
        if getattr(args, name) < 1:
            raise CtfreidError(f"--{name.replace('_', '-')} must be >= 1")
    config = ServeConfig(store=str(args.store), model=str(args.model), host=args.host, port=args.port, token=token,
                         read_token=read_token, rate_limit=rate, rate_burst=burst or 1,
                         beta=args.beta, gallery_size=args.gallery_size, retention_seconds=retention, thumbnails=not args.no_thumbnails,
                         flip=args.flip, max_concurrency=args.max_concurrency, max_images=args.max_images,
                         max_batch=args.max_batch,
                         max_body_bytes=int(args.max_body_mb * (1 << 20)), weighted=args.weighted)
    app = create_app(config, index_factory=_sharded(args) if args.ray is not None else None)
    import uvicorn

    svc = app.svc
    print(f"ctfreid serve: {len(svc.gallery)} items from {args.store} (model {svc.encoder.fingerprint}), "
          f"listening on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
