"""Dynamic batching end to end, through the server with tritonclient's asyncio client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from hub.config import DeploymentConfig
from hub.errors import SpecError

from .conftest import ROOT, RunningServer, Workers, link_plugins
from .plugins.behaviour import call_sleepy


def image_input(batch: np.ndarray) -> tc_aio.InferInput:
    tensor = tc_aio.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return tensor


def _counts(client: tc.InferenceServerClient, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


@pytest.fixture(scope="module")
def patient_digits(start_server: Any, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    """digits with a 5 ms queue delay: a policy that asks the batcher to wait for company from
    the first request (the plugin's own policy has none: there the adaptive delay waits only
    once a probe has shown that waiting gathers company).
    """
    plugins = link_plugins(tmp_path_factory.mktemp("patient"), ROOT / "plugins" / "digits")
    config = DeploymentConfig.parse({"models": {"digits": {"max_queue_delay": 0.005}}})
    return start_server(plugins, deployment=config)


async def test_256_concurrent_requests_are_batched_and_correct(
    patient_digits: RunningServer, digits_heldout: Any
) -> None:
    hub_server = patient_digits
    images, labels = digits_heldout
    sync = tc.InferenceServerClient(hub_server.url)
    expected = np.concatenate(
        [sync.infer("digits", [image_input(images[i : i + 64])]).as_numpy("logits") for i in range(0, 256, 64)]
    )
    before = _counts(sync, "digits")
    client = tc_aio.InferenceServerClient(hub_server.url)
    results = await asyncio.gather(
        *[client.infer("digits", [image_input(images[i : i + 1])], request_id=str(i)) for i in range(256)]
    )
    await client.close()
    for i, result in enumerate(results):
        assert result.get_response().id == str(i)
        np.testing.assert_allclose(result.as_numpy("logits")[0], expected[i], rtol=1e-5, atol=1e-5)
    predictions = np.array([r.as_numpy("logits")[0].argmax() for r in results])
    assert np.mean(predictions == labels[:256]) >= 0.95
    after = _counts(sync, "digits")
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 256
    assert executions <= inferences // 4, (inferences, executions)


async def test_the_adaptive_delay_batches_a_burst_without_a_policy_delay(tmp_path: Path, digits_heldout: Any) -> None:
    """digits with its own policy (no queue delay): under a burst of concurrent requests a
    probe finds that waiting gathers company, so the batches grow (hub/core/batching.py, the
    adaptive queue delay; with `adaptive_delay=0.0` every one of these runs alone); the
    answers are each request's own. A burst is what it says: the server is a process of its
    own (`--workers 1`, the one-process path), and the requests are serialized before it is
    sent. With the server in this test's process and tritonclient building each request as
    it went, the requests of a "burst" came a few hundred µs apart on a slow box, too few
    for a probe's 2 ms, and every probe missed (252 executions for 256)."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "plugins" / "digits")
    server = Workers(plugins, tmp_path / "models", tmp_path, 1)
    try:
        images, _ = digits_heldout
        sync = tc.InferenceServerClient(server.url)
        expected = sync.infer("digits", [image_input(images[:64])]).as_numpy("logits")
        requests = []
        for i in range(64):
            request = service_pb2.ModelInferRequest(model_name="digits")
            request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
            request.raw_input_contents.append(np.ascontiguousarray(images[i : i + 1], np.float32).tobytes())
            requests.append(request.SerializeToString())
        channel = grpc.aio.insecure_channel(server.url)
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )

        async def burst() -> list[Any]:
            return await asyncio.gather(*[infer(request, timeout=30) for request in requests])

        for _ in range(2):  # the probe comes at the 16th request: waiting is on from then
            await burst()
        before = _counts(sync, "digits")
        results = [result for _ in range(4) for result in await burst()]
        await channel.close()
        after = _counts(sync, "digits")
    finally:
        assert server.stop() == 0, server.output()
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 256
    assert executions <= inferences // 2, (inferences, executions)
    for i, result in enumerate(results):
        logits = np.frombuffer(result.raw_output_contents[0], np.float32)
        np.testing.assert_allclose(logits, expected[i % 64], rtol=1e-5, atol=1e-5)


async def test_burst_beyond_the_queue_is_rejected_and_the_rest_answered(hub_server: RunningServer) -> None:
    client = tc_aio.InferenceServerClient(hub_server.url)
    outcomes = await asyncio.gather(*[call_sleepy(client, float(i)) for i in range(24)])
    await client.close()
    rejected = [o for o in outcomes if o == "StatusCode.RESOURCE_EXHAUSTED"]
    answered = {i: o for i, o in enumerate(outcomes) if isinstance(o, float)}
    assert rejected, outcomes
    assert len(rejected) + len(answered) == 24, outcomes
    assert len(answered) >= 5  # one running plus a full queue of four, at least
    assert all(value == 2.0 * i for i, value in answered.items())


async def test_client_deadline_wins(hub_server: RunningServer) -> None:
    client = tc_aio.InferenceServerClient(hub_server.url)
    tensor = tc_aio.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
    busy = [asyncio.ensure_future(client.infer("sleepy", [tensor])) for _ in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(InferenceServerException) as err:
        await client.infer("sleepy", [tensor], client_timeout=0.03)
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    await asyncio.gather(*busy, return_exceptions=True)
    await client.close()


def test_deployment_config_overrides_the_policy(start_server: Any, tmp_path: Path) -> None:
    config = DeploymentConfig.parse(
        {"models": {"digits": {"max_batch_size": 8, "preferred_batch_sizes": [4, 8], "instances": 2,
                               "max_queue_delay": 0.001, "max_queue_size": 100, "timeout": 2.5}}}
    )  # fmt: skip
    plugins = link_plugins(tmp_path / "plugins", ROOT / "plugins" / "digits")
    server = start_server(plugins, deployment=config)
    client = tc.InferenceServerClient(server.url)
    cfg = client.get_model_config("digits", as_json=True)["config"]
    assert cfg["max_batch_size"] == 8
    assert cfg["instance_group"][0]["count"] == 2
    batching = cfg["dynamic_batching"]
    assert batching["preferred_batch_size"] == [4, 8]
    assert batching["max_queue_delay_microseconds"] == "1000"
    assert batching["default_queue_policy"]["max_queue_size"] == 100
    assert batching["default_queue_policy"]["default_timeout_microseconds"] == "2500000"
    with pytest.raises(InferenceServerException) as err:
        client.infer("digits", [image_input(np.zeros((9, 1, 8, 8), np.float32))])
    assert "exceeds max_batch_size 8" in err.value.message()


def test_deployment_config_file_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "deploy.toml"
    path.write_text("[models.digits]\nmax_batch_size = 16\npreferred_batch_sizes = [8, 16]\n")
    assert DeploymentConfig.load(path).models["digits"]["max_batch_size"] == 16
    path.write_text("[models.digits]\nmax_batch = 16\n")
    with pytest.raises(SpecError, match="max_batch"):
        DeploymentConfig.load(path)
    from hub.plugins.manager import PluginHost

    host = PluginHost(ROOT / "plugins", entry_points=False)
    host.collect_targets()
    specs = host.collect_models()
    with pytest.raises(SpecError, match="preferred_batch_sizes"):
        DeploymentConfig.parse({"models": {"digits": {"max_batch_size": 4, "preferred_batch_sizes": [8]}}}).apply(specs)
    with pytest.raises(SpecError, match="max_batch_size"):
        DeploymentConfig.parse({"models": {"digits": {"max_batch_size": 0}}}).apply(specs)
