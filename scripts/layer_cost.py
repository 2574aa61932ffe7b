"""`modelhub serve` with the layers under ModelInfer cut off one by one, to see what each costs
per request (issue 12's single-process goals). Measure each with scripts/thread_cpu.py.

    LAYERS=echo    ModelInfer answers as the kit's echo server does: grpc.aio and our server's
                   setup (options, reflection, health, the tolerant deserializer), nothing else
    LAYERS=plane   the data plane, codec, statistics and metrics run; the model is not called
                   (a fixed output of the right shape)
    LAYERS=runtime as `plane`, and the model's runtime computes the request, with no batcher
    LAYERS=full    (or unset) the server as shipped

For example, beside a full server on 9000:

    LAYERS=plane REFMODELS_DIR=../shared/bench .venv/bin/python scripts/layer_cost.py serve \\
        --plugins-dir bench/plugins --no-entry-points --model-repository bench-results/models \\
        --grpc-port 9110 --metrics-port 9112 --http-port off --device cpu --threads 1

It patches classes before the server starts; never use it to serve anything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

import hub.cli
from hub.core import models
from hub.core.batching import Delivery
from hub.core.stats import BatchRecord
from hub.protocol import servicer
from hub.protocol.generated import grpc_service_pb2 as pb

LAYERS = os.environ.get("LAYERS", "full")


async def echo(self: Any, request: Any, context: Any) -> Any:
    """The kit's echo_server.py ModelInfer, line for line."""
    tensor = request.inputs[0]
    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    output = response.outputs.add()
    output.name = "OUTPUT__0"
    output.datatype = tensor.datatype
    output.shape.extend(tensor.shape)
    if request.raw_input_contents:
        response.raw_output_contents.append(request.raw_input_contents[0])
    return response


async def no_model(self: Any, inputs: Mapping[str, np.ndarray], **_: Any) -> Delivery:
    rows = models.check_inputs(self.spec, inputs)
    outputs = {t.name: np.zeros((rows, *[max(d, 1) for d in t.shape]), np.float32) for t in self.spec.outputs}
    return Delivery(outputs, rows, 0, BatchRecord(rows, 0, 0, 0))


async def runtime_only(self: Any, inputs: Mapping[str, np.ndarray], **_: Any) -> Delivery:
    rows = models.check_inputs(self.spec, inputs)
    return Delivery(dict(self.batcher._compute(inputs)), rows, 0, BatchRecord(rows, 0, 0, 0))


if LAYERS == "echo":
    servicer.InferenceServicer.ModelInfer = echo  # type: ignore[method-assign]
elif LAYERS == "plane":
    models.ServedModel.infer = no_model  # type: ignore[method-assign]
elif LAYERS == "runtime":
    models.ServedModel.infer = runtime_only  # type: ignore[method-assign]
elif LAYERS != "full":
    raise SystemExit(f"LAYERS must be echo, plane, runtime or full, got {LAYERS!r}")

sys.exit(hub.cli.main(sys.argv[1:]))
