"""Prometheus metrics of one server instance, rendered by `GET /metrics`.

Load figures (KV slots, running and waiting requests, queue time) come from the router, which
publishes `RouterStats`; request-level figures are observed here, in the HTTP process, where each
request is submitted, gets its tokens and ends (`RequestRecord`, driven by the manager's
`RequestStream`). A "request" is one generation: an OpenAI request with `n` choices or several
prompts counts once per choice. Requests refused before submission (a 4xx answer) count as
`outcome="rejected"` and nowhere else.

Image-cache figures (multimodal servers) are the cache manager's, read when `/metrics` is
scraped (`ImageCacheCollector`).

Times are measured in the HTTP process from submission (after tokenization), so TTFT includes
the queue wait, prefill and the trip through the detokenizer: what a client sees, minus HTTP.
"""

from __future__ import annotations

import time
from typing import Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lightserve.cache_manager.protocol import CacheStats
from lightserve.io_struct import FinishReason, RouterStats, TextOut

# No `*_created` series (the time each metric was made): they double the output and no dashboard
# reads them. The switch is process-wide; the server process has no other metrics.
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

# `outcome` label values of lightserve_requests_total.
SUCCESS = "success"  # ended with length, eos_token or stop_sequence
ERROR = "error"  # failed inside the server (or was aborted by it)
CANCELLED = "cancelled"  # the client left (or the handler gave up) before the last token
REJECTED = "rejected"  # refused with a 4xx answer before it was submitted
OUTCOMES = (SUCCESS, ERROR, CANCELLED, REJECTED)


class ImageCacheCollector:
    """The cache manager's counters (`ImageCache.stats()`), as of the last `update`.

    They are counted in the cache manager, which every process of the instance reaches, so the
    figures are copied at scrape time rather than mirrored by counters here.
    """

    def __init__(self) -> None:
        self.stats = CacheStats(capacity=0, records=0, referenced=0, evictions=0, images_encoded=0, encode_batches=0)

    def update(self, stats: CacheStats) -> None:
        self.stats = stats

    def describe(self) -> Iterator[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        return self._families()

    def _families(self) -> Iterator[Metric]:
        s = self.stats
        yield CounterMetricFamily("lightserve_images_encoded", "Images encoded by the visual server (an image "
                                  "already in the cache is not encoded again)", value=s.images_encoded)
        yield CounterMetricFamily("lightserve_image_encode_batches", "Batches the visual server encoded",
                                  value=s.encode_batches)
        yield CounterMetricFamily("lightserve_image_cache_evictions", "Image records evicted to make room",
                                  value=s.evictions)
        yield GaugeMetricFamily("lightserve_image_cache_records", "Image records in the cache",
                                value=s.records)
        yield GaugeMetricFamily("lightserve_image_cache_capacity", "Image records the cache may hold (--cache_capacity)",
                                value=s.capacity)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multimodal: bool = False) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.image_cache: Optional[ImageCacheCollector] = None
        if multimodal:
            self.image_cache = ImageCacheCollector()
            r.register(self.image_cache)
        self.kv_total = Gauge("lightserve_kv_slots_total", "KV cache slots in the pool (rank 0)", registry=r)
        self.kv_used = Gauge("lightserve_kv_slots_used", "KV cache slots held by requests (rank 0)", registry=r)
        self.running = Gauge("lightserve_running_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("lightserve_waiting_requests", "Requests waiting for admission", registry=r)
        self.queue_time = Histogram("lightserve_queue_time_seconds", "Time from arrival to admission",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("lightserve_requests", "Generation requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:  # every series exists from the start, so rates never see a gap
            self.requests.labels(outcome)
        self.prompt_tokens = Counter("lightserve_prompt_tokens", "Prompt tokens of requests that started answering",
                                     registry=r)
        # vLLM's pair: the hit rate is rate(hits) / rate(queries).
        self.cache_queries = Counter("lightserve_prefix_cache_queries",
                                     "Prompt tokens of admitted requests looked up in the prefix cache", registry=r)
        self.cache_hits = Counter("lightserve_prefix_cache_hits",
                                  "Prompt tokens of admitted requests found in the prefix cache", registry=r)
        self.kv_cached = Gauge("lightserve_prefix_cache_slots",
                               "KV cache slots the prefix cache holds, in use or evictable (rank 0)", registry=r)
        self.generation_tokens = Counter("lightserve_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("lightserve_time_to_first_token_seconds", "Time from submission to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lightserve_time_per_output_token_seconds",
                              "Mean time between the tokens of one request (requests with 2+ tokens)",
                              buckets=_PER_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("lightserve_e2e_request_latency_seconds", "Time from submission to the end of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def update_router(self, stats: RouterStats) -> None:
        self.kv_total.set(stats.kv_total)
        self.kv_used.set(stats.kv_used)
        self.kv_cached.set(stats.kv_cached)
        self.running.set(stats.running_reqs)
        self.waiting.set(stats.waiting_reqs)
        for t in stats.queue_times:
            self.queue_time.observe(t)

    def request_started(self) -> "RequestRecord":
        return RequestRecord(self)

    def request_rejected(self) -> None:
        self.requests.labels(REJECTED).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestRecord:
    """The timings and token counts of one submitted request.

    Token counters move as tokens arrive (a dashboard sees a long request progress); the
    outcome, latency and time per token are recorded once, by `end()`.
    """

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._submitted = time.monotonic()
        self._first: Optional[float] = None
        self._latest: Optional[float] = None
        self._tokens = 0
        self._last_out: Optional[TextOut] = None

    def on_output(self, out: TextOut) -> None:
        self._last_out = out
        if out.error is not None:  # an error output carries no token
            return
        now = time.monotonic()
        if self._first is None:
            self._first = now
            self._metrics.ttft.observe(now - self._submitted)
            # Counted with the first token: only then is the prompt known to be prefilled.
            self._metrics.prompt_tokens.inc(out.prompt_tokens)
            self._metrics.cache_queries.inc(out.prompt_tokens)
            self._metrics.cache_hits.inc(out.cached_tokens)
        self._latest = now
        self._tokens += 1
        self._metrics.generation_tokens.inc()

    def end(self) -> None:
        m = self._metrics
        m.requests.labels(self._outcome()).inc()
        m.e2e.observe(time.monotonic() - self._submitted)
        if self._tokens >= 2:
            m.tpot.observe((self._latest - self._first) / (self._tokens - 1))

    def _outcome(self) -> str:
        last = self._last_out
        if last is None or (last.finish_reason is None and last.error is None):
            return CANCELLED
        if last.error is not None or last.finish_reason is FinishReason.ABORT:
            return ERROR
        return SUCCESS
