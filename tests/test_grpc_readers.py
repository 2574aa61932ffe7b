"""gRPC clients that ask for large answers and never read them, through the real server: what
the server holds for them is bounded (calls per connection, answers per stream), and other
clients are served meanwhile."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.grpc import service_pb2

from hub.limits import Limits

from .conftest import TEST_PLUGINS, Workers, link_plugins

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
MAX_CONCURRENT_STREAMS = 3  # HTTP/2 SETTINGS identifiers (RFC 9113 6.5.2)
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY = 0, 1, 3, 4, 7


def _bulky(kib: int, request_id: str = "") -> bytes:
    """A ModelInferRequest of a few bytes for an answer of `kib` KiB."""
    request = service_pb2.ModelInferRequest(model_name="bulky", id=request_id)
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 1])
    request.raw_input_contents.append(np.int32(kib).tobytes())
    return request.SerializeToString()


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK header field: literal, not indexed, no Huffman coding (short strings only)."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def _non_reader(url: str, calls: int, message: bytes) -> socket.socket:
    """A raw HTTP/2 connection that starts `calls` ModelInfer calls and then reads nothing: no
    byte of the socket, so it grants no flow-control window and answers no ping."""
    host, port = url.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    headers = b"".join(
        _literal(name, value)
        for name, value in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", INFER),
            (":authority", url),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )
    body = b"\x00" + struct.pack(">I", len(message)) + message
    frames = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", _frame(SETTINGS, 0, 0, b"")]
    for call in range(calls):
        stream = 1 + 2 * call
        frames += [_frame(HEADERS, 0x4, stream, headers), _frame(DATA, 0x1, stream, body)]  # END_HEADERS, END_STREAM
    sock.sendall(b"".join(frames))
    return sock


def _read_all(sock: socket.socket, timeout: float) -> tuple[list[tuple[int, int, bytes]], bool]:
    """Every frame the server sent (kind, stream, payload), and whether it closed the
    connection within `timeout` seconds."""
    sock.settimeout(timeout)
    data = b""
    closed = False
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
        closed = True
    except (ConnectionResetError, BrokenPipeError):
        closed = True
    except TimeoutError:
        pass
    frames = []
    at = 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at : at + 3], "big")
        stream = int.from_bytes(data[at + 5 : at + 9], "big") & 0x7FFFFFFF
        frames.append((data[at + 3], stream, data[at + 9 : at + 9 + length]))
        at += 9 + length
    return frames, closed


def _good_call(url: str) -> float:
    """Seconds one well-behaved tritonclient request takes."""
    client = tc.InferenceServerClient(url)
    tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    started = time.monotonic()
    result = client.infer("identity_fp32", [tensor], client_timeout=10)
    seconds = time.monotonic() - started
    assert result.as_numpy("OUTPUT0").tolist() == [[1.0] * 4]
    client.close()
    return seconds


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    return link_plugins(tmp_path / "plugins", TEST_PLUGINS / "identity.py", TEST_PLUGINS / "bulky")


def test_a_connection_opens_at_most_grpc_streams_calls(start_server: Any, plugins: Path) -> None:
    """A connection that asks for 40 answers of 1 MiB at once and reads nothing gets at most
    `grpc_streams` (8) calls: the server advertises the bound and refuses the calls past it,
    so it holds at most 8 answers for it. Before, such a connection had every call answered
    (1,000 of them on one connection, 16 GB held for 4 MiB answers) and kept them until it
    went away. A well-behaved client is served meanwhile."""
    server = start_server(plugins, limits=Limits(grpc_streams=8))
    sock = _non_reader(server.url, 40, _bulky(1024))
    try:
        time.sleep(0.5)
        assert _good_call(server.url) < 2
        frames, _ = _read_all(sock, timeout=1)
    finally:
        sock.close()
    settings = b"".join(payload for kind, stream, payload in frames if kind == SETTINGS and stream == 0)
    advertised = dict(struct.unpack(">HI", settings[at : at + 6]) for at in range(0, len(settings), 6))
    assert advertised.get(MAX_CONCURRENT_STREAMS) == 8, advertised
    refused = {stream for kind, stream, _ in frames if kind == RST_STREAM}
    assert len(refused) == 40 - 8, len(refused)
    statistics = tc.InferenceServerClient(server.url).get_inference_statistics("bulky", as_json=True)
    assert int(statistics["model_stats"][0]["inference_stats"]["success"].get("count", 0)) <= 8
    assert _good_call(server.url) < 2


async def test_by_default_a_client_may_gather_a_thousand_calls_on_one_connection(
    start_server: Any, plugins: Path
) -> None:
    """A batch job gathers all its calls on one client at once. grpc's Python client does not
    wait for room under a peer's stream bound (it fails the calls past it UNAVAILABLE,
    REFUSED_STREAM), so by default the server sets none, as Triton does; `grpc_streams` is
    the operator's choice (hub/limits.py)."""
    server = start_server(plugins)
    client = tc_aio.InferenceServerClient(server.url)
    try:
        calls = []
        for value in range(1000):
            tensor = tc_aio.InferInput("INPUT0", [1, 1], "FP32")
            tensor.set_data_from_numpy(np.full((1, 1), value, np.float32))
            calls.append(client.infer("identity_fp32", [tensor]))
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await client.close()
    failed = [result for result in results if isinstance(result, Exception)]
    assert failed == [], (len(failed), failed[:1])
    assert [float(result.as_numpy("OUTPUT0")[0, 0]) for result in results] == list(range(1000))


def _bulky_statistics(url: str) -> int:
    """How many requests "bulky" has answered."""
    statistics = tc.InferenceServerClient(url).get_inference_statistics("bulky", as_json=True)
    return int(statistics["model_stats"][0]["inference_stats"]["success"].get("count", 0))


async def _unread_stream(url: str, sizes: list[int], wait: float) -> tuple[int, list[Any]]:
    """Write one request per KiB size on one stream, read nothing for `wait` seconds, then read
    every answer: (requests answered by then, the answers). A first request, alone, shows the
    batcher that bulky's forward waits: later ones compute in a worker, not on the loop."""
    with grpc.insecure_channel(url) as warm:
        warm.unary_unary(INFER, request_serializer=None, response_deserializer=None)(_bulky(1), timeout=10)
    before = _bulky_statistics(url)
    # A window of 64 KiB that does not grow: the client's transport takes in no answer unread.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65535)]
    channel = grpc.aio.insecure_channel(url, options=options)
    call = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)(timeout=60)

    async def write() -> None:
        for number, kib in enumerate(sizes):
            await call.write(_bulky(kib, str(number)))
        await call.done_writing()

    writer = asyncio.ensure_future(write())
    await asyncio.sleep(wait)
    computed = await asyncio.to_thread(_bulky_statistics, url) - before
    answers = [service_pb2.ModelStreamInferResponse.FromString(raw) async for raw in call]
    await writer
    await channel.close()
    return computed, answers


def test_a_stream_holds_at_most_stream_bytes_of_unread_answers(start_server: Any, plugins: Path) -> None:
    """stream_bytes=4 MiB: a stream that writes 20 requests for 1 MiB answers and reads none
    has 4 of them computed, not `stream_in_flight` (16); each later one is read as the client
    takes an answer, and every answer comes. Before, the server computed and held 16 (64 by
    default: 270 MB for 4 MiB answers, per stream)."""
    server = start_server(plugins, limits=Limits(stream_in_flight=16, stream_bytes=4 << 20))
    computed, answers = asyncio.run(_unread_stream(server.url, [1024] * 20, wait=1.0))
    assert computed <= 4, computed
    assert [a.error_message for a in answers] == [""] * 20
    assert sorted(int(a.infer_response.id) for a in answers) == list(range(20))
    assert all(len(a.infer_response.raw_output_contents[0]) == 1 << 20 for a in answers)
    assert _good_call(server.url) < 2


def test_a_stream_whose_answers_grow_is_refused_past_stream_bytes(start_server: Any, plugins: Path) -> None:
    """A first answer of 1 KiB lets the stream read more requests than 1 MiB answers fit in
    stream_bytes (4 MiB); the answers that would take the unread ones past it are dropped, each
    request answered RESOURCE_EXHAUSTED naming --max-stream-bytes, so the server holds 4 MiB
    for the client whatever the sizes. Before, all 12 were held."""
    server = start_server(plugins, limits=Limits(stream_in_flight=16, stream_bytes=4 << 20))
    _, answers = asyncio.run(_unread_stream(server.url, [1] + [1024] * 12, wait=1.0))
    assert len(answers) == 13
    served = [a for a in answers if not a.error_message]
    refused = [a for a in answers if a.error_message]
    big = [a for a in served if len(a.infer_response.raw_output_contents[0]) == 1 << 20]
    assert len(big) <= 4, len(big)  # (the 1 KiB answer fitted in the client's window)
    assert refused and all("--max-stream-bytes" in a.error_message for a in refused), refused[:1]
    assert _good_call(server.url) < 2


def test_streams_that_are_not_read_leave_the_thread_pool_server_serving(
    plugins: Path, model_repository: Path, tmp_path: Path
) -> None:
    """`--grpc-server threads` (two running threads): three streams whose client reads none of
    their 1 MiB answers leave other calls served at once. grpc sends a stream's answer on its
    handler thread, waiting for the client's window; that thread kept its running place, so
    two such streams held both, and every other call waited until they went (a unary call
    took 7.9 s in the probe)."""
    server = Workers(plugins, model_repository, tmp_path, 1, "--grpc-server", "threads")

    async def scenario() -> list[float]:
        options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65535)]
        channel = grpc.aio.insecure_channel(server.url, options=options)
        calls = []
        for stream in range(3):
            call = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)(timeout=60)
            for number in range(4):
                await call.write(_bulky(1024, f"{stream}-{number}"))
            calls.append(call)
        await asyncio.sleep(1.0)  # every stream's first answer is computed and waits for its client
        seconds = [await asyncio.to_thread(_good_call, server.url) for _ in range(3)]
        for call in calls:
            call.cancel()
        await channel.close()
        return seconds

    try:
        seconds = asyncio.run(scenario())
    finally:
        assert server.stop() == 0, server.output()
    assert max(seconds) < 2, seconds


def _bulky_counts(url: str) -> tuple[int, int]:
    """How many requests "bulky" has answered, and how many failed."""
    statistics = tc.InferenceServerClient(url).get_inference_statistics("bulky", as_json=True)
    stats = statistics["model_stats"][0]["inference_stats"]
    return int(stats["success"].get("count", 0)), int(stats["fail"].get("count", 0))


def _settled(url: str, requests: int, timeout: float = 10) -> tuple[int, int]:
    """(answered, failed) for "bulky" once `requests` in all have been answered or failed."""
    deadline = time.monotonic() + timeout
    while sum(counts := _bulky_counts(url)) < requests and time.monotonic() < deadline:
        time.sleep(0.05)
    return counts


def _big_call(url: str, kib: int = 1024) -> Any:
    """A well-behaved tritonclient call for a `kib` KiB answer: its result or its error."""
    client = tc.InferenceServerClient(url)
    tensor = tc.InferInput("INPUT0", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.full((1, 1), kib, np.int32))
    try:
        return client.infer("bulky", [tensor], client_timeout=10)
    except tc.InferenceServerException as exc:
        return exc
    finally:
        client.close()


def test_answers_nobody_reads_are_bounded_per_connection_and_for_the_server(start_server: Any, plugins: Path) -> None:
    """unsent_bytes=4 MiB, so 1 MiB per connection: a connection that asks for three 1 MiB
    answers and reads nothing has one; four such connections hold the server's 4 MiB, and a
    fifth, or a client that reads, gets RESOURCE_EXHAUSTED naming --max-unsent-bytes until
    they go; small answers are not counted. Before, every answer was held until its client
    went: 200 calls for 4 MiB answers on one connection took the server past 1.6 GB."""
    server = start_server(plugins, limits=Limits(unsent_bytes=4 << 20))
    url = server.url
    plane = server.server.plane
    sockets = []
    try:
        sockets.append(_non_reader(url, 3, _bulky(1024)))
        assert _settled(url, 3) == (1, 2)  # its own quarter: the first answer always goes
        for connection in range(3):
            sockets.append(_non_reader(url, 1, _bulky(1024)))
            assert _settled(url, 4 + connection) == (2 + connection, 2)
        assert plane.unsent.held == 4 << 20
        refused = _big_call(url)  # the server's bound, on a connection that holds nothing
        assert isinstance(refused, tc.InferenceServerException), refused
        assert refused.status() == "StatusCode.RESOURCE_EXHAUSTED" and "--max-unsent-bytes" in refused.message()
        assert _good_call(url) < 2  # 16 bytes: not counted
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 5
    while plane.unsent.held and time.monotonic() < deadline:  # given back as each connection closes
        time.sleep(0.05)
    assert plane.unsent.held == 0
    answered = _big_call(url)
    assert not isinstance(answered, Exception), answered
    assert answered.as_numpy("OUTPUT0").nbytes == 1 << 20


def test_a_streams_unread_answers_count_against_its_connections_share(start_server: Any, plugins: Path) -> None:
    """A stream's answers are held until its client takes them, as a unary call's are: with
    1 MiB per connection (unsent_bytes=4 MiB), a stream that writes three requests for 1 MiB
    answers and reads none has the first answered and the others refused on the stream,
    naming the bound; once read, they are given back, and the next stream is served whole."""
    server = start_server(plugins, limits=Limits(unsent_bytes=4 << 20))
    _, answers = asyncio.run(_unread_stream(server.url, [1024] * 3, wait=1.0))
    assert [bool(a.error_message) for a in answers] == [False, True, True], [a.error_message for a in answers]
    assert all("quarter of --max-unsent-bytes" in a.error_message for a in answers[1:])
    assert server.server.plane.unsent.held == 0
    _, answers = asyncio.run(_unread_stream(server.url, [1024], wait=0.2))
    assert [a.error_message for a in answers] == [""]


@pytest.mark.parametrize("workers, grpc_server", [(1, "threads"), (2, "aio")])
def test_answers_nobody_reads_are_bounded_in_the_other_server_shapes(
    plugins: Path, model_repository: Path, tmp_path: Path, workers: int, grpc_server: str
) -> None:
    """`--grpc-server threads` counts unread answers too (grpcio's call-end callback, on one of
    its threads, hands the giving back to the loop), and so does each frontend of `--workers 2`
    (with half the bound each): a connection that reads nothing is refused past its share,
    and once it goes its share is free again."""
    flags = ("--grpc-server", grpc_server, "--max-unsent-bytes", str(4 << 20))
    server = Workers(plugins, model_repository, tmp_path, workers, *flags)
    try:
        sock = _non_reader(server.url, 3, _bulky(1024))
        assert _settled(server.url, 3) == (1, 2)
        sock.close()
        time.sleep(0.5)
        sock = _non_reader(server.url, 1, _bulky(1024))
        assert _settled(server.url, 4) == (2, 2)
        sock.close()
    finally:
        assert server.stop() == 0, server.output()


def _rest_non_reader(url: str, kib: int) -> socket.socket:
    """A REST connection that asks for a `kib` KiB binary answer and reads nothing."""
    body = json.dumps(
        {
            "inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 1], "data": [kib]}],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    host, port = url.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    head = f"POST /v2/models/bulky/infer HTTP/1.1\r\nHost: {url}\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_rest_answers_nobody_reads_are_bounded(
    start_server: Any, plugins: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """REST answers count until they are written (aiohttp waits for the client's socket to
    drain): with unsent_bytes=32 MiB, two connections that ask for 16 MiB and read nothing hold
    it all, and a third request is answered 429 naming --max-unsent-bytes (16 MiB: more than
    the kernel's socket buffers take in). Before, 100 such connections held 440 MB. When they
    go, what they held is given back, and quietly: an error logged with its traceback kept the
    frames, and their answers, alive until a full collection (a second round of 200 such
    connections grew the server by another 500 MB)."""
    server = start_server(plugins, limits=Limits(unsent_bytes=32 << 20))
    url = server.url
    sockets = [_rest_non_reader(server.http_url, 16 << 10) for _ in range(2)]
    try:
        assert _settled(url, 2) == (2, 0)
        time.sleep(0.2)
        assert server.server.plane.unsent.held == 32 << 20
        third = _rest_non_reader(server.http_url, 16 << 10)
        sockets.append(third)
        reply = _read_all_http(third)
        assert reply.startswith(b"HTTP/1.1 429"), reply[:200]
        assert b"--max-unsent-bytes" in reply
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 5
    while server.server.plane.unsent.held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.server.plane.unsent.held == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def _read_all_http(sock: socket.socket, timeout: float = 5) -> bytes:
    """A short HTTP response, read until its body is complete or `timeout`."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_unsent_answers_count_per_connection_and_give_back_exactly() -> None:
    """The count alone: a connection past its quarter is refused while another is not; the
    server's bound holds across connections; an answer always goes where nothing is held; and
    giving back restores the count to zero, connection by connection."""
    from hub.core.unsent import UnsentAnswers
    from hub.errors import LimitReached

    unsent = UnsentAnswers(400)  # 100 per connection
    first = unsent.take(150, "a")  # more than its share, but the connection held nothing
    with pytest.raises(LimitReached, match="this connection holds 150 bytes"):
        unsent.take(10, "a")
    others = [unsent.take(100, peer) for peer in ("b", "c")]
    rest = unsent.take(50, None)  # a REST answer: the server's bound only
    with pytest.raises(LimitReached, match="the server holds 400 bytes"):
        unsent.take(1, "d")
    assert unsent.held == 400
    for give_back in (first, *others, rest):
        give_back()
    assert unsent.held == 0 and unsent._connections == {}
    unsent.take(400, "a")  # all of it, for one connection, once nothing is held
