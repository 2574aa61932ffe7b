"""Prometheus metrics: one CollectorRegistry per server, never the global one; NullMetrics when they are off.

Histogram buckets span 50 µs to 10 s, so sub-millisecond CPU models and 100 ms GPU models
both get resolution (docs/metrics.md lists them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STATES = ("loading", "ready", "failed", "unloaded")
MODEL = ("model", "version")


class Histogram:
    """One histogram series, owned by the event loop: a bucket search (`bisect`, in C) and an
    increment per observation, with no lock and no per-observation Python loop. The buckets
    are exact counts, rendered cumulatively (Prometheus' `le`) only when scraped."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """(le, cumulative count) for every bound and +Inf, as HistogramMetricFamily takes them."""
        total = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            out.append((floatToGoString(bound), total))
        return out


class Metrics:
    """The server's metrics. Per-model series are plain numbers in ModelMetrics, updated on the
    event loop (where every request is answered and every batch delivered, as ModelStatistics
    is) and read by one collector when /metrics is scraped, also on the loop: prometheus_client's
    Counter and Histogram take a lock per update and walk the buckets in Python, which cost
    a request more than its model's whole statistics (docs/benchmarks.md)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        #: Each model version's series, by (name, version): a reload of a version shares them.
        self._models: dict[tuple[str, str], ModelMetrics] = {}
        self.registry.register(ModelCollector(self._models))

    def watch_cuda(self) -> None:
        self.registry.register(CudaCollector())

    def watch_frontends(self, pids: Callable[[], Iterable[int]]) -> None:
        """With --workers N the model process serves /metrics: add each frontend process's CPU
        and memory, which its own ProcessCollector (this process only) cannot see."""
        self.registry.register(FrontendCollector(pids))

    def for_model(self, name: str, version: int) -> ModelMetrics:
        key = (name, str(version))
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = ModelMetrics()
        return model

    def forget(self, name: str, version: int) -> None:
        """Remove every series of one model version: it is no longer in the repository."""
        self._models.pop((name, str(version)), None)


class ModelMetrics:
    """One model version's series. Updated from the event loop thread only, like ModelStats."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}  # by status code
        self.inferences = 0
        self.executions = 0
        self.request_duration = Histogram(LATENCY_BUCKETS)
        self.queue_duration = Histogram(LATENCY_BUCKETS)
        self.compute_duration = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.queue_depth = 0
        self.in_flight = 0
        self.current_state = ""
        self.load_seconds = 0.0
        self.build_seconds = 0.0
        self.load_failures = 0
        #: Queue depth and requests in flight in other processes (the frontends of --workers N
        #: that run this model from their own copy), by the process reporting them.
        self.elsewhere: dict[object, tuple[int, int]] = {}

    @property
    def queued_now(self) -> int:
        return self.queue_depth + sum(depth for depth, _ in self.elsewhere.values())

    @property
    def handling_now(self) -> int:
        return self.in_flight + sum(handling for _, handling in self.elsewhere.values())

    def gauges_from(self, source: object, queue_depth: int, in_flight: int) -> None:
        """Another process's queue depth and requests in flight for this model (0, 0: none)."""
        if queue_depth or in_flight:
            self.elsewhere[source] = (queue_depth, in_flight)
        else:
            self.elsewhere.pop(source, None)

    def executed_elsewhere(self, rows: int, queue_seconds: float, compute_seconds: float, first: bool) -> None:
        """One request of a batch another process computed (a frontend's copy of the model);
        `first`: the first of its batch to be counted, which counts the batch."""
        if first:
            self.batch_done(rows, (queue_seconds,), compute_seconds)
        else:
            self.queue_duration.observe(queue_seconds)

    def request_started(self) -> None:
        self.in_flight += 1

    def request_abandoned(self) -> None:
        """A request left this process unanswered (it is counted where it is answered)."""
        self.in_flight -= 1

    def request_done(self, code: str, seconds: float) -> None:
        self.in_flight -= 1
        requests = self.requests
        requests[code] = requests.get(code, 0) + 1
        self.request_duration.observe(seconds)

    # BatchObserver
    def queued(self, depth: int) -> None:
        self.queue_depth = depth

    def batch_done(self, rows: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        self.inferences += rows
        self.executions += 1
        self.batch_size.observe(rows)
        self.compute_duration.observe(compute_seconds)
        observe = self.queue_duration.observe
        for waited in queue_seconds:
            observe(waited)

    def state(self, state: str) -> None:
        self.current_state = state

    def loaded(self, load_seconds: float, build_seconds: float) -> None:
        self.load_seconds = load_seconds
        self.build_seconds = build_seconds

    def load_failed(self) -> None:
        self.load_failures += 1


#: The scalar series of every model version: (family, name, help, the ModelMetrics attribute).
_SCALARS: tuple[tuple[type[CounterMetricFamily] | type[GaugeMetricFamily], str, str, str], ...] = (
    (CounterMetricFamily, "modelhub_inferences", "Samples inferred (a batch of n counts n).", "inferences"),
    (CounterMetricFamily, "modelhub_executions", "Batched forwards run.", "executions"),
    (GaugeMetricFamily, "modelhub_queue_depth", "Requests waiting in the batcher's queue.", "queued_now"),
    (GaugeMetricFamily, "modelhub_inflight_requests", "Inference requests being handled.", "handling_now"),
    (
        GaugeMetricFamily,
        "modelhub_model_load_duration_seconds",
        "Time the last load of the model took, build included.",
        "load_seconds",
    ),
    (
        CounterMetricFamily,
        "modelhub_model_load_failures",
        "Loads and reloads that failed (the previous build keeps serving).",
        "load_failures",
    ),
    (
        GaugeMetricFamily,
        "modelhub_model_build_duration_seconds",
        "Time the model's artifact took to build (0 when cached).",
        "build_seconds",
    ),
)
#: The histograms of every model version: (name, help, the ModelMetrics attribute).
_HISTOGRAMS = (
    (
        "modelhub_request_duration_seconds",
        "Server time per inference request, receipt to response.",
        "request_duration",
    ),
    ("modelhub_queue_duration_seconds", "Time a request waited in the batcher's queue.", "queue_duration"),
    (
        "modelhub_compute_duration_seconds",
        "Time per batched forward (input, infer and output stages).",
        "compute_duration",
    ),
    ("modelhub_batch_size", "Rows per batched forward.", "batch_size"),
)


class ModelCollector:
    """Every model version's series, read at scrape time (docs/metrics.md lists them)."""

    def __init__(self, models: Mapping[tuple[str, str], ModelMetrics]) -> None:
        self._models = models

    def describe(self) -> Iterable[Metric]:
        return ()  # the series depend on the models served; collected fresh at each scrape

    def collect(self) -> Iterable[Metric]:
        labels = list(MODEL)
        models = list(self._models.items())
        requests = CounterMetricFamily(
            "modelhub_requests", "Inference requests answered, by gRPC status code.", labels=[*labels, "code"]
        )
        states = GaugeMetricFamily(
            "modelhub_model_state", "1 for the model's current state, 0 for the others.", labels=[*labels, "state"]
        )
        for (name, version), model in models:
            for code, count in model.requests.items():
                requests.add_metric([name, version, code], count)
            if model.current_state:
                for state in STATES:
                    states.add_metric([name, version, state], 1 if state == model.current_state else 0)
        yield requests
        yield states
        for family_type, name, documentation, attribute in _SCALARS:
            family = family_type(name, documentation, labels=labels)
            for key, model in models:
                family.add_metric(list(key), getattr(model, attribute))
            yield family
        for name, documentation, attribute in _HISTOGRAMS:
            histograms = HistogramMetricFamily(name, documentation, labels=labels)
            for key, model in models:
                histogram: Histogram = getattr(model, attribute)
                histograms.add_metric(list(key), histogram.buckets(), histogram.sum)
            yield histograms


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

    def batch_done(self, rows: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        pass

    def gauges_from(self, source: object, queue_depth: int, in_flight: int) -> None:
        pass

    def executed_elsewhere(self, rows: int, queue_seconds: float, compute_seconds: float, first: bool) -> None:
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
    installed. Registered only when the server runs on CUDA.

    Beside our own series, Triton's GPU metrics under Triton's names, per `gpu_uuid` (the UUID
    as nvidia-smi writes it, `GPU-...`): `nv_gpu_memory_total_bytes`, `nv_gpu_memory_used_bytes`,
    and with NVML `nv_gpu_utilization` (0-1) and `nv_gpu_power_usage` (watts). perf_analyzer's
    `--collect-metrics` reads these four, and Triton's dashboards query them."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        nvml = importlib.util.find_spec("pynvml") is not None
        allocated = GaugeMetricFamily(
            "modelhub_gpu_memory_allocated_bytes", "GPU memory held by tensors, per device.", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "modelhub_gpu_memory_reserved_bytes", "GPU memory reserved by torch's caching allocator.", labels=["device"]
        )
        total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=["gpu_uuid"])
        used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"])
        devices = range(torch.cuda.device_count())
        uuids = {}
        for index in devices:
            allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
            held = torch.cuda.memory_reserved(index)
            reserved.add_metric([str(index)], held)
            properties = torch.cuda.get_device_properties(index)
            uuids[index] = uuid = f"GPU-{properties.uuid}"
            total.add_metric([uuid], properties.total_memory)
            if nvml:  # the whole device's, every process's (nvidia-smi's "used"), as Triton's is
                with contextlib.suppress(Exception):  # a broken driver must not break /metrics
                    used.add_metric([uuid], torch.cuda.device_memory_used(index))
            elif held:  # cudaMemGetInfo, only where this process has a context already (it would make one)
                free, whole = torch.cuda.mem_get_info(index)
                used.add_metric([uuid], whole - free)
        yield allocated
        yield reserved
        yield total
        yield used
        if not nvml:
            return
        utilisation = GaugeMetricFamily(
            "modelhub_gpu_utilization_ratio", "GPU busy fraction over the last sample (NVML).", labels=["device"]
        )
        triton_utilisation = GaugeMetricFamily(
            "nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"]
        )
        power = GaugeMetricFamily("nv_gpu_power_usage", "GPU power usage in watts", labels=["gpu_uuid"])
        try:
            # torch's, not NVML's own by index: NVML numbers every GPU of the machine, torch
            # only those CUDA_VISIBLE_DEVICES shows, and torch maps one to the other.
            for index in devices:
                busy = torch.cuda.utilization(index) / 100.0
                utilisation.add_metric([str(index)], busy)
                triton_utilisation.add_metric([uuids[index]], busy)
                power.add_metric([uuids[index]], torch.cuda.power_draw(index) / 1000.0)  # mW
        except Exception:  # NVML is optional: a broken driver must not break /metrics
            return
        yield utilisation
        yield triton_utilisation
        yield power
