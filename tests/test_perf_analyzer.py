"""Triton's own perf_analyzer completes a measurement against digits (a few seconds), over
gRPC and over REST, and the server-side statistics it reads add up; and it runs against system
shared memory (`--shared-memory system`), registering and unregistering its regions.

`make perf-analyzer` installs the binary under tools/; `.ci/run` sets
MODELHUB_REQUIRE_PERF_ANALYZER=1 so that CI fails instead of skipping when it is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, TEST_PLUGINS, RunningServer, link_plugins

BINARY = ROOT / "tools" / "perf_analyzer" / "perf_analyzer"


@pytest.mark.perf_analyzer
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_measures_digits(hub_server: RunningServer, protocol: str) -> None:
    if not BINARY.exists():
        if os.environ.get("MODELHUB_REQUIRE_PERF_ANALYZER"):
            pytest.fail(f"{BINARY} is missing; run `make perf-analyzer`")
        pytest.skip("perf_analyzer not installed (make perf-analyzer)")
    url = hub_server.url if protocol == "grpc" else hub_server.http_url
    command = [str(BINARY), "-m", "digits", "-i", protocol, "-u", url, "--concurrency-range", "4",
               "-p", "1000", "-r", "10", "-s", "50", "-b", "2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Throughput: ([\d.]+) infer/sec", result.stdout)
    assert match and float(match.group(1)) > 0, result.stdout
    # Server-side statistics were read and add up: every request succeeded and was executed,
    # and a request's rows were counted with it (coherent snapshots).
    server = re.search(
        r"Inference count: (\d+)\s+Execution count: (\d+)\s+Successful request count: (\d+)", result.stdout
    )
    assert server, result.stdout
    inferences, executions, successes = map(int, server.groups())
    assert inferences == 2 * successes and 0 < executions <= successes


@pytest.mark.perf_analyzer
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_with_system_shared_memory(start_server: Any, tmp_path: Path, protocol: str) -> None:
    if not BINARY.exists():
        if os.environ.get("MODELHUB_REQUIRE_PERF_ANALYZER"):
            pytest.fail(f"{BINARY} is missing; run `make perf-analyzer`")
        pytest.skip("perf_analyzer not installed (make perf-analyzer)")
    server = start_server(
        link_plugins(tmp_path / "p", TEST_PLUGINS / "identity.py"),
        metrics_port=None,
        shared_memory=frozenset({"system"}),
    )
    url = server.url if protocol == "grpc" else server.http_url
    command = [str(BINARY), "-m", "identity_fp32", "--shape", "INPUT0:16", "-i", protocol, "-u", url,
               "--shared-memory", "system", "--output-shared-memory-size", "1024", "--concurrency-range", "2",
               "-p", "1000", "-r", "10", "-s", "50", "-b", "2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Throughput: ([\d.]+) infer/sec", result.stdout)
    assert match and float(match.group(1)) > 0, result.stdout
    assert server.server is not None and server.server.shared_memory is not None
    assert server.server.shared_memory.regions() == []  # it unregistered what it registered (CUDA's too: a no-op)
