"""`modelhub serve --workers 2`: one model process behind two frontend processes, as a user
starts it, driven with tritonclient: answers, statistics and metrics of the whole server,
reloads under load, a frontend or the model process killed under load, and SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException

from .conftest import ROOT, Workers, link_plugins
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

    def counts() -> tuple[int, int, int]:
        stats = sync.get_inference_statistics("digits", as_json=True)["model_stats"][0]
        return int(stats["inference_count"]), int(stats["inference_stats"]["success"]["count"]), _requests(workers)

    before = counts()
    # Many channels, so that the kernel spreads them over both frontends.
    clients = [tc_aio.InferenceServerClient(workers.url) for _ in range(8)]
    tensor = tc_aio.InferInput("image", [2, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(images[:2])
    await asyncio.gather(*[c.infer("digits", [tensor]) for c in clients for _ in range(20)])
    for client in clients:
        await client.close()
    after = counts()
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (320, 160, 160)


def _requests(workers: Workers) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{workers.ports['metrics']}/metrics").read().decode()
    prefix = 'modelhub_requests_total{code="OK",model="digits",version="1"}'
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


async def test_killed_frontend_and_model_process_recover(tmp_path: Path) -> None:
    plugins = link_plugins(
        tmp_path / "plugins", *(ROOT / "tests" / "plugins" / f for f in ("identity.py", "behaviour.py"))
    )
    server = Workers(plugins, tmp_path / "models", tmp_path)
    try:
        sync = tc.InferenceServerClient(server.url)
        # A frontend dies: it is restarted, and the server answers on fresh connections.
        victim = server.children("frontend")[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while victim in server.children("frontend") or len(server.children("frontend")) < 2:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.2)
        assert "frontend-0 exited (code -9); restarting it" in server.output() or "exited (code -9)" in server.output()
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
        assert errors, outcomes
        assert all(e.status() == "StatusCode.UNAVAILABLE" and "model process" in e.message() for e in errors), [
            (e.status(), e.message()) for e in errors
        ]
        assert not sync.is_server_ready()
        while not sync.is_server_ready():
            assert time.monotonic() < deadline + 120, server.output()
            time.sleep(0.2)
        assert float((await client.infer("sleepy", [tensor])).as_numpy("OUTPUT0")[0, 0]) == 2.0
        await client.close()
    finally:
        assert server.stop() == 0, server.output()


async def test_sigterm_answers_every_accepted_request(tmp_path: Path) -> None:
    plugins = link_plugins(
        tmp_path / "plugins", *(ROOT / "tests" / "plugins" / f for f in ("identity.py", "behaviour.py"))
    )
    server = Workers(plugins, tmp_path / "models", tmp_path)
    client = tc_aio.InferenceServerClient(server.url)
    tensor = tc_aio.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), 3.0, np.float32))
    flights = [asyncio.ensure_future(client.infer("sleepy", [tensor])) for _ in range(4)]
    await asyncio.sleep(0.1)  # accepted: sleepy takes 50 ms each, one at a time
    server.process.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*flights, return_exceptions=True)
    await client.close()
    assert [r if isinstance(r, Exception) else float(r.as_numpy("OUTPUT0")[0, 0]) for r in results] == [6.0] * 4
    assert server.stop() == 0, server.output()
