"""Typed tensor contents (`InferTensorContents.fp32_contents` and the rest) to numpy without a
Python object per element where the wire format allows.

`np.array(contents.fp32_contents)` walks the repeated field one Python float at a time: 16 MB
of FP32 held the event loop for 0.6-0.8 s, a stall every other request on the server waits
out. Instead the contents are serialized back (one C call, a copy of their bytes) and the
packed field is read whole: fixed-width fields (fp32, fp64) are little-endian arrays as they
stand (9-14 ms for those 16 MB), and so are varint fields whose every value fits one byte
(bool, small integers: token ids below 128, labels). Other varints go through `np.fromiter`,
about twice as fast as `np.array` on the field (docs/benchmarks.md, "Hardening").
"""

from __future__ import annotations

import numpy as np

from hub.protocol.generated import grpc_service_pb2 as pb
from hub.protocol.wire import varint

_FIXED: dict[str, np.dtype] = {"fp32_contents": np.dtype("<f4"), "fp64_contents": np.dtype("<f8")}
_NUMBERS = {field.name: field.number for field in pb.InferTensorContents.DESCRIPTOR.fields}
_LENGTH_DELIMITED = 2


class TooMany(Exception):
    """More typed values than the limit allows to convert one by one."""


def packed_payload(contents: pb.InferTensorContents, field: str) -> bytes | None:
    """The packed bytes of one repeated field, or None when it was not written packed."""
    data = contents.SerializeToString()
    number = _NUMBERS[field]
    chunks = []
    pos = 0
    while pos < len(data):
        tag, pos = varint(data, pos)
        if tag & 7 != _LENGTH_DELIMITED:  # proto3 writes repeated scalars packed; anything else is not ours
            return None
        length, pos = varint(data, pos)
        if tag >> 3 == number:
            chunks.append(data[pos : pos + length])
        pos += length
    return b"".join(chunks)


def from_typed(
    contents: pb.InferTensorContents, field: str, dtype: np.dtype, count: int, one_by_one: int
) -> np.ndarray:
    """The field's `count` values as `dtype`. Raises OverflowError when a value does not fit
    `dtype` (300 for INT8 in int_contents, say), and TooMany when more than `one_by_one`
    values would have to be converted one at a time. BYTES are not handled here."""
    values = getattr(contents, field)
    payload = packed_payload(contents, field)
    if payload is not None:
        fixed = _FIXED.get(field)
        if fixed is not None:
            return np.frombuffer(payload, dtype=fixed).astype(dtype, copy=False)
        if len(payload) == count:  # every varint is one byte: 0..127
            return np.frombuffer(payload, dtype=np.uint8).astype(dtype)
    if dtype == np.bool_:
        return np.fromiter(values, dtype=dtype, count=count)
    if count > one_by_one:
        raise TooMany(count)
    # fromiter converts each value with a C cast that would wrap (300 -> 44 for INT8): check first.
    wide = np.fromiter(values, dtype=np.uint64 if field.startswith("uint") else np.int64, count=count)
    info = np.iinfo(dtype)
    if count and (wide.min() < info.min or wide.max() > info.max):
        bad = wide[(wide < info.min) | (wide > info.max)][0]
        raise OverflowError(f"{bad} does not fit {dtype}")
    return wide.astype(dtype, copy=False)
