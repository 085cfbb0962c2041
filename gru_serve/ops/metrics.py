"""Prometheus metrics, one registry per server (prometheus-client)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # resident memory, CPU, file descriptors
        self.requests = Counter(
            "gru_serve_requests", "RPCs by method and status code", ["method", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "gru_serve_request_seconds", "RPC duration", ["method"], registry=r, buckets=LATENCY_BUCKETS
        )
        self.ttft = Histogram(
            "gru_serve_time_to_first_token_seconds",
            "time from request to first token",
            ["model"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.itl = _TokenGaps()
        r.register(self.itl)
        self.tokens = Counter("gru_serve_generated_tokens", "tokens generated", ["model"], registry=r)
        self.sessions = Gauge("gru_serve_active_sessions", "sessions in the store", registry=r)
        self._http = None
        self._children: dict[str, tuple] = {}

    def _per_model(self, model: str) -> tuple:
        # labels() costs a lock and a dict lookup; this runs for every message of every stream.
        children = self._children.get(model)
        if children is None:
            children = self._children[model] = (
                self.tokens.labels(model),
                self.itl.counts(model),
                self.ttft.labels(model),
            )
        return children

    def observe_first_token(self, model: str, seconds: float) -> None:
        self._per_model(model)[2].observe(seconds)

    def observe_tokens(self, model: str, n: int, gap: float | None) -> None:
        """n tokens sent together, `gap` seconds after the stream's previous message (None: first)."""
        tokens, itl, _ = self._per_model(model)
        tokens.inc(n)
        itl.observe(gap, zeros=n - 1)

    def serve_http(self, host: str, port: int) -> int:
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class _GapCounts:
    """One model's inter-token histogram: per-bucket counts (not cumulative) and the sum."""

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, gap: float | None, zeros: int) -> None:
        if gap is not None:
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, gap)] += 1
            self.sum += gap
        # Tokens sent in one message arrive 0 s after the one before them: that many
        # observations of 0 in one step, instead of a locked Python call per token.
        self.buckets[0] += max(zeros, 0)


class _TokenGaps(Collector):
    """gru_serve_inter_token_latency_seconds. prometheus_client's Histogram observes one value
    per call; a message carries up to fused_tokens tokens, so the counts are kept here and
    exposed through the public HistogramMetricFamily. Written on the event loop only; a scrape
    from the HTTP thread reads plain ints."""

    def __init__(self) -> None:
        self._models: dict[str, _GapCounts] = {}

    def counts(self, model: str) -> _GapCounts:
        return self._models.setdefault(model, _GapCounts())

    def collect(self) -> Iterator:
        family = HistogramMetricFamily(
            "gru_serve_inter_token_latency_seconds",
            "time between consecutive tokens of a stream as sent (tokens sent together: 0)",
            labels=["model"],
        )
        for model, c in list(self._models.items()):
            bounds = [*map(str, LATENCY_BUCKETS), "+Inf"]
            cumulative = [sum(c.buckets[: i + 1]) for i in range(len(c.buckets))]
            family.add_metric([model], list(zip(bounds, cumulative, strict=True)), c.sum)
        yield family
