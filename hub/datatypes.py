"""The V2 inference datatypes: their numpy dtypes and the BYTES wire encoding."""

from __future__ import annotations

import struct
from typing import Any

import ml_dtypes
import numpy as np

from hub.errors import InvalidInput, shorten
from hub.limits import DEFAULT_LIMITS, Limits

#: V2 datatype name -> numpy dtype. BYTES travels as an object array of `bytes`.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(np.object_),
}
DATATYPES = frozenset(NUMPY_DTYPES)
_BY_DTYPE = {dtype: name for name, dtype in NUMPY_DTYPES.items()}

#: V2 datatype -> the Triton model-config enum value (`TYPE_*`).
CONFIG_TYPE_NAMES: dict[str, str] = {name: f"TYPE_{name}" for name in DATATYPES}
CONFIG_TYPE_NAMES["BYTES"] = "TYPE_STRING"


#: torch dtypes by name, for inputs that stay on the device (CUDA shared memory): no torch import here.
_TORCH_TYPES = {
    "torch.bool": "BOOL",
    "torch.uint8": "UINT8",
    "torch.uint16": "UINT16",
    "torch.uint32": "UINT32",
    "torch.uint64": "UINT64",
    "torch.int8": "INT8",
    "torch.int16": "INT16",
    "torch.int32": "INT32",
    "torch.int64": "INT64",
    "torch.float16": "FP16",
    "torch.float32": "FP32",
    "torch.float64": "FP64",
    "torch.bfloat16": "BF16",
}


def v2_name(value: Any) -> str | None:
    """The V2 datatype a numpy or torch dtype (or its name) stands for: "float32", np.float32
    and torch.float32 are "FP32"; "fp32" is too; str, bytes and "string" are "BYTES". None when it
    stands for none."""
    text = str(value)
    if text.upper() in DATATYPES:
        return text.upper()
    if text in _TORCH_TYPES:
        return _TORCH_TYPES[text]
    if text == "bfloat16":
        return "BF16"
    if value in (str, bytes, object) or text.lower() in ("str", "string", "bytes", "object"):
        return "BYTES"
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError):
        return None
    return None if dtype == np.dtype(np.object_) else _BY_DTYPE.get(dtype)


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name of a numpy array (or of a torch tensor on the device); TypeError
    when it has none."""
    if not isinstance(array, np.ndarray):
        # A torch tensor, or where a frontend of --workers N knows a tensor lies (its datatype).
        name = getattr(array, "datatype", None) or _TORCH_TYPES.get(str(getattr(array, "dtype", "")))
        if name is None:
            raise TypeError(f"{type(array).__name__} of dtype {getattr(array, 'dtype', '?')} has no V2 datatype")
        return name
    try:
        return _BY_DTYPE[array.dtype]
    except KeyError:
        if array.dtype.kind in "SU":
            return "BYTES"
        raise TypeError(f"numpy dtype {array.dtype} has no V2 datatype") from None


#: The most dimensions a tensor may have: numpy 1's limit (numpy 2 allows 64), far past any
#: model's, so that a shape numpy cannot represent is refused by name, not failed in a reshape.
MAX_DIMS = 32


def rank_error(name: str, rank: int) -> InvalidInput:
    """The error for a shape of `rank` > MAX_DIMS dimensions, naming the input."""
    return InvalidInput(f"input '{shorten(name)}': shape has {rank} dimensions; this server takes at most {MAX_DIMS}")


def element_count(name: str, shape: tuple[int, ...], limits: Limits = DEFAULT_LIMITS) -> int:
    """The number of elements of a tensor's shape, checked before anything is allocated
    (InvalidInput naming the input): at most MAX_DIMS dimensions, none negative, and no
    dimension, nor product of the non-zero dimensions, above `limits.elements` (a shape with a
    zero dim holds nothing, but numpy cannot represent one whose other dims overflow)."""
    if len(shape) > MAX_DIMS:
        raise rank_error(name, len(shape))
    if shape and min(shape) < 0:
        raise InvalidInput(f"input '{shorten(name)}': shape {_shape_text(shape)} has a negative dimension")
    nonzero = 1
    for d in shape:
        if d:
            nonzero *= d
            if nonzero > limits.elements:
                raise InvalidInput(
                    f"input '{shorten(name)}': shape {_shape_text(shape)} has more than {limits.elements} elements, "
                    "this server's limit per request"
                )
    return 0 if 0 in shape else nonzero


def check_total_elements(name: str, total: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse a request whose inputs, up to and including `name`'s, hold more than
    `limits.elements` elements in all (InvalidInput naming the input that crossed it)."""
    if total > limits.elements:
        raise InvalidInput(
            f"input '{shorten(name)}': the request's inputs hold more than {limits.elements} elements, "
            "this server's limit per request"
        )


def _shape_text(shape: tuple[int, ...]) -> str:
    """A shape for an error message, bounded however many dims the request sent."""
    if len(shape) <= 16:
        return str(list(shape))
    return f"[{', '.join(map(str, shape[:16]))}, ... ({len(shape)} dims)]"


def from_buffer(
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    data: bytes | memoryview,
    limits: Limits = DEFAULT_LIMITS,
) -> np.ndarray:
    """An input tensor from its raw little-endian bytes: a zero-copy, read-only view, except
    BYTES, whose elements are split out. Both frontends (gRPC raw contents, REST binary data)
    decode through here. The shape is checked against `limits` and the buffer before
    anything is allocated. Raises InvalidInput naming the input."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(
            f"input '{shorten(name)}': unknown datatype '{shorten(datatype, 32)}'; "
            f"expected one of {', '.join(NUMPY_DTYPES)}"
        )
    return view_of(name, datatype, dtype, shape, element_count(name, shape, limits), data, limits)


def view_of(
    name: str,
    datatype: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    count: int,
    data: bytes | memoryview,
    limits: Limits = DEFAULT_LIMITS,
) -> np.ndarray:
    """`from_buffer` for a caller that has already resolved the datatype and counted the
    shape's elements with `element_count`."""
    if datatype == "BYTES":
        return decode_bytes(data, count, name, limits).reshape(shape)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input '{shorten(name)}': expected {expected} bytes of raw contents for {datatype} shape "
            f"{_shape_text(shape)}, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def check_bytes_count(name: str, count: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse more BYTES elements than `limits.bytes_elements` (InvalidInput naming the input)."""
    if count > limits.bytes_elements:
        raise InvalidInput(
            f"input '{shorten(name)}': {count} BYTES elements exceed this server's limit of "
            f"{limits.bytes_elements} per request"
        )


def check_bytes_element(name: str, index: int, length: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse a BYTES element longer than `limits.bytes_element` (InvalidInput naming the input)."""
    if length > limits.bytes_element:
        raise InvalidInput(
            f"input '{shorten(name)}': BYTES element {index} is {length} bytes, over this server's "
            f"limit of {limits.bytes_element}"
        )


def decode_bytes(buffer: bytes | memoryview, count: int, name: str, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Split a BYTES raw buffer (4-byte little-endian length, then the bytes) into `count` elements.

    Every element needs at least its 4-byte prefix, so a count the buffer cannot hold is
    refused before the element array is allocated. Raises InvalidInput naming the input when
    the buffer and the shape disagree, or an element or the count is over `limits`.
    """
    view = memoryview(buffer)
    total = len(view)
    if count > total // 4:
        raise InvalidInput(
            f"input '{shorten(name)}': shape declares {count} BYTES elements, but a {total}-byte buffer "
            f"holds at most {total // 4} (each element has a 4-byte length prefix)"
        )
    check_bytes_count(name, count, limits)
    out = np.empty(count, dtype=np.object_)
    offset = 0
    unpack = struct.Struct("<I").unpack_from
    for index in range(count):
        if offset + 4 > total:
            raise InvalidInput(
                f"input '{shorten(name)}': BYTES element {index} has no length prefix: "
                f"expected {count} elements, the buffer ends after {index}"
            )
        (length,) = unpack(view, offset)
        offset += 4
        if offset + length > total:
            raise InvalidInput(
                f"input '{shorten(name)}': BYTES element {index} declares {length} bytes "
                f"but only {total - offset} remain in the buffer"
            )
        check_bytes_element(name, index, length, limits)
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != total:
        raise InvalidInput(
            f"input '{shorten(name)}': BYTES buffer has {total - offset} bytes left over "
            f"after the {count} elements its shape declares"
        )
    return out


def encode_bytes(array: np.ndarray) -> bytes:
    """Serialise a BYTES array (bytes or str elements) as length-prefixed elements."""
    parts: list[bytes] = []
    pack = struct.Struct("<I").pack
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(pack(len(data)))
        parts.append(data)
    return b"".join(parts)
