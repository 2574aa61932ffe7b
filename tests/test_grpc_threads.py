"""`modelhub serve --grpc-server threads`: grpcio's thread-pool server in front of the same data
plane (hub/protocol/threaded.py), driven with tritonclient. The conformance cases run against it
in test_conformance.py; these are what a pool of two running threads could get wrong: more open
streams than threads, batching behind a small pool, health watches, tokens, SIGTERM."""

from __future__ import annotations

import asyncio
import queue
import threading
import types
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hub.limits import DEFAULT_LIMITS
from hub.protocol.threaded import ElasticPool

from .conftest import ROOT, Workers, link_plugins
from .test_workers import sigterm_answers_every_accepted_request


def _input(value: float) -> tc.InferInput:
    tensor = tc.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), value, np.float32))
    return tensor


def test_more_open_streams_than_threads_all_answer(threads_server: Workers) -> None:
    """Six streams held open at once against two running threads: a stream waiting for its
    client's next message gives its thread up, so every stream, and a unary call beside them,
    is answered."""
    clients, results = [], []
    for _ in range(6):
        answers: queue.Queue[Any] = queue.Queue()
        client = tc.InferenceServerClient(threads_server.url)
        client.start_stream(callback=lambda result, error, answers=answers: answers.put((result, error)))
        clients.append(client)
        results.append(answers)
    try:
        for round_ in range(3):
            for i, client in enumerate(clients):
                client.async_stream_infer("identity_fp32", [_input(10 * i + round_)], request_id=f"{i}-{round_}")
            for i, answers in enumerate(results):
                result, error = answers.get(timeout=30)
                assert error is None, error
                assert result.get_response().id == f"{i}-{round_}"
                assert float(result.as_numpy("OUTPUT0")[0, 0]) == 10 * i + round_
            unary = tc.InferenceServerClient(threads_server.url).infer("identity_fp32", [_input(7.0)])
            assert float(unary.as_numpy("OUTPUT0")[0, 0]) == 7.0
    finally:
        for client in clients:
            client.stop_stream()


async def test_requests_waiting_in_a_batcher_do_not_hold_the_pool(threads_server: Workers) -> None:
    """sleepy computes one request per 50 ms and queues four: five concurrent calls wait in its
    batcher at once, beyond the two running threads, and all are answered."""
    client = tc_aio.InferenceServerClient(threads_server.url)
    tensor = tc_aio.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), 2.0, np.float32))
    try:
        results = await asyncio.gather(*[client.infer("sleepy", [tensor]) for _ in range(5)])
    finally:
        await client.close()
    assert [float(r.as_numpy("OUTPUT0")[0, 0]) for r in results] == [4.0] * 5


def test_health_check_and_watch(threads_server: Workers) -> None:
    with grpc.insecure_channel(threads_server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="nothing"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service="identity_fp32"))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()  # a cancelled watch gives its thread back: the server still answers
        assert tc.InferenceServerClient(threads_server.url).is_server_ready()


def test_tokens_are_required_as_on_grpc_aio(tmp_path: Path) -> None:
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    server = Workers(plugins, tmp_path / "models", tmp_path, 1, "--grpc-server", "threads", "--auth-token", "s3cret")
    try:
        client = tc.InferenceServerClient(server.url)
        assert client.is_server_ready()  # health stays open for probes
        with pytest.raises(tc.InferenceServerException) as err:
            client.infer("identity_fp32", [_input(1.0)])
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        answer = client.infer("identity_fp32", [_input(1.0)], headers={"authorization": "Bearer s3cret"})
        assert float(answer.as_numpy("OUTPUT0")[0, 0]) == 1.0
    finally:
        assert server.stop() == 0, server.output()


async def test_sigterm_answers_every_accepted_request(tmp_path: Path) -> None:
    plugins = link_plugins(
        tmp_path / "plugins", *(ROOT / "tests" / "plugins" / f for f in ("identity.py", "behaviour.py"))
    )
    await sigterm_answers_every_accepted_request(
        Workers(plugins, tmp_path / "models", tmp_path, 1, "--grpc-server", "threads")
    )


def test_elastic_pool_runs_two_at_once_and_lends_a_waiting_place() -> None:
    """At most `running` calls run at once; one that parks lets a queued call run, and takes a
    place back (from the next call to finish) before it goes on."""
    pool = ElasticPool(running=2, limit=8, name="test")
    lock = threading.Lock()
    now = [0]
    most = [0]
    release = threading.Event()

    def busy() -> None:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        threading.Event().wait(0.01)
        with lock:
            now[0] -= 1

    def waits() -> str:
        pool.park()  # from here this thread is not running calls: it waits
        release.wait(10)
        pool.unpark()
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
            now[0] -= 1
        return "woke"

    parked = [pool.submit(waits) for _ in range(2)]  # both places given up while they wait
    done = [pool.submit(busy) for _ in range(6)]
    for future in done:
        future.result(10)
    release.set()
    assert [f.result(10) for f in parked] == ["woke", "woke"]
    assert most[0] <= 2, most
    pool.shutdown()


def test_grpc_threads_below_one_is_refused() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "hub.cli", "serve", "--grpc-server", "threads", "--grpc-threads", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--grpc-threads" in result.stderr and "expected at least 1, got '0'" in result.stderr


async def test_a_handler_past_its_deadline_waits_for_grpc_aio_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A unary handler that answers after its call's deadline waits for grpc.aio to cancel it
    (else grpcio logs a traceback per such call: hub.protocol.servicer._deadline_seen). grpcio's
    thread-pool server never cancels a handler: there the answer goes at once, and the pool
    thread is not held."""
    from hub.protocol import servicer as servicer_module
    from hub.protocol.generated import grpc_service_pb2 as pb
    from hub.protocol.threaded import _AioContext

    monkeypatch.setattr(servicer_module, "DEADLINE_SEEN_WAIT", 0.5)

    class _Expired:  # a call whose deadline has passed, as either server's context reports it
        def time_remaining(self) -> float:
            return 0.0

    async def live(request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    handler = grpc.unary_unary_rpc_method_handler(
        live,
        request_deserializer=pb.ServerLiveRequest.FromString,
        response_serializer=pb.ServerLiveResponse.SerializeToString,
    )
    servicer = cast(Any, types.SimpleNamespace(limits=DEFAULT_LIMITS))
    guarded = servicer_module._tolerant("ServerLive", handler, servicer).unary_unary
    loop = asyncio.get_running_loop()
    for context, waits in ((_Expired(), True), (_AioContext(cast(Any, _Expired()), loop), False)):
        started = loop.time()
        response = await guarded(pb.ServerLiveRequest(), context)
        assert response.live
        assert (loop.time() - started >= 0.5) is waits, type(context).__name__
