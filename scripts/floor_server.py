"""The floor under a Python server of ours: the kit's do-nothing grpc.aio server plus the model's
forward (issue 12). No checks, batcher, statistics, metrics or shared memory: ModelInfer wraps the
raw inputs, calls the built artifact's runtime (the same object, session options and thread count
our server uses) and answers the outputs as raw contents.

Beside the do-nothing server (the RPC ceiling) it splits a gap to that ceiling in two: what the
forward costs inside a served process (floor against ceiling) and what our own code costs
(ours against floor). It answers only ServerLive, ServerReady, ModelReady and ModelInfer, enough
for the peer kit's loadgen.

    REFMODELS_DIR=../shared/bench .venv/bin/python scripts/floor_server.py --port 9090 \\
        --plugins-dir bench/plugins --model-repository bench-results/models
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from hub import process
from hub.datatypes import NUMPY_DTYPES, datatype_of
from hub.pipeline.builder import Builder
from hub.plugins.manager import PluginHost
from hub.protocol.generated import grpc_service_pb2 as pb
from hub.protocol.generated import grpc_service_pb2_grpc as pb_grpc


class Floor(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtimes: dict[str, Any]) -> None:
        self.runtimes = runtimes  # model name -> the built artifact's runtime

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self.runtimes)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        runtime = self.runtimes[request.model_name]
        inputs = {
            t.name: np.frombuffer(raw, NUMPY_DTYPES[t.datatype]).reshape(tuple(t.shape))
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        outputs = runtime.run(inputs)
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, array in outputs.items():
            response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response


async def serve(args: argparse.Namespace) -> None:
    process.configure(args.threads, args.model_repository)
    host = PluginHost(args.plugins_dir, entry_points=False)
    builder = Builder(args.model_repository, host.collect_targets(), host, device="cpu", threads=args.threads)
    runtimes = {}
    for spec in host.collect_models():
        if spec.preprocess is None and (not args.model or spec.name in args.model):
            runtimes[spec.name] = builder.ensure(spec).runtime
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Floor(runtimes), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    print(f"floor server on {args.host}:{port}: {', '.join(runtimes)}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--plugins-dir", type=Path, default=Path("bench/plugins"))
    parser.add_argument("--model-repository", type=Path, default=Path("bench-results/models"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", action="append", help="serve only these (default: every model without a preprocess)")
    asyncio.run(serve(parser.parse_args()))
