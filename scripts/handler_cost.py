"""CPU time of one ModelInfer through our handler, in-process, warm and cold (issue 12).

The handler (parse, data plane, batcher, runtime, encode, statistics, metrics) is called
directly, without gRPC, on a real Server's servicer. "warm" runs requests back to back; "cold"
sweeps `--sweep` bytes of memory between two requests, which is what grpc.aio's machinery
does to our caches inside a served process (docs/benchmarks.md, "where a single process's time
goes"). Prints the median of five runs of `--requests` each, in thread CPU µs per request.

    REFMODELS_DIR=../shared/bench .venv/bin/python scripts/handler_cost.py \\
        --plugins-dir bench/plugins --model-repository bench-results/models --model digits_cnn
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from hub.datatypes import NUMPY_DTYPES, datatype_of
from hub.protocol.generated import grpc_service_pb2 as pb
from hub.server import Server, ServerConfig


class _Context:
    """What the handler asks of a grpc.aio context."""

    def time_remaining(self) -> float:
        return 30.0

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        raise SystemExit(f"the request failed: {self.code}: {details}")


def _bare_handler(runtime: Any) -> Any:
    """The floor under our handler: the inputs wrapped, ONNX Runtime's session binding called,
    one response built; no checks, batcher, statistics or metrics (an ONNX model on the CPU)."""
    run, names = runtime._run, runtime._outputs
    output = pb.ModelInferResponse.InferOutputTensor

    async def bare(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        inputs = {
            t.name: np.frombuffer(raw, NUMPY_DTYPES[t.datatype]).reshape(tuple(t.shape))
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        results = run(names, inputs, None)
        return pb.ModelInferResponse(
            model_name=request.model_name,
            id=request.id,
            outputs=[
                output(name=n, datatype=datatype_of(r), shape=r.shape) for n, r in zip(names, results, strict=True)
            ],
            raw_output_contents=[r.tobytes() for r in results],
        )

    return bare


async def main(args: argparse.Namespace) -> None:
    server = Server(
        ServerConfig(
            plugins_dir=args.plugins_dir,
            model_repository=args.model_repository,
            grpc_port=0,
            http_port=None,
            metrics_port=None if args.no_metrics else 0,
            device="cpu",
            threads=1,
            entry_points=False,
        )
    )
    await server.start()
    await server.wait_until_loaded()
    assert server.plane is not None and server._servicer is not None
    spec = server.plane.model(args.model, "").spec
    request = pb.ModelInferRequest(model_name=args.model, id="x")
    for tensor in spec.inputs:
        shape = [1 if d == -1 else d for d in tensor.shape]  # one row; variable dims of 1
        entry = request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        request.raw_input_contents.append(np.zeros(shape, tensor.dtype).tobytes())
        assert entry.name == tensor.name
    data = request.SerializeToString()
    context = _Context()
    handler = server._servicer.ModelInfer
    if args.bare:
        handler = _bare_handler(server.plane.model(args.model, "").runtime)
    sweep = np.ones(args.sweep, np.uint8)

    async def run(count: int, cold: bool) -> float:
        total = 0
        for _ in range(count):
            if cold:
                sweep.sum()
            started = time.thread_time_ns()
            response = await handler(pb.ModelInferRequest.FromString(data), context)
            response.SerializeToString()
            total += time.thread_time_ns() - started
        return total / count / 1000

    try:
        await run(args.requests, False)  # measures the batch sizes, warms up
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            await run(args.requests, False)
            profiler.disable()
            stats = pstats.Stats(profiler)
            calls = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
            print(f"{calls / args.requests:.0f} Python calls per request")
            stats.sort_stats("tottime").print_stats(args.profile)
            return
        for cold in (False, True):
            runs = [await run(args.requests, cold) for _ in range(5)]
            print(
                f"{args.model} {'cold' if cold else 'warm'}: median {statistics.median(runs):.1f} µs per request "
                f"({' '.join(f'{r:.0f}' for r in runs)})"
            )
    finally:
        await server.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugins-dir", type=Path, default=Path("bench/plugins"))
    parser.add_argument("--model-repository", type=Path, default=Path("bench-results/models"))
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--sweep", type=int, default=2 << 20, help="bytes swept between requests when cold")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions")
    parser.add_argument("--bare", action="store_true", help="time the bare handler (the floor), not ours")
    parser.add_argument("--no-metrics", action="store_true", help="metrics off (--metrics-port off)")
    asyncio.run(main(parser.parse_args()))
