"""Prometheus metrics on a live server: names, agreement with ModelStatistics, the dashboard's
queries, per-server registries; model health while loading; structured and access logs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import prometheus_client
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from hub.logs import JsonFormatter
from hub.metrics import Metrics, NullMetrics, NullModelMetrics
from hub.server import Server, ServerConfig

from .conftest import ROOT, RunningServer, link_plugins
from .fakes import LoadHook

CUDA_ONLY = {
    "modelhub_gpu_memory_allocated_bytes",
    "modelhub_gpu_memory_reserved_bytes",
    "modelhub_gpu_utilization_ratio",
}


def scrape(server: RunningServer) -> dict[str, float]:
    """Every sample as 'name{label="v",...}' -> value."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def infer_digits(client: tc.InferenceServerClient, images: np.ndarray) -> None:
    tensor = tc.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    client.infer("digits", [tensor])


def test_metrics_agree_with_model_statistics(hub_server: RunningServer, digits_heldout: Any) -> None:
    images, _ = digits_heldout
    client = tc.InferenceServerClient(hub_server.url)
    key = 'modelhub_requests_total{code="OK",model="digits",version="1"}'
    before = scrape(hub_server)
    stats_before = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    for i in range(25):
        infer_digits(client, images[i : i + 2])
    after = scrape(hub_server)
    stats = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]

    def stat(s: dict[str, Any], *path: str) -> int:
        for part in path:
            s = s.get(part, {})
        return int(s or 0)  # type: ignore[call-overload]

    assert after[key] - before.get(key, 0) == 25
    success = stat(stats, "inference_stats", "success", "count") - stat(
        stats_before, "inference_stats", "success", "count"
    )
    assert success == 25
    inferences = 'modelhub_inferences_total{model="digits",version="1"}'
    executions = 'modelhub_executions_total{model="digits",version="1"}'
    assert after[inferences] == int(stats["inference_count"])
    assert after[executions] == int(stats["execution_count"])
    assert after['modelhub_model_state{model="digits",state="ready",version="1"}'] == 1
    assert after['modelhub_model_state{model="digits",state="loading",version="1"}'] == 0
    count = 'modelhub_request_duration_seconds_count{model="digits",version="1"}'
    assert after[count] - before.get(count, 0) == 25
    assert any(k.startswith("process_cpu_seconds_total") for k in after)
    assert any(k.startswith("modelhub_batch_size_bucket") for k in after)


def test_histogram_sums_match_model_statistics(start_server: Any, tmp_path: Path, digits_heldout: Any) -> None:
    server = start_server(link_plugins(tmp_path / "p", ROOT / "plugins" / "digits"))
    client = tc.InferenceServerClient(server.url)
    for i in range(30):
        infer_digits(client, digits_heldout[0][i : i + 3])
    with pytest.raises(InferenceServerException):
        infer_digits(client, np.zeros((1, 8, 8), np.float32))
    metrics = scrape(server)
    stats = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]["inference_stats"]
    labels = '{model="digits",version="1"}'

    def seconds(name: str) -> float:
        return int(stats[name]["ns"]) / 1e9

    # Every request is observed once, with the same duration the statistics add up (the
    # statistics keep whole nanoseconds per request: allow 1 ns of truncation per request).
    assert metrics[f"modelhub_request_duration_seconds_count{labels}"] == 31
    assert metrics[f"modelhub_request_duration_seconds_sum{labels}"] == pytest.approx(
        seconds("success") + seconds("fail"), abs=31e-9
    )
    assert metrics[f"modelhub_queue_duration_seconds_count{labels}"] == int(stats["queue"]["count"]) == 30
    assert metrics[f"modelhub_queue_duration_seconds_sum{labels}"] == pytest.approx(seconds("queue"), abs=30e-9)
    compute = metrics[f"modelhub_compute_duration_seconds_sum{labels}"]
    batches = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]["batch_stats"]
    per_batch = sum(int(b[k]["ns"]) for b in batches for k in ("compute_input", "compute_infer", "compute_output"))
    assert compute == pytest.approx(per_batch / 1e9, rel=1e-6)


def test_failed_requests_are_counted_by_code(hub_server: RunningServer) -> None:
    client = tc.InferenceServerClient(hub_server.url)
    key = 'modelhub_requests_total{code="INVALID_ARGUMENT",model="digits",version="1"}'
    before = scrape(hub_server).get(key, 0)
    with pytest.raises(InferenceServerException, match="image"):
        infer_digits(client, np.zeros((1, 8, 8, 1), np.float32))
    assert scrape(hub_server)[key] - before == 1


def test_dashboard_queries_only_metrics_that_exist(hub_server: RunningServer, digits_heldout: Any) -> None:
    infer_digits(tc.InferenceServerClient(hub_server.url), digits_heldout[0][:1])
    names = {key.split("{")[0] for key in scrape(hub_server)}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "modelhub.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"\b((?:modelhub|process)_[a-z_]+)", target["expr"]))
    assert queried, "the dashboard queries nothing"
    missing = {q for q in queried if q not in names} - CUDA_ONLY
    assert not missing, f"the dashboard queries metrics the server does not export: {sorted(missing)}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "latency", "queue time", "batch size", "queue depth", "gpu memory"):
        assert topic in titles


def test_each_server_owns_its_registry(hub_server: RunningServer) -> None:
    assert hub_server.server is not None and isinstance(hub_server.server.metrics, Metrics)
    assert hub_server.server.metrics.registry is not prometheus_client.REGISTRY
    assert (
        prometheus_client.REGISTRY.get_sample_value("modelhub_inferences_total", {"model": "digits", "version": "1"})
        is None
    )


def test_metrics_port_none_records_nothing(start_server: Any, tmp_path: Path) -> None:
    server = start_server(link_plugins(tmp_path / "p", ROOT / "plugins" / "digits"), metrics_port=None)
    assert isinstance(server.server.metrics, NullMetrics) and server.server.metrics_port is None
    assert isinstance(server.model("digits").metrics, NullModelMetrics)
    infer_digits(tc.InferenceServerClient(server.url), np.zeros((1, 1, 8, 8), np.float32))
    assert server.model("digits").stats.inference_count == 1  # statistics still count; only metrics are off


def test_health_is_not_serving_while_a_model_loads(tmp_path: Path, model_repository: Path) -> None:
    gate = threading.Event()
    entered = threading.Event()

    def wait() -> None:
        entered.set()
        gate.wait(30)

    config = ServerConfig(
        plugins_dir=None,
        model_repository=tmp_path / "models",
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=None,
        device="cpu",
        threads=1,
        entry_points=False,
        extra_plugins={"slow": LoadHook("slowpoke", "slow", wait)},
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = Server(config)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        assert entered.wait(30)
        url = f"127.0.0.1:{server.grpc_port}"
        with grpc.insecure_channel(url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status  # noqa: E731
            assert check("") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert check("slowpoke") == health_pb2.HealthCheckResponse.NOT_SERVING
            client = tc.InferenceServerClient(url)
            assert client.is_server_live() and not client.is_server_ready()
            assert client.get_model_repository_index(as_json=True)["models"][0]["state"] == "LOADING"
            gate.set()
            asyncio.run_coroutine_threadsafe(server.wait_until_loaded(), loop).result(30)
            assert check("slowpoke") == health_pb2.HealthCheckResponse.SERVING
            for _ in range(50):  # the overall status follows on the loop
                if check("") == health_pb2.HealthCheckResponse.SERVING:
                    break
                threading.Event().wait(0.05)
            assert check("") == health_pb2.HealthCheckResponse.SERVING
            assert client.is_server_ready()
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_access_log_sampling(start_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = start_server(link_plugins(tmp_path / "p", ROOT / "plugins" / "digits"), log_requests=1.0)
    client = tc.InferenceServerClient(server.url)
    tensor = tc.InferInput("image", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    with caplog.at_level(logging.INFO, logger="modelhub.access"):
        client.infer("digits", [tensor], request_id="logged-1")
    records = [r for r in caplog.records if r.name == "modelhub.access"]
    assert records and records[-1].request_id == "logged-1" and records[-1].code == "OK"  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["model"] == "digits" and line["request_id"] == "logged-1" and line["level"] == "info"


@pytest.mark.gpu
def test_gpu_memory_metrics(start_server: Any, tmp_path: Path) -> None:
    server = start_server(link_plugins(tmp_path / "p", ROOT / "plugins" / "digits"), device="cuda")
    samples = scrape(server)
    names = {key.split("{")[0] for key in samples}
    assert {"modelhub_gpu_memory_allocated_bytes", "modelhub_gpu_memory_reserved_bytes"} <= names
    # Triton's names, as perf_analyzer --collect-metrics reads them: per gpu_uuid="GPU-...".
    total = {k: v for k, v in samples.items() if k.startswith("nv_gpu_memory_total_bytes{")}
    used = {k: v for k, v in samples.items() if k.startswith("nv_gpu_memory_used_bytes{")}
    assert total and all('gpu_uuid="GPU-' in k and v > 0 for k, v in total.items())
    assert used and all(v > 0 for v in used.values())


def test_gpu_metrics_carry_tritons_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """CudaCollector's series under Triton's names and labels, with torch's CUDA queries answered
    for two devices (this box has none; the gpu-marked test above reads a real one). Only the
    device this process uses (memory reserved) is asked for its used memory without NVML:
    cudaMemGetInfo would create a context on the other."""
    import importlib.util

    import torch

    from hub.metrics import CudaCollector

    class Properties:
        def __init__(self, index: int) -> None:
            self.uuid = f"340cec52-80ba-c0df-8511-5f9680aae0e{index}"
            self.total_memory = 16 << 30

    asked: list[int] = []

    def mem_get_info(index: int) -> tuple[int, int]:
        asked.append(index)
        return (15 << 30, 16 << 30)

    original = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pynvml" else original(name, *a))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 100 * (1 - index))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 200 * (1 - index))
    monkeypatch.setattr(torch.cuda, "get_device_properties", Properties)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    families = {family.name: family for family in CudaCollector().collect()}
    total = {s.labels["gpu_uuid"]: s.value for s in families["nv_gpu_memory_total_bytes"].samples}
    assert total == {f"GPU-340cec52-80ba-c0df-8511-5f9680aae0e{i}": 16 << 30 for i in (0, 1)}
    used = {s.labels["gpu_uuid"]: s.value for s in families["nv_gpu_memory_used_bytes"].samples}
    assert used == {"GPU-340cec52-80ba-c0df-8511-5f9680aae0e0": 1 << 30} and asked == [0]
    assert "nv_gpu_utilization" not in families  # NVML's, and pynvml is "not installed" here


def test_top_shows_rate_latency_and_batch(hub_server: RunningServer, digits_heldout: Any) -> None:
    from hub import top

    client = tc.InferenceServerClient(hub_server.url)
    before = top.scrape(hub_server.metrics_url)
    for i in range(20):
        infer_digits(client, digits_heldout[0][i : i + 4])
    after = top.scrape(hub_server.metrics_url)
    row = next(r for r in top.rows(before, after) if r["model"] == "digits")
    assert row["state"] == "ready" and row["rate"] > 0
    assert row["batch"] is not None and row["batch"] >= 4
    assert row["p99_ms"] is not None and row["p50_ms"] is not None and 0 < row["p50_ms"] <= row["p99_ms"]
    result = __import__("subprocess").run(
        [
            __import__("sys").executable,
            "-m",
            "hub.cli",
            "top",
            "--metrics-url",
            hub_server.metrics_url,
            "--once",
            "--interval",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "digits" in result.stdout and "p99 ms" in result.stdout, result.stdout


def test_histogram_quantile_interpolates() -> None:
    from hub.top import quantile

    before = [(0.001, 0.0), (0.01, 0.0), (float("inf"), 0.0)]
    after = [(0.001, 50.0), (0.01, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, before, after) == pytest.approx(0.001)
    assert quantile(0.75, before, after) == pytest.approx(0.0055)
    assert quantile(0.5, after, after) is None


def test_a_histogram_counts_a_value_on_a_bound_in_that_bucket_and_renders_cumulatively() -> None:
    """Prometheus' `le`: a value equal to a bound belongs to that bound's bucket; buckets are
    rendered cumulatively, ending with +Inf, whose count is every observation's."""
    metrics = Metrics()
    model = metrics.for_model("m", 1)
    for rows in (1, 2, 3, 2048):
        model.batch_done(rows, [0.0] * rows, 0.001)
    assert metrics.for_model("m", 1) is model  # a reload of the version shares its series
    text = prometheus_client.generate_latest(metrics.registry).decode()
    for line in (
        'modelhub_batch_size_bucket{le="1.0",model="m",version="1"} 1.0',
        'modelhub_batch_size_bucket{le="2.0",model="m",version="1"} 2.0',
        'modelhub_batch_size_bucket{le="4.0",model="m",version="1"} 3.0',
        'modelhub_batch_size_bucket{le="1024.0",model="m",version="1"} 3.0',
        'modelhub_batch_size_bucket{le="+Inf",model="m",version="1"} 4.0',
        'modelhub_batch_size_count{model="m",version="1"} 4.0',
        'modelhub_batch_size_sum{model="m",version="1"} 2054.0',
        'modelhub_queue_duration_seconds_count{model="m",version="1"} 2054.0',
        'modelhub_inferences_total{model="m",version="1"} 2054.0',
        'modelhub_executions_total{model="m",version="1"} 4.0',
    ):
        assert line in text, line
    metrics.forget("m", 1)
    assert 'model="m"' not in prometheus_client.generate_latest(metrics.registry).decode()
