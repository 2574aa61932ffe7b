"""gRPC clients that ask for large answers and never read them, through the real server: what
the server holds for them is bounded (calls per connection, answers per stream), and other
clients are served meanwhile."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2

from hub.limits import Limits

from .conftest import TEST_PLUGINS, link_plugins

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
