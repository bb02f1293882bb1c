"""Prometheus metrics of ``ctfreid serve`` (``GET /metrics``, as Qdrant and Milvus expose theirs), on a
registry of the service's own (no global state: two services in one process keep their own counts).

- ``ctfreid_requests_total{method, route, status}`` and ``ctfreid_request_duration_seconds{method, route}``;
- ``ctfreid_items``, ``ctfreid_erased_total``, ``ctfreid_erased_by_retention_total``,
  ``ctfreid_requests_in_progress``, ``ctfreid_info{model_fingerprint, lengths, thresholds_source}``,
  read from the service when scraped;
- ``process_*`` (resident memory, CPU seconds, open files) from ``prometheus_client``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

if TYPE_CHECKING:
    from ctfreid.serve.app import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# request latency buckets, seconds: a search of codes takes well under a millisecond, one of images tens of ms
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's Prometheus registry; ``observe`` is called once per request by the middleware."""

    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ctfreid_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("ctfreid_request_duration_seconds", "Time to answer a request",
                                 ["method", "route"], buckets=BUCKETS, registry=self.registry)
        ProcessCollector(registry=self.registry)
        self.registry.register(_ServiceCollector(service))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ServiceCollector:
    """Gauges and counters read from the service at scrape time."""

    def __init__(self, service: Service) -> None:
        self.svc = service

    def collect(self):
        svc = self.svc
        yield GaugeMetricFamily("ctfreid_items", "Items in the gallery (searchable)", value=len(svc.gallery))
        yield CounterMetricFamily("ctfreid_erased", "Items erased since the store was created",
                                  value=svc.store.erased())
        yield CounterMetricFamily("ctfreid_erased_by_retention", "Items erased by --retention-days since start",
                                  value=svc.retention_erased)
        yield GaugeMetricFamily("ctfreid_requests_in_progress", "Requests on /v1/ being answered",
                                value=svc.inflight)
        yield InfoMetricFamily("ctfreid", "The model and thresholds served",
                               value={"model_fingerprint": svc.encoder.fingerprint,
                                      "lengths": ",".join(map(str, svc.lengths)),
                                      "thresholds_source": svc.thresholds_source})
