"""The service's side of the metrics: values read from the GenerationService when scraped,
and the session gauge kept current. (ops/metrics.py holds the registry and what the request
paths observe; it imports nothing from core.)"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gru_serve.core.service import GenerationService
from gru_serve.ops.metrics import Metrics


def bind(metrics: Metrics, service: GenerationService) -> None:
    """Collect from the service; call on the server's event loop."""
    metrics.registry.register(ServiceCollector(service, asyncio.get_running_loop()))


async def refresh_sessions(metrics: Metrics, service: GenerationService, every_s: float = 1.0) -> None:
    """Keep the session gauge current (the store may be remote, so it is polled)."""
    while True:
        with contextlib.suppress(Exception):
            metrics.sessions.set(await service.store.count())
        await asyncio.sleep(every_s)


class ServiceCollector(Collector):
    """Values read from the service when scraped."""

    def __init__(self, service: GenerationService, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop

    def collect(self) -> Iterator:
        s = self.service
        yield GaugeMetricFamily(
            "gru_serve_active_streams", "generation streams in flight", value=s.active_streams
        )
        stats = s.store.stats
        yield CounterMetricFamily(
            "gru_serve_session_evictions", "sessions evicted at capacity", value=stats.evictions
        )
        yield CounterMetricFamily(
            "gru_serve_session_expiries", "sessions expired after their TTL", value=stats.expirations
        )
        yield CounterMetricFamily(
            "gru_serve_session_store_read_bytes",
            "bytes of sessions read from the store's disk or remote tier (SQLite, Redis)",
            value=stats.read_bytes,
        )
        cache = CounterMetricFamily(
            "gru_serve_session_cache_reads",
            "session reads: hit (this process's copy was current) or miss (read from disk or Redis)",
            labels=["result"],
        )
        cache.add_metric(["hit"], stats.cache_hits)
        cache.add_metric(["miss"], stats.cache_misses)
        yield cache
        batch = GaugeMetricFamily(
            "gru_serve_scheduler_batch_size", "streams in the last decode step", labels=["model"]
        )
        queue = GaugeMetricFamily(
            "gru_serve_scheduler_queue_depth", "requests waiting for a batch slot", labels=["model"]
        )
        paused = GaugeMetricFamily(
            "gru_serve_scheduler_paused_streams",
            "streams out of the batch because their clients are not reading (backpressure)",
            labels=["model"],
        )
        pauses = CounterMetricFamily(
            "gru_serve_scheduler_pauses",
            "times a stream left the batch because its client fell behind (backpressure)",
            labels=["model"],
        )
        provider = GaugeMetricFamily(
            "gru_serve_execution_provider", "onnxruntime provider in use (1)", labels=["model", "provider"]
        )
        # The service replaces its schedulers dict when a model is loaded or unloaded (never
        # changes it in place), so this thread iterates a stable copy; a model unloaded since
        # its last scrape is simply absent.
        for name, sched in s.schedulers.items():
            stats = sched.stats()
            batch.add_metric([name], stats.last_batch_size)
            queue.add_metric([name], stats.queue_depth)
            paused.add_metric([name], stats.paused)
            pauses.add_metric([name], stats.pauses)
            provider.add_metric([name, sched.provider], 1)
        yield from (batch, queue, paused, pauses, provider)
        pc = s.prefix_cache
        lookups = CounterMetricFamily(
            "gru_serve_prefix_cache_lookups",
            "zero-state prompts of at least one block looked up in the prefix cache: hit (a cached "
            "prefix was reused) or miss",
            labels=["result"],
        )
        lookups.add_metric(["hit"], pc.hits)
        lookups.add_metric(["miss"], pc.misses)
        yield lookups
        yield GaugeMetricFamily(
            "gru_serve_prefix_cache_bytes", "bytes held by this replica's prefix cache", value=pc.bytes
        )
        yield CounterMetricFamily(
            "gru_serve_prefix_cache_tokens_saved",
            "prompt tokens not prefilled because their state came from the prefix cache",
            value=pc.tokens_saved,
        )
        # Leak detectors: both return to their idle values when the server is idle.
        yield GaugeMetricFamily(
            "gru_serve_event_loop_tasks",
            "asyncio tasks on the server's loop",
            value=len(asyncio.all_tasks(self.loop)),
        )
        yield GaugeMetricFamily(
            "gru_serve_threads", "threads in the server process", value=threading.active_count()
        )
