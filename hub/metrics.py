"""Prometheus metrics: one CollectorRegistry per server, never the global one; NullMetrics when they are off.

Histogram buckets span 50 µs to 10 s, so sub-millisecond CPU models and 100 ms GPU models
both get resolution (docs/metrics.md lists them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STATES = ("loading", "ready", "failed", "unloaded")
MODEL = ("model", "version")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "modelhub_requests", "Inference requests answered, by gRPC status code.", [*MODEL, "code"], registry=r
        )
        self.inferences = Counter("modelhub_inferences", "Samples inferred (a batch of n counts n).", MODEL, registry=r)
        self.executions = Counter("modelhub_executions", "Batched forwards run.", MODEL, registry=r)
        self.request_duration = Histogram(
            "modelhub_request_duration_seconds",
            "Server time per inference request, receipt to response.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "modelhub_queue_duration_seconds",
            "Time a request waited in the batcher's queue.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "modelhub_compute_duration_seconds",
            "Time per batched forward (input, infer and output stages).",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "modelhub_batch_size", "Rows per batched forward.", MODEL, buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("modelhub_queue_depth", "Requests waiting in the batcher's queue.", MODEL, registry=r)
        self.in_flight = Gauge("modelhub_inflight_requests", "Inference requests being handled.", MODEL, registry=r)
        self.model_state = Gauge(
            "modelhub_model_state", "1 for the model's current state, 0 for the others.", [*MODEL, "state"], registry=r
        )
        self.load_seconds = Gauge(
            "modelhub_model_load_duration_seconds",
            "Time the last load of the model took, build included.",
            MODEL,
            registry=r,
        )
        self.load_failures = Counter(
            "modelhub_model_load_failures",
            "Loads and reloads that failed (the previous build keeps serving).",
            MODEL,
            registry=r,
        )
        self.build_seconds = Gauge(
            "modelhub_model_build_duration_seconds",
            "Time the model's artifact took to build (0 when cached).",
            MODEL,
            registry=r,
        )

        #: Every metric labelled by model and version, with its label names (to forget a model).
        self._per_model: list[tuple[Any, tuple[str, ...]]] = [
            (self.requests, (*MODEL, "code")),
            (self.inferences, MODEL),
            (self.executions, MODEL),
            (self.request_duration, MODEL),
            (self.queue_duration, MODEL),
            (self.compute_duration, MODEL),
            (self.batch_size, MODEL),
            (self.queue_depth, MODEL),
            (self.in_flight, MODEL),
            (self.model_state, (*MODEL, "state")),
            (self.load_seconds, MODEL),
            (self.load_failures, MODEL),
            (self.build_seconds, MODEL),
        ]

    def watch_cuda(self) -> None:
        self.registry.register(CudaCollector())

    def watch_frontends(self, pids: Callable[[], Iterable[int]]) -> None:
        """With --workers N the model process serves /metrics: add each frontend process's CPU
        and memory, which its own ProcessCollector (this process only) cannot see."""
        self.registry.register(FrontendCollector(pids))

    def for_model(self, name: str, version: int) -> ModelMetrics:
        return ModelMetrics(self, name, str(version))

    def forget(self, name: str, version: int) -> None:
        """Remove every series of one model version: it is no longer in the repository."""
        wanted = (name, str(version))
        for metric, labelnames in self._per_model:
            series = {
                tuple(sample.labels[label] for label in labelnames)
                for family in metric.collect()
                for sample in family.samples
                if (sample.labels.get("model"), sample.labels.get("version")) == wanted
            }
            for labelvalues in series:
                metric.remove(*labelvalues)


class ModelMetrics:
    """The children of every metric for one model version, bound once (labels() is not free)."""

    def __init__(self, metrics: Metrics, name: str, version: str) -> None:
        self._metrics = metrics
        self._labels = (name, version)
        self.inferences = metrics.inferences.labels(*self._labels)
        self.executions = metrics.executions.labels(*self._labels)
        self.request_duration = metrics.request_duration.labels(*self._labels)
        self.queue_duration = metrics.queue_duration.labels(*self._labels)
        self.compute_duration = metrics.compute_duration.labels(*self._labels)
        self.batch_size = metrics.batch_size.labels(*self._labels)
        self.queue_depth = metrics.queue_depth.labels(*self._labels)
        self.in_flight = metrics.in_flight.labels(*self._labels)
        self._codes: dict[str, Counter] = {}

    def request_started(self) -> None:
        self.in_flight.inc()

    def request_abandoned(self) -> None:
        """A request left this process unanswered (it is counted where it is answered)."""
        self.in_flight.dec()

    def request_done(self, code: str, seconds: float) -> None:
        self.in_flight.dec()
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes[code] = self._metrics.requests.labels(*self._labels, code)
        counter.inc()
        self.request_duration.observe(seconds)

    # BatchObserver
    def queued(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def batch_done(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        self.inferences.inc(rows)
        self.executions.inc()
        self.batch_size.observe(rows)
        self.compute_duration.observe(compute_seconds)
        for waited in queue_seconds:
            self.queue_duration.observe(waited)

    def state(self, state: str) -> None:
        for name in STATES:
            self._metrics.model_state.labels(*self._labels, name).set(1 if name == state else 0)

    def loaded(self, load_seconds: float, build_seconds: float) -> None:
        self._metrics.load_seconds.labels(*self._labels).set(load_seconds)
        self._metrics.build_seconds.labels(*self._labels).set(build_seconds)

    def load_failed(self) -> None:
        self._metrics.load_failures.labels(*self._labels).inc()


class NullModelMetrics:
    """ModelMetrics' interface recording nothing: a model's metrics when the server has none."""

    def request_started(self) -> None:
        pass

    def request_abandoned(self) -> None:
        pass

    def request_done(self, code: str, seconds: float) -> None:
        pass

    def queued(self, depth: int) -> None:
        pass

    def batch_done(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        pass

    def state(self, state: str) -> None:
        pass

    def loaded(self, load_seconds: float, build_seconds: float) -> None:
        pass

    def load_failed(self) -> None:
        pass


class NullMetrics:
    """Metrics off (`--metrics-port off`): the same calls as Metrics, and nothing is recorded."""

    def watch_cuda(self) -> None:
        pass

    def watch_frontends(self, pids: Callable[[], Iterable[int]]) -> None:
        pass

    def for_model(self, name: str, version: int) -> NullModelMetrics:
        return NullModelMetrics()

    def forget(self, name: str, version: int) -> None:
        pass


class FrontendCollector:
    """CPU seconds and resident memory of each connected frontend process (Linux /proc), by pid:
    the same figures as the process_* series, for the processes that do the protocol work."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        cpu = CounterMetricFamily(
            "modelhub_frontend_cpu_seconds", "CPU (user + system) of a frontend process (--workers).", labels=["pid"]
        )
        memory = GaugeMetricFamily(
            "modelhub_frontend_resident_memory_bytes",
            "Resident memory of a frontend process (--workers).",
            labels=["pid"],
        )
        for pid in sorted(set(self._pids())):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except (OSError, ValueError, IndexError):  # gone, or no /proc here
                continue
            fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state is fields[0]
            cpu.add_metric([str(pid)], (int(fields[11]) + int(fields[12])) / self._ticks)
            memory.add_metric([str(pid)], pages * self._page)
        yield cpu
        yield memory


class CudaCollector:
    """GPU memory per device from torch (always), and utilisation from NVML when pynvml is
    installed. Registered only when the server runs on CUDA."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        allocated = GaugeMetricFamily(
            "modelhub_gpu_memory_allocated_bytes", "GPU memory held by tensors, per device.", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "modelhub_gpu_memory_reserved_bytes", "GPU memory reserved by torch's caching allocator.", labels=["device"]
        )
        devices = range(torch.cuda.device_count())
        for index in devices:
            allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
            reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved
        try:
            import pynvml
        except ImportError:
            return
        utilisation = GaugeMetricFamily(
            "modelhub_gpu_utilization_ratio", "GPU busy fraction over the last sample (NVML).", labels=["device"]
        )
        try:
            pynvml.nvmlInit()
            for index in devices:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                utilisation.add_metric([str(index)], pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        except Exception:  # NVML is optional: a broken driver must not break /metrics
            return
        yield utilisation
