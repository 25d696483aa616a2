"""Prometheus metrics of the service, in a registry of their own (one per app instance)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# (device, kind, bytes) readings, e.g. ("cuda:0", "allocated", 1.2e9) or ("cpu", "rss", 5e8).
MemoryProbe = Callable[[], list[tuple[str, str, float]]]

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
STAGES = ("fetch", "decode", "queue", "inference", "postprocess")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "detr_serve_http_requests_total",
            "HTTP requests answered, by route and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "detr_serve_http_request_duration_seconds",
            "Time from a request's arrival to its response, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "detr_serve_stage_duration_seconds",
            "Time one image spends in each stage (fetch, decode, queue, inference, postprocess).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "detr_serve_batch_size",
            "Images per forward pass.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batches = Counter(
            "detr_serve_batches_total",
            "Forward passes run, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.images = Counter(
            "detr_serve_images_total", "Images answered with detections.", registry=r
        )
        self.image_errors = Counter(
            "detr_serve_image_errors_total",
            "Images refused or failed, by error type.",
            ["type"],
            registry=r,
        )
        self.detections = Counter("detr_serve_detections_total", "Detections returned.", registry=r)
        self.queue_depth = Gauge(
            "detr_serve_queue_depth", "Images waiting for the model.", registry=r
        )
        self.in_flight = Gauge(
            "detr_serve_inflight_images", "Images inside the running forward pass.", registry=r
        )
        self.model_info = Info("detr_serve_model", "The served model.", registry=r)
        self.cuda_graph_buckets = Gauge(
            "detr_serve_cuda_graph_in_use",
            "1 where batches of this size replay a CUDA graph on this device, 0 where they run "
            "eagerly (the reason is in /v1/models and the start-up log).",
            ["device", "batch_size"],
            registry=r,
        )

    def observe_device_memory(self, probe: MemoryProbe) -> None:
        self.registry.register(_DeviceMemoryCollector(probe))

    def observe_buckets(self, buckets: Iterable[tuple[str, int, bool]]) -> None:
        """(device, batch size, whether a CUDA graph serves it) per bucket."""
        for device, batch_size, graph in buckets:
            self.cuda_graph_buckets.labels(device, str(batch_size)).set(1 if graph else 0)

    def observe_queue(self, depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)
        self.in_flight.set_function(in_flight)


class _DeviceMemoryCollector(Collector):
    """Reads device memory at scrape time (no polling thread)."""

    def __init__(self, probe: MemoryProbe) -> None:
        self._probe = probe

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "detr_serve_device_memory_bytes",
            "Memory held on the model's device: allocated/reserved on CUDA, process RSS on CPU.",
            labels=["device", "kind"],
        )
        for device, kind, value in self._probe():
            family.add_metric([device, kind], value)
        yield family
