"""CudaGraphRuntime: a compiled module replayed from explicitly captured CUDA graphs, one per batch bucket."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hub.errors import BuildError
from hub.runtimes.tensors import tile
from hub.spec import ModelSpec


class CudaGraphRuntime:
    """A compiled module replayed from CUDA graphs captured explicitly, one per batch bucket.

    Each batch is copied into its bucket's static input tensors (rows past the batch keep
    whatever the last batch left there: valid numbers, whose outputs are sliced off) and the
    graph is replayed. Explicit capture rather than mode="reduce-overhead": cudagraph trees keep
    their state per thread and asserted when the worker thread that serves was not the thread
    that compiled (seen on an H200, torch 2.11); a torch.cuda.CUDAGraph replays from any thread,
    and every bucket is captured at load, so no request pays for a capture.
    """

    def __init__(self, module: Any, spec: ModelSpec, buckets: list[int], examples: Mapping[str, np.ndarray]) -> None:
        import threading

        import torch

        from hub.runtimes.tensors import as_outputs, to_tensor

        self.device = "cuda"
        self.buckets = buckets
        self._inputs = [t.name for t in spec.forward_inputs]
        self._lock = threading.Lock()
        self._graphs: dict[int, tuple[Any, list[Any], dict[str, Any]]] = {}
        self._pool = torch.cuda.graph_pool_handle()  # buckets share one memory pool
        side = torch.cuda.Stream()
        with torch.inference_mode():
            for bucket in sorted(buckets, reverse=True):  # largest first: the pool is sized once
                static = [to_tensor(tile(examples, bucket)[name], "cuda").clone() for name in self._inputs]
                for tensor in static:
                    torch._dynamo.maybe_mark_dynamic(tensor, 0)  # one Inductor compile for all buckets
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # compile and warm up outside the capture
                        module(*static)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    outputs = as_outputs(module(*static), [t.name for t in spec.outputs])
                self._graphs[bucket] = (graph, static, outputs)
        torch.cuda.synchronize()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from hub.runtimes.tensors import to_tensor  # copies read-only request buffers

        rows = len(next(iter(inputs.values())))
        bucket = next((b for b in self.buckets if b >= rows), None)
        if bucket is None:
            raise BuildError(f"batch of {rows} rows is larger than the largest CUDA graph bucket {self.buckets[-1]}")
        graph, static, outputs = self._graphs[bucket]
        with self._lock, torch.inference_mode():  # one replay at a time: the buffers are shared
            for name, tensor in zip(self._inputs, static, strict=True):
                tensor[:rows].copy_(to_tensor(inputs[name], "cpu"))
            graph.replay()
            return {name: value[:rows].float().cpu().numpy() for name, value in outputs.items()}

    def close(self) -> None:
        self._graphs.clear()
