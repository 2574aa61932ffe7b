"""REST bodies <-> numpy arrays: JSON tensors, and Triton's binary tensor extension.

A binary request is a JSON header (its length in the `Inference-Header-Content-Length` HTTP
header) followed by each binary input's bytes, in the order of `inputs`, each input giving
its size in `parameters.binary_data_size`. Binary inputs become zero-copy, read-only numpy
views of the request body (through hub.datatypes.from_buffer, as gRPC's raw contents do).
Outputs go back as binary when the request asks (`parameters.binary_data_output`, or an
output's `parameters.binary_data`), else as JSON `data`. FP16 and BF16 have no JSON form.

Triton's shared-memory extension: an input or requested output whose parameters carry
`shared_memory_region` and `shared_memory_byte_size` (and optionally `shared_memory_offset`)
is read from, or written into, that registered region; such an output comes back with no
`data` and no binary part.
"""

from __future__ import annotations

import gc
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hub.core.dataplane import InferRequest, InferResponse, RequestedOutput
from hub.datatypes import (
    NUMPY_DTYPES,
    check_bytes_count,
    check_bytes_element,
    check_total_elements,
    datatype_of,
    element_count,
    encode_bytes,
    from_buffer,
)
from hub.errors import InvalidInput, TooLarge
from hub.limits import DEFAULT_LIMITS, Limits
from hub.protocol.triton import model_inputs
from hub.shm import Holds
from hub.spec import ModelSpec

HEADER_LENGTH = "Inference-Header-Content-Length"

#: Datatypes that travel only as binary data (the spec gives them no JSON representation).
BINARY_ONLY = frozenset({"FP16", "BF16"})

#: The largest `timeout` parameter (microseconds): Triton's is a uint64, as the gRPC parameter
#: is, and a larger JSON integer has no float to become.
MAX_TIMEOUT = (1 << 64) - 1

#: What the JSON literals NaN, Infinity and -Infinity parse to: these very objects, so that an
#: infinity the client wrote can be told from one a number too large for a double (1e999)
#: became. Triton's parser (RapidJSON with kParseNanAndInfFlag) takes the literals, as we do,
#: and refuses such a number, as we do (`_overflowed`).
_LITERALS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_LITERAL_IDS = frozenset(id(value) for value in _LITERALS.values())
_DECODER = json.JSONDecoder(parse_constant=_LITERALS.__getitem__)


@dataclass
class RestRequest:
    """An inference request's JSON header, parsed and checked, with the body its binary
    inputs are read from."""

    id: str
    inputs: list[Mapping[str, Any]]
    outputs: list[RequestedOutput]
    binary_outputs: dict[str, bool]  # per requested output; missing: `binary_default`
    binary_default: bool
    body: memoryview
    binary_start: int
    parameters: Mapping[str, Any] = field(default_factory=dict)
    #: Requested outputs to write into shared memory: name -> (region, offset, byte_size).
    shared_outputs: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    @property
    def timeout(self) -> float | None:
        """Triton's `timeout` request parameter (microseconds) as seconds, or None."""
        value = self.parameters.get("timeout")
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TIMEOUT:
            raise InvalidInput(
                f"parameters.timeout must be an integer of microseconds from 0 to 2^64-1, got {str(value)[:32]!r}"
            )
        return value / 1e6 if value else None


def json_too_large(limit: int) -> str:
    return (
        f"the request's JSON is larger than the server's limit of {limit} bytes (--max-json-bytes); "
        "send large tensors as binary data (Triton's binary tensor extension: binary_data_size)"
    )


def load_json(raw: bytes) -> Any:
    """A request body's JSON; InvalidInput (400) when it is not JSON, when it nests arrays and
    objects deeper than the parser's recursion allows (`[[[[` costs a byte a level, and must
    not cost a 500 and a traceback in the log), or when an integer has more digits than Python
    converts (sys.get_int_max_str_digits(), 4300 by default).

    It runs on the event loop, and must: json's C parser holds the GIL until it is done, so
    parsing in a thread would hold the loop as long (measured: a 1 s parse in a thread held a
    1 ms timer on the main thread for 0.9 s), and several parses at once, each up to ~60x its
    input in Python objects, would multiply the memory. What bounds both is the size of the
    JSON: Limits.json_bytes, and CONTROL_BODY (hub/protocol/rest/app.py).

    The cyclic garbage collector is off while it parses: a JSON document has no cycles to
    collect, but every 700 new lists or dicts would start a collection that walks the growing
    tree again. 8 MiB of `[[0]],...` parsed in 1.44 s with it and 0.25 s without, plus one
    collection of 0.14 s when the next allocation starts it."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {str(exc)[:120]}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {str(exc)[:120]}") from None
    except ValueError:  # int()'s refusal, whose message names sys.set_int_max_str_digits()
        raise InvalidInput(
            f"request body has a JSON integer of more than {sys.get_int_max_str_digits()} digits"
        ) from None
    except RecursionError:
        raise InvalidInput("request body nests JSON arrays or objects too deeply to be parsed") from None
    finally:
        if collecting:
            gc.enable()


#: What a parsed JSON value was, in JSON's words, for messages (a bool before int: it is one).
_JSON_KINDS: tuple[tuple[type, str], ...] = (
    (dict, "an object"),
    (list, "an array"),
    (str, "a string"),
    (bool, "a boolean"),
    (int, "a number"),
    (float, "a number"),
    (type(None), "null"),
)


def _json_kind(value: Any) -> str:
    return next((kind for cls, kind in _JSON_KINDS if isinstance(value, cls)), type(value).__name__)


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {_json_kind(value)}")
    return value


def parameters_of(item: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    """The `parameters` of a JSON object (a request, an input, a requested output, a load
    request's body): {} when it has none, or null; InvalidInput naming `what` when they are
    anything else but a JSON object. "", [], 0 and false are refused, not read as {}: Triton
    refuses them too, and a client that sent them meant something we would silently drop.
    null is absent, as KServe's and MLServer's servers read it (their pydantic models' fields
    are Optional, and a client built on those models writes null for a field it leaves out);
    Triton ignores it on an input or output, and refuses it on a request."""
    value = item.get("parameters")
    if value is None:
        return {}
    return _object(value, f"{what}: parameters")


def parse_request(body: bytes, header_length: str | None, limits: Limits = DEFAULT_LIMITS) -> RestRequest:
    """The request's JSON header, checked; InvalidInput (400) naming the field otherwise, and
    TooLarge (413) when the JSON is longer than `limits.json_bytes`."""
    view = memoryview(body)
    if header_length is None:
        length = len(view)
    else:
        # Decimal digits only: int() would also take "5_0", "+50" and " 50 ", and read 5,000
        # digits before it refused them.
        if not (header_length.isascii() and header_length.isdigit() and len(header_length) <= 20):
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header_length[:32]!r}")
        length = int(header_length)
        if not 0 < length <= len(view):
            raise InvalidInput(f"{HEADER_LENGTH} is {length}, but the request body has {len(view)} bytes")
    if length > limits.json_bytes:
        raise TooLarge(json_too_large(limits.json_bytes))
    header = _object(load_json(view[:length].tobytes() if header_length is not None else body), "the request body")
    request_id = header.get("id")
    if request_id is None:  # absent, or null as a pydantic-built KServe request writes it (parameters_of)
        request_id = ""
    elif not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = parameters_of(header, "request")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput("parameters.binary_data_output must be true or false")
    outputs, binary, shared = _requested_outputs(header.get("outputs"))
    return RestRequest(
        request_id,
        [_object(t, f"inputs[{i}]") for i, t in enumerate(inputs)],
        outputs,
        binary,
        binary_default,
        view,
        length,
        parameters,
        shared,
    )


SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_BYTE_SIZE = "shared_memory_byte_size"


def shared_memory_parameters(what: str, parameters: Mapping[str, Any]) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) when a tensor's parameters name shared memory, else None;
    InvalidInput when they are incomplete or of the wrong JSON types."""
    if SHM_REGION not in parameters and SHM_BYTE_SIZE not in parameters:
        if SHM_OFFSET in parameters:
            raise InvalidInput(f"{what}: {SHM_OFFSET} without {SHM_REGION} and {SHM_BYTE_SIZE}")
        return None
    if SHM_REGION not in parameters or SHM_BYTE_SIZE not in parameters:
        raise InvalidInput(f"{what}: shared memory needs both {SHM_REGION} and {SHM_BYTE_SIZE}")
    region = parameters[SHM_REGION]
    if not isinstance(region, str):
        raise InvalidInput(f"{what}: {SHM_REGION} must be a string")
    values = []
    for key, default in ((SHM_OFFSET, 0), (SHM_BYTE_SIZE, None)):
        value = parameters.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidInput(f"{what}: {key} must be a non-negative integer")
        values.append(value)
    return region, values[0], values[1]


def _requested_outputs(value: Any) -> tuple[list[RequestedOutput], dict[str, bool], dict[str, tuple[str, int, int]]]:
    if value is None:
        return [], {}, {}
    if not isinstance(value, list):
        raise InvalidInput("'outputs' must be a list of requested outputs")
    outputs, binary, shared = [], {}, {}
    for index, item in enumerate(value):
        item = _object(item, f"outputs[{index}]")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"outputs[{index}].name must be a string")
        parameters = parameters_of(item, f"output '{name[:128]}'")
        location = shared_memory_parameters(f"output '{name[:128]}'", parameters)
        if location is not None:
            shared[name] = location
        count = parameters.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool):
            raise InvalidInput(f"output '{name[:128]}': parameters.classification must be an integer")
        flag = parameters.get("binary_data")
        if flag is not None:
            if not isinstance(flag, bool):
                raise InvalidInput(f"output '{name[:128]}': parameters.binary_data must be true or false")
            binary[name] = flag
        outputs.append(RequestedOutput(name, count))
    return outputs, binary, shared


def decode_inputs(
    request: RestRequest, limits: Limits = DEFAULT_LIMITS, holds: Holds | None = None
) -> dict[str, np.ndarray]:
    """The request's inputs as numpy arrays: binary ones as views of the body, those in shared
    memory as views of their region (held by `holds`), JSON ones converted once. Raises
    InvalidInput naming the input."""
    arrays: dict[str, np.ndarray] = {}
    body, offset = request.body, request.binary_start
    total = 0
    for index, tensor in enumerate(request.inputs):
        name = tensor.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"inputs[{index}].name must be a string")
        if name in arrays:
            raise InvalidInput(f"input '{name[:128]}' appears more than once")
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"input '{name[:128]}': 'datatype' must be a string")
        shape = _shape(name, tensor.get("shape"))
        total += element_count(name, shape, limits)
        check_total_elements(name, total, limits)
        parameters = parameters_of(tensor, f"input '{name[:128]}'")
        location = shared_memory_parameters(f"input '{name[:128]}'", parameters) if parameters else None
        if location is not None:
            if "data" in tensor or "binary_data_size" in parameters:
                raise InvalidInput(f"input '{name[:128]}' is in shared memory and also has data; send one or the other")
            arrays[name] = (holds or Holds(None)).read(name, datatype, shape, *location, limits)
            continue
        size = parameters.get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise InvalidInput(
                    f"input '{name[:128]}' has both 'data' and parameters.binary_data_size; send one or the other"
                )
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input '{name[:128]}': binary_data_size must be a non-negative integer")
            if offset + size > len(body):
                raise InvalidInput(
                    f"input '{name[:128]}': binary_data_size {size} runs past the end of the request body "
                    f"({len(body) - offset} bytes of binary data left)"
                )
            arrays[name] = from_buffer(name, datatype, shape, body[offset : offset + size], limits)
            offset += size
        elif "data" in tensor:
            arrays[name] = _from_json(name, datatype, shape, tensor["data"], limits)
        else:
            raise InvalidInput(f"input '{name[:128]}' has neither 'data' nor parameters.binary_data_size")
    if offset != len(body):
        raise InvalidInput(
            f"the request body has {len(body) - offset} bytes after the binary inputs; "
            "the binary_data_size of the inputs must add up to the binary data sent"
        )
    return arrays


def _shape(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidInput(f"input '{name[:128]}': 'shape' must be a list of integers, got {str(value)[:64]}")
    return tuple(value)


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any, limits: Limits) -> np.ndarray:
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(
            f"input '{name[:128]}': unknown datatype '{datatype[:32]}'; expected one of {', '.join(NUMPY_DTYPES)}"
        )
    if datatype in BINARY_ONLY:
        raise InvalidInput(
            f"input '{name[:128]}': {datatype} has no JSON representation; send it as binary data "
            "(parameters.binary_data_size)"
        )
    count = element_count(name, shape, limits)
    if not isinstance(data, list):
        data = [data]
    try:
        if datatype == "BYTES":  # the limits raw BYTES contents have, on the element count and each size
            check_bytes_count(name, count, limits)
            values = _flatten(data)  # bounded by the body; checked before the array is allocated
            if len(values) != count:
                raise InvalidInput(_count_message(name, count, shape, len(values)))
            flat = np.empty(count, dtype=np.object_)
            for i, value in enumerate(values):
                if not isinstance(value, str):
                    raise InvalidInput(f"input '{name[:128]}': BYTES data must be strings, element {i} is not")
                encoded = value.encode()
                check_bytes_element(name, i, len(encoded), limits)
                flat[i] = encoded
            return flat.reshape(shape)
        # A finite number past the type's range (1e39 for FP32) is refused like an integer
        # that does not fit, not turned into an infinity; "Infinity" and "NaN" stay as sent.
        with np.errstate(over="raise", invalid="raise"):
            array = _numbers(name, datatype, dtype, data)
    except (OverflowError, TypeError, ValueError, FloatingPointError):
        raise InvalidInput(f"input '{name[:128]}': a value in 'data' does not fit {datatype}") from None
    if array.size != count:
        raise InvalidInput(_count_message(name, count, shape, array.size))
    return array.reshape(shape)


def _numbers(name: str, datatype: str, dtype: np.dtype[Any], data: list[Any]) -> np.ndarray:
    """The values of a numeric or BOOL tensor's JSON `data` as a flat or nested array of `dtype`.
    They must be JSON numbers (integers for an integer tensor; true and false for BOOL, and only
    for BOOL): numpy would read "1.5", " 7 " or "inf" as numbers, null as NaN, 1.5 for INT32 as
    1, and true for FP32 as 1.0.

    Flat data of a float tensor, as tritonclient and the KServe SDK send it, is checked by Python's
    sum (TypeError for anything else; not finite when a value is not) and converted once. Other
    data has numpy find the values' own type first, which tells strings, nulls and objects from
    numbers without a walk in Python. (numpy's reductions, which that path needs, cost 5-8 µs a
    call in a server that idles between requests: more than summing 64 values in Python.)"""
    if dtype.kind == "f":  # (an integer tensor takes the path below, which tells 1.5 from 1)
        try:
            total = sum(data)
        except TypeError:  # nested, or not all numbers: the general path below tells which
            pass
        else:
            if bool in set(map(type, data)):  # sum takes true as 1
                raise InvalidInput(f"input '{name[:128]}': {datatype} data must be JSON numbers, not true or false")
            if not _finite_number(total) and _overflowed(data):
                raise ValueError("a number past a double's range")
            return np.array(data, dtype=dtype)  # OverflowError or FloatingPointError past the type
    try:
        array = np.array(data)
    except ValueError:  # ragged, or nested deeper than numpy's dimensions: the values in order
        data = _flatten(data)
        array = np.array(data)
    kind = array.dtype.kind
    if not array.size:
        return array.astype(dtype)
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidInput(f"input '{name[:128]}': BOOL data must be true or false")
        return array
    integers = dtype.kind in "iu"
    if kind == "b" or (kind in "iuf" and bool in set(map(type, _flatten(data)))):
        # numpy makes 1 of true beside an integer ([1, true]) and 1.0 beside a float; Triton refuses both
        raise InvalidInput(f"input '{name[:128]}': {datatype} data must be JSON {_kind(integers)}, not true or false")
    if kind == "O":  # integers past 64 bits, or values that are not numbers (null, objects)
        data = _flatten(data)
        if not all(type(value) in ((int,) if integers else (int, float)) for value in data):
            raise InvalidInput(f"input '{name[:128]}': {datatype} data must be JSON {_kind(integers)}")
        if _overflowed(data):
            raise ValueError("a number past a double's range")
        return np.array(data, dtype=dtype)  # OverflowError for an integer past the type
    if kind not in "biuf":  # strings ("U"), which numpy would have parsed
        raise InvalidInput(f"input '{name[:128]}': {datatype} data must be JSON numbers, not strings")
    if integers and kind in "bf":  # 1.5 would become 1, and true 1, without a word (Triton refuses both)
        data = _flatten(data)  # (numpy makes float64 of integers too when one is past INT64: [0, 2**64 - 1])
        if kind == "b" or not all(type(value) is int for value in data):
            raise InvalidInput(f"input '{name[:128]}': {datatype} data must be JSON {_kind(integers)}")
        return np.array(data, dtype=dtype)  # OverflowError for an integer past the type
    if kind == "f":
        try:
            finite = math.isfinite(array.sum())
        except FloatingPointError:  # inf - inf, or finite values whose sum overflows: look closer
            finite = False
        if not finite and _overflowed(data):
            raise ValueError("a number past a double's range")
    elif integers:  # astype would wrap an integer past the type around
        info = np.iinfo(dtype)
        if int(array.min()) < info.min or int(array.max()) > info.max:
            raise OverflowError(f"an integer past {datatype}")
    return array.astype(dtype)


def _kind(integers: bool) -> str:
    return "integers" if integers else "numbers"


def _finite_number(total: float) -> bool:
    """Whether a sum of JSON numbers is finite (not when a value was NaN or infinite, or when
    finite values add up past a double: the caller looks closer then)."""
    try:
        return math.isfinite(total)
    except OverflowError:  # an integer sum past a double
        return False


def _overflowed(data: list[Any]) -> bool:
    """Whether a value is an infinity that a number too large for a double (1e999) became,
    rather than the literal Infinity or -Infinity (_LITERALS)."""
    return any(type(value) is float and math.isinf(value) and id(value) not in _LITERAL_IDS for value in _flatten(data))


def _count_message(name: str, count: int, shape: tuple[int, ...], got: int) -> str:
    return f"input '{name[:128]}': expected {count} values in 'data' for shape {list(shape)}, got {got}"


def _flatten(data: list[Any]) -> list[Any]:
    """The values of nested lists in row-major order, however deep or ragged the nesting (as
    Triton reads JSON tensor data); without recursion, so depth costs no stack."""
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def decode_request(
    request: RestRequest, spec: ModelSpec, limits: Limits = DEFAULT_LIMITS, holds: Holds | None = None
) -> InferRequest:
    inputs = model_inputs(spec, decode_inputs(request, limits, holds))
    outputs = request.outputs
    if request.shared_outputs:
        holds = holds or Holds(None)
        outputs = [
            RequestedOutput(o.name, o.class_count, holds.output(o.name, *request.shared_outputs[o.name]))
            if o.name in request.shared_outputs
            else o
            for o in outputs
        ]
    return InferRequest(inputs, outputs, request.parameters)


#: JSON values (and BYTES elements) of an answer that are rendered on the event loop: 0.3-0.6 µs
#: each, so at most ~15 ms. Past it the data plane encodes the answer in a worker thread
#: (`encoding_is_heavy`), and its JSON data is rendered in slices of `JSON_SLICE` values, each a
#: few milliseconds under the GIL: json's C encoder holds the GIL for a whole list, so a 64 MiB
#: FP32 tensor answered as JSON (16 M values, 320 MB of text) held the event loop, and every
#: other request, for 9 s, and cost 2 GB, as one list of Python floats and one string.
INLINE_ENCODE_VALUES = 1 << 15
JSON_SLICE = 1 << 13


def encoding_is_heavy(request: RestRequest, response: InferResponse) -> bool:
    """Whether encoding `response` takes more per-value work than the event loop should do:
    more than INLINE_ENCODE_VALUES values to render as JSON or BYTES elements to split."""
    shared = response.in_shared_memory
    values = 0
    for name, array in response.outputs:
        if (shared and name in shared) or not isinstance(array, np.ndarray):
            continue
        datatype = datatype_of(array)
        if datatype == "BYTES" or (
            datatype not in BINARY_ONLY and not request.binary_outputs.get(name, request.binary_default)
        ):
            values += array.size
    return values > INLINE_ENCODE_VALUES


#: json.dumps with keyword arguments builds an encoder per call; this one is built once.
_ENCODER = json.JSONEncoder(allow_nan=True, separators=(",", ":"))


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def encode_response(request: RestRequest, response: InferResponse) -> tuple[bytes, int | None]:
    """The response body and, when it carries binary outputs, the JSON header's length. The
    JSON is that of `{"model_name", "model_version", ["id",] "outputs"}` as json.dumps writes it
    compactly; an output with many values has its `data` rendered a slice at a time
    (`_json_data`) and spliced in."""
    outputs: list[dict[str, Any]] = []
    sliced: dict[int, tuple[bytes, ...]] = {}  # by output: its data's JSON text, in pieces
    chunks: list[bytes] = []
    shared = response.in_shared_memory
    for name, array in response.outputs:
        datatype = datatype_of(array)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        outputs.append(tensor)
        if shared and name in shared:
            continue  # written into its shared memory: no data here
        data = None
        if not request.binary_outputs.get(name, request.binary_default) and datatype not in BINARY_ONLY:
            data = _json_data(array, datatype)
        if data is None:
            raw = encode_bytes(array) if datatype == "BYTES" else array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif isinstance(data, tuple):
            sliced[len(outputs) - 1] = data
        else:
            tensor["data"] = data
    header: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        header["id"] = response.id
    if not sliced:  # (the small answers: one encoder call)
        header["outputs"] = outputs
        text = _dumps(header)
    else:
        tensors = [
            b"".join([_dumps(tensor)[:-1], b',"data":', *sliced[i], b"}"]) if i in sliced else _dumps(tensor)
            for i, tensor in enumerate(outputs)
        ]
        text = b"".join([_dumps(header)[:-1], b',"outputs":[', b",".join(tensors), b"]}"])
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)


def _json_data(array: np.ndarray, datatype: str) -> list[Any] | tuple[bytes, ...] | None:
    """An output's values as one flat JSON list: the values (a list), or for more than
    JSON_SLICE of them the list's JSON text in pieces (a tuple), each rendered from one slice so
    that no single call holds the GIL for the whole tensor. None when it has no JSON form (BYTES
    that are not UTF-8, floats that are not finite), so that it goes back as binary."""
    flat = array.reshape(-1)
    if flat.size <= JSON_SLICE:
        return _to_json(flat, datatype)
    if array.dtype.kind == "f" and not np.isfinite(flat).all():
        return None  # JSON has no NaN or infinity
    pieces = [b"["]
    for start in range(0, flat.size, JSON_SLICE):
        values = _to_json(flat[start : start + JSON_SLICE], datatype, check=False)
        if values is None:
            return None
        if start:
            pieces.append(b",")
        pieces.append(_dumps(values)[1:-1])
    pieces.append(b"]")
    return tuple(pieces)


def _to_json(flat: np.ndarray, datatype: str, check: bool = True) -> list[Any] | None:
    """Values of a flat output as a JSON list; None when they have no JSON form (BYTES that are
    not UTF-8; with `check`, floats that are not finite)."""
    if datatype == "BYTES":
        try:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in flat]
        except UnicodeDecodeError:
            return None
    values = flat.tolist()
    if check and flat.dtype.kind == "f" and not all(math.isfinite(v) for v in values):
        return None  # JSON has no NaN or infinity
    return values
