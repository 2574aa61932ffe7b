"""Messages between a frontend process and the model process, over a Unix socket.

A message is a small JSON header plus zero or more binary frames (tensor bytes):

    u32 header length | u32 frame count | u64 frame length * count | header | frames

Tensors are never pickled. Receiving, a frame of 64 KiB or more is read by the kernel
straight into its own buffer, which numpy then views (one copy: the kernel's); smaller ones
are sliced out of the shared receive buffer (a copy of a few KiB costs less than a syscall).
Sending, large frames go to the socket as memoryviews of the arrays (no copy in user space
when the socket takes them whole); small ones are joined into the prefix write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hub.datatypes import NUMPY_DTYPES, decode_bytes, encode_bytes

PREFIX = struct.Struct("<II")
LENGTH = struct.Struct("<Q")
#: Frames this large are received into their own buffer and sent without joining.
LARGE = 64 << 10
#: The most frames and header bytes one message may carry: the peer is ours, but a bug must
#: not make either side allocate without bound.
MAX_FRAMES = 4096
MAX_HEADER = 16 << 20
SOCKET_BUFFER = 8 << 20

Header = dict[str, Any]
Buffer = bytes | bytearray | memoryview
OnMessage = Callable[[Header, list[memoryview]], None]


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
        written as a view of its array."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection to the peer process is closed")
        data = json.dumps(header, separators=(",", ":")).encode()
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
        self._header = json.loads(bytes(self._staging[offset : offset + header_length]))
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


def pack_arrays(arrays: Sequence[tuple[str, np.ndarray]]) -> tuple[list[list[Any]], list[Buffer]]:
    """(name, datatype, shape) descriptions and one frame per array (BYTES length-prefixed)."""
    from hub.datatypes import datatype_of

    described: list[list[Any]] = []
    frames: list[Buffer] = []
    for name, array in arrays:
        datatype = datatype_of(array)
        described.append([name, datatype, list(array.shape)])
        if datatype == "BYTES":
            frames.append(encode_bytes(array))
        else:
            frames.append(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    return described, frames


def unpack_arrays(described: Sequence[Sequence[Any]], frames: Sequence[memoryview]) -> dict[str, np.ndarray]:
    """Arrays viewing the received frames (no copy), keyed by name."""
    out: dict[str, np.ndarray] = {}
    for (name, datatype, shape), frame in zip(described, frames, strict=True):
        count = int(np.prod(shape)) if shape else 1
        if datatype == "BYTES":
            out[name] = decode_bytes(frame, count, name).reshape(shape)
        else:
            out[name] = np.frombuffer(frame, dtype=NUMPY_DTYPES[datatype]).reshape(shape)
    return out
