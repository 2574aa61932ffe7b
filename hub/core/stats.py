"""Cumulative per-model-version statistics, in the shape of Triton's ModelStatistics.

Updated only from the event loop thread, so plain integers suffice. A request and its batch
are counted in one step, when the request is answered, so that a snapshot taken at any
instant adds up: `inference_count` is the rows of the requests counted in `success`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(eq=False)
class BatchRecord:
    """One batched forward's figures, counted once, with the first of its requests answered."""

    rows: int
    input_ns: int
    infer_ns: int
    output_ns: int
    counted: bool = False


@dataclass
class ModelStats:
    """Counters that add up the way perf_analyzer expects.

    Per successful request: `success` (its total server time), `queue`, the compute stages of
    the batch it ran in (every request waited for its whole batch, as in Triton) and its rows
    in `inference_count`. Per batch, with its first request: `execution_count` and
    `batch_stats[rows]`. Per failed request: `fail`.
    """

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def request_failed(self, total_ns: int) -> None:
        self.fail.add(total_ns)

    def request_succeeded(self, total_ns: int, inferences: int, queue_ns: int, batch: BatchRecord) -> None:
        """Count one answered request, and its batch if no other request of it was counted yet."""
        # Every request, so written out (a Duration.add call each costs more than its sum).
        success, waited = self.success, self.queue
        success.count += 1
        success.ns += total_ns
        waited.count += 1
        waited.ns += queue_ns
        self.inference_count += inferences
        stage = self.compute_input
        stage.count += 1
        stage.ns += batch.input_ns
        stage = self.compute_infer
        stage.count += 1
        stage.ns += batch.infer_ns
        stage = self.compute_output
        stage.count += 1
        stage.ns += batch.output_ns
        self.last_inference_ms = time.time_ns() // 1_000_000
        if batch.counted:
            return
        batch.counted = True
        self.execution_count += 1
        per_size = self.batches.get(batch.rows)
        if per_size is None:
            per_size = self.batches[batch.rows] = BatchStats()
        per_size.compute_input.add(batch.input_ns)
        per_size.compute_infer.add(batch.infer_ns)
        per_size.compute_output.add(batch.output_ns)
