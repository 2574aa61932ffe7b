"""Fuzzing ModelInfer, bounded for the default suite: a few thousand mutated messages and
hypothesis-generated tensors. Every answer is a defined status with a bounded message, or a
result equal to the model's in-process; the server stays up and keeps its memory.
`make fuzz` runs the same fuzzer for 100,000+ cases against `modelhub serve`."""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import random
import struct
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hub.datatypes import NUMPY_DTYPES, encode_bytes
from hub.errors import MESSAGE_LIMIT
from hub.protocol.generated import grpc_service_pb2 as pb

from . import fuzzing
from .conftest import RunningServer


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / (1 << 20)


@pytest.fixture(scope="module")
def references(hub_server: RunningServer) -> dict[str, Any]:
    assert hub_server.server is not None and hub_server.server.repository is not None
    served = {m.name: fuzzing.REFERENCES.get(m.name) for m in hub_server.server.repository.models()}
    digits = hub_server.model("digits").runtime
    served["digits"] = lambda inputs: digits.run({"image": inputs["image"]})
    return served


def _send(server: RunningServer, cases: list[bytes], references: dict[str, Any]) -> fuzzing.Verdicts:
    return asyncio.run(fuzzing.run(server.url, cases, references, concurrency=8, timeout=30))


def test_mutated_requests(hub_server: RunningServer, references: dict[str, Any]) -> None:
    rng = random.Random(13)
    seeds = fuzzing.seed_requests(rng)
    warm = _send(hub_server, list(fuzzing.mutations(seeds, 500, rng)), references)
    assert not warm.problems, "\n".join(warm.problems)
    before = _rss_mib()
    verdicts = _send(hub_server, list(fuzzing.mutations(seeds, 3000, rng)), references)
    grown = _rss_mib() - before
    assert not verdicts.problems, "\n".join(verdicts.problems)
    # The mutations reach both sides of the oracle: real results checked, and refusals.
    assert verdicts.checked > 150 and verdicts.codes["INVALID_ARGUMENT"] > 1000, verdicts.codes
    assert set(verdicts.codes) <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL"}, verdicts.codes
    assert grown < 48, f"RSS grew {grown:.0f} MiB over 3,000 mutated requests"
    with grpc.insecure_channel(hub_server.url) as channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        assert pb.ServerLiveResponse.FromString(live(b"", timeout=10)).live


@st.composite
def tensors(draw: Any) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from(sorted(NUMPY_DTYPES)))
    shape = (draw(st.integers(1, 4)), draw(st.integers(0, 6)))
    if datatype == "BYTES":
        elements = draw(st.lists(st.binary(max_size=12), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
        array = np.empty(len(elements), dtype=np.object_)
        array[:] = elements
        return datatype, array.reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    # Any bit pattern (NaNs, infinities, denormals) must come back as sent.
    storage = np.dtype(f"u{dtype.itemsize}") if dtype.kind in "fV" or datatype == "BF16" else dtype
    if datatype == "BOOL":
        return datatype, draw(hnp.arrays(np.bool_, shape))
    bits = draw(hnp.arrays(storage, shape))
    return datatype, bits.view(dtype)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensor=tensors())
def test_generated_tensors_round_trip(hub_server: RunningServer, references: dict[str, Any], tensor: Any) -> None:
    datatype, array = tensor
    request = pb.ModelInferRequest(model_name=f"identity_{datatype.lower()}")
    request.inputs.add(name="INPUT0", datatype=datatype, shape=array.shape)
    request.raw_input_contents.append(encode_bytes(array) if datatype == "BYTES" else array.tobytes())
    verdicts = _send(hub_server, [request.SerializeToString()], references)
    assert not verdicts.problems, verdicts.problems
    assert verdicts.codes["OK"] == 1 and verdicts.checked == 1, verdicts.codes


DIMS = st.one_of(st.integers(-2, 8), st.sampled_from(fuzzing.INTERESTING))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    datatype=st.sampled_from([*sorted(NUMPY_DTYPES), "FP8", ""]),
    shape=st.lists(DIMS, max_size=4),
    data=st.one_of(
        st.binary(max_size=64),
        st.lists(st.binary(max_size=6), max_size=6).map(lambda xs: b"".join(struct.pack("<I", len(x)) + x for x in xs)),
    ),
    model=st.sampled_from(["identity_bytes", "identity_fp32", "identity_uint8", "addsub", "digits"]),
)
def test_generated_claims_get_defined_answers(
    hub_server: RunningServer, references: dict[str, Any], datatype: str, shape: list[int], data: bytes, model: str
) -> None:
    """Datatype, shape and buffer drawn independently: refused with a defined status unless
    they agree, and then the result is the model's."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0" if model != "digits" else "image", datatype=datatype, shape=shape)
    request.raw_input_contents.append(data)
    verdicts = _send(hub_server, [request.SerializeToString()], references)
    assert not verdicts.problems, verdicts.problems
    assert set(verdicts.codes) <= {"OK", "INVALID_ARGUMENT"}, verdicts.codes


# --- REST: JSON bodies with one part replaced, dropped or nested ------------------------------

_REST_SEEDS = [
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
    ("identity_bytes", {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "bc"]}]}),
    ("identity_bool", {"inputs": [{"name": "INPUT0", "datatype": "BOOL", "shape": [2], "data": [True, False]}]}),
    ("fragile", {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}),
]
_WEIRD: list[Any] = [None, True, -1, 0, 2**70, 1.5, -1e308, "", "x" * 3000, "9" * 5000, [], {}, [1, "a"], [[[]]],
                     [-1], [2**63], {"a": {"b": [None]}}, "FP32", "BYTES", [1] * 65]  # fmt: skip


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


def _mutate_json(body: dict[str, Any], rng: random.Random) -> bytes:
    out = copy.deepcopy(body)
    path = rng.choice(_parts(out)[1:])
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    choice = rng.randrange(4)
    if choice == 0:
        del parent[path[-1]]
    elif choice == 1:
        nested = parent[path[-1]]
        for _ in range(rng.choice([2, 70, 900])):
            nested = [nested]
        parent[path[-1]] = nested
    else:
        parent[path[-1]] = rng.choice(_WEIRD)
    data = json.dumps(out).encode()
    if rng.random() < 0.1:  # and now and then the bytes themselves
        cut = rng.randrange(len(data) + 1)
        data = data[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(4))) + data[cut + rng.randrange(3) :]
    return data


def _encode_rest(body: bytes, rng: random.Random) -> tuple[bytes, dict[str, str]]:
    """The body as sent: as it is mostly, else gzip or deflate, now and then cut short, with a
    byte flipped, under the other coding's name or a coding we do not read."""
    roll = rng.random()
    if roll < 0.7:
        return body, {}
    coding = rng.choice(["gzip", "deflate"])
    data = gzip.compress(body) if coding == "gzip" else zlib.compress(body)
    if roll < 0.8:
        data = data[: rng.randrange(len(data))]
    elif roll < 0.85:
        i = rng.randrange(len(data))
        data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
    elif roll < 0.9:
        coding = {"gzip": "deflate", "deflate": "gzip"}[coding]
    elif roll < 0.93:
        coding = rng.choice(["br", "zstd", "gzip, deflate", "compress"])
    return data, {"Content-Encoding": coding, "Accept-Encoding": rng.choice(["gzip", "deflate", "br", "*"])}


def test_mutated_rest_bodies(hub_server: RunningServer) -> None:
    """1,500 JSON inference bodies with one part replaced by a value of the wrong type, dropped
    or nested deep, three in ten of them compressed (some corrupt, some cut short, some under
    a coding we do not read): each answered 200 or a 4xx with a bounded JSON error (500 only
    from the model made to fail), and the server stays up."""
    rng = random.Random(29)
    cases = [
        (model, *_encode_rest(_mutate_json(body, rng), rng))
        for model, body in (rng.choice(_REST_SEEDS) for _ in range(1500))
    ]

    def send(case: tuple[str, bytes, dict[str, str]]) -> tuple[str, int, str]:
        model, data, headers = case
        request = urllib.request.Request(
            f"http://{hub_server.http_url}/v2/models/{model}/infer", data=data, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
                return model, response.status, ""
        except urllib.error.HTTPError as err:
            return model, err.code, json.loads(err.read())["error"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, cases))
    problems = [
        f"{model}: {status} {error[:200]!r}"
        for model, status, error in answers
        if (status not in (200, 400, 404) and not (status == 500 and model in fuzzing.MAY_FAIL))
        or len(error) > MESSAGE_LIMIT + 64
    ]
    assert not problems, "\n".join(problems[:20])
    statuses = {status for _, status, _ in answers}
    assert {200, 400} <= statuses, statuses
    with urllib.request.urlopen(f"http://{hub_server.http_url}/v2/health/live", timeout=10) as response:
        assert response.status == 200
