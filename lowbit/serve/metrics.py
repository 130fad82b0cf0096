"""Prometheus metrics, named like vLLM's (prefix `lowbit:`) so existing dashboards map one to one.

Engine-side numbers (running/waiting requests, KV usage, prefix-cache and token totals) are read from
`engine.stats()` at scrape time, so they are never stale; latency histograms are observed per request by
the server. Each app owns its CollectorRegistry, so tests can run several apps in one process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PREFIX = "lowbit:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0)


def _stat(stats: Any, *names: str, default: float = 0.0) -> float:
    for n in names:
        v = getattr(stats, n, None)
        if v is not None:
            return float(v)
    return default


class EngineCollector:
    """Reads engine.stats() on every scrape. `snapshots()` may give several engines (the cluster
    ingress labels each replica's); every metric family then has one sample per snapshot."""

    def __init__(self, engine: Any, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def describe(self) -> Iterable[Metric]:
        return []

    def snapshots(self) -> list[tuple[list[str], list[str], Any]]:
        """(label names, label values, stats) per engine."""
        return [(["model_name"], [self.model_name], self.engine.stats())]

    def collect(self) -> Iterable[Metric]:
        snaps = self.snapshots()
        lbl = snaps[0][0] if snaps else ["model_name"]

        def family(kind: type, name: str, doc: str, value: Any) -> Metric:
            f = kind(PREFIX + name, doc, labels=lbl)
            for _, val, s in snaps:
                f.add_metric(val, value(s))
            return f

        def gauge(name: str, doc: str, value: Any) -> Metric:
            return family(GaugeMetricFamily, name, doc, value)

        def counter(name: str, doc: str, value: Any) -> Metric:
            return family(CounterMetricFamily, name, doc, value)

        def hit_rate(s: Any) -> float:
            queries = _stat(s, "prefix_cache_queries")
            return _stat(s, "prefix_cache_hits") / queries if queries else 0.0

        yield gauge("num_requests_running", "Sequences being generated in the current engine step.",
                    lambda s: _stat(s, "num_running"))
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", lambda s: _stat(s, "num_waiting"))
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
                    lambda s: _stat(s, "kv_usage"))
        yield gauge("kv_cache_free_blocks", "Free KV-cache blocks.", lambda s: _stat(s, "num_free_blocks"))
        yield gauge("kv_cache_total_blocks", "KV-cache blocks in the pool.", lambda s: _stat(s, "num_total_blocks"))
        yield gauge("prefix_cache_hit_rate", "Prefix-cache hits / queries (tokens) since start.", hit_rate)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      lambda s: _stat(s, "prefix_cache_queries"))
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      lambda s: _stat(s, "prefix_cache_hits"))
        yield counter("prompt_tokens", "Prompt tokens processed.",
                      lambda s: _stat(s, "prompt_tokens_total", "num_prompt_tokens", "prompt_tokens"))
        yield counter("generation_tokens", "Tokens generated.",
                      lambda s: _stat(s, "generation_tokens_total", "num_generation_tokens", "generation_tokens"))
        yield counter("num_preemptions", "Sequences preempted (freed and recomputed) for lack of KV blocks.",
                      lambda s: _stat(s, "num_preemptions", "preemptions"))


class ServerMetrics:
    """Per-app registry: engine gauges/counters plus per-request latency histograms."""

    def __init__(self, engine: Any, model_name: str, collector: EngineCollector | None = None):
        self.registry = CollectorRegistry()
        self.registry.register(collector if collector is not None else EngineCollector(engine, model_name))
        lbl = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", lbl,
                              buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between streamed outputs.", lbl,
                             buckets=ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency, arrival to finish.", lbl,
                             buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        self._success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                lbl + ["finished_reason"], registry=self.registry)

    def finished(self, reason: str | None) -> None:
        self._success.labels(self.model_name, reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class RequestTimer:
    """Latency bookkeeping for one engine request, observed into the histograms when it ends."""

    metrics: ServerMetrics
    arrival: float = field(default_factory=time.monotonic)
    first: float | None = None
    last: float | None = None

    def on_tokens(self) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.arrival)
        elif self.last is not None:
            self.metrics.itl.observe(now - self.last)
        self.last = now

    def on_finish(self, reasons: list[str | None]) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.arrival)
        for r in reasons:
            self.metrics.finished(r)
