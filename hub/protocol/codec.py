"""Tensors on the wire <-> numpy arrays: raw contents with zero-copy views, typed contents,
and the BYTES length-prefix encoding."""

from __future__ import annotations

import sys

import numpy as np

from hub.core.dataplane import InferRequest, InferResponse, RequestedOutput
from hub.datatypes import (
    NUMPY_DTYPES,
    check_bytes_count,
    check_bytes_element,
    datatype_of,
    element_count,
    encode_bytes,
    from_buffer,
)
from hub.errors import InvalidInput, shorten
from hub.limits import DEFAULT_LIMITS, Limits
from hub.protocol.generated import grpc_service_pb2 as pb
from hub.protocol.triton import model_inputs
from hub.spec import ModelSpec

if sys.byteorder != "little":  # pragma: no cover - every platform we ship on is little-endian
    raise ImportError("modelhub's zero-copy decoding assumes a little-endian host")

#: V2 datatype -> the InferTensorContents field that carries it (FP16/BF16 have none).
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

OutputTensor = pb.ModelInferResponse.InferOutputTensor


def decode_inputs(request: pb.ModelInferRequest, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """The request's inputs as numpy arrays, keyed by name.

    Raw contents are wrapped without copying (read-only views of the request's bytes). Every
    shape is checked against `limits` (and the whole request's element count) before its
    tensor is decoded. Raises InvalidInput naming the input for any inconsistency.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        typed = [t.name for t in request.inputs if t.HasField("contents")]
        if typed:
            raise InvalidInput(_mixed_message(typed[0]))
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "a request that uses raw contents must send one entry per input, in order"
        )
    arrays: dict[str, np.ndarray] = {}
    total = 0
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise InvalidInput(f"input '{shorten(name)}' appears more than once")
        datatype = tensor.datatype
        dtype = NUMPY_DTYPES.get(datatype)
        if dtype is None:
            raise InvalidInput(
                f"input '{shorten(name)}': unknown datatype '{shorten(datatype, 32)}'; "
                f"expected one of {', '.join(NUMPY_DTYPES)}"
            )
        shape = tuple(tensor.shape)
        count = element_count(name, shape, limits)
        total += count
        if total > limits.elements:
            raise InvalidInput(
                f"input '{shorten(name)}': the request's inputs hold more than {limits.elements} elements, "
                "this server's limit per request"
            )
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(_mixed_message(name))
            arrays[name] = from_buffer(name, datatype, shape, raw[index], limits)
        else:
            arrays[name] = _from_typed(name, datatype, dtype, shape, count, tensor.contents, limits)
    return arrays


def _mixed_message(name: str) -> str:
    return (
        f"input '{shorten(name)}' has typed contents but the request also carries raw_input_contents; "
        "use raw contents for every input or for none"
    )


def _from_typed(
    name: str,
    datatype: str,
    dtype: np.dtype,
    shape: tuple[int, ...],
    count: int,
    contents: pb.InferTensorContents,
    limits: Limits,
) -> np.ndarray:
    field = TYPED_FIELDS.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{shorten(name)}': {datatype} has no typed contents field; send it as raw contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input '{shorten(name)}': expected {count} values in contents.{field} for shape "
            f"{list(shape)[:16]}, got {len(values)}"
        )
    if datatype == "BYTES":
        check_bytes_count(name, count, limits)
        array = np.empty(count, dtype=np.object_)
        for index, value in enumerate(values):
            check_bytes_element(name, index, len(value), limits)
            array[index] = value
        return array.reshape(shape)
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InvalidInput(f"input '{shorten(name)}': a value in contents.{field} does not fit {datatype}") from None


def requested_outputs(request: pb.ModelInferRequest) -> list[RequestedOutput]:
    """The outputs the request names, with the classification extension's `class_count`
    (tritonclient sends it as the output parameter `classification`)."""
    out = []
    for output in request.outputs:
        count = 0
        if "classification" in output.parameters:
            count = int(output.parameters["classification"].int64_param)
        out.append(RequestedOutput(output.name, count))
    return out


def decode_request(request: pb.ModelInferRequest, spec: ModelSpec, limits: Limits = DEFAULT_LIMITS) -> InferRequest:
    return InferRequest(model_inputs(spec, decode_inputs(request, limits)), requested_outputs(request))


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    """A response with every output as raw contents, echoing the request's id."""
    tensors = []
    raw = []
    for name, array in response.outputs:
        datatype = datatype_of(array)
        tensors.append(OutputTensor(name=name, datatype=datatype, shape=array.shape))
        raw.append(encode_bytes(array) if datatype == "BYTES" else array.tobytes())
    return pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        outputs=tensors,
        raw_output_contents=raw,
    )
