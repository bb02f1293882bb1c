"""The FastAPI application of ``ctfreid serve`` (see ``ctfreid serve --help`` and ``docs`` in the module
:mod:`ctfreid.cli.serve`).

Every answer is JSON; every error is ``{"error": {"field": NAME or null, "message": TEXT}}`` with 400 (bad
input), 401 (no or wrong token), 403 (a read-only token on a write), 404, 413 (body, image count or pixels
over the limits), 422 (a request that does not validate), 429 (over the client's request rate, with
``Retry-After``) or 503 (overloaded). Thresholds of a search, in order of precedence: the request's
``thresholds``; its ``beta`` (DTO on the Gaussian fits of the model's validation split, Sec. 3.3, Eq. 8;
400 when the model has no validation split); the server default (``--beta``, else the thresholds stored
with the model, else the accuracy target (tolerance 0.5 points) fitted on the validation split and
planned for ``--gallery-size`` items, else DTO with beta = 2 when fits exist, else ``t_L = L``: no
pruning, the ranking of the longest code). A search by images that gives neither uses the weighted
(asymmetric) stage 1 instead when there is one (``ctfreid.search.asymmetric``; ``--weighted 0`` turns it
off): the one stored beside the model's thresholds, else, when the server fits its own default, a
weighted fit beside it (``--weighted`` bits). Searches by codes or items have no real values to weight.
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime as _dt
import hmac
import io
import json
import math
import re
import resource
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Path as PathParam
from fastapi import Request
from pydantic import BeforeValidator

from ctfreid.errors import CtfreidError
from ctfreid.serve.batcher import SearchBatcher
from ctfreid.serve.gallery import Filter, Gallery
from ctfreid.serve.metrics import CONTENT_TYPE, Metrics
from ctfreid.serve.store import INT_MAX, INT_MIN, META_FIELDS, FieldError, ItemMeta, Store, StoreBusy, check_text

STATIC = Path(__file__).with_name("static")
MAX_PAGE = 1000  # items per page of /v1/scroll and GET /v1/persons/PID
INTEGER = re.compile(r"-?[0-9]+")  # an integer given as text: plain decimal digits (int() also takes " 5", "5_0")
NUMBER = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")  # a number as text (float() also takes "nan")


def _digits(v: Any) -> Any:
    if isinstance(v, str) and not INTEGER.fullmatch(v):
        raise ValueError("must be an integer (decimal digits)")
    return v


# an id or pid in a path: an SQLite INTEGER, in decimal digits (not "1.0", " 1", "1_0")
ItemId = Annotated[int, BeforeValidator(_digits), PathParam(ge=INT_MIN, le=INT_MAX)]


@dataclass
class ServeConfig:
    """Options of ``ctfreid serve`` (limits included)."""

    store: str
    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    read_token: str | None = None  # may search and read, not add or erase (Qdrant's read-only API key)
    rate_limit: float | None = None  # requests a second per client address on /v1/ (None: no limit)
    rate_burst: int = 1  # requests a client may send at once before the rate applies
    beta: float | None = None
    gallery_size: int = 1_000_000  # the gallery the default thresholds' time is planned for
    retention_seconds: float | None = None
    thumbnails: bool = True
    flip: bool | None = None
    max_body_bytes: int = 32 << 20
    max_images: int = 64
    max_codes: int = 10_000  # codes per request (cheap: no decoding, no model)
    max_pixels: int = 16_000_000
    max_k: int = 1000
    max_concurrency: int = 16
    max_batch: int = 64  # queries of concurrent searches searched together (1: each request alone)
    thumb_size: tuple[int, int] = (64, 128)
    # bits of the weighted (asymmetric) stage 1 of image searches with the default thresholds, fitted at the
    # first start when the model stores no thresholds (0 or None: Hamming only; see Service)
    weighted: int | None = 4


def _error(status: int, field: str | None, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status)


class Service:
    """Everything behind the routes: encoder, store, gallery, thresholds, counters."""

    def __init__(self, config: ServeConfig, encoder=None, index_factory=None) -> None:
        from ctfreid.serve import encoder as enc_mod

        self.config = config
        self.started = time.time()
        t0 = time.perf_counter()
        self.encoder = encoder if encoder is not None else enc_mod.load(config.model, flip=config.flip)
        self.lengths = sorted(self.encoder.lengths)
        self.length_keys = {str(L) for L in self.lengths}  # a length as a JSON key: its canonical spelling
        self.store = Store(config.store, self.encoder.fingerprint, self.lengths)
        fits = self.store.get_meta("dto_fits")
        target = self.store.get_meta("target_fit")
        target_obj = json.loads(target) if target is not None else None
        # the server fits its own defaults (kept with the store) unless --beta or the model gives thresholds
        own_default = config.beta is None and not self.encoder.thresholds and len(self.lengths) > 1
        need_target = own_default and (target_obj is None or target_obj.get("gallery_size") != config.gallery_size)
        fit_weighted = own_default and bool(config.weighted)  # and the weighted stage 1 of image searches
        weighted = self.store.get_meta("weighted_fit") if fit_weighted else None
        weighted_obj = json.loads(weighted) if weighted is not None else None
        need_weighted = fit_weighted and (weighted_obj is None or (weighted_obj.get("gallery_size"),
                                          weighted_obj.get("bits")) != (config.gallery_size, config.weighted))
        val = enc_mod.validation_set(self.encoder) if fits is None or need_target or need_weighted else None
        if fits is None:  # first start: Gaussian fits of the validation pairs, kept with the store
            fits_obj = enc_mod.dto_fits(self.encoder, val)
            self.store.set_meta("dto_fits", json.dumps(fits_obj))
        else:
            fits_obj = json.loads(fits)
        if need_target:  # first start (or another --gallery-size): the default thresholds, kept with the store
            target_obj = enc_mod.target_fit(val, config.gallery_size) or {"gallery_size": config.gallery_size,
                                                                          "thresholds": None}
            self.store.set_meta("target_fit", json.dumps(target_obj))
        if need_weighted:  # first start (or other --weighted bits or --gallery-size): kept with the store
            weighted_obj = enc_mod.weighted_fit(val, config.gallery_size, config.weighted) or {
                "gallery_size": config.gallery_size, "bits": config.weighted, "thresholds": None}  # none fits
            self.store.set_meta("weighted_fit", json.dumps(weighted_obj))
        # the default of image searches (a WeightedFit, or None) and where it comes from
        self.weighted, self.weighted_source = self._weighted_default(weighted_obj)
        self.fits: dict | None = fits_obj
        self.target: dict | None = target_obj
        self.thresholds_source = ""
        self.default_thresholds = self._default_thresholds()
        index = index_factory(self.encoder.fingerprint, self.store) if index_factory is not None else None
        self.gallery = Gallery(self.store, self.default_thresholds, index=index, max_batch=config.max_batch)
        self.batcher = SearchBatcher(self.gallery.search, config.max_batch)
        self.start_seconds = time.perf_counter() - t0
        self.requests: collections.Counter = collections.Counter()
        self.latency: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=10_000))
        self.inflight = 0
        self.inflight_lock = threading.Lock()
        self.retention_erased = 0
        self._stop = threading.Event()
        self.metrics = Metrics(self)

    def _default_thresholds(self) -> dict[int, int]:
        """The server's default thresholds (see the module); sets ``thresholds_source``."""
        from ctfreid.search.thresholds import check_thresholds
        from ctfreid.serve.encoder import thresholds_for_beta

        need = self.lengths[:-1]
        if not need:
            self.thresholds_source = "one code length"
            return {}
        if self.config.beta is not None:
            if not self.fits:
                raise CtfreidError(f"--beta {self.config.beta:g} needs DTO statistics, but model {self.config.model} "
                                   "has no readable validation split: retrain with --val-fraction, or omit --beta")
            self.thresholds_source = f"DTO beta={self.config.beta:g} (--beta)"
            return thresholds_for_beta(self.fits, self.config.beta)
        if self.encoder.thresholds:
            self.thresholds_source = "stored with the model"
            return check_thresholds(self.encoder.thresholds, self.lengths)
        if self.target and self.target.get("thresholds"):
            self.thresholds_source = self.target["source"]
            return check_thresholds({int(L): t for L, t in self.target["thresholds"].items()}, self.lengths)
        if self.fits:
            self.thresholds_source = "DTO beta=2 (the accuracy target could not be fitted)"
            return thresholds_for_beta(self.fits, 2.0)
        self.thresholds_source = "no pruning (no thresholds with the model and no validation split)"
        return {L: L for L in need}

    def _weighted_default(self, fitted: dict | None) -> tuple:
        """The default of image searches (see the module) as ``(WeightedFit, source)``: the weighted stage 1
        stored beside the model's thresholds ('ctfreid calibrate' writes it), else the server's own fit
        (``fitted``, kept with the store); ``(None, "")`` under ``--weighted 0`` or ``--beta``, or when there is
        neither."""
        from ctfreid.search.asymmetric import WeightedFit, Weighting
        from ctfreid.search.thresholds import check_thresholds

        if not self.config.weighted or self.config.beta is not None:
            return None, ""
        # (an encoder object of the caller's may have no 'weighted')
        stored = getattr(self.encoder, "weighted", None) if self.encoder.thresholds else None
        if stored is not None:
            th = check_thresholds(stored.thresholds, self.lengths, maxima=stored.weighting.maxima(self.lengths[0]))
            return WeightedFit(th, stored.weighting), f"stored with the model ({self.encoder.thresholds_source})"
        if fitted and fitted.get("thresholds"):
            th = {int(L): int(t) for L, t in fitted["thresholds"].items()}
            return WeightedFit(th, Weighting.from_dict(fitted["weights"])), fitted["source"]
        return None, ""

    # ------------------------------------------------------------------------------------- helpers
    def thresholds_for(self, thresholds: Any, beta: Any) -> dict[int, int] | None:
        """A search's own thresholds: the request's ``thresholds``, else those of its ``beta``; None when it
        gives neither (then :meth:`default_for`)."""
        from ctfreid.search.thresholds import check_thresholds, parse_thresholds
        from ctfreid.serve.encoder import thresholds_for_beta

        if thresholds not in (None, ""):
            try:
                if isinstance(thresholds, str):  # JSON, or the CLI's "32=9,64=20" (which refuses a length twice)
                    thresholds = json.loads(thresholds) if thresholds.strip().startswith("{") else \
                        {str(L): t for L, t in parse_thresholds(thresholds).items()}
                if not isinstance(thresholds, Mapping):
                    raise CtfreidError("must be an object {length: distance}")
                thr = {}
                for k, v in thresholds.items():
                    if k not in self.length_keys:  # "032", " 32": not two spellings of one length
                        raise CtfreidError(f"key {k!r:.30} is not a code length; the gallery holds {self.lengths}")
                    if isinstance(v, bool) or not isinstance(v, int):
                        raise CtfreidError(f"threshold of {k} must be an integer, got {v!r:.30}")
                    thr[int(k)] = v
                return check_thresholds(thr, self.lengths)
            except (ValueError, TypeError, RecursionError) as e:
                raise FieldError("thresholds", str(e)) from None
        if beta not in (None, ""):
            try:
                if isinstance(beta, bool) or (isinstance(beta, str) and not NUMBER.fullmatch(beta)):
                    raise ValueError
                b = float(beta)
            except OverflowError:
                b = math.inf
            except (TypeError, ValueError):
                raise FieldError("beta", f"must be a number > 0, got {beta!r:.30}") from None
            if not math.isfinite(b * b) or b <= 0:  # F_beta uses beta squared
                raise FieldError("beta", f"must be a finite number > 0 (below 1e154), got {beta!r:.30}")
            if not self.fits:
                raise FieldError("beta", "this model has no validation statistics for DTO; pass thresholds instead")
            return thresholds_for_beta(self.fits, b)
        return None

    def default_for(self, values: tuple | None) -> tuple[dict[int, int], np.ndarray | dict | None]:
        """The default thresholds of a search and its query weights: the weighted default for queries with
        real ``values`` (images, under ``--weighted``: ``(values, later_values)`` of :meth:`encode`), else the
        default thresholds and no weights."""
        if self.weighted is not None and values is not None:
            return self.weighted.thresholds, self.weighted.weighting.query_weights(*values)
        return self.default_thresholds, None

    def decode_codes(self, obj: Any, field: str = "codes") -> dict[int, np.ndarray]:
        if not isinstance(obj, Mapping) or not obj:
            raise FieldError(field, "must be an object {length: [base64 code, ...]} with every code length")
        keys = {}
        for k in obj:
            if k not in self.length_keys:  # "032", " 32": not two spellings of one length
                raise FieldError(f"{field}.{k}", f"not a code length; the gallery holds {self.lengths}")
            keys[int(k)] = k
        if sorted(keys) != self.lengths:
            raise FieldError(field, f"lengths {sorted(keys)} given, the gallery holds {self.lengths}")
        out, n = {}, None
        for L in self.lengths:
            items = obj[keys[L]]
            if not isinstance(items, list):
                raise FieldError(f"{field}.{L}", "must be a list of base64 strings")
            if n is None:
                n = len(items)
            elif len(items) != n:
                raise FieldError(f"{field}.{L}", f"{len(items)} codes, the shorter length has {n}")
            arr = np.empty((len(items), L // 8), np.uint8)
            for i, s in enumerate(items):
                try:
                    b = base64.b64decode(s, validate=True) if isinstance(s, str) else None
                except (binascii.Error, ValueError):
                    b = None
                if b is None or len(b) != L // 8:
                    raise FieldError(f"{field}.{L}[{i}]", f"must be {L // 8} bytes in base64 (a packed {L}-bit code)")
                arr[i] = np.frombuffer(b, np.uint8)
            out[L] = arr
        if not n:
            raise FieldError(field, "no codes given")
        if n > self.config.max_codes:
            raise FieldError(field, f"{n} items, at most {self.config.max_codes} per request", 413)
        return out

    def decode_images(self, blobs: list[tuple[str, bytes]]) -> list:
        from PIL import Image, UnidentifiedImageError

        from ctfreid.data.datasets import to_rgb

        Image.MAX_IMAGE_PIXELS = self.config.max_pixels
        out = []
        for i, (name, data) in enumerate(blobs):
            field = f"images[{i}]"
            try:
                im = Image.open(io.BytesIO(data))
                w, h = im.size
                if w * h > self.config.max_pixels:
                    raise FieldError(field, f"{name}: {w} x {h} pixels, at most {self.config.max_pixels}", 413)
                im.load()
                out.append(to_rgb(im))  # 16-bit images scaled to 8 bits, not clipped
            except Image.DecompressionBombError as e:
                raise FieldError(field, f"{name}: {e}", 413) from None
            except UnidentifiedImageError:
                raise FieldError(field, f"{name}: not an image (cannot identify its format)") from None
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                if isinstance(e, FieldError):
                    raise
                raise FieldError(field, f"{name}: corrupt image ({e})") from None
        return out

    def thumbnail(self, im) -> bytes:
        t = im.copy()
        t.thumbnail(self.config.thumb_size)
        buf = io.BytesIO()
        t.save(buf, "JPEG", quality=80)
        return buf.getvalue()

    def encode(self, images: list) -> tuple[dict[int, np.ndarray], float, tuple | None]:
        """Codes of decoded images, milliseconds, and their ``bn(v)`` for weighted stages: ``(values,
        later_values)`` of the ``EncodedSet`` (None without values)."""
        t0 = time.perf_counter()
        enc = self.encoder.encode_images(images)
        codes = {int(L): np.ascontiguousarray(c) for L, c in enc.codes.items()}
        values = None if enc.values is None else (enc.values, enc.later_values)
        return codes, (time.perf_counter() - t0) * 1e3, values

    def receipt(self, ids: list[int]) -> dict:
        now = time.time()
        return {"erased": ids, "count": len(ids), "time": now,
                "time_utc": _dt.datetime.fromtimestamp(now, _dt.UTC).isoformat()}

    def retention_loop(self) -> None:
        r = self.config.retention_seconds
        period = max(0.05, min(60.0, r / 4))
        while not self._stop.wait(period):
            cutoff = time.time() - r
            try:
                gone = self.gallery.erase_where(lambda c=cutoff: self.store.select_ids(added_before=c))
            except StoreBusy as e:  # deleted and out of search; only the checkpoint waits for the next round
                gone = e.erased
            except Exception:  # noqa: BLE001 - keep the loop alive; the next round retries
                continue
            self.retention_erased += len(gone)

    def stats(self) -> dict:
        n = len(self.gallery)
        code_bytes = n * (sum(self.lengths) // 8 + 8)
        lat = {}
        for name, d in list(self.latency.items()):
            arr = np.array(d, dtype=np.float64)
            if arr.size:
                lat[name] = {f"p{p}": round(float(np.percentile(arr, p)), 3) for p in (50, 95, 99)} | {"n": int(arr.size)}
        return {
            "items": n,
            "erased": self.store.erased(),
            "erased_by_retention": self.retention_erased,
            "lengths": self.lengths,
            "thresholds": {str(k): v for k, v in self.default_thresholds.items()},
            "dto_fits": self.fits is not None,
            "thresholds_source": self.thresholds_source,
            "weighted_stage1": None if self.weighted is None else {
                "thresholds": {str(L): t for L, t in self.weighted.thresholds.items()},
                "weights": self.weighted.weighting.to_dict(), "source": self.weighted_source,
                "applies_to": "image searches with the default thresholds"},
            "model_fingerprint": self.encoder.fingerprint,
            "uptime_s": round(time.time() - self.started, 3),
            "start_s": round(self.start_seconds, 3),
            "memory": {"index_bytes": code_bytes,
                       "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
            "requests": dict(self.requests),
            "latency_ms": lat,
            "retention_seconds": self.config.retention_seconds,
            "limits": {"rate_limit": self.config.rate_limit,
                       "rate_burst": self.config.rate_burst if self.config.rate_limit else None,
                       "max_concurrency": self.config.max_concurrency, "max_k": self.config.max_k,
                       "max_images": self.config.max_images, "max_codes": self.config.max_codes,
                       "max_body_bytes": self.config.max_body_bytes, "max_pixels": self.config.max_pixels},
            "auth": {"token": self.config.token is not None, "read_only_token": self.config.read_token is not None},
            "search_batches": {"searches": self.batcher.batches, "queries": self.batcher.queries,
                               "max_queries": self.batcher.max_queries, "lanes": self.batcher.lanes},
        }


class _TooLarge(Exception):
    pass


class RateLimiter:
    """A token bucket per client (as nginx's ``limit_req``): ``rate`` requests a second on average, up to
    ``burst`` at once. Past ``max_clients`` buckets, those that have refilled are forgotten (they equal a new
    client's), then the least recent half: memory stays bounded."""

    def __init__(self, rate: float, burst: int, max_clients: int = 100_000) -> None:
        self.rate, self.burst, self.max_clients = float(rate), float(burst), max_clients
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens left, when)
        self.lock = threading.Lock()

    def take(self, client: str, now: float) -> float:
        """Spend one request of ``client`` at time ``now``: 0 if allowed, else the seconds until it would be."""
        with self.lock:
            tokens, then = self.buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
            if tokens < 1:
                self.buckets[client] = (tokens, now)
                return (1 - tokens) / self.rate
            self.buckets[client] = (tokens - 1, now)
            if len(self.buckets) > self.max_clients:
                self._forget(now)
            return 0.0

    def _forget(self, now: float) -> None:
        full = [c for c, (tok, t) in self.buckets.items() if tok + (now - t) * self.rate >= self.burst]
        for c in full:
            del self.buckets[c]
        if len(self.buckets) > self.max_clients:  # a flood of addresses: forget the least recent half
            for c, _ in sorted(self.buckets.items(), key=lambda kv: kv[1][1])[: len(self.buckets) // 2]:
                del self.buckets[c]


class Guard:
    """ASGI middleware: request rate per client, token check (constant time; a read-only token may only
    read and search), body size limit, bounded concurrency, counters."""

    OPEN = ("/healthz", "/", "/favicon.ico")  # and /static/: the page; /metrics needs the token, as /v1/

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.svc = service
        cfg = service.config
        self.expected = cfg.token.encode() if cfg.token else None
        self.read_only = cfg.read_token.encode() if cfg.read_token else None
        self.limiter = RateLimiter(cfg.rate_limit, cfg.rate_burst) if cfg.rate_limit else None

    @staticmethod
    def reads(method: str, path: str) -> bool:
        """What a read-only token may do: GET / HEAD anything, search and scroll."""
        return method in ("GET", "HEAD") or (method == "POST" and path in ("/v1/search", "/v1/scroll"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        svc = self.svc
        path = scope["path"]
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def respond(resp):
            await resp(scope, receive, send_wrapped)

        route = _route(path)
        key = f"{scope['method']} {route}"
        try:
            guarded = path.startswith("/v1/")
            if guarded and self.limiter is not None:  # before the token: guessing tokens is rate-limited too
                client = (scope.get("client") or ("?",))[0]
                wait = self.limiter.take(client, time.monotonic())
                if wait:
                    cfg = svc.config
                    resp = _error(429, None, f"rate limit: {cfg.rate_limit:g} requests a second per client "
                                             f"(bursts of {cfg.rate_burst}); retry in {wait:.2f} s")
                    resp.headers["Retry-After"] = str(math.ceil(wait))
                    return await respond(resp)
            if self.expected is not None and not (path in self.OPEN or path.startswith("/static/")):
                got = [v for k, v in scope["headers"] if k == b"authorization"]
                scheme, _, token = got[0].partition(b" ") if len(got) == 1 else (b"", b"", b"")  # two: refused
                token = token.lstrip(b" ")
                full = hmac.compare_digest(token, self.expected)
                read = self.read_only is not None and hmac.compare_digest(token, self.read_only)
                if not ((full or read) and scheme.lower() == b"bearer"):
                    return await respond(_error(401, "Authorization", "missing or wrong bearer token"))
                if not full and not self.reads(scope["method"], path):
                    return await respond(_error(403, "Authorization", "this token may only search and read; adding "
                                                                      "and erasing need the full token"))
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            limit = svc.config.max_body_bytes
            if length is not None:
                try:
                    if int(length) > limit:
                        return await respond(_error(413, "body", f"{int(length)} bytes, at most {limit}"))
                except ValueError:
                    return await respond(_error(400, "Content-Length", "not a number"))
            seen = {"n": 0}

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    seen["n"] += len(message.get("body", b""))
                    if seen["n"] > limit:
                        raise _TooLarge()
                return message

            if guarded:
                with svc.inflight_lock:
                    if svc.inflight >= svc.config.max_concurrency:
                        busy = True
                    else:
                        busy = False
                        svc.inflight += 1
                if busy:
                    return await respond(_error(503, None, f"overloaded: {svc.config.max_concurrency} requests "
                                                           "in progress, retry later"))
            try:
                await self.app(scope, receive_limited, send_wrapped)
            except _TooLarge:
                await respond(_error(413, "body", f"more than {limit} bytes"))
            finally:
                if guarded:
                    with svc.inflight_lock:
                        svc.inflight -= 1
        finally:
            seconds = time.perf_counter() - t0
            svc.requests[f"{key} {status['code']}"] += 1
            svc.latency[key].append(seconds * 1e3)
            svc.metrics.observe(scope["method"], route, status["code"], seconds)


ROUTES = frozenset({"/", "/healthz", "/metrics", "/favicon.ico", "/static/{file}", "/v1/stats", "/v1/items",
                    "/v1/search", "/v1/scroll", "/v1/erase", "/v1/items/{x}", "/v1/items/{x}/thumbnail",
                    "/v1/persons/{x}"})


def _route(path: str) -> str:
    """The route template of ``path`` (ids as ``{x}``), or "other": counters keep one entry per route, not one
    per path a scanner tries."""
    if path.startswith("/static/"):
        return "/static/{file}"
    name = "/".join("{x}" if p.isdigit() or (p.startswith("-") and p[1:].isdigit()) else p for p in path.split("/"))
    return name if name in ROUTES else "other"


def create_app(config: ServeConfig, encoder=None, index_factory=None):
    """The ASGI application (loads the model and the store now, so start-up errors surface before serving).

    ``index_factory(fingerprint, store)``: the gallery's index when it is not one in-process ``CtFIndex`` (``ctfreid
    serve --ray`` passes a ``ctfreid.distributed.ShardedIndex``), for the model's fingerprint and the gallery's
    ``Store``."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.staticfiles import StaticFiles

    svc = Service(config, encoder, index_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # the first hand-off to a worker thread imports anyio's thread machinery and starts the thread: about
        # 14 ms of the first request after a start (benchmarks/README.md, twenty-first session), paid here
        await run_in_threadpool(lambda: None)
        thread = None
        if config.retention_seconds:
            thread = threading.Thread(target=svc.retention_loop, name="retention", daemon=True)
            thread.start()
        yield
        svc._stop.set()
        if thread is not None:
            thread.join(timeout=5)
        svc.store.close()

    app = FastAPI(title="ctfreid serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc

    @app.exception_handler(FieldError)
    async def _field_error(request, e: FieldError):
        return _error(e.status, e.field, e.message)

    @app.exception_handler(StoreBusy)
    async def _busy(request, e: StoreBusy):
        return _error(503, None, str(e))

    @app.exception_handler(CtfreidError)
    async def _user_error(request, e: CtfreidError):
        return _error(400, None, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")]
        return _error(422, ".".join(loc) or None, err.get("msg", "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error(e.status_code, None, str(e.detail))

    async def read_request(request: Request) -> tuple[dict, list[tuple[str, bytes]]]:
        """(fields, images) from multipart or JSON."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=config.max_images, max_fields=100,
                                          max_part_size=config.max_body_bytes)
            except _TooLarge:  # a chunked body over the limit (no Content-Length to refuse it up front)
                raise FieldError("body", f"more than {config.max_body_bytes} bytes", 413) from None
            except Exception as e:  # noqa: BLE001 - python-multipart / starlette parse errors
                status = 413 if "Too many files" in str(e) else 400
                raise FieldError("images" if status == 413 else "body", f"bad multipart body: {e}", status) from None
            fields, images = {}, []
            for name, value in form.multi_items():
                if hasattr(value, "read"):
                    if name != "images":
                        raise FieldError(name, "unexpected file field (images go in 'images')")
                    images.append((value.filename or f"image {len(images)}", await value.read()))
                elif name == "images":
                    raise FieldError(name, "must be a file part (an image), not a text field")
                else:
                    fields[name] = value
            if "metadata" in fields:
                try:
                    fields["metadata"] = json.loads(fields["metadata"])
                except (ValueError, RecursionError) as e:
                    raise FieldError("metadata", f"not JSON: {e}") from None
            return fields, images
        if ctype.startswith("application/json") or not ctype:
            try:
                body = await request.body()
            except _TooLarge:
                raise FieldError("body", f"more than {config.max_body_bytes} bytes", 413) from None
            try:
                obj = json.loads(body or b"null")
            except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too deep, too many digits
                raise FieldError("body", f"not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise FieldError("body", "must be a JSON object")
            return obj, []
        raise FieldError("Content-Type", f"expected multipart/form-data or application/json, got {ctype!r}", 415)

    def only(fields: dict, allowed: set[str], what: str = "field") -> None:
        """400 naming the first field of ``fields`` not in ``allowed`` (a typo such as ``kk`` is not dropped)."""
        extra = set(fields) - allowed
        if extra:
            raise FieldError(sorted(extra)[0], f"unknown {what}; expected some of {', '.join(sorted(allowed))}")

    def metas_from(fields: dict, n: int) -> list[ItemMeta]:
        raw = fields.get("metadata")
        if raw is None:
            return [ItemMeta() for _ in range(n)]
        if not isinstance(raw, list) or len(raw) != n:
            raise FieldError("metadata", f"must be a list of {n} objects (one per item)")
        return [ItemMeta.from_json(m, f"metadata[{i}]") for i, m in enumerate(raw)]

    def int_field(fields: dict, name: str, default=None, lo=None, hi=None):
        v = fields.get(name)
        return default if v in (None, "") else to_int(v, name, lo, hi)

    def to_int(v: Any, name: str, lo=None, hi=None) -> int:
        """``v`` as an integer in [lo, hi] (default: SQLite's INTEGER), else a 400 naming ``name``."""
        try:
            if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and INTEGER.fullmatch(v))):
                raise ValueError  # a JSON integer, or decimal digits (a form field)
            x = int(v)
        except (TypeError, ValueError):
            raise FieldError(name, f"must be an integer, got {v!r:.30}") from None
        lo, hi = INT_MIN if lo is None else lo, INT_MAX if hi is None else hi  # SQLite's INTEGER
        if not lo <= x <= hi:
            raise FieldError(name, f"must be between {lo} and {hi}, got {x}")
        return x

    def bool_field(fields: dict, name: str, default: bool) -> bool:
        v = fields.get(name)
        if v in (None, ""):
            return default
        if isinstance(v, bool):
            return v
        text = str(v).lower() if isinstance(v, str) else None  # a form field
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise FieldError(name, f"must be true or false, got {v!r:.30}")

    def float_field(fields: dict, name: str):
        v = fields.get(name)
        if v in (None, ""):
            return None
        try:
            if isinstance(v, bool) or (isinstance(v, str) and not NUMBER.fullmatch(v)):
                raise ValueError  # a JSON number, or a decimal number (a form field)
            x = float(v)
        except OverflowError:
            x = math.inf
        except (TypeError, ValueError):
            raise FieldError(name, f"must be a number, got {v!r:.30}") from None
        if not math.isfinite(x):
            raise FieldError(name, f"must be finite, got {v!r:.30}")
        return x

    def query_codes(fields, images) -> tuple[dict[int, np.ndarray], float, list, np.ndarray | None]:
        """(codes, encoding ms, decoded images, the shortest code's bn(v) of images or None)."""
        if sum(map(bool, (images, "codes" in fields, "items" in fields))) > 1:
            raise FieldError("codes" if "codes" in fields else "items", "give one of images, codes or items")
        if "items" in fields:  # stored items as queries: "find this person elsewhere"
            ids = fields["items"]
            if not isinstance(ids, list) or not ids:
                raise FieldError("items", "must be a non-empty list of item ids")
            if len(ids) > config.max_codes:
                raise FieldError("items", f"{len(ids)} items, at most {config.max_codes} per request", 413)
            ids = [to_int(v, f"items[{j}]") for j, v in enumerate(ids)]
            codes, missing = svc.store.codes(ids)
            if missing:
                raise FieldError(f"items[{ids.index(missing[0])}]", f"no item {missing[0]}", 404)
            return codes, 0.0, [], None
        if images:
            if len(images) > config.max_images:
                raise FieldError("images", f"{len(images)} images, at most {config.max_images}", 413)
            decoded = svc.decode_images(images)
            codes, ms, values = svc.encode(decoded)
            return codes, ms, decoded, values
        if "codes" not in fields:
            raise FieldError("images", "no images (multipart field 'images'), codes or items given")
        return svc.decode_codes(fields["codes"]), 0.0, [], None

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        # routes answer JSONResponse themselves: FastAPI would first walk the answer with jsonable_encoder, which
        # took a third of a search request's CPU (benchmarks/README.md, "ctfreid serve"); the bytes are the same
        return JSONResponse({"ok": True, "items": len(svc.gallery)})

    @app.api_route("/v1/stats", methods=["GET", "HEAD"])
    async def stats():
        return JSONResponse(svc.stats())

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():  # Prometheus text format; gauges read the gallery (a sharded one asks its shards)
        return Response(await run_in_threadpool(svc.metrics.exposition), media_type=CONTENT_TYPE)

    @app.post("/v1/items")
    async def add_items(request: Request):
        fields, images = await read_request(request)
        only(fields, {"codes", "metadata"})

        def work():
            codes, _, decoded, _ = query_codes(fields, images)
            n = next(iter(codes.values())).shape[0]
            metas = metas_from(fields, n)
            for m, (name, _) in zip(metas, images):
                if m.source is None:
                    m.source = name
            thumbs = [svc.thumbnail(im) for im in decoded] if config.thumbnails and decoded else None
            return svc.gallery.add(codes, metas, thumbs)

        ids = await run_in_threadpool(work)
        return JSONResponse({"ids": ids})

    @app.post("/v1/search")
    async def search(request: Request):
        fields, images = await read_request(request)
        only(fields, {"codes", "items", "k", "thresholds", "beta", "camera", "time_from", "time_to", "candidates"})

        def work():
            k = int_field(fields, "k", 10, 1, config.max_k)
            thr = svc.thresholds_for(fields.get("thresholds"), fields.get("beta"))  # a bad one: 400 before any work
            flt = Filter(camera=int_field(fields, "camera"), time_from=float_field(fields, "time_from"),
                         time_to=float_field(fields, "time_to"))
            codes, encode_ms, _, values = query_codes(fields, images)
            weights = None
            if thr is None:
                thr, weights = svc.default_for(values)
            own = fields["items"] if "items" in fields else None
            # concurrent searches go out together (serve.batcher); the time a query is the batch's over its queries
            got = svc.batcher.search(codes, k + (own is not None), thr, flt, query_weights=weights)
            hits, cands, partial = got.hits, got.candidates, got.partial
            if own is not None:  # an item as the query: the others, not itself
                hits = [[h for h in row if h["id"] != int(i)][:k] for row, i in zip(hits, own)]
            search_ms = got.seconds / got.queries * 1e3
            if not bool_field(fields, "candidates", True):
                cands = [None] * len(hits)
            nq = len(hits)
            answer = {"queries": [{"hits": h, "candidates": c, "encode_ms": round(encode_ms / nq, 3),
                                   "search_ms": round(search_ms, 3)} for h, c in zip(hits, cands)],
                      "thresholds": {str(k_): v for k_, v in thr.items()}}
            if weights is not None:  # the weighted lengths' thresholds are weighted distances (search.asymmetric)
                answer["weights"] = svc.weighted.weighting.to_dict()
            if partial:  # a sharded gallery with shards that did not answer in time: said, never silent
                answer["partial"] = {"missing_shards": list(partial),
                                     "message": "these shards did not answer in time: their items are missing"}
            return JSONResponse(answer)  # serialised on the worker thread too

        return await run_in_threadpool(work)

    @app.api_route("/v1/items/{item_id}", methods=["GET", "HEAD"])
    async def get_item(item_id: ItemId):
        row = await run_in_threadpool(svc.store.get, item_id)
        if row is None:
            return _error(404, "id", f"no item {item_id}")
        return JSONResponse(row)

    @app.api_route("/v1/items/{item_id}/thumbnail", methods=["GET", "HEAD"])
    async def get_thumb(item_id: ItemId):
        data = await run_in_threadpool(svc.store.thumbnail, item_id)
        if data is None:
            return _error(404, "id", f"no thumbnail for item {item_id}")
        return Response(data, media_type="image/jpeg")

    @app.patch("/v1/items/{item_id}")
    async def update_item(item_id: ItemId, request: Request):
        # Qdrant's set_payload: the fields given replace the stored ones (null clears), the others stay; e.g.
        # a pid confirmed after the crop was added, so that erasing that person finds it
        fields, images = await read_request(request)
        if images:
            raise FieldError("images", "an item's codes do not change: add the new crop as an item")
        if not fields:
            raise FieldError("body", f"give some of {', '.join(META_FIELDS)}")
        meta = ItemMeta.from_json(fields, "")
        row = await run_in_threadpool(svc.gallery.update, item_id, meta, list(fields))
        if row is None:
            return _error(404, "id", f"no item {item_id}")
        return JSONResponse(row)

    @app.delete("/v1/items/{item_id}")
    async def delete_item(item_id: ItemId):
        gone = await run_in_threadpool(svc.gallery.erase, [item_id])
        if not gone:
            return _error(404, "id", f"no item {item_id}")
        return JSONResponse(svc.receipt(gone))

    @app.delete("/v1/persons/{pid}")
    async def delete_person(pid: ItemId):
        gone = await run_in_threadpool(svc.gallery.erase_where, lambda: svc.store.select_ids(pid=pid))
        return JSONResponse(svc.receipt(gone))

    FILTER = {"pid", "camera", "track", "time_from", "time_to"}

    def item_filter(fields: dict) -> dict:
        """The item conditions of an erasure or a scroll (None where not given)."""
        track = fields.get("track")
        if track is not None and (isinstance(track, bool) or not isinstance(track, (str, int))):
            raise FieldError("track", f"must be a string, got {type(track).__name__}")
        return dict(pid=int_field(fields, "pid"), camera=int_field(fields, "camera"),
                    track=None if track is None else check_text(track, "track"),
                    time_from=float_field(fields, "time_from"), time_to=float_field(fields, "time_to"))

    @app.post("/v1/erase")
    async def erase(request: Request):
        fields, _ = await read_request(request)
        only(fields, FILTER, "filter")
        cond = item_filter(fields)
        if all(v is None for v in cond.values()):
            raise FieldError("filter", f"give at least one of {', '.join(sorted(FILTER))}")
        gone = await run_in_threadpool(svc.gallery.erase_where, lambda: svc.store.select_ids(**cond))
        return JSONResponse(svc.receipt(gone))

    def page_of(fields: dict, cond: dict) -> dict:
        limit = int_field(fields, "limit", 100, 1, MAX_PAGE)
        rows, nxt = svc.store.scroll(offset=int_field(fields, "offset"), limit=limit, **cond)
        return {"items": rows, "next_offset": nxt}

    @app.post("/v1/scroll")
    async def scroll(request: Request):  # Qdrant's scroll: the stored items matching a filter, a page at a time
        fields, _ = await read_request(request)
        only(fields, FILTER | {"limit", "offset"})
        return JSONResponse(await run_in_threadpool(page_of, fields, item_filter(fields)))

    @app.api_route("/v1/persons/{pid}", methods=["GET", "HEAD"])
    async def get_person(pid: ItemId, offset: str | None = None, limit: str | None = None):
        # what the gallery holds about a person (a data subject's access request), a page at a time
        fields = {"offset": offset, "limit": limit}
        return JSONResponse(await run_in_threadpool(page_of, fields, dict(pid=pid)))

    @app.api_route("/", methods=["GET", "HEAD"])
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return Guard(app, svc)
