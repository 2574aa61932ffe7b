"""`modelhub health --service NAME` says the model's state and reason; `modelhub top --once`
fails when it cannot read the server. Both against a real server on port 0."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import TEST_PLUGINS, RunningServer, link_plugins

MODELS = """
import numpy as np
from hub import ModelSpec, TensorSpec, hookimpl

def _refuse():
    raise RuntimeError("weights file is truncated")

def _spec(name, build):
    return ModelSpec(
        name=name,
        build=build,
        inputs=[TensorSpec("IN", "FP32", (-1, 2))],
        outputs=[TensorSpec("OUT", "FP32", (-1, 2))],
        example_inputs={"IN": np.ones((1, 2), np.float32)},
        target="numpy",
    )

@hookimpl
def register_models(register):
    register(_spec("probe_ok", lambda: (lambda inputs: {"OUT": inputs["IN"]})))
    register(_spec("probe_broken", _refuse))
"""


def modelhub(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hub.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def server(start_server: Any, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    folder = link_plugins(tmp_path_factory.mktemp("probe-plugins"), TEST_PLUGINS / "identity.py")
    (folder / "probes.py").write_text(textwrap.dedent(MODELS))
    return start_server(folder, model_repository=tmp_path_factory.mktemp("probe-models"))


def test_health_of_a_ready_model(server: RunningServer) -> None:
    result = modelhub("health", "--url", server.url, "--service", "probe_ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["SERVING", "  model 'probe_ok' version 1: READY"]


def test_health_of_a_failed_model_prints_state_and_reason(server: RunningServer) -> None:
    result = modelhub("health", "--url", server.url, "--service", "probe_broken")
    assert result.returncode == 1
    status, detail = result.stdout.splitlines()
    assert status == "NOT_SERVING"
    assert detail.startswith("  model 'probe_broken' version 1: UNAVAILABLE (")
    assert "weights file is truncated" in detail


def test_models_url_shows_a_failed_models_reason(server: RunningServer) -> None:
    result = modelhub("models", "--url", server.url)
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("probe_broken ")]
    assert "UNAVAILABLE" in row and "weights file is truncated" in row, row
    assert "not reported" not in row, row


def test_health_of_an_unknown_model_names_the_known_ones(server: RunningServer) -> None:
    result = modelhub("health", "--url", server.url, "--service", "probe_missing")
    assert result.returncode == 1
    status, detail = result.stdout.splitlines()
    assert status == "NOT_FOUND"
    assert "no model named 'probe_missing'" in detail
    assert "probe_ok" in detail and "probe_broken" in detail


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound by us (so no one else takes it), never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_top_once_fails_when_the_server_is_unreachable(closed_port: int) -> None:
    result = modelhub("top", "--once", "--interval", "0", "--metrics-url", f"http://127.0.0.1:{closed_port}/metrics")
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "Connection refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_top_once_fails_on_a_port_that_is_not_metrics(server: RunningServer) -> None:
    result = modelhub("top", "--once", "--interval", "0", "--metrics-url", f"http://{server.url}/metrics")
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_top_once_reads_a_running_server(server: RunningServer) -> None:
    result = modelhub("top", "--once", "--interval", "0", "--metrics-url", server.metrics_url)
    assert result.returncode == 0, result.stderr
    assert "probe_ok" in result.stdout and "probe_broken" in result.stdout


def test_models_locally_shows_why_a_build_raised(server: RunningServer) -> None:
    """A build that raised leaves no artifact: the local listing says so, with the error, and
    not a bare "not built" (the record is cleared by the next build that gets as far as a manifest)."""
    assert server.server is not None
    config = server.server.config
    assert config.plugins_dir is not None
    result = modelhub(
        "models", "--plugins-dir", str(config.plugins_dir), "--model-repository", str(config.model_repository),
        "--no-entry-points",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (broken,) = [line for line in result.stdout.splitlines() if line.startswith("probe_broken ")]
    assert "failed (build raised)" in broken and "weights file is truncated" in broken, broken
    (ok,) = [line for line in result.stdout.splitlines() if line.startswith("probe_ok ")]
    assert "failed" not in ok and " ok " in ok, ok
