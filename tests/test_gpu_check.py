"""scripts/gpu_check.sh runs on a GPU image that has our runtime dependencies and what
`make gpu-wheels` carries, not our test extras: the test modules it names must collect there."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from typing import Any

import pytest

from .conftest import ROOT

#: Test extras (pyproject's `test` and `embeddings`) that `make gpu-wheels` does not carry, as
#: the top-level modules they install; tritonclient.http needs geventhttpclient.
NOT_ON_THE_IMAGE = ("hypothesis", "geventhttpclient", "kserve", "sklearn", "grpc_tools", "yaml", "tokenizers")

COLLECT = r"""
import importlib.abc, sys
import pytest

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED or name == "tritonclient.http":
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image)", name=name)

BLOCKED = set(sys.argv[1].split(","))
sys.meta_path.insert(0, Absent())
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", *sys.argv[2:]]))
"""


def test_the_gpu_checks_test_modules_collect_without_the_test_extras() -> None:
    files = sorted(set(re.findall(r"tests/test_\w+\.py", (ROOT / "scripts" / "gpu_check.sh").read_text())))
    assert "tests/test_shared_memory_cuda.py" in files and "tests/test_resnet.py" in files
    done = subprocess.run(
        [sys.executable, "-c", COLLECT, ",".join(NOT_ON_THE_IMAGE), *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def bench() -> Any:
    """scripts/bench_gpu.py, imported as the GPU check runs it (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", ROOT / "scripts" / "bench_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_bench_warms_only_batch_sizes_the_model_takes(bench: Any) -> None:
    """scripts/bench_gpu.py warms the server with one request per batch size it may form at
    the top concurrency. A request over the model's max_batch_size is refused: at c=256 against
    resnet's 128 that once lost the GPU run's whole served step (workers 1/4/8, CUDA shared
    memory), on a path the CPU rehearsal, which warms with batch 1, never took."""
    assert bench.warm_sizes(256, 128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert bench.warm_sizes(100, 128) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert bench.warm_sizes(1, 128) == [1]
    assert bench.warm_sizes(3, 0) == [1, 2, 3]  # a model without batching sets no limit


def test_the_gpu_bench_records_where_a_request_spent_its_time(bench: Any) -> None:
    """The issue asks where the time went when served throughput misses: perf_analyzer's
    server-side split (from our ModelStatistics), as it prints it, lands in each served row."""
    printed = (
        "  Server: \n    Inference count: 10056\n    Execution count: 2813\n"
        "    Avg request latency: 591 usec (overhead 200 usec + queue 293 usec + compute input 11 usec "
        "+ compute infer 81 usec + compute output 6 usec)\n"
    )
    assert bench.server_time(printed) == {
        "request": 591, "overhead": 200, "queue": 293, "compute_input": 11, "compute_infer": 81, "compute_output": 6,
    }  # fmt: skip
    assert bench.server_time("no server statistics") is None
    # ... and each row is set against the bare model at a batch that holds the average formed
    bare = [
        {"batch": 1, "images_per_s": 1000.0},
        {"batch": 16, "images_per_s": 8000.0},
        {"batch": 128, "images_per_s": 10000.0},
    ]
    assert bench.against_bare({"concurrency": 128, "images_per_s": 8500.0, "avg_batch": 90.2}, bare) == "0.85x b128"
    assert bench.against_bare({"concurrency": 256, "images_per_s": 9000.0, "avg_batch": 128.0}, bare) == "0.90x b128"
    assert bench.against_bare({"concurrency": 1, "images_per_s": 400.0, "avg_batch": 1.0, "p50_ms": 1.75}, bare) == (
        "0.40x b1, p50 +0.75 ms"
    )
    assert bench.against_bare({"concurrency": 16, "images_per_s": 1.0, "avg_batch": 3.0}, []) == "-"
