"""The protobuf wire format read directly, for what must be known before a message is parsed.

A ModelInferRequest of 31 M empty `inputs` entries is 60 MiB (61 KB gzip'd), under the request
cap, yet upb makes a ~90-byte message of each (2.7 GB) and the codec's loops a Python wrapper
of each: 10-12 GB and a 13-56 s stall of the event loop. `too_many_entries` counts the
entries such a request holds, stopping at the cap, so the cost of refusing it is the cap's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hub.datatypes import MAX_DIMS
from hub.limits import Limits
from hub.protocol.generated import grpc_service_pb2 as pb

_VARINT_BYTES = 10  # a 64-bit varint takes at most 10 bytes
_VARINT, _FIXED64, _LENGTH_DELIMITED, _START_GROUP, _END_GROUP, _FIXED32 = range(6)
_ENTRIES, _ELEMENTS = 0, 1  # the two counts of too_many_entries, as indexes of its `left`
_DIMS = 2  # what else _Over reports: a packed shape too long for MAX_DIMS dims


class Malformed(Exception):
    """Bytes that are not the wire format: a truncated field, a varint of more than 10 bytes,
    an unknown wire type. Whoever parses the message next says what is wrong with it."""


def varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `data[pos:]` and the position after it. Raises Malformed when the data
    ends inside it or it runs past 10 bytes (unbounded, 60 MiB of 0xff would build one
    60 M-bit integer, a byte at a time)."""
    result = shift = 0
    end = min(pos + _VARINT_BYTES, len(data))
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise Malformed("truncated or overlong varint")


@dataclass(frozen=True)
class _Level:
    """A message whose fields are counted: which length-delimited fields are messages counted
    in turn, and which field's entries count as BYTES elements rather than entries (-1: none)."""

    children: dict[int, _Level] = field(default_factory=dict)
    bytes_elements: int = -1
    shape: int = -1  # the field that is a tensor's shape (its dims are bounded, packed or not)


def _number(message: type, name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number  # type: ignore[attr-defined]


_CONTENTS = _Level(bytes_elements=_number(pb.InferTensorContents, "bytes_contents"))
_INPUT = _Level(
    {_number(pb.ModelInferRequest.InferInputTensor, "contents"): _CONTENTS},
    shape=_number(pb.ModelInferRequest.InferInputTensor, "shape"),
)
#: The longest packed shape of MAX_DIMS dims; a longer one has more (60 M, one entry, cost 480 MB parsed).
_SHAPE_BYTES = MAX_DIMS * _VARINT_BYTES
_OUTPUT = _Level()
_REQUEST = _Level({_number(pb.ModelInferRequest, "inputs"): _INPUT, _number(pb.ModelInferRequest, "outputs"): _OUTPUT})
_MAP_ENTRY_VALUE = 2  # a map's entries are messages of key (1) and value (2)


@dataclass(frozen=True)
class Scan:
    """What `too_many_entries` counts in one kind of request, and what its entries are, for
    the refusal's message."""

    level: _Level
    entries: str


INFER = Scan(
    _REQUEST,
    "inputs, outputs, parameters, raw_input_contents, and the fields within each input, requested output and "
    "input contents",
)
#: The requests besides inference whose maps hold entries without bound. 52 MB of 4 M trace
#: settings, log settings or load parameters (refused the same, model control being off)
#: stalled every other client for 15-42 s and grew the server by 1.2-1.9 GB while upb and the
#: handler's dict of them were built; a real one has a handful.
SETTINGS = Scan(_Level({_number(pb.TraceSettingRequest, "settings"): _Level({_MAP_ENTRY_VALUE: _Level()})}),
                "settings, and the values within each")  # fmt: skip
LOG_SETTINGS = Scan(_Level(), "settings")
LOAD = Scan(_Level(), "parameters")


class _Over(Exception):
    """A count passed its cap; the scan stops there. Its arguments: which (_ENTRIES,
    _ELEMENTS, _DIMS) and, for _DIMS, the shape's length in bytes."""


def too_many_entries(data: bytes, limits: Limits, scan: Scan = INFER) -> str | None:
    """What a serialized ModelInferRequest (or another request `scan` describes: its map's
    entries, and the fields within them it names, count as entries) holds more of than
    `limits` allow, or None.

    Counted, each against `limits.request_entries`: the fields at its top level (each input,
    requested output, parameter, raw_input_contents entry) and within each input (each
    unpacked shape dim, each parameter), each requested output and each input's contents (a
    packed repeated field is one). Each `contents.bytes_contents` entry counts against
    `limits.bytes_elements` instead: a typed BYTES tensor has one per element, as many as that
    limit lets through anyway. An input's packed shape longer than MAX_DIMS dims can be is
    refused too (one entry; 60 MiB of it cost 480 MB parsed). The scan stops at the first
    count past its cap, so it costs O(cap), not O(message); a message too short to hold that
    many entries (each takes at least 2 bytes) is not scanned. Never raises: on bytes that are not the wire format it
    returns None and leaves them to the parser.
    """
    entries, elements = limits.request_entries, limits.bytes_elements
    if len(data) <= 2 * min(entries, elements):
        return None
    left = [entries, elements]
    try:
        _count(data, 0, len(data), scan.level, left)
    except _Over as over:
        if over.args[0] == _DIMS:
            return (
                f"an input shape of more than {MAX_DIMS} dimensions ({over.args[1]} bytes packed); "
                f"this server takes at most {MAX_DIMS}"
            )
        if over.args[0] == _ENTRIES:
            return f"more than {entries} entries ({scan.entries}), this server's limit per request"
        return (
            f"more than {elements} contents.bytes_contents entries, this server's limit of BYTES elements per request"
        )
    except Malformed:
        pass
    return None


def _count(data: bytes, pos: int, end: int, level: _Level, left: list[int]) -> None:
    """Count the fields of `data[pos:end]` (a message of `level`) into `left`: [entries,
    BYTES elements] still allowed. Raises _Over past either cap, Malformed on garbage."""
    children, bytes_elements = level.children, level.bytes_elements
    groups = 0
    while pos < end:
        tag = data[pos]
        if tag < 0x80:  # the tag of every field of these messages is one byte
            pos += 1
        else:
            tag, pos = varint(data, pos)
        kind, number = tag & 7, tag >> 3
        if kind == _LENGTH_DELIMITED:
            if pos >= end:
                raise Malformed("a field runs past its message")
            length = data[pos]
            if length < 0x80:
                pos += 1
            else:
                length, pos = varint(data, pos)
            stop = pos + length
            if stop > end:
                raise Malformed("a field runs past its message")
            if number == level.shape and length > _SHAPE_BYTES:
                raise _Over(_DIMS, length)
            child = children.get(number)
            if child is not None:
                _count(data, pos, stop, child, left)
            pos = stop
        elif kind == _VARINT:
            _, pos = varint(data, pos)
        elif kind == _FIXED32:
            pos += 4
        elif kind == _FIXED64:
            pos += 8
        elif kind == _START_GROUP:
            # Only unknown fields are groups here (upb keeps them as bytes). The group counts
            # as an entry, and so do the fields inside, as if at this level: never fewer pass
            # than there are.
            groups += 1
        elif kind == _END_GROUP:
            if not groups:  # unmatched: garbage, and uncounted it would make the scan O(message)
                raise Malformed("end of a group never started")
            groups -= 1
            continue
        else:
            raise Malformed(f"wire type {kind}")
        counter = _ELEMENTS if number == bytes_elements else _ENTRIES
        left[counter] -= 1
        if left[counter] < 0:
            raise _Over(counter)
    if pos > end:
        raise Malformed("a field runs past its message")
