"""Fuzzing ModelInfer, bounded for the default suite: a few thousand mutated messages and
hypothesis-generated tensors. Every answer is a defined status with a bounded message, or a
result equal to the model's in-process; the server stays up and keeps its memory.
`make fuzz` runs the same fuzzer for 100,000+ cases against `modelhub serve`."""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hub.datatypes import NUMPY_DTYPES, encode_bytes
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


# --- REST: the same harness, over HTTP --------------------------------------------------------


def test_mutated_rest_requests(hub_server: RunningServer, references: dict[str, Any]) -> None:
    """3,000 REST requests from tests/fuzzing.py: JSON and binary-extension infer bodies with
    one part replaced by a value of the wrong type, dropped or nested deep, three in ten
    compressed (some corrupt, cut short or under a coding we do not read), odd headers, and
    the other endpoints under odd names and bodies. Each answer is a 4xx with a bounded JSON
    error (500 only from the model made to fail), or a well-formed 2xx whose outputs are the
    model's; the server stays up. Model control is off here: load, unload and settings
    changes are refused, so the shared server keeps its models."""
    rng = random.Random(29)
    cases = list(fuzzing.rest_cases(3000, rng))
    verdicts = asyncio.run(
        fuzzing.run(hub_server.http_url, cases, references, protocol="rest", concurrency=8, timeout=30)
    )
    assert not verdicts.problems, "\n".join(verdicts.problems[:20])
    assert verdicts.checked > 100 and verdicts.codes["400"] > 1000 and verdicts.codes["404"] > 300, verdicts.codes
    assert asyncio.run(fuzzing.probe(hub_server.http_url, "rest"))
