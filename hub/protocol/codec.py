"""Tensors on the wire <-> numpy arrays: raw contents with zero-copy views, typed contents,
the BYTES length-prefix encoding, and tensors in shared memory (Triton's extension: the
`shared_memory_region`, `_offset` and `_byte_size` parameters of an input or output)."""

from __future__ import annotations

import sys

import numpy as np

from hub.core.dataplane import InferRequest, InferResponse, RequestedOutput
from hub.datatypes import (
    MAX_DIMS,
    NUMPY_DTYPES,
    check_bytes_count,
    check_bytes_element,
    check_total_elements,
    datatype_of,
    element_count,
    encode_bytes,
    from_buffer,
    rank_error,
    view_of,
)
from hub.errors import InvalidInput, shorten
from hub.limits import DEFAULT_LIMITS, Limits
from hub.protocol.generated import grpc_service_pb2 as pb
from hub.protocol.packed import TooMany, from_typed
from hub.protocol.triton import model_inputs
from hub.shm import Holds
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


SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_BYTE_SIZE = "shared_memory_byte_size"


def shared_memory_parameters(what: str, parameters: object) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) when a tensor's parameters name shared memory, else None.
    Region and byte size come together (offset defaults to 0), with the types tritonclient
    sends (string_param; int64_param, or uint64_param); InvalidInput otherwise."""
    if SHM_REGION not in parameters and SHM_BYTE_SIZE not in parameters:  # type: ignore[operator]
        if SHM_OFFSET in parameters:  # type: ignore[operator]
            raise InvalidInput(f"{what}: {SHM_OFFSET} without {SHM_REGION} and {SHM_BYTE_SIZE}")
        return None
    if SHM_REGION not in parameters or SHM_BYTE_SIZE not in parameters:  # type: ignore[operator]
        raise InvalidInput(f"{what}: shared memory needs both {SHM_REGION} and {SHM_BYTE_SIZE}")
    region = parameters[SHM_REGION]  # type: ignore[index]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"{what}: {SHM_REGION} must be a string_param")
    offset = _integer(what, SHM_OFFSET, parameters[SHM_OFFSET]) if SHM_OFFSET in parameters else 0  # type: ignore[operator,index]
    return region.string_param, offset, _integer(what, SHM_BYTE_SIZE, parameters[SHM_BYTE_SIZE])  # type: ignore[index]


def request_timeout(request: pb.ModelInferRequest, time_remaining: float | None) -> float | None:
    """How long the request may wait, in seconds, or None: Triton's `timeout` request parameter
    (microseconds, as tritonclient's `infer(timeout=...)` sends it; 0 is none) and the call's
    gRPC deadline, whichever ends first. InvalidInput for a parameter of the wrong type."""
    if not request.parameters or "timeout" not in request.parameters:
        return time_remaining
    microseconds = _integer("request parameters", "timeout", request.parameters["timeout"])
    if not microseconds:
        return time_remaining
    return microseconds / 1e6 if time_remaining is None else min(microseconds / 1e6, time_remaining)


def _names_shared_memory(parameters: object) -> bool:
    return SHM_REGION in parameters or SHM_BYTE_SIZE in parameters or SHM_OFFSET in parameters  # type: ignore[operator]


def _integer(what: str, key: str, parameter: pb.InferParameter) -> int:
    choice = parameter.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"{what}: {key} must be an int64_param (or uint64_param)")
    value = int(getattr(parameter, choice))
    if value < 0:
        raise InvalidInput(f"{what}: {key} must not be negative, got {value}")
    return value


def decode_inputs(
    request: pb.ModelInferRequest, limits: Limits = DEFAULT_LIMITS, holds: Holds | None = None
) -> dict[str, np.ndarray]:
    """The request's inputs as numpy arrays, keyed by name.

    Raw contents are wrapped without copying (read-only views of the request's bytes), and so
    are inputs in system shared memory (views of the region, which `holds` keeps). Every
    shape is checked against `limits` (and the whole request's element count) before its
    tensor is decoded. Raises InvalidInput naming the input for any inconsistency.
    """
    raw = request.raw_input_contents
    shared = [t for t in request.inputs if t.parameters and _names_shared_memory(t.parameters)]
    if shared:
        return _decode_shared(request, shared, limits, holds)
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
        shape = _shape(name, tensor)
        count = element_count(name, shape, limits)
        total += count
        check_total_elements(name, total, limits)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(_mixed_message(name))
            arrays[name] = view_of(name, datatype, dtype, shape, count, raw[index], limits)
        else:
            arrays[name] = _from_typed(name, datatype, dtype, shape, count, tensor.contents, limits)
    return arrays


def _decode_shared(
    request: pb.ModelInferRequest,
    shared: list[pb.ModelInferRequest.InferInputTensor],
    limits: Limits,
    holds: Holds | None,
) -> dict[str, np.ndarray]:
    """Inputs of which some are in shared memory: the others come, in order, from raw
    contents (one entry per input not in shared memory, as Triton counts them) or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs) - len(shared):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs) - len(shared)} inputs not in "
            "shared memory; send one entry per such input, in order"
        )
    arrays: dict[str, np.ndarray] = {}
    index = 0
    total = 0
    for tensor in request.inputs:
        name = tensor.name
        if name in arrays:
            raise InvalidInput(f"input '{shorten(name)}' appears more than once")
        what = f"input '{shorten(name)}'"
        shape = _shape(name, tensor)
        total += element_count(name, shape, limits)
        check_total_elements(name, total, limits)
        location = shared_memory_parameters(what, tensor.parameters)
        if location is not None:
            if tensor.HasField("contents"):
                raise InvalidInput(f"{what} is in shared memory and also has contents; send one or the other")
            if holds is None:
                holds = Holds(None)  # raises Unsupported: shared memory is off
            arrays[name] = holds.read(name, tensor.datatype, shape, *location, limits)
        elif raw:
            if tensor.HasField("contents"):
                raise InvalidInput(_mixed_message(name))
            arrays[name] = from_buffer(name, tensor.datatype, shape, raw[index], limits)
            index += 1
        else:
            dtype = NUMPY_DTYPES.get(tensor.datatype)
            if dtype is None:
                raise InvalidInput(f"{what}: unknown datatype '{shorten(tensor.datatype, 32)}'")
            count = element_count(name, shape, limits)
            arrays[name] = _from_typed(name, tensor.datatype, dtype, shape, count, tensor.contents, limits)
    return arrays


def _shape(name: str, tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    """The input's shape, its rank checked first: a packed shape of 60 M dims (one entry on
    the wire) would cost 440 MB as a tuple before element_count refused it."""
    dims = tensor.shape
    if len(dims) > MAX_DIMS:
        raise rank_error(name, len(dims))
    return tuple(dims)


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
        return from_typed(contents, field, dtype, count, limits.typed_values).reshape(shape)
    except TooMany:
        raise InvalidInput(
            f"input '{shorten(name)}': {count} values in contents.{field} are more than the "
            f"{limits.typed_values} the server converts one by one; send large tensors as "
            "raw_input_contents (tritonclient does)"
        ) from None
    except OverflowError:
        raise InvalidInput(f"input '{shorten(name)}': a value in contents.{field} does not fit {datatype}") from None


def requested_outputs(request: pb.ModelInferRequest, holds: Holds | None = None) -> list[RequestedOutput]:
    """The outputs the request names, with the classification extension's `class_count`
    (tritonclient sends it as the output parameter `classification`) and the shared memory
    each is to be written into (checked against its region now, held by `holds`)."""
    out = []
    for output in request.outputs:
        count = 0
        target = None
        parameters = output.parameters
        if parameters:
            if "classification" in parameters:  # int64 or uint64 as `timeout` is; not a string read as 0
                count = _integer(f"output '{shorten(output.name)}'", "classification", parameters["classification"])
            location = shared_memory_parameters(f"output '{shorten(output.name)}'", parameters)
            if location is not None:
                target = (holds or Holds(None)).output(output.name, *location)
        out.append(RequestedOutput(output.name, count, target))
    return out


def decode_request(
    request: pb.ModelInferRequest, spec: ModelSpec, limits: Limits = DEFAULT_LIMITS, holds: Holds | None = None
) -> InferRequest:
    return InferRequest(model_inputs(spec, decode_inputs(request, limits, holds)), requested_outputs(request, holds))


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    """A response with every output as raw contents, echoing the request's id. An output
    written into shared memory is described with an empty raw entry, as Triton does."""
    tensors = []
    raw = []
    shared = response.in_shared_memory
    for name, array in response.outputs:
        datatype = datatype_of(array)
        tensors.append(OutputTensor(name=name, datatype=datatype, shape=array.shape))
        if shared and name in shared:
            raw.append(b"")
        else:
            raw.append(encode_bytes(array) if datatype == "BYTES" else array.tobytes())
    return pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        outputs=tensors,
        raw_output_contents=raw,
    )
