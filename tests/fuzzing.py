"""The fuzzer shared by tests/test_fuzz.py (bounded, default suite) and scripts/fuzz.py
(`make fuzz`), for both protocols: valid seed requests, mutations (byte-level and
protobuf-aware ModelInfer messages over gRPC; JSON, binary-extension, compressed and header
mutations of REST infer and of every other REST endpoint), one runner, and the oracle that
judges each answer. An answer is acceptable when its status is one the request may get, its
message is bounded (over REST, a JSON `{"error": ...}`), and, when it succeeds, it is
well-formed and its outputs are what the model computes from the request as we decode it
here, independently of the server."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gzip
import json
import math
import random
import struct
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import grpc
import numpy as np
import yarl

from hub.datatypes import NUMPY_DTYPES, from_buffer
from hub.errors import MESSAGE_LIMIT, HubError
from hub.protocol.codec import TYPED_FIELDS, decode_inputs
from hub.protocol.generated import grpc_service_pb2 as pb
from hub.protocol.rest.codec import _flatten as flatten_json  # row-major, as Triton reads JSON data

INFER = "/inference.GRPCInferenceService/ModelInfer"
INTERESTING = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    64,
    65,
    255,
    256,
    -1,
    -2,
    1 << 26,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 62,
    (1 << 63) - 1,
]
NUMERIC = [d for d in NUMPY_DTYPES if d != "BYTES"]

#: Model name -> its outputs computed in numpy from the decoded inputs (digits is added by the
#: caller, from the in-process runtime or None when there is none).
Reference = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
REFERENCES: dict[str, Reference] = {
    **{f"identity_{d.lower()}": (lambda i: {"OUTPUT0": i["INPUT0"]}) for d in NUMPY_DTYPES},
    "addsub": lambda i: {"SUM": i["INPUT0"] + i["INPUT1"], "DIFF": i["INPUT0"] - i["INPUT1"]},
    "fragile": lambda i: {"OUTPUT0": i["INPUT0"] + 1},
    "affine_torch": lambda i: {"y": i["x"] * 2 + 1, "total": i["x"].sum(1, keepdims=True)},
    "affine_onnx": lambda i: {"y": i["x"] * 2 + 1, "total": i["x"].sum(1, keepdims=True)},
}
#: Models whose forward may fail on purpose (a poisoned row fails its whole batch).
MAY_FAIL = {"fragile"}


def _sample(datatype: str, shape: tuple[int, ...], rng: random.Random) -> np.ndarray:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([bytes(rng.randrange(256) for _ in range(rng.randrange(6))) for _ in range(count)],
                        dtype=np.object_).reshape(shape)  # fmt: skip
    raw = bytes(rng.randrange(256) for _ in range(count * NUMPY_DTYPES[datatype].itemsize))
    array = np.frombuffer(raw, NUMPY_DTYPES[datatype]).reshape(shape)
    return array.astype(np.bool_) if datatype == "BOOL" else array


def seed_requests(rng: random.Random) -> list[pb.ModelInferRequest]:
    """Valid requests for the shared test server's models, raw and typed."""
    from hub.datatypes import encode_bytes

    seeds = []
    for datatype in NUMPY_DTYPES:
        for shape in ((1, 3), (2, 2), (3, 1)):
            array = _sample(datatype, shape, rng)
            request = pb.ModelInferRequest(model_name=f"identity_{datatype.lower()}", id=f"seed-{len(seeds)}")
            request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
            request.raw_input_contents.append(encode_bytes(array) if datatype == "BYTES" else array.tobytes())
            seeds.append(request)
            if datatype in TYPED_FIELDS:
                typed = pb.ModelInferRequest(model_name=request.model_name)
                tensor = typed.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
                getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(array.reshape(-1).tolist())
                seeds.append(typed)
    for rows in (1, 2):
        a, b = (np.arange(4 * rows, dtype=np.float32).reshape(rows, 4) * k for k in (1.5, -2))
        request = pb.ModelInferRequest(model_name="addsub")
        for name, value in (("INPUT0", a), ("INPUT1", b)):
            request.inputs.add(name=name, datatype="FP32", shape=value.shape)
            request.raw_input_contents.append(value.tobytes())
        seeds.append(request)
        with_output = pb.ModelInferRequest()
        with_output.CopyFrom(request)
        with_output.outputs.add(name="DIFF")
        seeds.append(with_output)
    for model, name, shape in (("digits", "image", (1, 1, 8, 8)), ("digits", "image", (3, 1, 8, 8)),
                               ("fragile", "INPUT0", (2, 1)), ("affine_torch", "x", (2, 4))):  # fmt: skip
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name=name, datatype="FP32", shape=shape)
        request.raw_input_contents.append(np.ones(shape, np.float32).tobytes())
        seeds.append(request)
    return seeds


def _mutate_message(request: pb.ModelInferRequest, rng: random.Random) -> bytes:
    """A protobuf-aware mutation: the message still parses, its claims do not hold."""
    out = pb.ModelInferRequest()
    out.CopyFrom(request)
    choice = rng.randrange(9)
    tensors = list(out.inputs)
    tensor = rng.choice(tensors) if tensors else out.inputs.add(name="INPUT0", datatype="FP32")
    if choice == 0 and tensor.shape:
        tensor.shape[rng.randrange(len(tensor.shape))] = rng.choice(INTERESTING)
    elif choice == 1:
        if rng.random() < 0.2:  # the same elements in more dimensions than numpy can represent
            tensor.shape.extend([1] * rng.choice([33, 65, 300]))
        else:
            tensor.shape.append(rng.choice(INTERESTING))
    elif choice == 2:
        tensor.datatype = rng.choice([*NUMPY_DTYPES, "FP8", "", "fp32", "B" * rng.randrange(1, 300)])
    elif choice == 3 and out.raw_input_contents:
        index = rng.randrange(len(out.raw_input_contents))
        data = out.raw_input_contents[index]
        cut = rng.randrange(len(data) + 1)
        out.raw_input_contents[index] = data[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(9)))
    elif choice == 4:
        tensor.name = rng.choice(["", "INPUT1", "x" * rng.randrange(1, 5000), tensor.name + "\u00e9"])
    elif choice == 5:
        out.raw_input_contents.append(struct.pack("<I", rng.choice(INTERESTING) & 0xFFFFFFFF))
    elif choice == 6:
        field_name = rng.choice(sorted(set(TYPED_FIELDS.values())))
        values = getattr(tensor.contents, field_name)
        if field_name == "bytes_contents":
            values.extend([b"\x00" * rng.randrange(4)] * rng.randrange(5))
        elif field_name == "bool_contents":
            values.extend([True] * rng.randrange(5))
        else:
            values.extend([rng.randrange(100)] * rng.randrange(5))
    elif choice == 7:
        out.outputs.add(name=rng.choice(["OUTPUT0", "SUM", "nope", "logits", "y" * 3000]))
        if rng.random() < 0.3:
            out.outputs[-1].parameters["classification"].int64_param = rng.choice([-1, 0, 1, 3, 1 << 40])
    else:
        out.model_version = rng.choice(["1", "2", "", "-1", "v" * 200])
    return out.SerializeToString()


def _mutate_bytes(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        choice = rng.randrange(7)
        position = rng.randrange(len(buffer) + 1)
        if choice == 0 and buffer:
            index = min(position, len(buffer) - 1)
            buffer[index] ^= 1 << rng.randrange(8)
        elif choice == 1 and buffer:
            buffer[min(position, len(buffer) - 1)] = rng.choice([0, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x1A])
        elif choice == 2:
            buffer[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif choice == 3:
            del buffer[position : position + rng.randrange(1, 17)]
        elif choice == 4:
            del buffer[position:]
        elif choice == 5:
            value = rng.choice(INTERESTING) & 0xFFFFFFFFFFFFFFFF
            buffer[position : position + 8] = struct.pack("<Q", value)
        else:
            other = rng.choice(others)
            start = rng.randrange(len(other) + 1)
            buffer[position:position] = other[start : start + rng.randrange(1, 64)]
    return bytes(buffer)


def mutations(seeds: list[pb.ModelInferRequest], count: int, rng: random.Random) -> Iterable[bytes]:
    """`count` mutated requests: half protobuf-aware, half byte-level (most of those no
    longer parse, or parse into something else)."""
    serialized = [s.SerializeToString() for s in seeds]
    for _ in range(count):
        index = rng.randrange(len(seeds))
        if rng.random() < 0.5:
            yield _mutate_message(seeds[index], rng)
        else:
            yield _mutate_bytes(serialized[index], rng, serialized)


@dataclass
class Verdicts:
    codes: Counter[str] = field(default_factory=Counter)
    checked: int = 0  # successful answers compared with the reference
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str, request: bytes) -> None:
        if len(self.problems) < 50:
            self.problems.append(f"{text} (request {request[:80]!r}..., {len(request)} bytes)")

    def add(self, other: Verdicts) -> None:
        self.codes.update(other.codes)
        self.checked += other.checked
        self.problems.extend(other.problems)


def _compare_outputs(
    model: str,
    expected: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
    wanted: list[str],
    problem: Callable[[str], None],
) -> bool:
    """Whether the outputs answered (decoded) are the ones asked for, with the reference's
    values; a problem naming the first difference otherwise."""
    if sorted(got) != sorted(wanted):
        problem(f"{model!r}: outputs {sorted(got)}, expected {sorted(wanted)}")
        return False
    for name, value in got.items():
        want = np.asarray(expected[name])
        if want.size != value.size:
            problem(f"{model!r}: output {name} has shape {value.shape}, expected {want.shape}")
            return False
        want = want.reshape(value.shape)
        if value.dtype.kind == "f" and not model.startswith("identity_"):
            ok = np.allclose(value, want, rtol=1e-4, atol=1e-5, equal_nan=True)
        elif value.dtype == np.object_:
            ok = [bytes(v) for v in value.reshape(-1)] == [bytes(v) for v in want.reshape(-1)]
        else:
            ok = value.tobytes() == np.ascontiguousarray(want).astype(value.dtype).tobytes()
        if not ok:
            problem(f"{model!r}: output {name} differs from the in-process reference")
            return False
    return True


def judge(
    data: bytes,
    code: grpc.StatusCode,
    details: str,
    response: bytes | None,
    references: Mapping[str, Reference | None],
    verdicts: Verdicts,
) -> None:
    """Record one answer, and a problem when it is not an acceptable one."""
    verdicts.codes[code.name] += 1

    def problem(text: str) -> None:
        verdicts.problem(text, data)

    if len(details) > MESSAGE_LIMIT + 32 or "Traceback" in details:
        problem(f"{code.name}: unbounded or internal message of {len(details)} chars: {details[:200]!r}")
    try:
        request = pb.ModelInferRequest.FromString(data)
    except Exception:
        if code != grpc.StatusCode.INVALID_ARGUMENT:
            problem(f"undecodable request answered {code.name}: {details[:200]!r}")
        return
    model = request.model_name
    if code == grpc.StatusCode.INTERNAL and model in MAY_FAIL:
        return
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        return
    if code != grpc.StatusCode.OK:
        problem(f"{model!r}: undefined status {code.name}: {details[:200]!r}")
        return
    assert response is not None
    reference = references.get(model)
    if reference is None:
        if model not in references:
            problem(f"{model!r}: answered OK, but no such model is served")
        return
    try:
        inputs = decode_inputs(request)
        with np.errstate(all="ignore"):  # mutated floats overflow, as they do in the model
            expected = reference(inputs)
    except (HubError, ValueError, KeyError, TypeError) as exc:
        problem(f"{model!r}: answered OK, but the request does not decode here ({type(exc).__name__}: {exc})")
        return
    answer = pb.ModelInferResponse.FromString(response)
    wanted = [o.name for o in request.outputs] or list(expected)
    got = {
        t.name: from_buffer(t.name, t.datatype, tuple(t.shape), raw)
        for t, raw in zip(answer.outputs, answer.raw_output_contents, strict=False)
    }
    if any("classification" in o.parameters for o in request.outputs):
        # a top-N view of the output; the classification tests check its values
        if sorted(got) != sorted(wanted):
            problem(f"{model!r}: outputs {sorted(got)}, expected {sorted(wanted)}")
        return
    if _compare_outputs(model, expected, got, wanted, problem):
        verdicts.checked += 1


# --- REST (KServe V2 over HTTP): the same oracle's rules, for JSON answers --------------------

#: Valid infer bodies for the shared test server's models (model, JSON body).
REST_SEEDS: list[tuple[str, dict[str, Any]]] = [
    ("digits", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64}]}),
    (
        "addsub",
        {
            "id": "a",
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
                {"name": "INPUT1", "datatype": "FP32", "shape": [1, 4], "data": [[1, 1, 1, 1]]},
            ],
            "outputs": [{"name": "SUM", "parameters": {"classification": 2}}, {"name": "DIFF"}],
            "parameters": {"binary_data_output": False},
        },
    ),
    (
        "addsub",
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [2, 4], "data": [[1, 2, 3, 4], [5, 6, 7, 8]]},
                {"name": "INPUT1", "datatype": "FP32", "shape": [2, 4], "data": [0.5] * 8},
            ],
            "outputs": [{"name": "SUM", "parameters": {"binary_data": True}}],
        },
    ),
    ("identity_bytes", {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "bc"]}]}),
    ("identity_bool", {"inputs": [{"name": "INPUT0", "datatype": "BOOL", "shape": [1, 2], "data": [True, False]}]}),
    ("identity_int64", {"inputs": [{"name": "INPUT0", "datatype": "INT64", "shape": [1, 3], "data": [-1, 0, 2**40]}]}),
    ("identity_uint8", {"inputs": [{"name": "INPUT0", "datatype": "UINT8", "shape": [2, 1], "data": [0, 255]}]}),
    ("identity_fp16", {"inputs": [{"name": "INPUT0", "datatype": "FP16", "shape": [1, 2], "data": [0.5, -2]}]}),
    ("fragile", {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}),
    ("affine_torch", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": list(range(8))}]}),
]
WEIRD: list[Any] = [None, True, False, -1, 0, 1, 2**70, 1.5, -1e308, float("nan"), "", "x" * 3000, "9" * 5000,
                    "\u00e9\x00", [], {}, [1, "a"], [[[]]], [-1], [2**63], {"a": {"b": [None]}}, "FP32", "BYTES",
                    [1] * 65, {"binary_data_size": 4}]  # fmt: skip
#: Where the load/unload cases point: a model the infer cases never use, and names that are none.
CONTROL_MODELS = ["nobatch", "no_such_model", "x" * 300, "%2e%2e", "n\u00e9", "digits%2F1"]
JSON_ANSWER = {"metadata", "ready", "config", "stats", "index", "logging", "trace", "shm_status", "health", "server"}
EMPTY_ANSWER = {"load", "unload", "shm_register", "shm_unregister"}


@dataclass(frozen=True)
class RestCase:
    """One HTTP request, and what the oracle needs to judge its answer: `sent` is the JSON (the
    header, with the binary extension) exactly as the server will read it, None when its bytes
    were mangled; `tail` the binary part; `refused` that any 2xx is wrong (a corrupt or
    mislabelled Content-Encoding)."""

    endpoint: str
    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    model: str = ""
    sent: Any = None
    tail: bytes = b""
    refused: bool = False


def _parts(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (dict keys and list indexes), the value itself first."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _parts(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:8]):
            found += _parts(item, (*path, index))
    return found


def mutate_json(body: Any, rng: random.Random) -> Any:
    """A copy of `body` with one part (or the whole) replaced by a value of the wrong type,
    dropped, nested 2-900 levels deep, or given a new key."""
    out = copy.deepcopy(body)
    parts = _parts(out)
    path = rng.choice(parts[1:] or parts)
    if not path:
        return rng.choice(WEIRD)
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    choice = rng.randrange(5)
    if choice == 0:
        del parent[path[-1]]
    elif choice == 1:
        nested = parent[path[-1]]
        for _ in range(rng.choice([2, 70, 900])):
            nested = [nested]
        parent[path[-1]] = nested
    elif choice == 2 and isinstance(parent, dict):
        key = rng.choice(["parameters", "shared_memory_region", "binary_data_size", "x" * 200, ""])
        parent[key] = rng.choice(WEIRD)
    else:
        parent[path[-1]] = rng.choice(WEIRD)
    return out


def _mangle(data: bytes, rng: random.Random) -> bytes:
    cut = rng.randrange(len(data) + 1)
    return data[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(4))) + data[cut + rng.randrange(3) :]


def encode_body(body: bytes, rng: random.Random) -> tuple[bytes, dict[str, str], bool]:
    """The body as sent, its headers, and whether it must be refused: as it is mostly, else
    gzip or deflate, now and then cut short, with a byte flipped, under the other coding's
    name or a coding we do not read."""
    roll = rng.random()
    if roll < 0.7:
        return body, {}, False
    coding = rng.choice(["gzip", "deflate"])
    data = gzip.compress(body) if coding == "gzip" else zlib.compress(body)
    refused = True
    if roll < 0.8:
        data = data[: rng.randrange(len(data))]
    elif roll < 0.85:  # a flipped bit in a gzip header's mtime or OS byte may pass: not judged
        i = rng.randrange(len(data))
        data, refused = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :], False
    elif roll < 0.9:
        coding = {"gzip": "deflate", "deflate": "gzip"}[coding]
    elif roll < 0.93:
        coding = rng.choice(["br", "zstd", "gzip, deflate", "compress", "GZIP "])
        refused = coding != "GZIP "  # HTTP's codings are case-insensitive; not judged
    else:
        refused = False
    return data, {"Content-Encoding": coding, "Accept-Encoding": rng.choice(["gzip", "deflate", "br", "*"])}, refused


def _binary(body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The binary-extension form of a JSON infer body: each input's data as raw bytes."""
    from hub.datatypes import encode_bytes

    header = copy.deepcopy(body)
    parts = []
    for tensor in header["inputs"]:
        if tensor["datatype"] == "BYTES":
            raw = encode_bytes(np.array([v.encode() for v in tensor.pop("data")], dtype=np.object_))
        else:
            raw = np.array(tensor.pop("data"), NUMPY_DTYPES[tensor["datatype"]]).tobytes()
        tensor.setdefault("parameters", {})["binary_data_size"] = len(raw)
        parts.append(raw)
    return header, b"".join(parts)


def _infer_case(rng: random.Random, model: str, body: dict[str, Any], shm: str | None) -> RestCase:
    body = copy.deepcopy(body)  # the seed stays as it is
    binary = rng.random() < 0.3
    tail = b""
    if binary:
        body, tail = _binary(body)
    if shm is not None and rng.random() < 0.1:  # an input, or an output, from a registered region
        tensor = rng.choice(body["inputs"] if rng.random() < 0.7 else body.setdefault("outputs", [{"name": "x"}]))
        tensor.pop("data", None)
        tensor["parameters"] = {"shared_memory_region": shm, "shared_memory_byte_size": rng.choice([4, 16, 64, 4096]),
                                "shared_memory_offset": rng.choice([0, 8, 4095, 4096])}  # fmt: skip
    sent = mutate_json(body, rng) if rng.random() < 0.9 else body
    header = json.dumps(sent).encode()
    if rng.random() < 0.1:
        header, sent = _mangle(header, rng), None
    headers: dict[str, str] = {}
    if binary:
        roll = rng.random()
        if roll < 0.15:
            tail = tail[: rng.randrange(len(tail) + 1)]
        elif roll < 0.25:
            tail += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        length: Any = len(header)
        if rng.random() < 0.15:
            length = rng.choice([-1, 0, len(header) - 1, len(header) + 1, len(header) + len(tail) + 1, 1 << 40,
                                 "abc", "", " 12", "1e2", "0x10", "+5"])  # fmt: skip
            sent = None
        headers["Inference-Header-Content-Length"] = str(length)
    data, encoding, refused = encode_body(header + tail, rng)
    headers.update(encoding)
    if rng.random() < 0.1:
        key = rng.choice(["Content-Type", "Inference-Header-Content-Length", "Authorization", "Expect"])
        headers[key] = rng.choice(["application/octet-stream", "text/plain; charset=utf-16", "", "-5", "Bearer x",
                                   "\u00e9", "100-continue"])  # fmt: skip
        if key == "Inference-Header-Content-Length":
            sent = None
    version = rng.choice(["", "", "", "/versions/1", "/versions/2", "/versions/-1", "/versions/v"])
    return RestCase("infer", "POST", f"/v2/models/{model}{version}/infer", data, tuple(headers.items()), model,
                    sent, tail, refused)  # fmt: skip


def _name(rng: random.Random, models: list[str]) -> str:
    return rng.choice([*models, "no_such_model", "", "x" * 3000, "a%2Fb", "%00", "\u00e9", "..", "digits%20"])


def _other_case(rng: random.Random, models: list[str], shm: str | None) -> RestCase:
    """A request to an endpoint but infer: metadata, config, readiness and statistics under
    mutated names and versions; repository, shared-memory, trace and log requests with mutated
    bodies."""
    model = _name(rng, models)
    version = rng.choice(["", "", "/versions/1", "/versions/0", "/versions/-1", "/versions/99999999999999999999"])
    kind = rng.randrange(12)
    body: Any = None
    control = rng.choice(CONTROL_MODELS)
    region = rng.choice(["fuzz0", "fuzz1", "", "r" * 2000, "a%2Fb"])
    area = "systemsharedmemory" if rng.random() < 0.85 else "cudasharedmemory"
    if kind == 0:
        endpoint, method, path = "metadata", "GET", f"/v2/models/{model}{version}"
    elif kind == 1:
        endpoint, method, path = "ready", "GET", f"/v2/models/{model}{version}/ready"
    elif kind == 2:
        endpoint, method, path = "config", "GET", f"/v2/models/{model}{version}/config"
    elif kind == 3:
        endpoint, method, path = "stats", "GET", rng.choice([f"/v2/models/{model}{version}/stats", "/v2/models/stats"])
    elif kind == 4:
        endpoint, method, path, body = "index", "POST", "/v2/repository/index", rng.choice([{}, {"ready": True}])
    elif kind == 5:
        endpoint, method, path = "load", "POST", f"/v2/repository/models/{control}/load"
        body = rng.choice([{}, {"parameters": {}}, {"parameters": {"config": "{}"}}])
    elif kind == 6:
        endpoint, method, path = "unload", "POST", f"/v2/repository/models/{control}/unload"
        body = rng.choice([{}, {"parameters": {"unload_dependents": False}}])
    elif kind == 7:
        endpoint, method, path = "shm_register", "POST", f"/v2/{area}/region/{region}/register"
        body = {"key": shm or "/modelhub-fuzz-absent", "offset": 0, "byte_size": 4096}
        if area == "cudasharedmemory":
            body = {"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64}
    elif kind == 8:
        endpoint, method = "shm_status", "GET"
        path = rng.choice([f"/v2/{area}/status", f"/v2/{area}/region/{region}/status"])
    elif kind == 9:
        endpoint, method, body = "shm_unregister", "POST", rng.choice([None, {}])
        path = rng.choice([f"/v2/{area}/unregister", f"/v2/{area}/region/{region}/unregister"])
    elif kind == 10:
        endpoint, method, path = (
            "trace",
            rng.choice(["GET", "POST"]),
            rng.choice(["/v2/trace/setting", f"/v2/models/{model}/trace/setting"]),
        )
        body = rng.choice([{}, {"trace_level": ["OFF"]}, {"trace_rate": "1000"}, {"trace_count": "-1"}])
    else:
        endpoint, method, path = "logging", rng.choice(["GET", "POST"]), "/v2/logging"
        body = rng.choice([{}, {"log_info": True}, {"log_verbose_level": 0}, {"log_format": "text"}])
    if method == "GET" and rng.random() < 0.05:
        method, body = "HEAD", None
    data = b""
    headers: dict[str, str] = {}
    refused = False
    if body is not None and method == "POST":
        if rng.random() < 0.8:
            body = mutate_json(body, rng)
        data = json.dumps(body).encode()
        if rng.random() < 0.1:
            data = _mangle(data, rng)
        data, headers, refused = encode_body(data, rng)
    name = model if endpoint in ("metadata", "ready", "config", "stats") else control
    refused &= endpoint != "shm_unregister"  # which reads no body
    return RestCase(endpoint, method, path, data, tuple(headers.items()), name, refused=refused)


def rest_cases(count: int, rng: random.Random, *, shm: str | None = None) -> Iterable[RestCase]:
    """`count` mutated REST requests: seven in ten to infer (three of those in the binary
    extension), the rest to the other endpoints. `shm` is the key of a system shared-memory
    object for the server to map (its regions are named fuzz0 and fuzz1), or None."""
    models = sorted({model for model, _ in REST_SEEDS})
    for _ in range(count):
        if rng.random() < 0.7:
            model, body = rng.choice(REST_SEEDS)
            yield _infer_case(rng, model, body, shm)
        else:
            yield _other_case(rng, models, shm)


def _json_values(datatype: str, shape: Any, data: Any) -> np.ndarray:
    """A tensor's JSON `data` decoded here, strictly: ValueError for anything the server may
    read some other way (or must refuse)."""
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 31 for d in shape):
        raise ValueError("shape")
    flat = flatten_json(data)
    if len(flat) != int(np.prod(shape)) or datatype not in NUMPY_DTYPES:
        raise ValueError("count")
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ValueError("BYTES")
        array = np.empty(len(flat), np.object_)
        array[:] = [v.encode() for v in flat]
        return array.reshape(shape)
    if datatype == "BOOL":
        ok = all(type(v) is bool for v in flat)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        ok = all(type(v) is int and info.min <= v <= info.max for v in flat)
    else:
        limit = float(np.finfo(dtype).max)
        ok = all(type(v) in (int, float) and (not math.isfinite(v) or abs(v) <= limit) for v in flat)
    if not ok:
        raise ValueError("values")
    return np.array(flat, dtype).reshape(shape)


def _rest_inputs(case: RestCase) -> dict[str, np.ndarray]:
    """The inputs of an infer case decoded here, independently of the server (ValueError,
    KeyError or TypeError for one this does not read the same way for sure)."""
    sent = case.sent
    if not isinstance(sent, dict) or not isinstance(sent.get("inputs"), list):
        raise ValueError("body")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in sent["inputs"]:
        name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
        parameters = tensor.get("parameters") or {}
        if not isinstance(name, str) or name in inputs or set(parameters) - {"binary_data_size"}:
            raise ValueError("input")
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if type(size) is not int or "data" in tensor or not 0 <= size <= len(case.tail) - offset:
                raise ValueError("binary_data_size")
            raw = case.tail[offset : offset + size]
            offset += size
            inputs[name] = from_buffer(name, datatype, tuple(shape), raw)
        else:
            inputs[name] = _json_values(datatype, shape, tensor["data"])
    if offset != len(case.tail):
        raise ValueError("tail")
    return inputs


def _rest_outputs(answer: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A 2xx infer answer's JSON and its outputs decoded (ValueError, KeyError or TypeError
    when it is not well-formed)."""
    length = len(answer) if header_length is None else int(header_length)
    if not 0 < length <= len(answer):
        raise ValueError(f"Inference-Header-Content-Length {header_length} of a {len(answer)}-byte answer")
    payload = json.loads(answer[:length])
    tail = answer[length:]
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in payload["outputs"]:
        name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
        if not isinstance(name, str) or name in outputs or datatype not in NUMPY_DTYPES:
            raise ValueError(f"output {tensor!r:.200}")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"output {name}: shape {shape}")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            outputs[name] = from_buffer(name, datatype, tuple(shape), tail[offset : offset + size])
            offset += size
        elif datatype == "BYTES":
            values = flatten_json(tensor["data"])
            if len(values) != int(np.prod(shape)) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"output {name}: {len(values)} BYTES values for shape {shape}")
            outputs[name] = np.array([v.encode() for v in values], np.object_).reshape(shape)
        else:
            outputs[name] = np.array(flatten_json(tensor["data"]), NUMPY_DTYPES[datatype]).reshape(shape)
    if offset != len(tail):
        raise ValueError(f"binary outputs of {offset} bytes in a {len(tail)}-byte tail")
    return payload, outputs


def judge_rest(
    case: RestCase,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    references: Mapping[str, Reference | None],
    verdicts: Verdicts,
) -> None:
    """Record one REST answer, and a problem when it is not an acceptable one: the rules of
    `judge`, in HTTP. A refusal is a 4xx (501 for a kind of shared memory the server is without;
    503 for a model that a load or unload case has made unready) with a bounded JSON
    `{"error": ...}`; 500 only from the model made to fail; a 2xx a well-formed answer, and for
    infer the reference's outputs where the request decodes here."""
    verdicts.codes[str(status)] += 1

    def problem(text: str) -> None:
        verdicts.problem(f"{case.method} {case.path[:120]}: {text}", case.body)

    if status >= 400 or (status == 503 and case.endpoint in ("ready", "health")):
        if case.method == "HEAD":
            return
        try:
            error = json.loads(body)["error"] if status != 503 or "error" in json.loads(body) else "unready"
        except (ValueError, KeyError, TypeError):
            problem(f"{status} without a JSON error: {body[:200]!r}")
            return
        if not isinstance(error, str) or not error or len(error) > MESSAGE_LIMIT + 64 or "Traceback" in error:
            problem(f"{status}: an empty, unbounded or internal error of {len(str(error))} chars: {str(error)[:200]!r}")
        defined = status in (400, 403, 404, 405, 409, 413, 417) or (
            status == 501 and ("sharedmemory" in case.path or case.endpoint == "logging")
        )
        defined |= status == 503 and case.model in CONTROL_MODELS
        defined |= status == 500 and case.endpoint == "infer" and case.model in MAY_FAIL
        defined |= status == 503 and case.endpoint == "ready" and case.model == "nobatch"
        if not defined:
            problem(f"undefined status {status}: {error!r:.200}")
        return
    if not 200 <= status < 300:
        problem(f"undefined status {status}: {body[:200]!r}")
        return
    if case.refused:
        problem(f"{status} for a body that cannot be read as {dict(case.headers).get('Content-Encoding')!r}")
        return
    if case.method == "HEAD":
        return
    if case.endpoint in EMPTY_ANSWER:
        return
    if case.endpoint != "infer":
        try:
            answer = json.loads(body)
        except ValueError:
            problem(f"{status} with a body that is not JSON: {body[:200]!r}")
            return
        kind: type = list if case.endpoint in ("index", "shm_status") else dict
        if not isinstance(answer, kind):
            problem(f"{status} with a {type(answer).__name__}, not a {kind.__name__}: {body[:200]!r}")
        return
    try:
        payload, got = _rest_outputs(body, headers.get("Inference-Header-Content-Length"))
    except (ValueError, KeyError, TypeError) as exc:
        problem(f"{status}: a malformed infer answer ({type(exc).__name__}: {exc}): {body[:200]!r}")
        return
    if payload.get("model_name") != case.model:
        problem(f"answered for model {payload.get('model_name')!r:.100}")
        return
    sent = case.sent if isinstance(case.sent, dict) else {}
    if isinstance(sent.get("id"), str) and payload.get("id") != sent["id"]:
        problem(f"id {sent['id']!r:.100} came back as {payload.get('id')!r:.100}")
    reference = references.get(case.model)
    if reference is None:
        if case.model not in references:
            problem(f"{case.model!r}: answered {status}, but no such model is served")
        return
    outputs = sent.get("outputs") or []
    try:
        inputs = _rest_inputs(case)
        wanted = [o["name"] for o in outputs] or None
        classified = any("classification" in (o.get("parameters") or {}) for o in outputs)
        with np.errstate(all="ignore"):
            expected = reference(inputs)
    except (HubError, ValueError, KeyError, TypeError, AttributeError):
        return  # the server reads more kinds of request than this does (ragged nesting, say)
    wanted = wanted or list(expected)
    if classified:
        if sorted(got) != sorted(wanted):
            problem(f"{case.model!r}: outputs {sorted(got)}, expected {sorted(wanted)}")
        return
    if _compare_outputs(case.model, expected, got, wanted, problem):
        verdicts.checked += 1


# --- the runner, for either protocol ---------------------------------------------------------

Sender = Callable[[Any, Mapping[str, Reference | None], Verdicts], Awaitable[None]]


@contextlib.asynccontextmanager
async def _grpc_sender(url: str, timeout: float) -> AsyncIterator[Sender]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(url, options=options) as channel:
        method = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)

        async def send(data: bytes, references: Mapping[str, Reference | None], verdicts: Verdicts) -> None:
            try:
                response = await method(data, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                judge(data, exc.code(), exc.details() or "", None, references, verdicts)
            else:
                judge(data, grpc.StatusCode.OK, "", response, references, verdicts)

        yield send


@contextlib.asynccontextmanager
async def _rest_sender(url: str, timeout: float) -> AsyncIterator[Sender]:
    import aiohttp

    session_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(f"http://{url}", timeout=session_timeout, auto_decompress=True) as session:

        async def send(case: RestCase, references: Mapping[str, Reference | None], verdicts: Verdicts) -> None:
            headers = dict(case.headers)
            headers.setdefault("Accept-Encoding", "identity")
            try:
                async with session.request(
                    case.method,
                    yarl.URL(quote(case.path, safe="/%"), encoded=True),
                    data=case.body or None,
                    headers=headers,
                ) as response:
                    body = await response.read()
                    judge_rest(case, response.status, body, response.headers, references, verdicts)
            except TimeoutError:
                verdicts.codes["timeout"] += 1
                verdicts.problem(f"{case.method} {case.path[:120]}: no answer within {timeout} s", case.body)
            except aiohttp.ClientError as exc:
                verdicts.codes["connection"] += 1
                verdicts.problem(f"{case.method} {case.path[:120]}: {type(exc).__name__}: {exc}", case.body)

        yield send


SENDERS = {"grpc": _grpc_sender, "rest": _rest_sender}


async def run(
    url: str,
    cases: Iterable[Any],
    references: Mapping[str, Reference | None],
    *,
    protocol: str = "grpc",
    concurrency: int = 16,
    timeout: float = 60.0,
) -> Verdicts:
    """Send every case to `url`, `concurrency` at a time, and judge each answer: raw bytes as
    a ModelInfer (protocol "grpc", url host:port of gRPC), or RestCases (protocol "rest", url
    host:port of HTTP)."""
    verdicts = Verdicts()
    async with SENDERS[protocol](url, timeout) as send:
        iterator = iter(cases)

        async def worker() -> None:
            for case in iterator:
                await send(case, references, verdicts)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return verdicts


async def probe(url: str, protocol: str = "grpc", timeout: float = 10.0) -> bool:
    """Whether the server answers its liveness probe within `timeout`."""
    if protocol == "rest":
        import aiohttp

        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.get(f"http://{url}/v2/health/live") as response,
            ):
                return response.status == 200 and (await response.json()).get("live") is True
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
    async with grpc.aio.insecure_channel(url) as channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        try:
            return bool(pb.ServerLiveResponse.FromString(await live(b"", timeout=timeout)).live)
        except grpc.aio.AioRpcError:
            return False
