"""HTTP content codings of REST bodies: gzip and deflate, both ways, as Triton's HTTP server and
tritonclient.http use them (`request_compression_algorithm`, `response_compression_algorithm`).

A request body in `Content-Encoding: gzip` or `deflate` is inflated here, not by aiohttp (the
listener turns its decoding off): aiohttp answered a body it could not inflate with a 500 and
a traceback in the log, an unknown coding such as `zstd` with a plain-text 400 logged at ERROR,
and let other unknown codings through as if they were none. Here a body inflates to at most the
server's body limit (more is the same 413 as an uncompressed body over it), an unknown coding
or a corrupt or truncated body is a 400 that names the header, and a body that inflates to more
than a mebibyte goes on inflating in a worker thread, so that a small compressed request cannot
hold the event loop for the time a large one takes.

An infer response is compressed when the request's `Accept-Encoding` takes gzip or deflate
and the body is at least `MIN_COMPRESSED` bytes (below that, compression saves nothing a
client would notice, and a client must accept an uncompressed answer anyway), at level 1
(zlib's fastest; on the 2-core Xeon, 2026-12-07, level 6 took 1.2-14x level 1's time for the
same ratio or one at most 10% better: 16 MB of FP32 0.27 in 132 against 1,882 ms, 2 MB of JSON
embeddings 0.48 against 0.44 in 19 against 125 ms, 4 MB of random FP32 0.93 either way), and in
a worker thread when the body is large.

A body is read at a pace (`read_body`'s `grace` and `rate`, the server's Limits.body_timeout and
body_rate): it must arrive within `grace` seconds plus one second per `rate` bytes received,
or the request is answered 408 (BodyTimeout), so that a client sending a byte a second cannot
hold a connection, and a handler, for as long as it likes.
"""

from __future__ import annotations

import asyncio
import sys
import zlib
from typing import Any

from aiohttp import web

from hub.errors import BodyTimeout, Cancelled, InvalidInput, TooLarge, Unsupported

#: The codings we read and write, by their HTTP token.
GZIP, DEFLATE = "gzip", "deflate"
_ALIASES = {"gzip": GZIP, "x-gzip": GZIP, "deflate": DEFLATE}

#: Output inflated on the event loop before the rest goes to a worker thread.
INLINE_INFLATE = 1 << 20
#: Smallest response body worth compressing, and the size from which it is compressed in a thread.
MIN_COMPRESSED = 1024
THREADED_COMPRESS = 256 << 10


def _decompressor(coding: str, first: bytes) -> Any:
    if coding == GZIP:
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    # HTTP's deflate is zlib-wrapped (RFC 9110), but some clients send a raw deflate stream: a
    # zlib header is a CMF byte with method 8 and a 16-bit value divisible by 31.
    wrapped = len(first) >= 2 and first[0] & 0x0F == 8 and ((first[0] << 8) | first[1]) % 31 == 0
    return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)


def request_coding(header: str | None) -> str | None:
    """The one coding a request body is in (None: as it stands); InvalidInput for any other."""
    if header is None:
        return None
    codings = [token.strip().lower() for token in header.split(",") if token.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _ALIASES:
        return _ALIASES[codings[0]]
    raise InvalidInput(
        f"Content-Encoding {header[:64]!r} is not supported: send the body as it is, or in one of gzip, deflate"
    )


def _inflate(inflater: Any, data: bytes, room: int) -> bytes:
    """Up to `room` bytes of output, and one more when there is more to come."""
    return inflater.decompress(data, room + 1) if room else b""


async def _read(request: web.Request) -> bytes:
    try:
        return await request.read()
    except ConnectionError as exc:  # aiohttp's "Connection lost", the client's doing
        raise Cancelled(f"the client disconnected while its request body was read ({exc})") from None


async def _read_paced(request: web.Request, grace: float, rate: int) -> bytes:
    """`request.read()`, cut short with BodyTimeout when the body falls behind: by `grace`
    seconds from now it must have arrived, and each `rate` bytes received give it one second
    more. One timer per read, rescheduled to the new deadline each time it fires, and none for
    a body already received whole (most requests: headers and body in one segment)."""
    content = request.content
    if content.is_eof():
        return await _read(request)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    start = loop.time()
    expired = False
    timer: asyncio.TimerHandle

    def check() -> None:
        nonlocal timer, expired
        deadline = start + grace + content.total_bytes / rate
        if loop.time() < deadline:
            timer = loop.call_at(deadline, check)
        elif not content.is_eof():  # (once it is, read() returns without waiting again)
            # The task is waiting inside read() (the timer is cancelled as read() returns, with
            # no await between), so the cancellation lands there and nowhere else.
            expired = True
            task.cancel()

    timer = loop.call_at(start + grace, check)
    try:
        return await _read(request)
    except asyncio.CancelledError:
        if not expired:
            raise
        if sys.version_info >= (3, 11):
            task.uncancel()  # ours, handled here: later awaits in this task are not cancelled
        received = content.total_bytes
        raise BodyTimeout(
            f"the request body did not arrive in time: {received} bytes in {loop.time() - start:.0f} s, slower "
            f"than the server's floor of {rate} bytes/s after {grace:g} s (--http-body-rate, --http-body-timeout)"
        ) from None
    finally:
        timer.cancel()


async def read_body(request: web.Request, limit: int, too_large: str, *, grace: float, rate: int) -> bytes:
    """The request's body, inflated when its Content-Encoding says so, at most `limit` bytes:
    TooLarge with the message `too_large` when it is, or would inflate to, more (aiohttp's
    HTTPRequestEntityTooLarge when it is larger than the application's client_max_size).
    BodyTimeout when it arrives slower than `rate` bytes/s after `grace` seconds (_read_paced),
    Cancelled when the client disconnects before it has sent it. Unsupported (501) for a
    transfer coding other than chunked."""
    transfer = [c.strip().lower() for h in request.headers.getall("Transfer-Encoding", ()) for c in h.split(",")]
    if transfer and transfer != ["chunked"]:  # aiohttp reads `gzip, chunked` as chunked alone: gzip'd bytes as JSON
        raise Unsupported(
            f"Transfer-Encoding {', '.join(transfer)[:64]!r} is not supported: only chunked (RFC 9112 6.1); "
            "send a compressed body with Content-Encoding"
        )
    coding = request_coding(request.headers.get("Content-Encoding"))
    length = request.content_length
    if coding is None and length is not None and length > limit:
        raise TooLarge(too_large)  # refused unread
    raw = await _read_paced(request, grace, rate)
    if coding is None:
        if len(raw) > limit:  # sent chunked, without a Content-Length
            raise TooLarge(too_large)
        return raw
    inflater = _decompressor(coding, raw[:2])
    try:
        step = min(limit, INLINE_INFLATE)
        body = inflater.decompress(raw, step)
        if not inflater.eof and len(body) == step:  # more output to come (or input left to read)
            rest = await asyncio.get_running_loop().run_in_executor(
                None, _inflate, inflater, inflater.unconsumed_tail, limit - step
            )
            if len(rest) > limit - step:
                raise TooLarge(too_large)
            body += rest
    except zlib.error as exc:
        raise InvalidInput(f"the request body is not valid {coding} (Content-Encoding: {coding}): {exc}") from None
    if not inflater.eof:
        if len(body) == limit:
            raise TooLarge(too_large)
        raise InvalidInput(f"the request body ends before its {coding} stream does (Content-Encoding: {coding})")
    if inflater.unused_data:
        raise InvalidInput(f"the request body has bytes after its {coding} stream (Content-Encoding: {coding})")
    return body


def response_coding(header: str | None) -> str | None:
    """The coding to answer in for an Accept-Encoding header: gzip or deflate, the one with the
    higher q-value (gzip on a tie, `*` counting for gzip), or None."""
    if not header:
        return None
    best: tuple[float, bool] | None = None
    chosen = None
    for item in header.split(",")[:32]:
        token, _, params = item.partition(";")
        token = token.strip().lower()
        coding = GZIP if token == "*" else _ALIASES.get(token)
        if coding is None:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        rank = (q, coding == GZIP)
        if q > 0 and (best is None or rank > best):
            best, chosen = rank, coding
    return chosen


def _compress(coding: str, body: bytes) -> bytes:
    if coding == GZIP:
        compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    else:
        compressor = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush()


async def compressed(request: web.Request, response: web.Response) -> web.Response:
    """`response`, compressed when the request accepts a coding we write and its body is worth it."""
    body = response.body
    if not isinstance(body, bytes) or len(body) < MIN_COMPRESSED:
        return response
    coding = response_coding(request.headers.get("Accept-Encoding"))
    if coding is None:
        return response
    if len(body) >= THREADED_COMPRESS:
        packed = await asyncio.get_running_loop().run_in_executor(None, _compress, coding, body)
    else:
        packed = _compress(coding, body)
    response.body = packed
    response.headers["Content-Encoding"] = coding
    response.headers["Vary"] = "Accept-Encoding"
    return response
