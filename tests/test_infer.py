"""ModelInfer through tritonclient: real answers, every datatype, and every bad request."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from hub.datatypes import NUMPY_DTYPES

from .conftest import RunningServer
from .plugins.identity import DATATYPES, sample


@pytest.fixture()
def client(hub_server: RunningServer) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(hub_server.url)


def infer_input(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_digits_heldout_accuracy_as_onnx(client: tc.InferenceServerClient, digits_heldout: Any) -> None:
    images, labels = digits_heldout
    predictions = []
    for start in range(0, len(images), 64):
        batch = images[start : start + 64]
        result = client.infer("digits", [infer_input("image", batch, "FP32")])
        predictions.append(result.as_numpy("logits").argmax(1))
    accuracy = float(np.mean(np.concatenate(predictions) == labels))
    assert accuracy >= 0.95, accuracy


def test_request_id_is_echoed(client: tc.InferenceServerClient, digits_heldout: Any) -> None:
    images, _ = digits_heldout
    result = client.infer("digits", [infer_input("image", images[:1], "FP32")], request_id="req-42")
    assert result.get_response().id == "req-42"
    assert result.get_response().model_version == "1"


def test_classification_extension_top_n(client: tc.InferenceServerClient) -> None:
    """InferRequestedOutput(class_count=N): the top N of each row as "value:index[:label]"."""
    a = np.array([[1, 9, 3, 5], [8, 0, 2, 1]], dtype=np.float32)
    inputs = [infer_input("INPUT0", a, "FP32"), infer_input("INPUT1", np.zeros_like(a), "FP32")]
    outputs = [tc.InferRequestedOutput("SUM", class_count=2), tc.InferRequestedOutput("DIFF", class_count=1)]
    result = client.infer("addsub", inputs, outputs=outputs)
    top = result.as_numpy("SUM")
    assert top.shape == (2, 2)
    assert [[e.decode() for e in row] for row in top] == [
        ["9.000000:1:b", "5.000000:3:d"],
        ["8.000000:0:a", "2.000000:2:c"],
    ]
    assert [e.decode() for e in result.as_numpy("DIFF").ravel()] == ["9.000000:1", "8.000000:0"]  # no labels


def test_requested_outputs_are_honoured(client: tc.InferenceServerClient) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), dtype=np.float32)
    inputs = [infer_input("INPUT0", a, "FP32"), infer_input("INPUT1", b, "FP32")]
    result = client.infer("addsub", inputs, outputs=[tc.InferRequestedOutput("DIFF")])
    assert [o.name for o in result.get_response().outputs] == ["DIFF"]
    np.testing.assert_array_equal(result.as_numpy("DIFF"), a - b)
    both = client.infer("addsub", inputs)
    np.testing.assert_array_equal(both.as_numpy("SUM"), a + b)


def test_torch_eager_and_onnx_targets_agree(client: tc.InferenceServerClient) -> None:
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    eager = client.infer("affine_torch", [infer_input("x", x, "FP32")])
    onnx = client.infer("affine_onnx", [infer_input("x", x, "FP32")])
    np.testing.assert_allclose(eager.as_numpy("y"), x * 2 + 1, rtol=1e-6)
    np.testing.assert_allclose(onnx.as_numpy("y"), x * 2 + 1, rtol=1e-6)
    np.testing.assert_allclose(onnx.as_numpy("total"), x.sum(1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips_raw(client: tc.InferenceServerClient, datatype: str) -> None:
    array = sample(datatype, (3, 5))
    result = client.infer(f"identity_{datatype.lower()}", [infer_input("INPUT0", array, datatype)])
    out = result.get_response().outputs[0]
    assert out.datatype == datatype and list(out.shape) == [3, 5]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)


TYPED = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def _stub(server: RunningServer) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(server.url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("datatype", sorted(TYPED))
def test_every_datatype_round_trips_typed(hub_server: RunningServer, datatype: str) -> None:
    array = sample(datatype, (2, 3))
    request = service_pb2.ModelInferRequest(model_name=f"identity_{datatype.lower()}")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=[2, 3])
    getattr(tensor.contents, TYPED[datatype]).extend(array.reshape(-1).tolist())
    channel, stub = _stub(hub_server)
    with channel:
        response = stub.ModelInfer(request, timeout=10)
    result = tc.InferResult(response)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)


def _raw_request(model: str, name: str, datatype: str, shape: list[int], raw: bytes) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _digits_image(n: int = 1) -> bytes:
    return np.zeros((n, 1, 8, 8), np.float32).tobytes()


def _mixed() -> service_pb2.ModelInferRequest:
    request = _raw_request("addsub", "INPUT0", "FP32", [1, 4], np.ones(4, np.float32).tobytes())
    typed = request.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 4])
    typed.contents.fp32_contents.extend([1, 2, 3, 4])
    return request


def _bytes_overrun() -> service_pb2.ModelInferRequest:
    raw = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 100) + b"short"
    return _raw_request("identity_bytes", "INPUT0", "BYTES", [1, 2], raw)


BAD_REQUESTS: dict[str, tuple[Any, grpc.StatusCode, list[str]]] = {
    "unknown model": (
        lambda: _raw_request("nope", "image", "FP32", [1, 1, 8, 8], _digits_image()),
        grpc.StatusCode.NOT_FOUND, ["nope"],
    ),
    "unknown version": (
        lambda: service_pb2.ModelInferRequest(model_name="digits", model_version="3"),
        grpc.StatusCode.NOT_FOUND, ["digits", "'3'"],
    ),
    "missing input": (
        lambda: _raw_request("addsub", "INPUT0", "FP32", [1, 4], np.ones(4, np.float32).tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT, ["INPUT1", "missing"],
    ),
    "extra input": (
        lambda: _raw_request("digits", "pixels", "FP32", [1, 1, 8, 8], _digits_image()),
        grpc.StatusCode.INVALID_ARGUMENT, ["pixels", "image"],
    ),
    "wrong datatype": (
        lambda: _raw_request("digits", "image", "FP64", [1, 1, 8, 8], np.zeros(64).tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT, ["image", "FP32", "FP64"],
    ),
    "unknown datatype": (
        lambda: _raw_request("digits", "image", "FP8", [1, 1, 8, 8], _digits_image()),
        grpc.StatusCode.INVALID_ARGUMENT, ["image", "FP8"],
    ),
    "wrong shape": (
        lambda: _raw_request("digits", "image", "FP32", [1, 8, 8], np.zeros(64, np.float32).tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT, ["image", "[-1, 1, 8, 8]", "[1, 8, 8]"],
    ),
    "byte count": (
        lambda: _raw_request("digits", "image", "FP32", [1, 1, 8, 8], _digits_image()[:-4]),
        grpc.StatusCode.INVALID_ARGUMENT, ["image", "256", "252"],
    ),
    "mixed raw and typed": (_mixed, grpc.StatusCode.INVALID_ARGUMENT, ["INPUT1", "raw"]),
    "batch over max_batch_size": (
        lambda: _raw_request("digits", "image", "FP32", [65, 1, 8, 8], _digits_image(65)),
        grpc.StatusCode.INVALID_ARGUMENT, ["image", "65", "64"],
    ),
    "bytes length prefix overrun": (_bytes_overrun, grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "100"]),
    "typed count": (
        lambda: _typed("digits", "image", "FP32", [1, 1, 8, 8], list(range(10))),
        grpc.StatusCode.INVALID_ARGUMENT, ["image", "64", "10"],
    ),
    "fp16 as typed": (
        lambda: _typed("identity_fp16", "INPUT0", "FP16", [1, 1], []),
        grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "raw"],
    ),
    "unknown output": (
        lambda: _with_output(_raw_request("digits", "image", "FP32", [1, 1, 8, 8], _digits_image()), "probs"),
        grpc.StatusCode.INVALID_ARGUMENT, ["probs", "logits"],
    ),
    "raw entries count": (
        lambda: _extra_raw(_raw_request("digits", "image", "FP32", [1, 1, 8, 8], _digits_image())),
        grpc.StatusCode.INVALID_ARGUMENT, ["raw_input_contents", "2", "1"],
    ),
    "value out of range": (
        lambda: _typed("identity_uint8", "INPUT0", "UINT8", [1, 1], [300]),
        grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "UINT8"],
    ),
}  # fmt: skip


def _typed(model: str, name: str, datatype: str, shape: list[int], values: list[Any]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    field = TYPED.get(datatype, "fp32_contents")
    getattr(tensor.contents, field).extend(values)
    if datatype == "FP16":
        tensor.contents.SetInParent()
    return request


def _with_output(request: service_pb2.ModelInferRequest, name: str) -> service_pb2.ModelInferRequest:
    request.outputs.add(name=name)
    return request


def _extra_raw(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferRequest:
    request.raw_input_contents.append(b"")
    return request


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request(hub_server: RunningServer, case: str) -> None:
    build, code, fragments = BAD_REQUESTS[case]
    channel, stub = _stub(hub_server)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(build(), timeout=10)
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details(), (fragment, err.value.details())
    assert "Traceback" not in err.value.details()


async def test_bad_requests_do_not_disturb_good_ones(hub_server: RunningServer, digits_heldout: Any) -> None:
    images, labels = digits_heldout
    client = tc_aio.InferenceServerClient(hub_server.url)
    channel = grpc.aio.insecure_channel(hub_server.url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def good(i: int) -> int:
        result = await client.infer("digits", [infer_input("image", images[i : i + 1], "FP32")], request_id=str(i))
        assert result.get_response().id == str(i)
        return int(result.as_numpy("logits").argmax())

    async def bad(case: str) -> grpc.StatusCode:
        build = BAD_REQUESTS[case][0]
        try:
            await stub.ModelInfer(build(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        raise AssertionError(f"{case} succeeded")

    cases = sorted(BAD_REQUESTS) * 3
    good_tasks = [good(i) for i in range(120)]
    bad_tasks = [bad(c) for c in cases]
    results = await asyncio.gather(*good_tasks, *bad_tasks)
    predictions = np.array(results[:120])
    assert np.mean(predictions == labels[:120]) >= 0.95
    assert results[120:] == [BAD_REQUESTS[c][1] for c in cases]
    await client.close()
    await channel.close()


def test_model_failure_is_internal_and_names_the_model(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer("fragile", [infer_input("INPUT0", np.full((1, 1), -1.0, np.float32), "FP32")])
    assert err.value.status() == "StatusCode.INTERNAL"
    assert "fragile" in err.value.message()
    assert "Traceback" not in err.value.message()
    ok = client.infer("fragile", [infer_input("INPUT0", np.ones((1, 1), np.float32), "FP32")])
    np.testing.assert_array_equal(ok.as_numpy("OUTPUT0"), [[2.0]])


def test_stream_infer_answers_each_request_with_its_id(hub_server: RunningServer, digits_heldout: Any) -> None:
    """tritonclient's streaming API: responses and per-request errors come back on the stream."""
    import queue

    images, labels = digits_heldout
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = tc.InferenceServerClient(hub_server.url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for i in range(20):
        client.async_stream_infer("digits", [infer_input("image", images[i : i + 1], "FP32")], request_id=str(i))
    client.async_stream_infer(
        "digits", [infer_input("image", np.zeros((1, 8, 8), np.float32), "FP32")], request_id="bad"
    )
    answers, errors = {}, []
    for _ in range(21):
        result, error = results.get(timeout=30)
        if error is not None:
            errors.append(error)
        else:
            answers[result.get_response().id] = int(result.as_numpy("logits").argmax())
    client.stop_stream()
    assert sorted(answers, key=int) == [str(i) for i in range(20)]
    assert np.mean([answers[str(i)] == labels[i] for i in range(20)]) >= 0.9
    assert len(errors) == 1 and "image" in str(errors[0])


def test_stream_responses_say_they_are_final(hub_server: RunningServer) -> None:
    """Triton sets `triton_final_response` on every streamed response, answers and errors alike;
    the usual client loop reads until it is true, and would wait forever without it."""
    import queue

    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = tc.InferenceServerClient(hub_server.url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    ones = infer_input("INPUT0", np.ones((1, 1), np.float32), "FP32")
    client.async_stream_infer("fragile", [ones], request_id="ok", enable_empty_final_response=True)
    result, error = results.get(timeout=30)
    assert error is None
    assert result.get_response().parameters["triton_final_response"].bool_param is True
    bad = infer_input("INPUT0", np.full((1, 1), -1.0, np.float32), "FP32")
    client.async_stream_infer("fragile", [bad], request_id="bad")
    result, error = results.get(timeout=30)
    assert result is None and "fragile" in str(error)
    client.stop_stream()


def test_stream_with_triton_grpc_error_ends_at_the_first_error(hub_server: RunningServer) -> None:
    """With the header `triton_grpc_error: true` (Triton's opt-in), a model's error ends the stream
    with its gRPC status, which tritonclient reports through `status()`, instead of an in-band
    error message on a stream that goes on."""
    import queue

    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = tc.InferenceServerClient(hub_server.url)
    client.start_stream(
        callback=lambda result, error: results.put((result, error)), headers={"triton_grpc_error": "true"}
    )
    client.async_stream_infer("fragile", [infer_input("INPUT0", np.ones((1, 1), np.float32), "FP32")], request_id="ok")
    result, error = results.get(timeout=30)
    assert error is None and result.get_response().id == "ok"
    client.async_stream_infer("fragile", [infer_input("INPUT0", np.full((1, 1), -1.0, np.float32), "FP32")])
    result, error = results.get(timeout=30)
    assert result is None
    assert error.status() == "StatusCode.INTERNAL" and "fragile" in error.message()
    client.stop_stream()


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_typed_contents_are_read_as_the_protobuf_field_reads(data: st.DataObject) -> None:
    """hub/protocol/packed.py reads the packed field whole where it can: the values must be
    exactly those of the field, for every integer width, sign and varint length."""
    from hub.protocol.generated import grpc_service_pb2 as pb
    from hub.protocol.packed import from_typed

    datatype = data.draw(st.sampled_from(sorted(set(TYPED) - {"BYTES"})))
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind == "b":
        values: list[Any] = data.draw(st.lists(st.booleans(), max_size=50))
    elif dtype.kind == "f":
        values = data.draw(st.lists(st.floats(width=32 if dtype.itemsize == 4 else 64, allow_nan=False), max_size=50))
    else:
        info = np.iinfo(dtype)
        small = st.integers(0, 127)
        values = data.draw(st.lists(st.one_of(small, st.integers(int(info.min), int(info.max))), max_size=50))
    contents = pb.InferTensorContents()
    getattr(contents, TYPED[datatype]).extend(values)
    contents = pb.InferTensorContents.FromString(contents.SerializeToString())
    got = from_typed(contents, TYPED[datatype], dtype, len(values), 1 << 20)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.array(values, dtype=dtype))
