"""Prometheus metrics, one registry per app so several apps (tests) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from service.batcher import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("camserve_requests", "HTTP requests", ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram(
            "camserve_request_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.images = Counter("camserve_images", "Images processed", ["endpoint"], registry=r)
        self.rejections = Counter("camserve_rejections", "Requests refused, by reason", ["reason"], registry=r)
        self.batch_size = Histogram(
            "camserve_batch_size", "Images per forward pass", ["endpoint"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "camserve_queue_wait_seconds",
            "Time an image waited for its batch",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "camserve_inference_seconds", "Model time per batch", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.dropped = Counter(
            "camserve_dropped_images", "Queued images dropped because their caller gave up", ["endpoint"], registry=r
        )
        self.queue_depth = Gauge("camserve_queue_depth", "Images waiting", ["endpoint"], registry=r)
        self.decode_memory = Gauge(
            "camserve_decode_memory_bytes", "Expected peak memory of the decodes running now", registry=r
        )
        self.model = Info("camserve_model", "The model being served", registry=r)

    def batch_observer(self, endpoint: str):
        def observe(stats: BatchStats) -> None:
            if stats.dropped:
                self.dropped.labels(endpoint).inc(stats.dropped)
            if not stats.size:
                return
            self.batch_size.labels(endpoint).observe(stats.size)
            self.inference.labels(endpoint).observe(stats.run_s)
            self.images.labels(endpoint).inc(stats.size)
            wait = self.queue_wait.labels(endpoint)
            for seconds in stats.queue_wait_s:
                wait.observe(seconds)

        return observe
