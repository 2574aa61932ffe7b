"""The V2 inference datatypes: their numpy dtypes and the BYTES wire encoding."""

from __future__ import annotations

import math
import struct

import ml_dtypes
import numpy as np

from hub.errors import InvalidInput

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

#: Little-endian wire dtypes, for decoding raw contents on any host.
WIRE_DTYPES: dict[str, np.dtype] = {
    name: dtype.newbyteorder("<") for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"
}

#: V2 datatype -> the Triton model-config enum value (`TYPE_*`).
CONFIG_TYPE_NAMES: dict[str, str] = {name: f"TYPE_{name}" for name in DATATYPES}
CONFIG_TYPE_NAMES["BYTES"] = "TYPE_STRING"


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name of a numpy array; TypeError when it has none."""
    try:
        return _BY_DTYPE[array.dtype]
    except KeyError:
        if array.dtype.kind in "SU":
            return "BYTES"
        raise TypeError(f"numpy dtype {array.dtype} has no V2 datatype") from None


def element_size(datatype: str) -> int:
    """Bytes per element on the wire; 0 for BYTES, whose elements vary in length."""
    return 0 if datatype == "BYTES" else WIRE_DTYPES[datatype].itemsize


def element_count(name: str, shape: tuple[int, ...]) -> int:
    """The number of elements of a tensor's shape, checked (InvalidInput naming the input)."""
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def from_buffer(name: str, datatype: str, shape: tuple[int, ...], data: bytes | memoryview) -> np.ndarray:
    """An input tensor from its raw little-endian bytes: a zero-copy, read-only view, except
    BYTES, whose elements are split out. Both frontends (gRPC raw contents, REST binary data)
    decode through here. Raises InvalidInput naming the input."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"input '{name}': unknown datatype '{datatype}'; expected one of {', '.join(NUMPY_DTYPES)}")
    count = element_count(name, shape)
    if datatype == "BYTES":
        return decode_bytes(data, count, name).reshape(shape)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input '{name}': expected {expected} bytes of raw contents for {datatype} shape "
            f"{list(shape)}, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def decode_bytes(buffer: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """Split a BYTES raw buffer (4-byte little-endian length, then the bytes) into `count` elements.

    Raises InvalidInput naming the input when the buffer and the shape disagree.
    """
    view = memoryview(buffer)
    total = len(view)
    out = np.empty(count, dtype=np.object_)
    offset = 0
    unpack = struct.Struct("<I").unpack_from
    for index in range(count):
        if offset + 4 > total:
            raise InvalidInput(
                f"input '{name}': BYTES element {index} has no length prefix: "
                f"expected {count} elements, the buffer ends after {index}"
            )
        (length,) = unpack(view, offset)
        offset += 4
        if offset + length > total:
            raise InvalidInput(
                f"input '{name}': BYTES element {index} declares {length} bytes "
                f"but only {total - offset} remain in the buffer"
            )
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != total:
        raise InvalidInput(
            f"input '{name}': BYTES buffer has {total - offset} bytes left over "
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
