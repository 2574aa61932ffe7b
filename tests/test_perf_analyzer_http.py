"""perf_analyzer -i http completes a measurement against digits over REST (a few seconds),
and the server-side statistics it reads over HTTP add up."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from .conftest import RunningServer
from .test_perf_analyzer import BINARY


@pytest.mark.perf_analyzer
def test_perf_analyzer_http_measures_digits(hub_server: RunningServer) -> None:
    if not BINARY.exists():
        if os.environ.get("MODELHUB_REQUIRE_PERF_ANALYZER"):
            pytest.fail(f"{BINARY} is missing; run `make perf-analyzer`")
        pytest.skip("perf_analyzer not installed (make perf-analyzer)")
    command = [str(BINARY), "-m", "digits", "-i", "http", "-u", hub_server.http_url, "--concurrency-range", "4",
               "-p", "1000", "-r", "10", "-s", "50", "-b", "2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Throughput: ([\d.]+) infer/sec", result.stdout)
    assert match and float(match.group(1)) > 0, result.stdout
    server = re.search(
        r"Inference count: (\d+)\s+Execution count: (\d+)\s+Successful request count: (\d+)", result.stdout
    )
    assert server, result.stdout
    inferences, executions, successes = map(int, server.groups())
    assert inferences == 2 * successes and 0 < executions <= successes
