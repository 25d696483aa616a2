"""Prometheus metrics of the service, correct across its processes.

With the engine in a process of its own (the default) the supervisor points
PROMETHEUS_MULTIPROC_DIR at a directory it owns before any process starts: every process writes
its samples there (prometheus_client's multiprocess mode) and whichever front end answers
/metrics reads them all, so the view is the same from every worker. In one process (tests, or
--no-engine-process) each Metrics keeps a registry of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
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
_DEVICE_MEMORY_HELP = (
    "Memory held on the model's device: allocated/reserved on CUDA, engine process RSS on CPU."
)
STAGES = ("fetch", "decode", "queue", "inference", "postprocess")


class _Info(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def architecture(self) -> str: ...


def multiprocess_mode() -> bool:
    """Whether samples go to PROMETHEUS_MULTIPROC_DIR (prometheus_client decides at import)."""
    return values.ValueClass is not values.MutexValue


class _Pid:
    """This process's id, read once and again in a forked child: prometheus_client's
    multiprocess values check it on every write (a process that forked must write to a file of
    its own), and os.getpid() is a system call, 17 of them per request in a front end."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        os.register_at_fork(after_in_child=self.reread)

    def reread(self) -> None:
        self.pid = os.getpid()

    def __call__(self) -> int:
        return self.pid


if multiprocess_mode():
    # The same value class prometheus_client picks in multiprocess mode, given the pid this way
    # (MultiProcessValue's own parameter); every metric below is made after this line.
    values.ValueClass = values.MultiProcessValue(process_identifier=_Pid())


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_mode()
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
        self.grpc_requests = Counter(
            "detr_serve_grpc_requests_total",
            "gRPC calls answered (KServe v2 GRPCInferenceService), by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.grpc_latency = Histogram(
            "detr_serve_grpc_request_duration_seconds",
            "Time from a gRPC call's arrival to its answer, by method.",
            ["method"],
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
        self.tiles = Counter(
            "detr_serve_tiles_total",
            "Tiles (and full-image passes) that tiled images ran as; each is one batch item.",
            registry=r,
        )
        self.image_errors = Counter(
            "detr_serve_image_errors_total",
            "Images refused or failed, by error type.",
            ["type"],
            registry=r,
        )
        self.detections = Counter("detr_serve_detections_total", "Detections returned.", registry=r)
        # Per model (several models: app/models/manager.py); the series above stay server-wide.
        self.model_images = Counter(
            "detr_serve_model_images_total",
            "Images answered with detections, by model.",
            ["model"],
            registry=r,
        )
        self.model_detections = Counter(
            "detr_serve_model_detections_total",
            "Detections returned, by model.",
            ["model"],
            registry=r,
        )
        self.model_inference = Histogram(
            "detr_serve_model_inference_seconds",
            "Forward-pass time of one image's batch, by model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_batches = Counter(
            "detr_serve_model_batches_total",
            "Forward passes run, by model and outcome.",
            ["model", "outcome"],
            registry=r,
        )
        self.model_queue_depth = Gauge(
            "detr_serve_model_queue_depth",
            "Images waiting for the model, by model.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        # Written by the engine process(es) only; "livesum" drops a dead engine's last value.
        self.queue_depth = Gauge(
            "detr_serve_queue_depth",
            "Images waiting for the model.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "detr_serve_inflight_images",
            "Images inside the running forward pass.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Written by the front ends: what a drain waits for (app/api/http/open_requests.py).
        self.open_requests = Gauge(
            "detr_serve_open_requests",
            "Inference requests accepted and not answered yet.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # A gauge at 1 rather than an Info: Info has no multiprocess mode. Same exposition.
        self.model_info = Gauge(
            "detr_serve_model_info",
            "The served model.",
            ["architecture", "backend", "device", "dtype", "model"],
            registry=r,
            multiprocess_mode="max",
        )
        # Set by the engine process(es) once their buckets are warm; "livemax": a dead engine's
        # graphs are not in use.
        self.cuda_graph_buckets = Gauge(
            "detr_serve_cuda_graph_in_use",
            "1 where batches of this size replay a CUDA graph on this device, 0 where they run "
            "eagerly (the reason is in /v1/models and the start-up log).",
            ["device", "batch_size"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.engine_restarts = Counter(
            "detr_serve_engine_restarts_total",
            "Engine processes restarted after they died.",
            registry=r,
        )
        self.device_memory: Gauge | None = None
        if self.multiprocess:
            # The engine process sets it (a scrape cannot call into another process).
            self.device_memory = Gauge(
                "detr_serve_device_memory_bytes",
                _DEVICE_MEMORY_HELP,
                ["device", "kind"],
                registry=r,
                multiprocess_mode="livemax",
            )

    def set_model_info(self, info: _Info) -> None:
        self.model_info.labels(
            architecture=info.architecture,
            backend=info.backend,
            device=info.device,
            dtype=info.dtype,
            model=info.name,
        ).set(1)

    def observe_device_memory(self, probe: MemoryProbe) -> None:
        """Read at scrape time, in one process (see refresh_engine_gauges otherwise)."""
        self.registry.register(_DeviceMemoryCollector(probe))

    def observe_buckets(self, buckets: Iterable[tuple[str, int, bool]]) -> None:
        """(device, batch size, whether a CUDA graph serves it) per bucket."""
        for device, batch_size, graph in buckets:
            self.cuda_graph_buckets.labels(device, str(batch_size)).set(1 if graph else 0)

    def observe_queue(self, depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)
        self.in_flight.set_function(in_flight)

    def refresh_engine_gauges(self, depth: float, in_flight: float, probe: MemoryProbe) -> None:
        """The engine process's periodic update of the gauges that scrapes cannot compute."""
        self.queue_depth.set(depth)
        self.in_flight.set(in_flight)
        if self.device_memory is not None:
            for device, kind, value in probe():
                self.device_memory.labels(device, kind).set(value)

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets: every process's samples in multiprocess mode."""
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _DeviceMemoryCollector(Collector):
    """Reads device memory at scrape time (no polling thread)."""

    def __init__(self, probe: MemoryProbe) -> None:
        self._probe = probe

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "detr_serve_device_memory_bytes", _DEVICE_MEMORY_HELP, labels=["device", "kind"]
        )
        for device, kind, value in self._probe():
            family.add_metric([device, kind], value)
        yield family
