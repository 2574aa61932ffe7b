"""What a client puts in a field that crosses from a frontend to the model process with
`--workers N`: a request id, a model name to load, a region's key or name, a log or trace
setting. Each has a bound far below what the hand-off carries (16 MiB of header, wire.py),
checked where one process checks it too, so a string of 20 MiB is refused by the frontend
(INVALID_ARGUMENT, naming the field, as one process refuses it) before anything is sent.
It used to reach the model process's socket, which dropped the frontend's connection: the
client got a false "the model process exited", and the requests in flight on that frontend
failed with it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as tc_aio
import tritonclient.http.aio as tc_http
from tritonclient.utils import InferenceServerException

from .conftest import ROOT, Workers, link_plugins

#: Over the 16 MiB a header may have (hub/workers/wire.py MAX_HEADER).
BIG = "x" * (20 << 20)


def _small() -> tc_aio.InferInput:
    tensor = tc_aio.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    return tensor


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workers, Workers]]:
    """`--workers 2 --model-copies none` (every request crosses to the model process) with
    model control and system shared memory, and one process (`--workers 1`) with the same
    options, both as `modelhub serve` starts them."""
    tmp = tmp_path_factory.mktemp("workers-bounds")
    plugins = link_plugins(tmp / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    options = ("--model-control", "--shared-memory", "system")
    workers = Workers(plugins, tmp / "models", tmp, 2, "--model-copies", "none", *options)
    try:
        (tmp / "one").mkdir()
        one = Workers(plugins, tmp / "models", tmp / "one", 1, *options)
    except BaseException:
        workers.stop()
        raise
    yield workers, one
    assert workers.stop() == 0, workers.output()
    assert one.stop() == 0, one.output()


Call = Callable[[tc_aio.InferenceServerClient], Awaitable[Any]]

CASES: dict[str, tuple[Call, str]] = {
    "infer id": (
        lambda c: c.infer("identity_fp32", [_small()], request_id=BIG),
        "request id is 20971520 characters long; the most this server accepts is 4096",
    ),
    "load model_name": (lambda c: c.load_model(BIG), "is longer than 128 characters"),
    "register key": (
        lambda c: c.register_system_shared_memory("r", BIG, 64),
        "shared memory region 'r': the key must name a shared memory object",
    ),
    "unregister name": (lambda c: c.unregister_system_shared_memory(BIG), "is longer than 256 characters"),
    "log_format": (lambda c: c.update_log_settings({"log_format": BIG}), "log_format must be one of"),
    "trace_level": (lambda c: c.update_trace_settings(settings={"trace_level": [BIG]}), "trace_level must be"),
}


async def _refusal(url: str, call: Call) -> tuple[str, str]:
    client = tc_aio.InferenceServerClient(url)
    try:
        with pytest.raises(InferenceServerException) as refused:
            await call(client)
        return str(refused.value.status()), str(refused.value.message())
    finally:
        await client.close()


@pytest.mark.parametrize("case", list(CASES))
async def test_an_oversized_field_is_refused_by_the_frontend_and_requests_in_flight_are_answered(
    servers: tuple[Workers, Workers], case: str
) -> None:
    workers, one = servers
    call, message = CASES[case]
    lost_before = workers.logged("lost the model process")
    # One channel: the refused call and the small requests go to the same frontend.
    client = tc_aio.InferenceServerClient(workers.url)
    stop = asyncio.Event()
    answered = 0
    failures: list[str] = []

    async def small_requests() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                result = await client.infer("identity_fp32", [_small()], request_id="small")
                assert result.get_response().id == "small"
                answered += 1
            except InferenceServerException as exc:
                failures.append(f"{exc.status()}: {exc.message()}")

    tasks = [asyncio.ensure_future(small_requests()) for _ in range(4)]
    try:
        await asyncio.sleep(0.3)
        with pytest.raises(InferenceServerException) as refused:
            await call(client)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await client.close()
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", refused.value.message()
    assert message in str(refused.value.message())
    assert failures == [] and answered > 0
    assert workers.logged("lost the model process") == lost_before, workers.output()[-3000:]
    # One process gives the same answer.
    assert await _refusal(one.url, call) == (refused.value.status(), refused.value.message())


async def test_an_oversized_id_over_rest_is_refused_alike(servers: tuple[Workers, Workers]) -> None:
    """Over REST the id is in the JSON, which --max-json-bytes (4 MiB) holds first: an id of
    1 MiB passes that and meets the id's own bound."""
    workers, one = servers
    big = "x" * (1 << 20)
    answers = []
    for url in (workers.http_url, one.http_url):
        client = tc_http.InferenceServerClient(url)
        tensor = tc_http.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        try:
            with pytest.raises(InferenceServerException) as refused:
                await client.infer("identity_fp32", [tensor], request_id=big)
            answers.append((refused.value.status(), refused.value.message()))
        finally:
            await client.close()
    assert answers[0] == answers[1]
    assert answers[0][0] == "400" and "request id is 1048576 characters long" in str(answers[0][1]), answers


def test_the_bounds_are_those_of_one_process(servers: tuple[Workers, Workers]) -> None:
    """A field at its bound still crosses: a 4096-character id is answered, and a 128-character
    model name that no plugin registers is NOT_FOUND from the model process, as in one process."""
    import tritonclient.grpc as tc

    workers, one = servers
    for url in (workers.url, one.url):
        client = tc.InferenceServerClient(url)
        tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        assert client.infer("identity_fp32", [tensor], request_id="i" * 4096).get_response().id == "i" * 4096
        with pytest.raises(InferenceServerException, match="no plugin registers a model named") as missing:
            client.load_model("m" * 128)
        assert missing.value.status() == "StatusCode.NOT_FOUND"
        client.close()
