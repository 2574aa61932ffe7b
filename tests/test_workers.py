"""`modelhub serve --workers 2`: one model process behind two frontend processes, as a user
starts it, driven with tritonclient: answers, statistics and metrics of the whole server,
reloads under load, a frontend or the model process killed under load, SIGTERM, and the
shared-memory hand-off (answers, a full arena, nothing left in /dev/shm); and independent
single-process servers sharing the ports (`--reuse-port`)."""

from __future__ import annotations

import asyncio
import enum
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from hub.core.models import ModelState
from hub.server import ServerConfig
from hub.workers.arena import SHM_DIR, Arena
from hub.workers.counter import SharedCounter
from hub.workers.frontend import EngineClient
from hub.workers.wire import MAX_FRAMES, MAX_HEADER, Channel, MessageTooLarge, pack_arrays, unpack_arrays

from .conftest import ROOT, RunningServer, Workers, link_plugins
from .test_lifecycle import one, write_scaler


@pytest.fixture()
def workers(workers_server: Workers) -> Workers:
    return workers_server


def image_input(images: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return tensor


def test_answers_match_one_process(workers: Workers, hub_server: Any, digits_heldout: Any) -> None:
    images, _ = digits_heldout
    ours = tc.InferenceServerClient(workers.url).infer("digits", [image_input(images[:8])]).as_numpy("logits")
    single = tc.InferenceServerClient(hub_server.url).infer("digits", [image_input(images[:8])]).as_numpy("logits")
    np.testing.assert_allclose(ours, single, rtol=1e-5, atol=1e-5)
    assert len(workers.children("frontend")) == 2 and len(workers.children("engine")) == 1


async def test_statistics_and_metrics_count_every_frontend(workers: Workers, digits_heldout: Any) -> None:
    images, _ = digits_heldout
    sync = tc.InferenceServerClient(workers.url)

    def counts() -> tuple[int, int, int, int, int]:
        stats = sync.get_inference_statistics("digits", as_json=True)["model_stats"][0]
        batched = sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", []))
        return (  # (JSON leaves out what is still 0)
            int(stats.get("inference_count", 0)),
            int(stats.get("inference_stats", {}).get("success", {}).get("count", 0)),
            _requests(workers),
            int(stats.get("execution_count", 0)),
            batched,
        )

    # Both frontends compute digits from their own copies (--model-copies cpu, the default);
    # the model process counts their batches with the requests.
    assert workers.logged("model 'digits/1': serving from this frontend's copy") == 2, workers.output()
    before = counts()
    # Many channels, so that the kernel spreads them over both frontends.
    clients = [tc_aio.InferenceServerClient(workers.url) for _ in range(8)]
    tensor = tc_aio.InferInput("image", [2, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(images[:2])
    await asyncio.gather(*[c.infer("digits", [tensor]) for c in clients for _ in range(20)])
    for client in clients:
        await client.close()
    after = counts()
    inferences, successes, requests, executions, batched = (a - b for a, b in zip(after, before, strict=True))
    assert (inferences, successes, requests, batched) == (320, 160, 160, 320)
    assert 1 <= executions <= 160  # two rows a request: a batch holds one request or more
    # What was queued and in flight in each frontend is back to nothing once all is answered.
    deadline = time.monotonic() + 10
    while (gauges := (_metric(workers, "modelhub_queue_depth"), _metric(workers, "modelhub_inflight_requests"))) != (
        0,
        0,
    ):
        assert time.monotonic() < deadline, gauges
        await asyncio.sleep(0.05)


async def test_requests_in_flight_in_a_frontend_show_in_the_gauge(workers: Workers) -> None:
    """A frontend computing from its own copy reports what it holds to the model process,
    which serves /metrics and asks every frontend at each scrape."""
    client = tc_aio.InferenceServerClient(workers.url)
    tensor = tc_aio.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
    # "sleepy": 50 ms a request, one at a time, so four on one connection take 200 ms or more.
    flights = [asyncio.ensure_future(client.infer("sleepy", [tensor])) for _ in range(4)]
    labels = 'model="sleepy",version="1"'
    seen = 0
    while not all(f.done() for f in flights):
        seen = max(seen, await asyncio.to_thread(_metric, workers, "modelhub_inflight_requests", labels))
        await asyncio.sleep(0.01)
    assert [float(f.result().as_numpy("OUTPUT0")[0, 0]) for f in flights] == [2.0] * 4
    assert seen >= 1
    deadline = time.monotonic() + 10
    while _metric(workers, "modelhub_inflight_requests", labels) != 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await client.close()


def test_metrics_show_each_frontends_cpu_and_memory(workers: Workers) -> None:
    """/metrics is served by the model process; the frontends do the protocol work, so their
    CPU and memory are there too, one series per frontend pid."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{workers.ports['metrics']}/metrics").read().decode()
    frontends = sorted(workers.children("frontend"))
    for name in ("modelhub_frontend_cpu_seconds_total", "modelhub_frontend_resident_memory_bytes"):
        values = {
            int(line.split('pid="')[1].split('"')[0]): float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(name + "{")
        }
        assert sorted(values) == frontends, (name, values, frontends)
        assert all(value > 0 for value in values.values()), values


def _requests(workers: Workers) -> int:
    return _metric(workers, "modelhub_requests_total", 'code="OK",model="digits",version="1"')


def _metric(workers: Workers, name: str, labels: str = 'model="digits",version="1"') -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{workers.ports['metrics']}/metrics").read().decode()
    prefix = f"{name}{{{labels}}}"
    return sum(int(float(line.split()[-1])) for line in text.splitlines() if line.startswith(prefix))


async def test_reload_under_load_drops_nothing_across_workers(tmp_path: Path) -> None:
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    write_scaler(plugins, 2.0)
    # the control flags reach the frontends (the supervisor re-runs this argv)
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--model-control", "--model-control-token", "ctl")
    control = {"authorization": "Bearer ctl"}
    try:
        clients = [tc_aio.InferenceServerClient(server.url) for _ in range(4)]
        for client in clients:
            with pytest.raises(InferenceServerException, match="--model-control-token"):
                await client.load_model("scaler")
        stop = asyncio.Event()
        failures: list[str] = []
        answered = 0

        async def load(client: tc_aio.InferenceServerClient) -> None:
            nonlocal answered
            while not stop.is_set():
                try:
                    await client.infer("scaler", [one(1.0)])
                    answered += 1
                except InferenceServerException as exc:
                    failures.append(f"{exc.status()}: {exc.message()}")

        tasks = [asyncio.ensure_future(load(clients[i % 4])) for i in range(64)]
        await asyncio.sleep(0.5)
        for factor in (3.0, 4.0):
            write_scaler(plugins, factor)
            await clients[0].load_model("scaler", headers=control)
            # Every frontend serves the new build once the load returned.
            fresh = await asyncio.gather(*[c.infer("scaler", [one(1.0)]) for c in clients for _ in range(4)])
            assert {float(r.as_numpy("OUTPUT0")[0, 0]) for r in fresh} == {factor}
        stop.set()
        await asyncio.gather(*tasks)
        assert failures == [] and answered > 0
        await clients[1].unload_model("scaler", headers=control)
        assert not await clients[2].is_model_ready("scaler")
        for client in clients:
            await client.close()
    finally:
        assert server.stop() == 0, server.output()


@pytest.mark.parametrize("copies", ["none", "cpu"])
async def test_killed_frontend_and_model_process_recover(tmp_path: Path, copies: str) -> None:
    """With `--model-copies none` the model process computes every request, so its death fails
    those in flight (UNAVAILABLE, naming it); with copies (the default on CPU) they are computing
    in a frontend and are answered. Either way the server is not ready until it is back."""
    plugins = link_plugins(
        tmp_path / "plugins", *(ROOT / "tests" / "plugins" / f for f in ("identity.py", "behaviour.py"))
    )
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--model-copies", copies)
    try:
        sync = tc.InferenceServerClient(server.url)
        # A frontend dies: it is restarted, and the server answers on fresh connections.
        server.kill_frontend()
        deadline = time.monotonic() + 120
        assert "frontend-0 exited (code -9); restarting it" in server.output() or "exited (code -9)" in server.output()
        if copies == "cpu":  # both frontends, the restarted one included, have loaded their copies
            while server.logged("model 'sleepy/1': serving from this frontend's copy") < 3:
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.2)
        # The model process dies with a request in flight: UNAVAILABLE naming the cause, not
        # ready until it is back, then serving again.
        client = tc_aio.InferenceServerClient(server.url)
        tensor = tc_aio.InferInput("INPUT0", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
        flights = [asyncio.ensure_future(client.infer("sleepy", [tensor])) for _ in range(3)]
        await asyncio.sleep(0.02)
        os.kill(server.children("engine")[0], signal.SIGKILL)
        outcomes = await asyncio.gather(*flights, return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, InferenceServerException)]
        if copies == "none":
            assert errors, outcomes
            assert all(e.status() == "StatusCode.UNAVAILABLE" and "model process" in e.message() for e in errors), [
                (e.status(), e.message()) for e in errors
            ]
        else:
            assert not errors, [(e.status(), e.message()) for e in errors]
            assert all(float(o.as_numpy("OUTPUT0")[0, 0]) == 2.0 for o in outcomes)
        assert not sync.is_server_ready()
        while not sync.is_server_ready():
            assert time.monotonic() < deadline + 120, server.output()
            time.sleep(0.05)
        # Each frontend reconnects on its own (every 50 ms): the one `client`'s connection
        # reached may apply the model process's table a moment after the one `sync` asked.
        ready_at = time.monotonic()
        while True:
            try:
                result = await client.infer("sleepy", [tensor])
                break
            except InferenceServerException as err:
                assert err.status() == "StatusCode.UNAVAILABLE", err
                assert time.monotonic() < ready_at + 2, f"a frontend still refuses 2 s after another was ready: {err}"
                await asyncio.sleep(0.01)
        assert float(result.as_numpy("OUTPUT0")[0, 0]) == 2.0
        await client.close()
        # The restarted model process has mapped both frontends' fresh arenas, and offered
        # its own: the dead processes' arenas are gone, nothing is left in /dev/shm.
        while len(_arenas(server.children("engine")[0])) != 4:
            assert time.monotonic() < deadline + 120, _arenas(server.children("engine")[0])
            time.sleep(0.2)
        assert _leftovers(server) == []
    finally:
        assert server.stop() == 0, server.output()
    assert _leftovers(server) == []


def _restart_model_process(server: Workers, connections: int = 8) -> list[tc.InferenceServerClient]:
    """SIGKILL the model process; once the supervisor's restart is ready on every frontend,
    that many clients, each on a connection of its own (spread over the frontends)."""
    victim = server.children("engine")[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while victim in server.children("engine") or not server.children("engine"):
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    clients = [
        tc.InferenceServerClient(server.url, channel_args=[("grpc.use_local_subchannel_pool", 1), ("restart", i)])
        for i in range(connections)
    ]
    for client in clients:  # each frontend reconnects on its own
        while not client.is_server_ready():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
    return clients


def test_a_restarted_model_process_keeps_unloaded_models_unloaded(tmp_path: Path) -> None:
    """A model unloaded by RPC stays unloaded when the model process dies and the supervisor
    restarts it (it does not come back READY and serving); a load after that is honoured by
    the next restart too. Its statistics start again from zero, as a restarted Triton's do
    (docs/workers.md, "Failures")."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    write_scaler(plugins, 2.0)
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--model-control")
    tensor = tc.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
    try:
        client = tc.InferenceServerClient(server.url)
        client.infer("scaler", [tensor])
        client.unload_model("scaler")
        for client in _restart_model_process(server):
            index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
            assert index["scaler"] == {"name": "scaler", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
            assert index["identity_fp32"]["state"] == "READY"
            assert not client.is_model_ready("scaler")
            with pytest.raises(InferenceServerException) as err:
                client.infer("scaler", [tensor])
            assert err.value.status() == "StatusCode.UNAVAILABLE" and "unloaded" in err.value.message()
            stats = client.get_inference_statistics("scaler", as_json=True)["model_stats"][0]
            assert "count" not in stats["inference_stats"]["success"]  # zero: a restarted Triton's too
        client.load_model("scaler")
        for client in _restart_model_process(server):
            assert client.is_model_ready("scaler")
            assert float(client.infer("scaler", [tensor]).as_numpy("OUTPUT0")[0, 0]) == 2.0
    finally:
        assert server.stop() == 0, server.output()


async def test_sigterm_answers_every_accepted_request(tmp_path: Path) -> None:
    plugins = link_plugins(
        tmp_path / "plugins", *(ROOT / "tests" / "plugins" / f for f in ("identity.py", "behaviour.py"))
    )
    await sigterm_answers_every_accepted_request(Workers(plugins, tmp_path / "models", tmp_path))


async def sigterm_answers_every_accepted_request(server: Workers) -> None:
    """Four requests to `sleepy` accepted, then SIGTERM: all four answered, and exit 0."""
    client = tc_aio.InferenceServerClient(server.url)
    tensor = tc_aio.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), 3.0, np.float32))
    assert await client.is_server_ready()  # connected first: on a loaded box that took past the 0.1 s below
    flights = [asyncio.ensure_future(client.infer("sleepy", [tensor])) for _ in range(4)]
    await asyncio.sleep(0.1)  # accepted: sleepy takes 50 ms each, one at a time
    server.process.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*flights, return_exceptions=True)
    await client.close()
    assert [r if isinstance(r, Exception) else float(r.as_numpy("OUTPUT0")[0, 0]) for r in results] == [6.0] * 4
    assert server.stop() == 0, server.output()


# --- health, metrics and traces of the whole server --------------------------------------------


def _health(server: Workers, service: str, connections: int = 8) -> list[str]:
    """The gRPC health of `service` over that many connections of their own (SO_REUSEPORT
    spreads them over the frontends): one status name each."""
    statuses = []
    for i in range(connections):
        options = [("grpc.use_local_subchannel_pool", 1), ("health", i)]
        with grpc.insecure_channel(server.url, options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return statuses


def _all_serving(server: Workers, services: tuple[str, ...], within: float = 3.0) -> None:
    """Every frontend reports each of `services` SERVING within `within` seconds of ServerReady
    (a change of readiness reaches the health service at once; NOT_SERVING for minutes was the
    fault)."""
    deadline = time.monotonic() + within
    while True:
        found = {service: _health(server, service) for service in services}
        if all(set(statuses) == {"SERVING"} for statuses in found.values()):
            return
        assert time.monotonic() < deadline, found
        time.sleep(0.1)


#: A model that takes a second to load: a restarted model process is still loading when the
#: frontends have reconnected, and says it has loaded in a message of its own.
SLOW_LOAD = """
import time

import numpy as np
from hub import ModelSpec, TensorSpec, hookimpl

def build():
    time.sleep(1.0)
    return lambda inputs: {"OUTPUT0": inputs["INPUT0"] * 2}

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="slow_load",
        build=build,
        inputs=[TensorSpec("INPUT0", "FP32", (-1, 1))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (-1, 1))],
        example_inputs={"INPUT0": np.ones((1, 1), np.float32)},
        target="numpy",
    ))
"""


def test_grpc_health_follows_readiness_in_every_frontend(tmp_path: Path) -> None:
    """grpc.health.v1 (`modelhub health`, the Dockerfile's HEALTHCHECK) says what ServerReady and
    ModelReady say, in every frontend: a model already ready when a frontend starts listening
    is SERVING there (a restarted frontend's too), and the server is SERVING again once a
    restarted model process has loaded (its last message says so, and changes no model)."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    (plugins / "slow_load.py").write_text(SLOW_LOAD)
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--model-control")
    services = ("", "identity_fp32", "slow_load")
    try:
        _all_serving(server, services)
        health = subprocess.run(
            [sys.executable, "-m", "hub.cli", "health", "--url", server.url, "--service", "slow_load"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert health.returncode == 0, health.stdout + health.stderr
        server.kill_frontend()
        clients = _restart_clients(server)
        assert all(c.is_model_ready("slow_load") for c in clients)
        _all_serving(server, services)
        client = tc.InferenceServerClient(server.url)
        client.unload_model("slow_load")
        assert set(_health(server, "slow_load")) == {"NOT_SERVING"}
        client.load_model("slow_load")
        assert set(_health(server, "slow_load")) == {"SERVING"}
        for _ in range(2):
            _restart_model_process(server)
            _all_serving(server, services)
    finally:
        assert server.stop() == 0, server.output()


def _restart_clients(server: Workers, connections: int = 8) -> list[tc.InferenceServerClient]:
    """Once a killed frontend's replacement serves: that many clients, each on a connection of its own."""
    deadline = time.monotonic() + 120
    clients = [
        tc.InferenceServerClient(server.url, channel_args=[("grpc.use_local_subchannel_pool", 1), ("again", i)])
        for i in range(connections)
    ]
    for client in clients:
        while not client.is_server_ready():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
    return clients


@pytest.mark.parametrize("fixture", ["workers_server", "workers_remote_server"])
async def test_gauges_are_what_is_queued_and_in_flight_when_scraped(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """Under steady load /metrics reads the queue depth and requests in flight as they are at
    the scrape, with the model in a frontend's copy or in the model process: four clients
    that each send "sleepy" (50 ms a request, one at a time) a request as soon as the last is
    answered keep four in flight and three queued nearly all the time (Little's law). Read
    from the frontends' commits, which follow the answers, the gauges caught the moment just
    after one: a request fewer in flight and queued, every time."""
    server = cast(Workers, request.getfixturevalue(fixture))
    client = tc_aio.InferenceServerClient(server.url)  # one connection: one frontend
    tensor = tc_aio.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
    stop = asyncio.Event()

    async def closed_loop() -> int:
        answered = 0
        while not stop.is_set():
            await client.infer("sleepy", [tensor])
            answered += 1
        return answered

    loops = [asyncio.ensure_future(closed_loop()) for _ in range(4)]
    labels = 'model="sleepy",version="1"'
    await asyncio.sleep(0.3)  # the four are in
    in_flight, queued = [], []
    for _ in range(30):
        in_flight.append(await asyncio.to_thread(_metric, server, "modelhub_inflight_requests", labels))
        queued.append(await asyncio.to_thread(_metric, server, "modelhub_queue_depth", labels))
        await asyncio.sleep(0.037)  # not a multiple of the 50 ms a request takes
    stop.set()
    assert min(await asyncio.gather(*loops)) > 5
    await client.close()
    assert max(in_flight) <= 4 and max(queued) <= 3, (in_flight, queued)
    assert sum(in_flight) / len(in_flight) >= 3.5, in_flight
    assert sum(queued) / len(queued) >= 2.5, queued


def _traces(server: Workers, model: str) -> list[int]:
    """The ids of the trace lines of `model` in the server's log so far."""
    ids = []
    for line in server.log_path.read_bytes().decode(errors="replace").splitlines():
        if "modelhub.trace" in line and f'"model_name":"{model}"' in line:
            ids.append(json.loads(line[line.index("{") :])["id"])
    return ids


def test_trace_ids_are_unique_across_frontends_and_the_count_is_the_servers(tmp_path: Path) -> None:
    """Triton numbers its traces once per server: with --workers 2 no two traces share an id,
    whichever frontend wrote them (one restarted since included), and `trace_count` is the
    whole server's."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--model-control")
    tensor = tc.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 1), np.float32))

    def requests(count: int) -> None:
        for client in _connections(server, count):
            client.infer("identity_fp32", [tensor])
        time.sleep(0.5)  # the frontends write the log

    try:
        client = tc.InferenceServerClient(server.url)
        settings = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "5"}
        client.update_trace_settings(model_name="identity_fp32", settings=settings)
        requests(20)
        ids = _traces(server, "identity_fp32")
        assert sorted(ids) == [1, 2, 3, 4, 5], ids
        client.update_trace_settings(model_name="identity_fp32", settings={"trace_count": "-1"})
        requests(12)
        server.kill_frontend()
        _restart_clients(server)
        requests(12)
        ids = _traces(server, "identity_fp32")
        assert len(ids) == 5 + 24 and len(set(ids)) == len(ids), sorted(ids)
    finally:
        assert server.stop() == 0, server.output()


def test_a_shared_counter_draws_each_number_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every holder of the file draws the next number, a later one (a restarted frontend's)
    included; a file that cannot be used counts alone, and says so, rather than fail."""
    first, second = SharedCounter(tmp_path / "ids"), SharedCounter(tmp_path / "ids")
    assert [first(), second(), second(), first()] == [1, 2, 3, 4]
    first.close()
    later = SharedCounter(tmp_path / "ids")
    assert later() == 5
    for counter in (second, later):
        counter.close()
    lost = SharedCounter(tmp_path / "gone" / "ids")
    assert [lost(), lost()] == [1, 2]
    assert "ids may repeat" in caplog.text


def _connections(server: Workers, n: int) -> list[tc.InferenceServerClient]:
    """n clients, each on its own connection (SO_REUSEPORT spreads them over the frontends)."""
    return [
        tc.InferenceServerClient(server.url, channel_args=[("grpc.use_local_subchannel_pool", 1), ("fresh", i)])
        for i in range(n)
    ]


# --- independent servers on one port (--reuse-port) -------------------------------------------


def test_reuse_port_lets_independent_servers_share_the_ports(
    start_server: Any, tmp_path: Path, digits_heldout: Any
) -> None:
    """`--reuse-port`: a second single-process server binds the first one's gRPC and REST ports,
    and the kernel spreads connections over both, each answering from its own copy of the model."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "plugins" / "digits")
    first = start_server(plugins, reuse_port=True)
    second = start_server(plugins, reuse_port=True, grpc_port=first.server.grpc_port, http_port=first.server.http_port)
    assert (second.server.grpc_port, second.server.http_port) == (first.server.grpc_port, first.server.http_port)
    images, _ = digits_heldout
    answers = []
    for channel in range(24):  # a connection each: without a pool of its own, channels share one
        options = [("grpc.use_local_subchannel_pool", 1), ("modelhub.test.channel", channel)]
        client = tc.InferenceServerClient(first.url, channel_args=options)
        answers.append(client.infer("digits", [image_input(images[:4])]).as_numpy("logits"))
        client.close()
    for answer in answers:
        np.testing.assert_allclose(answer, answers[0], rtol=1e-5, atol=1e-5)
    counts = [server.model("digits").stats.success.count for server in (first, second)]
    assert sum(counts) == 24 and min(counts) > 0, counts


@pytest.mark.parametrize("field", ["grpc_port", "http_port", "metrics_port"])
def test_a_port_in_use_is_named_with_its_flag(field: str, tmp_path: Path, model_repository: Path) -> None:
    """A port that is taken (the metrics port, say, which --reuse-port servers never share)
    fails the start with an error naming the flag and the address, for each of the three."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    ports = {"grpc_port": 0, "http_port": 0, "metrics_port": 0, field: port}
    config = ServerConfig(
        plugins_dir=link_plugins(tmp_path / "plugins", ROOT / "plugins" / "digits"), model_repository=model_repository,
        host="127.0.0.1", device="cpu", threads=1, entry_points=False, reuse_port=True, **ports,
    )  # fmt: skip
    server = RunningServer(config)
    flag = "--" + field.replace("_", "-")
    try:
        cause = "in use" if field == "grpc_port" else "Address already in use"  # grpcio logs its errno itself
        with pytest.raises(OSError, match=rf"\({flag}.*cannot listen on 127\.0\.0\.1:{port}: {cause}"):
            server.start()
    finally:
        server.stop()
        taken.close()


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port"])
def test_workers_do_not_join_another_server_on_their_ports(flag: str, tmp_path: Path) -> None:
    """The frontends of --workers bind with SO_REUSEPORT, which let them join a server already
    listening there with it: two servers on one port, each answering for its own models. Without
    --reuse-port a taken port now fails the start (exit 1) naming it, as one process does,
    before any child starts."""
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another --workers server's frontends
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    other = "--http-port" if flag == "--grpc-port" else "--grpc-port"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "hub.cli", "serve", "--workers", "2", "--host", "127.0.0.1", flag, str(port),
             other, "0", "--metrics-port", "off", "--plugins-dir", str(tmp_path), "--no-entry-points"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        taken.close()
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"port {port} on 127.0.0.1 cannot be served" in result.stderr and flag in result.stderr, result.stderr
    assert "--reuse-port" in result.stderr and "frontend 0" not in result.stderr


# --- the shared-memory hand-off (hub/workers/arena.py) ----------------------------------------


def test_arena_ring_reuses_blocks_freed_out_of_order() -> None:
    arena = Arena.create(4096)
    assert arena is not None
    try:
        first, second, third = (arena.alloc(1000) for _ in range(3))
        assert (first, second, third) == (0, 1024, 2048)  # rounded up to ALIGN, back to back
        assert arena.alloc(2048) is None  # no contiguous room: the caller uses the socket
        arena.free(second)  # out of order: the tail waits for the oldest block
        assert arena.alloc(1100) is None and arena.used == 2048
        arena.free(first)  # now the tail moves past both, and the ring wraps to the front
        assert arena.alloc(2048) == 0 and arena.alloc(64) is None
        arena.free(third)
        arena.free(0)
        assert arena.used == 0 and arena.blocks == 0 and arena.alloc(4096) == 0
        arena.free(12345)  # never taken: ignored
    finally:
        arena.unlink()
    assert not (SHM_DIR / arena.name).exists()


async def test_headers_cross_as_sent_and_subclassed_values_as_json_would_send_them() -> None:
    """Headers go in marshal's format: tuples and int keys arrive as they were sent. A value
    marshal refuses (numpy's float64 in a plugin's build report, an enum) sends the header as
    JSON would have, rather than failing the message."""
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[tuple[dict[str, Any], list[memoryview]]] = asyncio.Queue()
    left, right = socket.socketpair()
    sender = Channel(lambda header, frames: None, lambda exc: None)
    receiver = Channel(lambda header, frames: received.put_nowait((header, frames)), lambda exc: None)
    await loop.create_connection(lambda: sender, sock=left)
    await loop.create_connection(lambda: receiver, sock=right)
    try:
        plain = {"k": "reply", "t": 7, "outputs": [("logits", "FP32", (1, 10))], "batches": {4: 1}, "none": None}
        sender.send(plain, [b"\x01" * 40])
        header, frames = await asyncio.wait_for(received.get(), 5)
        assert header == plain and isinstance(header["outputs"][0], tuple)
        assert [bytes(f) for f in frames] == [b"\x01" * 40]

        report = {"k": "state", "validation": {"max_abs_diff": np.float64(0.5), "state": ModelState.READY.value}}
        report["phase"] = _Phase.BUILT
        report["pair"] = (1, 2)
        sender.send(report)
        header, _ = await asyncio.wait_for(received.get(), 5)
        assert header == {
            "k": "state",
            "validation": {"max_abs_diff": 0.5, "state": "ready"},
            "phase": 1,
            "pair": [1, 2],
        }
        assert type(header["validation"]["max_abs_diff"]) is float
    finally:
        for channel in (sender, receiver):
            assert channel.transport is not None
            channel.transport.close()


class _Phase(enum.IntEnum):
    BUILT = 1


async def test_a_message_the_wire_cannot_carry_fails_that_call_and_not_the_connection() -> None:
    """The receiver drops the connection on a header over MAX_HEADER (or over MAX_FRAMES
    frames), which failed every request in flight on it: the sender refuses such a message
    instead (MessageTooLarge, a HubError), before writing any of it. An EngineClient call that
    meets it fails alone, its ticket and its block of the arena given back; a call in flight
    beside it is answered."""
    loop = asyncio.get_running_loop()
    client = EngineClient(Path("unused"), lambda header: None)
    lost: list[BaseException | None] = []
    sender = Channel(client._received, lambda exc: lost.append(exc))
    answered: list[dict[str, Any]] = []

    def answer(header: dict[str, Any], frames: list[memoryview]) -> None:
        answered.append(header)
        receiver.send({"k": "reply", "t": header["t"]})

    receiver = Channel(answer, lambda exc: lost.append(exc))
    left, right = socket.socketpair()
    await loop.create_connection(lambda: sender, sock=left)
    await loop.create_connection(lambda: receiver, sock=right)
    client._channel = sender
    arena = Arena.create(64 << 10)
    assert arena is not None
    try:
        arena.unlink()
        with pytest.raises(MessageTooLarge, match=f"header bytes, over the {MAX_HEADER}"):
            sender.send({"k": "submit", "id": "i" * MAX_HEADER})
        with pytest.raises(MessageTooLarge, match=f"frames, over the {MAX_FRAMES}"):
            sender.send({"k": "submit"}, [b"x"] * (MAX_FRAMES + 1))

        small = asyncio.ensure_future(client.request({"k": "stats", "models": []}))
        await asyncio.sleep(0)  # sent (queued for this turn's write)
        block = arena.alloc(1024)
        assert block is not None
        with pytest.raises(MessageTooLarge) as refused:
            await client.request({"k": "submit", "id": "i" * (20 << 20)}, (), (arena, block))
        assert refused.value.code == "RESOURCE_EXHAUSTED" and "'submit' message" in str(refused.value)
        assert arena.used == 0  # its block came back
        header, _ = await asyncio.wait_for(small, 5)
        assert header["k"] == "reply" and client._pending == {}
        assert [h["k"] for h in answered] == ["stats"]  # nothing of the refused messages arrived
        assert lost == [] and not sender.closed.done() and not receiver.closed.done()
    finally:
        for channel in (sender, receiver):
            assert channel.transport is not None
            channel.transport.close()


async def test_an_answer_the_wire_cannot_carry_fails_that_call_in_the_frontend() -> None:
    """The model process's side of it: an answer too large to send goes as that call's error
    instead, an `ask` resolves with the reason, and the connection stays."""
    from hub.workers.engine import _Connection

    loop = asyncio.get_running_loop()
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    connection = _Connection(cast(Any, types.SimpleNamespace(connections=set())))
    frontend = Channel(lambda header, frames: received.put_nowait(header), lambda exc: None)
    left, right = socket.socketpair()
    await loop.create_connection(lambda: connection.channel, sock=left)
    await loop.create_connection(lambda: frontend, sock=right)
    try:
        failure = connection.send({"k": "reply", "t": 9, "settings": "x" * MAX_HEADER})
        assert failure is not None and "'reply' message" in failure
        header = await asyncio.wait_for(received.get(), 5)
        assert header["k"] == "error" and header["t"] == 9 and header["code"] == "RESOURCE_EXHAUSTED"
        assert header["message"] == failure
        asked = connection.ask({"k": "regions", "regions": "x" * MAX_HEADER}, 1)
        assert asked.done() and "'regions' message" in (asked.result() or "") and connection.asks == {}
        assert connection.send({"k": "state", "models": []}) is None
        assert (await asyncio.wait_for(received.get(), 5))["k"] == "state"
        assert not frontend.closed.done() and not connection.channel.closed.done()
    finally:
        for channel in (connection.channel, frontend):
            assert channel.transport is not None
            channel.transport.close()


def test_pack_falls_back_to_frames_when_the_arena_is_full() -> None:
    arena = Arena.create(64 << 10)
    assert arena is not None
    arena.unlink()
    big = np.arange(12 << 10, dtype=np.float32)  # 48 KiB
    small = np.arange(16, dtype=np.int64)
    described, frames, block = pack_arrays([("big", big), ("small", small)], arena)
    assert block == 0 and len(described[0]) == 5 and len(described[1]) == 3 and len(frames) == 1
    again, frames_again, no_block = pack_arrays([("big", big)], arena)  # 48 KiB more do not fit
    assert no_block == -1 and len(again[0]) == 3 and len(frames_again) == 1
    received = unpack_arrays(described, [memoryview(bytes(f)) for f in frames], arena)
    np.testing.assert_array_equal(received["big"], big)
    np.testing.assert_array_equal(received["small"], small)
    assert unpack_arrays(again, [memoryview(bytes(frames_again[0]))])["big"].tobytes() == big.tobytes()


def _arenas(pid: int) -> set[str]:
    """The hand-off arenas a process has mapped (their names are unlinked: '(deleted)')."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {line.split("/dev/shm/")[1].split()[0] for line in maps.splitlines() if "/dev/shm/modelhub-handoff-" in line}


def _leftovers(server: Workers) -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if n.startswith(f"modelhub-handoff-{server.process.pid}-")]


async def _round_trips(server: Workers, shapes: list[tuple[int, int]], concurrency: int = 16) -> None:
    """Each request a distinct tensor through identity_fp32 (batched) and identity_bytes:
    every answer must be its own request's."""
    client = tc_aio.InferenceServerClient(server.url)

    async def one_request(index: int) -> None:
        shape = shapes[index % len(shapes)]
        data = np.random.default_rng(index).standard_normal(shape).astype(np.float32)
        tensor = tc_aio.InferInput("INPUT0", list(shape), "FP32")
        tensor.set_data_from_numpy(data)
        result = await client.infer("identity_fp32", [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)

    await asyncio.gather(*[one_request(i) for i in range(concurrency * 4)])
    words = np.array([[f"w{i}".encode() * 100 for i in range(64)]], dtype=np.object_)
    tensor = tc_aio.InferInput("INPUT0", [1, 64], "BYTES")
    tensor.set_data_from_numpy(words)
    assert (await client.infer("identity_bytes", [tensor])).as_numpy("OUTPUT0").tolist() == words.tolist()
    await client.close()


#: 128 KiB, 48 KiB (both through the arena) and 1 KiB (inline) per request.
SHAPES = [(1, 32 << 10), (1, 12 << 10), (2, 128)]


async def test_shared_memory_handoff_answers_and_leaves_nothing_in_dev_shm(tmp_path: Path) -> None:
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    # Copies off: every request crosses to the model process, which is what this tests.
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--model-copies", "none")
    try:
        await _round_trips(server, SHAPES)
        engine = server.children("engine")[0]
        frontends = server.children("frontend")
        # Each frontend's arena and the model process's one for it are mapped on both sides
        # and already unlinked: nothing is left in /dev/shm while the server runs.
        mapped = _arenas(engine)
        assert len(mapped) == 4, mapped
        for pid in frontends:
            assert len(_arenas(pid)) == 2 and _arenas(pid) <= mapped
        assert _leftovers(server) == []
    finally:
        assert server.stop() == 0, server.output()
    assert _leftovers(server) == []


async def test_a_full_arena_falls_back_to_the_socket(tmp_path: Path) -> None:
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    # 256 KiB each way: a few 48 KiB tensors fit at once, a 128 KiB one now and then; the rest go as frames
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--handoff-arena", "256K", "--model-copies", "none")
    try:
        await _round_trips(server, SHAPES, concurrency=32)
        assert len(_arenas(server.children("engine")[0])) == 4
    finally:
        assert server.stop() == 0, server.output()
    assert _leftovers(server) == []


async def test_socket_handoff_maps_no_arena(tmp_path: Path) -> None:
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--handoff", "socket", "--model-copies", "none")
    try:
        await _round_trips(server, SHAPES, concurrency=4)
        assert _arenas(server.children("engine")[0]) == set()
    finally:
        assert server.stop() == 0, server.output()


async def _deadline_storm(server: Workers, seconds: float, concurrency: int = 16) -> dict[str, int]:
    """identity_fp32 requests of 16 KiB over two connections, each with a gRPC deadline of
    1-10 ms, around their time in the server: some callers go away before the model process
    answers, some while the answer is on its way (on the 2-core box: 100-300 of 10k requests in
    4 s), most are answered. The status names and how many of each."""
    clients = [tc_aio.InferenceServerClient(server.url) for _ in range(2)]
    tensor = tc_aio.InferInput("INPUT0", [1, 4096], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4096), np.float32))
    rng = np.random.default_rng(7)
    codes: dict[str, int] = {}
    end = time.monotonic() + seconds

    async def caller(client: tc_aio.InferenceServerClient) -> None:
        while time.monotonic() < end:
            try:
                await client.infer("identity_fp32", [tensor], client_timeout=float(rng.uniform(0.001, 0.010)))
                code = "OK"
            except InferenceServerException as exc:
                code = str(exc.status()).removeprefix("StatusCode.")
            codes[code] = codes.get(code, 0) + 1

    await asyncio.gather(*[caller(clients[i % 2]) for i in range(concurrency)])
    for client in clients:
        await client.close()
    return codes


async def test_answers_whose_caller_went_away_release_their_tickets(tmp_path: Path) -> None:
    """The model process keeps each answer's batch under a ticket until the frontend commits
    that request with it. An answer that reaches the frontend after its caller went away (a
    deadline, a cancel) is released too: the model process holds none when the frontends have
    drained and exit (it logs those it still held), however long the frontend lives."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--model-copies", "none")
    try:
        codes = await _deadline_storm(server, seconds=4)
        assert codes.get("OK", 0) and codes.get("DEADLINE_EXCEEDED", 0), codes
    finally:
        assert server.stop() == 0, server.output()
    assert server.logged("answered requests not counted") == 0, server.output()


async def test_a_commit_too_large_for_the_wire_goes_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit carries every request answered in one event-loop turn, the output blocks to
    free and the tickets to release. One over the wire's limit goes as parts that fit, so
    that nothing of it is lost: lost blocks would stay taken in the model process's arena."""
    monkeypatch.setattr("hub.workers.wire.MAX_HEADER", 4096)
    loop = asyncio.get_running_loop()
    client = EngineClient(Path("unused"), lambda header: None)
    received: list[dict[str, Any]] = []
    sender = Channel(client._received, lambda exc: None)
    receiver = Channel(lambda header, frames: received.append(header), lambda exc: None)
    left, right = socket.socketpair()
    await loop.create_connection(lambda: sender, sock=left)
    await loop.create_connection(lambda: receiver, sock=right)
    client._channel = sender
    items = [[f"model-{i}" * 4, 1, "OK", 1000 + i, 1, 10, i, None] for i in range(300)]
    try:
        for item in items:
            client.commit(item)
        client._frees.extend(range(0, 3000, 3))
        client._drops.extend(range(5000, 5400))
        client._flush()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if sum(len(header["items"]) for header in received) == len(items):
                break
        assert len(received) > 1 and {header["k"] for header in received} == {"commit"}
        assert [item for header in received for item in header["items"]] == items
        assert [offset for header in received for offset in header.get("free", ())] == list(range(0, 3000, 3))
        assert [ticket for header in received for ticket in header.get("drop", ())] == list(range(5000, 5400))
        assert not sender.closed.done() and not receiver.closed.done()
    finally:
        for channel in (sender, receiver):
            assert channel.transport is not None
            channel.transport.close()


def test_an_answer_from_before_a_model_process_restart_is_not_committed_with_its_ticket() -> None:
    """Tickets are numbered by the model process, anew when it restarts: an answer that came
    on the connection before is not committed with its ticket, which would name another batch
    of the new process (its figures went with the process that computed it)."""
    from hub.core.batching import Delivery
    from hub.spec import ModelSpec, TensorSpec
    from hub.workers.frontend import RemoteBatch, RemoteModel

    client = EngineClient(Path("unused"), lambda header: None)
    tensor = [TensorSpec("INPUT0", "FP32", [1])]
    model = RemoteModel(ModelSpec(name="m", build=lambda: None, inputs=tensor, outputs=tensor, example_inputs={}))
    model.client = client
    client.connection = 2
    scheduled: list[Any] = []
    client._flush_scheduled = True  # (no event loop here: keep the flush from being scheduled)
    for connection in (1, 2):
        model.begin_request()
        batch = RemoteBatch(1, 0, 0, 0, ticket=7, connection=connection)
        model.end_request("OK", 0.001, Delivery({}, 1, 0, batch))
        scheduled.append(list(client._commits))
    assert scheduled[0] == []  # the answer of the first connection: not committed
    assert [item[6] for item in scheduled[1]] == [7]  # this connection's: with its ticket
    assert model.handling == 0
