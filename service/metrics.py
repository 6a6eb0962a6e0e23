"""Prometheus metrics, one registry per app so several apps (tests) never share counters.

With several worker processes (``CAMSERVE_WORKERS`` > 1) prometheus-client runs in multiprocess
mode: every process writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (the supervisor's
private directory) and a scrape of any worker reads them all, so one ``/metrics`` view shows the
whole service. Two metric types need care there: a Gauge's ``set_function`` is never written to the
files (so the queue depth is pushed after each batch and on each scrape, summed over live workers),
and an Info is not supported at all (so the scraping worker adds its own: every worker serves the
same model at the same precision, chosen once by the supervisor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.multiprocess import MultiProcessCollector

from service.inference.batcher import BatchStats

if TYPE_CHECKING:
    from camcore.bundle import Bundle
    from service.inference.contract import Engine

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)


class ServiceMetrics:
    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._depth_functions: dict[str, Callable[[], int]] = {}
        self._decode_memory_function: Callable[[], float] | None = None
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
        self.queue_depth = Gauge(
            "camserve_queue_depth", "Images waiting", ["endpoint"], registry=r, multiprocess_mode="livesum"
        )
        self.decode_memory = Gauge(
            "camserve_decode_memory_bytes",
            "Expected peak memory of the decodes running now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model = Info("camserve_model", "The model being served", registry=r)
        # Each request's labelled children, looked up once per label set: ``labels()`` takes a lock and
        # builds a key on every call, a few microseconds each on the path of every request.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        # What /metrics exposes: this registry, or every worker's files plus this worker's Info.
        self.exposed = r
        self.multiprocess = multiprocess_dir is not None
        if multiprocess_dir is not None:
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed, path=multiprocess_dir)
            self.exposed.register(self.model)

    def request_done(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """One answered request: counted by endpoint, method and status; its latency by endpoint."""
        key = (endpoint, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(endpoint, method, str(status)), self.latency.labels(endpoint))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def model_installed(self, bundle: Bundle, engine: Engine) -> None:
        """The model now serving (on start-up and after every reload)."""
        info = {"name": bundle.name, "version": bundle.version, "precision": engine.precision}
        self.model.info({**info, "device": engine.device_name, "runtime": engine.runtime})

    def track_queue_depth(self, endpoint: str, depth: Callable[[], int]) -> None:
        if self.multiprocess:  # set_function is invisible to other processes: pushed instead
            self._depth_functions[endpoint] = depth
            self.queue_depth.labels(endpoint).set(depth())
        else:
            self.queue_depth.labels(endpoint).set_function(depth)

    def track_decode_memory(self, in_use: Callable[[], float]) -> None:
        if self.multiprocess:  # as for the queue depth: pushed before each scrape
            self._decode_memory_function = in_use
            self.decode_memory.set(in_use())
        else:
            self.decode_memory.set_function(in_use)

    def refresh(self) -> None:
        """Before a scrape: this worker's queue depths and decode memory as of now."""
        for endpoint, depth in self._depth_functions.items():
            self.queue_depth.labels(endpoint).set(depth())
        if self._decode_memory_function is not None:
            self.decode_memory.set(self._decode_memory_function())

    def batch_observer(self, endpoint: str):
        def observe(stats: BatchStats) -> None:
            if depth := self._depth_functions.get(endpoint):
                self.queue_depth.labels(endpoint).set(depth())
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
