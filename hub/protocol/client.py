"""Decoding a ModelInferResponse into numpy arrays (for `modelhub infer` and tests)."""

from __future__ import annotations

import math

import numpy as np

from hub.datatypes import NUMPY_DTYPES, decode_bytes
from hub.protocol.generated import grpc_service_pb2 as pb


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output of a response, from raw contents (which modelhub always sends)."""
    out: dict[str, np.ndarray] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        shape = tuple(tensor.shape)
        if tensor.datatype == "BYTES":
            out[tensor.name] = decode_bytes(raw, math.prod(shape), tensor.name).reshape(shape)
        else:
            out[tensor.name] = np.frombuffer(raw, dtype=NUMPY_DTYPES[tensor.datatype]).reshape(shape)
    return out
