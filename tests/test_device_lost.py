"""A sticky CUDA error (an illegal memory access, a device-side assert...) leaves the process's
CUDA context unusable: every later CUDA call fails. The process then reports not live, drains
and exits with EXIT_DEVICE_LOST, so that whatever runs it starts a fresh one; behind
--workers N that is the supervisor, which restarts the model process while the frontends
stay. Without a GPU, tests/plugins/device_fault.py raises what torch raises on one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
import tritonclient.http as th
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from hub.errors import device_lost
from hub.server import EXIT_DEVICE_LOST

from .conftest import TEST_PLUGINS, Workers, link_plugins
from .plugins.device_fault import FAULT, illegal_address
from .test_cli import ServeProcess


def _cuda_error(text: str, code: int) -> BaseException:
    """What torch raises for CUDA error `code` (tests/plugins/device_fault.py raises code 700)."""
    error = torch.AcceleratorError(f"CUDA error: {text}\nCUDA kernel errors might be asynchronously reported")
    error.error_code = code  # type: ignore[attr-defined]
    return error


def test_which_cuda_errors_lose_the_device() -> None:
    """By torch.AcceleratorError's code where it has one, else by a RuntimeError's text: an
    out-of-memory or an invalid argument leaves the context usable; only sticky errors count."""
    assert device_lost(illegal_address()) == ("CUDA error: an illegal memory access was encountered")
    assert device_lost(_cuda_error("device-side assert triggered", 710)) is not None
    assert device_lost(_cuda_error("out of memory", 2)) is None
    assert device_lost(_cuda_error("invalid argument", 1)) is None
    assert device_lost(RuntimeError("CUDA error: unspecified launch failure")) is not None
    assert device_lost(RuntimeError("CUDA error: out of memory")) is None
    assert device_lost(ValueError("CUDA error: misaligned address")) is None  # not torch's
    assert device_lost(RuntimeError("a model's own error mentioning an illegal memory access")) is None
    # Triton's kernel launcher (torch-compile) and ONNX Runtime's CUDA provider word it otherwise
    assert device_lost(RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")) is not None
    assert device_lost(RuntimeError("CUDA failure 700: an illegal memory access was encountered ; GPU=0")) is not None
    # A plugin's own exception that happens to carry an error_code is not torch's
    coded = ValueError("bad row")
    coded.error_code = 700  # type: ignore[attr-defined]
    assert device_lost(coded) is None


def _infer(url: str, value: float) -> Any:
    client = tc.InferenceServerClient(url)
    tensor = tc.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), value, np.float32))
    return client.infer("faulty", [tensor])


def _fault(url: str) -> None:
    with pytest.raises(InferenceServerException) as failed:
        _infer(url, FAULT)
    assert failed.value.status() == "StatusCode.INTERNAL"
    assert "model 'faulty' failed: AcceleratorError" in failed.value.message()


def _health(url: str) -> str:
    """The gRPC health of the whole server (service "")."""
    with grpc.insecure_channel(url) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def test_in_one_process_it_stops_being_live(start_server: Any, tmp_path: Path) -> None:
    server = start_server(link_plugins(tmp_path / "p", TEST_PLUGINS / "device_fault.py"))
    client, rest = tc.InferenceServerClient(server.url), th.InferenceServerClient(server.http_url)
    assert float(_infer(server.url, 3.0).as_numpy("OUTPUT0")[0, 0]) == 6.0
    assert rest.is_server_live() and _health(server.url) == "SERVING"
    _fault(server.url)
    assert not client.is_server_live() and not client.is_server_ready()
    assert not rest.is_server_live() and not rest.is_server_ready()  # a liveness probe restarts the pod
    assert server.server.exit_code == EXIT_DEVICE_LOST
    deadline = time.monotonic() + 2  # the health service follows ServerReady (at once: a loop turn)
    while _health(server.url) != "NOT_SERVING":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_modelhub_serve_drains_and_exits_to_be_started_afresh(model_repository: Path, tmp_path: Path) -> None:
    plugins = link_plugins(tmp_path / "p", TEST_PLUGINS / "device_fault.py")
    server = ServeProcess("--plugins-dir", str(plugins), "--model-repository", str(model_repository))
    deadline = time.monotonic() + 120
    while not tc.InferenceServerClient(server.url).is_server_ready():  # every model loaded
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _fault(server.url)
    code, log = server.stop(None)
    assert code == EXIT_DEVICE_LOST, log  # although the runtime, like torch's, cannot close now
    assert "model 'faulty/1': closing its runtime failed" in log
    assert "the CUDA device failed (model 'faulty': CUDA error: an illegal memory access was encountered)" in log
    assert "modelhub stopped" in log


def test_behind_workers_the_model_process_is_started_afresh(model_repository: Path, tmp_path: Path) -> None:
    """The frontends stay; the model process exits and the supervisor starts another, which
    serves (the fault came from the request, not the fresh process's device)."""
    plugins = link_plugins(tmp_path / "p", TEST_PLUGINS / "device_fault.py")
    server = Workers(plugins, model_repository, tmp_path, 2, "--model-copies", "none")
    try:
        engine, frontends = server.children("engine"), server.children("frontend")
        _fault(server.url)
        client = tc.InferenceServerClient(server.url)
        deadline = time.monotonic() + 120
        while server.children("engine") in ([], engine) or not client.is_server_ready():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        assert f"model process exited (code {EXIT_DEVICE_LOST}); restarting it" in server.output()
        while True:  # each frontend reconnects to the fresh model process on its own
            try:
                assert float(_infer(server.url, 3.0).as_numpy("OUTPUT0")[0, 0]) == 6.0
                break
            except InferenceServerException as err:
                assert err.status() == "StatusCode.UNAVAILABLE" and time.monotonic() < deadline, err
                time.sleep(0.05)
        assert server.children("frontend") == frontends
    finally:
        assert server.stop() == 0, server.output()
