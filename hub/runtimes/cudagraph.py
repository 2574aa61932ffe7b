"""CudaGraphRuntime: a compiled module replayed from explicitly captured CUDA graphs, one per batch bucket."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hub.errors import BuildError
from hub.runtimes.tensors import as_outputs, tile, to_numpy, to_tensor
from hub.spec import ModelSpec

#: Captures `module(*static)` once: returns what replays it and the output tensors it writes.
Capture = Callable[[Any, Sequence[torch.Tensor], Sequence[str]], tuple[Callable[[], Any], dict[str, torch.Tensor]]]


class CudaGraphCapture:
    """The CUDA capture: warm up on a side stream, then record one torch.cuda.CUDAGraph; every
    bucket of one runtime shares one memory pool (the largest is captured first and sizes it)."""

    def __init__(self) -> None:
        self._pool = torch.cuda.graph_pool_handle()
        self._side = torch.cuda.Stream()

    def __call__(
        self, module: Any, static: Sequence[torch.Tensor], names: Sequence[str]
    ) -> tuple[Callable[[], Any], dict[str, torch.Tensor]]:
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            for _ in range(2):  # compile and warm up outside the capture
                module(*static)
        torch.cuda.current_stream().wait_stream(self._side)
        graph = torch.cuda.CUDAGraph()
        # "thread_local": a load (a reload, a model-control load) captures while other threads
        # serve on the same device; torch's default ("global") makes their copies and
        # allocations errors for as long as the capture lasts, failing requests and the capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = as_outputs(module(*static), names)
        return graph.replay, outputs


class CudaGraphRuntime:
    """A compiled module replayed from CUDA graphs captured explicitly, one per batch bucket.

    Each batch is copied into its bucket's static input tensors (rows past the batch keep
    whatever the last batch left there: valid numbers, whose outputs are sliced off) and the
    graph is replayed; each output comes back in the dtype the module wrote it (an INT64 stays
    INT64). Explicit capture rather than mode="reduce-overhead": cudagraph trees keep their
    state per thread and asserted when the worker thread that serves was not the thread that
    compiled (seen on an H200, torch 2.11); a torch.cuda.CUDAGraph replays from any thread, and
    every bucket is captured at load, so no request pays for a capture.

    `capture` and `device` exist for tests, which replay eagerly on the CPU what the CUDA capture
    records: the bucketing, copying and slicing around it are the same.
    """

    #: Inputs may be torch tensors on the device (CUDA shared memory): copied into the static
    #: inputs there, device to device, where numpy inputs are copied from the host.
    takes_device_tensors = True

    def __init__(
        self,
        module: Any,
        spec: ModelSpec,
        buckets: list[int],
        examples: Mapping[str, np.ndarray],
        *,
        device: str = "cuda",
        capture: Capture | None = None,
    ) -> None:
        self.device = device
        self.buckets = sorted(buckets)
        self._inputs = [t.name for t in spec.forward_inputs]
        names = [t.name for t in spec.forward_outputs]
        self._lock = threading.Lock()
        self._graphs: dict[int, tuple[Callable[[], Any], list[torch.Tensor], dict[str, torch.Tensor]]] = {}
        record = capture if capture is not None else CudaGraphCapture()
        with torch.inference_mode():
            for bucket in sorted(buckets, reverse=True):  # largest first: the pool is sized once
                rows = tile(examples, bucket)
                static = [to_tensor(rows[name], device).clone() for name in self._inputs]
                for tensor in static:
                    torch._dynamo.maybe_mark_dynamic(tensor, 0)  # one Inductor compile for all buckets
                replay, outputs = record(module, static, names)
                self._graphs[bucket] = (replay, static, outputs)
        if device == "cuda":
            torch.cuda.synchronize()

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket that holds `rows` rows."""
        for bucket in self.buckets:
            if bucket >= rows:
                return bucket
        raise BuildError(f"batch of {rows} rows is larger than the largest CUDA graph bucket {self.buckets[-1]}")

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(inputs.values())))
        replay, static, outputs = self._graphs[self.bucket_for(rows)]
        with self._lock, torch.inference_mode():  # one replay at a time: the buffers are shared
            for name, tensor in zip(self._inputs, static, strict=True):
                given = inputs[name]
                # (to_tensor copies read-only numpy buffers; a tensor is copied from where it is)
                tensor[:rows].copy_(given if isinstance(given, torch.Tensor) else to_tensor(given, "cpu"))
            replay()
            # A copy, on the CPU: the next replay overwrites the static outputs.
            return {name: to_numpy(value[:rows].to("cpu", copy=True)) for name, value in outputs.items()}

    def close(self) -> None:
        self._graphs.clear()
