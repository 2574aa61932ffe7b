"""The ModelInfer fuzzer shared by tests/test_fuzz.py (bounded, default suite) and
scripts/fuzz.py (`make fuzz`): valid seed requests, byte-level and protobuf-aware mutations,
and the oracle that judges each answer. An answer is acceptable when its status is one the
request may get, its message is bounded, and, when it succeeds, its outputs are what the model
computes from the request as we decode it here, independently of the server."""

from __future__ import annotations

import asyncio
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from hub.datatypes import NUMPY_DTYPES, from_buffer
from hub.errors import MESSAGE_LIMIT, HubError
from hub.protocol.codec import TYPED_FIELDS, decode_inputs
from hub.protocol.generated import grpc_service_pb2 as pb

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
        if len(verdicts.problems) < 50:
            verdicts.problems.append(f"{text} (request {data[:80]!r}..., {len(data)} bytes)")

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
    got = {t.name: (t, raw) for t, raw in zip(answer.outputs, answer.raw_output_contents, strict=False)}
    if sorted(got) != sorted(wanted):
        problem(f"{model!r}: outputs {sorted(got)}, expected {sorted(wanted)}")
        return
    if any("classification" in o.parameters for o in request.outputs):
        return  # a top-N view of the output; the classification tests check its values
    for name, (tensor, raw) in got.items():
        value = from_buffer(name, tensor.datatype, tuple(tensor.shape), raw)
        want = np.asarray(expected[name])
        if want.size != value.size:
            problem(f"{model!r}: output {name} has shape {value.shape}, expected {want.shape}")
            return
        want = want.reshape(value.shape)
        if value.dtype.kind == "f" and not model.startswith("identity_"):
            ok = np.allclose(value, want, rtol=1e-4, atol=1e-5, equal_nan=True)
        elif value.dtype == np.object_:
            ok = [bytes(v) for v in value.reshape(-1)] == [bytes(v) for v in want.reshape(-1)]
        else:
            ok = value.tobytes() == np.ascontiguousarray(want).astype(value.dtype).tobytes()
        if not ok:
            problem(f"{model!r}: output {name} differs from the in-process reference")
            return
    verdicts.checked += 1


async def run(
    url: str,
    cases: Iterable[bytes],
    references: Mapping[str, Reference | None],
    *,
    concurrency: int = 16,
    timeout: float = 60.0,
) -> Verdicts:
    """Send every case (raw bytes) as a ModelInfer to `url`, `concurrency` at a time."""
    verdicts = Verdicts()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(url, options=options) as channel:
        method = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        iterator = iter(cases)

        async def worker() -> None:
            for data in iterator:
                try:
                    response = await method(data, timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    judge(data, exc.code(), exc.details() or "", None, references, verdicts)
                else:
                    judge(data, grpc.StatusCode.OK, "", response, references, verdicts)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return verdicts
