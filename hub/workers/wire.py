"""Messages between a frontend process and the model process, over a Unix socket.

A message is a small header plus zero or more binary frames (tensor bytes):

    u32 header length | u32 frame count | u64 frame length * count | header | frames

The header is a dict of plain values (str, int, float, bool, None, lists, tuples, dicts) in
`marshal`'s format: both ends are processes of this server, run by one interpreter, and
marshal's C codec costs 1.2-2.8 µs a header where json's cost 7-12 (2-core EPYC; marshal runs
no code, unlike pickle). A header arrives as it was sent: tuples stay tuples, and int keys stay
ints.

Tensors are never pickled or marshalled. Receiving, a frame of 64 KiB or more is read by the kernel
straight into its own buffer, which numpy then views (one copy: the kernel's); smaller ones
are sliced out of the shared receive buffer (a copy of a few KiB costs less than a syscall).
Sending, large frames go to the socket as memoryviews of the arrays (no copy in user space
when the socket takes them whole); small ones are joined into the prefix write.

With the shared-memory hand-off (hub/workers/arena.py, the default) a tensor of THRESHOLD
bytes or more does not cross the socket at all: the sender copies it into its arena and the
header says where; the receiver views it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import marshal
import math
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hub.datatypes import NUMPY_DTYPES, decode_bytes, encode_bytes
from hub.errors import LimitReached, shorten
from hub.workers.arena import ALIGN, THRESHOLD, Arena

PREFIX = struct.Struct("<II")
LENGTH = struct.Struct("<Q")
#: Frames this large are received into their own buffer and sent without joining.
LARGE = 64 << 10
#: The most frames and header bytes one message may carry: the peer is ours, but a bug must
#: not make either side allocate without bound. The receiver drops the connection on a message
#: over them (its framing can no longer be trusted); the sender refuses to send one
#: (MessageTooLarge), which fails that one message's call and nothing else.
MAX_FRAMES = 4096
MAX_HEADER = 16 << 20
SOCKET_BUFFER = 8 << 20

Header = dict[str, Any]
Buffer = bytes | bytearray | memoryview
OnMessage = Callable[[Header, list[memoryview]], None]


class MessageTooLarge(LimitReached):
    """A message the wire cannot carry (over MAX_HEADER header bytes or MAX_FRAMES frames):
    raised by `Channel.send` before anything is written, so the connection and every other
    message on it are untouched. The frontends bound what a client can put in a header (names,
    keys, ids, settings) well below this; meeting it means a bound is missing."""


def encode_header(header: Header) -> bytes:
    """The header in marshal's format. A value of a subclass of a plain type, which marshal
    refuses (an enum, numpy's float64 in a plugin's build report), makes the header go as JSON
    would have sent it: such values then arrive as their plain values, tuples as lists and
    keys as strings. Only rare messages carry such values (a model's state); requests do not."""
    try:
        return marshal.dumps(header)
    except ValueError:
        return marshal.dumps(json.loads(json.dumps(header)))


class Channel(asyncio.BufferedProtocol):
    """One end of a framed connection. `on_message(header, frames)` runs on the event loop
    for every message received; `on_lost(exc)` once, when the connection ends."""

    def __init__(self, on_message: OnMessage, on_lost: Callable[[BaseException | None], None]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._staging = bytearray(256 << 10)
        self._start = 0  # unparsed bytes are _staging[_start:_end]
        self._end = 0
        self._header: Header | None = None
        self._lengths: list[int] = []
        self._frames: list[memoryview] = []
        self._large: bytearray | None = None  # the large frame being received directly
        self._large_filled = 0
        self.closed = asyncio.get_event_loop().create_future()
        self._out = bytearray()  # small messages waiting for the end of this event-loop turn
        self._flush_scheduled = False

    # --- sending ----------------------------------------------------------------------------

    def send(self, header: Header, frames: Sequence[Buffer] = ()) -> None:
        """Queue a message. Small messages sent in one event-loop turn go out in one write (a
        syscall wakes the peer, and costs more than copying a few KiB); a large frame is
        written as a view of its array. ConnectionError when the connection is closed;
        MessageTooLarge, with nothing sent, for a message over MAX_HEADER or MAX_FRAMES."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection to the peer process is closed")
        data = encode_header(header)
        if len(data) > MAX_HEADER or len(frames) > MAX_FRAMES:
            # The peer would drop the connection, failing every request on it: fail this one.
            what = (
                f"{len(data)} header bytes, over the {MAX_HEADER}"
                if len(data) > MAX_HEADER
                else f"{len(frames)} frames, over the {MAX_FRAMES}"
            )
            raise MessageTooLarge(
                f"too large to hand between the server's processes: its '{shorten(str(header.get('k')), 32)}' "
                f"message would be {what} one carries; nothing was sent"
            )
        views = [memoryview(f).cast("B") if not isinstance(f, bytes) else memoryview(f) for f in frames]
        out = self._out
        out += PREFIX.pack(len(data), len(views))
        for view in views:
            out += LENGTH.pack(view.nbytes)
        out += data
        for view in views:
            if view.nbytes < LARGE:
                out += view
                continue
            self._flush()
            self.transport.write(view)
            out = self._out
        if out and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._out)
        self._out = bytearray()

    # --- receiving --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # room for a batch of images in flight: fewer partial writes and wake-ups
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_lost(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large is not None:
            return memoryview(self._large)[self._large_filled :]
        if len(self._staging) - self._end < 4096:  # compact, or grow for a header larger than half the buffer
            pending = self._end - self._start
            if pending > len(self._staging) // 2:
                self._staging.extend(bytes(len(self._staging)))
            else:
                self._staging[:pending] = self._staging[self._start : self._end]
                self._start, self._end = 0, pending
        return memoryview(self._staging)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._large is not None:
            self._large_filled += nbytes
            if self._large_filled == len(self._large):
                self._frames.append(memoryview(self._large))
                self._large = None
                self._frame_done()
            return
        self._end += nbytes
        self._parse()

    def _parse(self) -> None:
        while True:
            if self._header is None:
                if not self._read_header():
                    return
                continue
            index = len(self._frames)
            length = self._lengths[index]
            available = self._end - self._start
            if length >= LARGE:
                # Take what already arrived, then let the kernel fill the rest in place.
                buffer = bytearray(length)
                taken = min(available, length)
                buffer[:taken] = self._staging[self._start : self._start + taken]
                self._start += taken
                if taken == length:
                    self._frames.append(memoryview(buffer))
                    self._frame_done()
                    continue
                self._large, self._large_filled = buffer, taken
                self._rewind()
                return
            if available < length:
                self._rewind()
                return
            self._frames.append(memoryview(bytes(self._staging[self._start : self._start + length])))
            self._start += length
            self._frame_done()

    def _read_header(self) -> bool:
        available = self._end - self._start
        if available < PREFIX.size:
            self._rewind()
            return False
        header_length, count = PREFIX.unpack_from(self._staging, self._start)
        if header_length > MAX_HEADER or count > MAX_FRAMES:
            raise ConnectionError(f"malformed message from the peer: {header_length} header bytes, {count} frames")
        needed = PREFIX.size + LENGTH.size * count + header_length
        if available < needed:
            self._rewind()
            return False
        offset = self._start + PREFIX.size
        self._lengths = [LENGTH.unpack_from(self._staging, offset + LENGTH.size * i)[0] for i in range(count)]
        offset += LENGTH.size * count
        self._header = marshal.loads(bytes(self._staging[offset : offset + header_length]))
        self._start = offset + header_length
        self._frames = []
        if not self._lengths:
            self._deliver()
        return True

    def _frame_done(self) -> None:
        if len(self._frames) == len(self._lengths):
            self._deliver()

    def _deliver(self) -> None:
        header, frames = self._header, self._frames
        self._header, self._lengths, self._frames = None, [], []
        assert header is not None
        self._on_message(header, frames)

    def _rewind(self) -> None:
        """Move unparsed bytes to the front when the buffer is mostly consumed."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start > len(self._staging) // 2:
            pending = self._end - self._start
            self._staging[:pending] = self._staging[self._start : self._end]
            self._start, self._end = 0, pending


# --- tensors ----------------------------------------------------------------------------------
#
# A message describes each tensor as [name, datatype, shape] plus where its bytes are:
#   nothing more                      the next frame of the message
#   offset, nbytes                    a block of the sender's arena (hub/workers/arena.py)
#   offset, nbytes, region, name      a client's shared-memory region, by the model process's id
#                                     for it and its name (the model process checks both)

#: Where a tensor lies in a client's shared-memory region: (region id, region name, offset).
Locate = Callable[[np.ndarray], "tuple[int, str, int] | None"]
#: The array for a tensor in a client's region: (name, datatype, shape, offset, nbytes, id, region name).
RegionView = Callable[[str, str, list[int], int, int, int, str], np.ndarray]


def pack_arrays(
    arrays: Sequence[tuple[str, np.ndarray]],
    arena: Arena | None = None,
    threshold: int = THRESHOLD,
    locate: Locate | None = None,
) -> tuple[list[list[Any]], list[Buffer], int]:
    """Descriptions, frames, and the arena block the tensors were copied into (-1: none).

    With an `arena`, tensors of `threshold` bytes or more are copied into one block of it
    (the hand-off's one copy) and described by offset; when it is full they go as frames.
    `locate` finds tensors that already lie in a client's shared-memory region: those are
    described by where they are, with no copy. BYTES tensors always go as frames
    (length-prefixed)."""
    from hub.datatypes import datatype_of

    described: list[list[Any]] = []
    frames: list[Buffer] = []
    in_region: dict[int, tuple[int, str, int]] = {}
    in_block: dict[int, int] = {}  # index -> offset within the block
    block = None
    if arena is not None or locate is not None:
        total = 0
        for index, (_, array) in enumerate(arrays):
            if isinstance(array, np.ndarray) and (array.dtype == np.object_ or array.nbytes < threshold):
                continue  # (what is not an array lies in a client's CUDA region: located, whatever its size)
            where = locate(array) if locate is not None else None
            if where is not None:
                in_region[index] = where
            elif arena is not None:
                in_block[index] = total
                total += -(-array.nbytes // ALIGN) * ALIGN
        if total:
            assert arena is not None
            block = arena.alloc(total)
    for index, (name, array) in enumerate(arrays):
        datatype = datatype_of(array)
        shape = list(array.shape)
        if index in in_region:
            region, region_name, offset = in_region[index]
            described.append([name, datatype, shape, offset, array.nbytes, region, region_name])
        elif block is not None and index in in_block:
            assert arena is not None
            offset = block + in_block[index]
            np.ndarray(array.shape, array.dtype, buffer=arena.map, offset=offset)[...] = array
            described.append([name, datatype, shape, offset, array.nbytes])
        else:
            described.append([name, datatype, shape])
            if datatype == "BYTES":
                frames.append(encode_bytes(array))
            else:
                frames.append(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    return described, frames, -1 if block is None else block


def unpack_arrays(
    described: Sequence[Sequence[Any]],
    frames: Sequence[memoryview],
    arena: Arena | None = None,
    region: RegionView | None = None,
) -> dict[str, np.ndarray]:
    """Arrays viewing the received frames, the sender's `arena` or a client's region (no
    copy), keyed by name."""
    out: dict[str, np.ndarray] = {}
    index = 0
    for entry in described:
        name, datatype, shape = entry[0], entry[1], entry[2]
        if len(entry) == 3:
            frame = frames[index]
            index += 1
            count = math.prod(shape)
            if datatype == "BYTES":
                out[name] = decode_bytes(frame, count, name).reshape(shape)
            else:
                out[name] = np.frombuffer(frame, dtype=NUMPY_DTYPES[datatype]).reshape(shape)
        elif len(entry) == 5:
            if arena is None:
                raise ConnectionError(f"the peer described tensor {name!r} in an arena this process has not mapped")
            out[name] = np.ndarray(shape, NUMPY_DTYPES[datatype], buffer=arena.map, offset=entry[3])
        else:
            if region is None:
                raise ConnectionError(f"the peer described tensor {name!r} in a shared-memory region")
            out[name] = region(name, datatype, shape, entry[3], entry[4], entry[5], entry[6])
    if index != len(frames):
        raise ConnectionError(f"the peer sent {len(frames)} frames for {index} tensors")
    return out
