"""Prometheus metrics of one server instance, rendered by `GET /metrics`.

Load figures (KV slots, running and waiting requests, queue time) come from the router, which
publishes `RouterStats`; request-level timings are observed here, where requests start and end.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lightserve.io_struct import RouterStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.kv_total = Gauge("lightserve_kv_slots_total", "KV cache slots in the pool (rank 0)", registry=r)
        self.kv_used = Gauge("lightserve_kv_slots_used", "KV cache slots held by requests (rank 0)", registry=r)
        self.running = Gauge("lightserve_running_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("lightserve_waiting_requests", "Requests waiting for admission", registry=r)
        self.queue_time = Histogram("lightserve_queue_time_seconds", "Time from arrival to admission",
                                    buckets=_LATENCY_BUCKETS, registry=r)

    def update_router(self, stats: RouterStats) -> None:
        self.kv_total.set(stats.kv_total)
        self.kv_used.set(stats.kv_used)
        self.running.set(stats.running_reqs)
        self.waiting.set(stats.waiting_reqs)
        for t in stats.queue_times:
            self.queue_time.observe(t)

    def render(self) -> bytes:
        return generate_latest(self.registry)
