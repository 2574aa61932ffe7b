"""Model control: RepositoryModelLoad / Unload through tritonclient, reloads under load with
zero failed requests, and failed reloads that leave the previous build serving."""

from __future__ import annotations

import asyncio
import json
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
import tritonclient.http as th
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from .conftest import ROOT, RunningServer, link_plugins
from .fakes import LoadHook

SCALER = """
import numpy as np
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

FACTOR = {factor}

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="scaler",
        build=lambda: (lambda inputs: {{"OUTPUT0": inputs["INPUT0"] * FACTOR}}),
        inputs=[TensorSpec("INPUT0", "FP32", (-1, 1))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (-1, 1))],
        example_inputs={{"INPUT0": np.ones((1, 1), np.float32)}},
        target="numpy",
        batching=BatchPolicy(max_batch_size=32),
    ))
"""


def write_scaler(plugins: Path, factor: float) -> None:
    (plugins / "scaler.py").write_text(textwrap.dedent(SCALER.format(factor=factor)))


@pytest.fixture()
def scaler_server(start_server: Any, tmp_path: Path) -> tuple[RunningServer, Path]:
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    write_scaler(plugins, 2.0)
    return start_server(plugins, model_repository=tmp_path / "models", model_control=True), plugins


def one(value: float) -> tc_aio.InferInput:
    tensor = tc_aio.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), value, np.float32))
    return tensor


async def test_reload_under_load_drops_nothing(scaler_server: tuple[RunningServer, Path]) -> None:
    server, plugins = scaler_server
    client = tc_aio.InferenceServerClient(server.url)
    stop = asyncio.Event()
    failures: list[str] = []
    answers: list[float] = []

    async def worker(seed: int) -> None:
        value = float(seed + 1)
        while not stop.is_set():
            try:
                result = await client.infer("scaler", [one(value)])
                answers.append(float(result.as_numpy("OUTPUT0")[0, 0]) / value)
            except InferenceServerException as exc:
                failures.append(f"{exc.status()}: {exc.message()}")

    workers = [asyncio.ensure_future(worker(i)) for i in range(64)]
    await asyncio.sleep(0.5)
    for factor in (3.0, 4.0, 5.0):
        write_scaler(plugins, factor)
        await client.load_model("scaler")
        # Every request sent after the load returned is answered by the new build.
        fresh = await asyncio.gather(*[client.infer("scaler", [one(1.0)]) for _ in range(8)])
        assert {float(r.as_numpy("OUTPUT0")[0, 0]) for r in fresh} == {factor}
        await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*workers)
    await client.close()
    assert failures == []
    assert len(answers) > 200 and set(answers) <= {2.0, 3.0, 4.0, 5.0}
    stats = tc.InferenceServerClient(server.url).get_inference_statistics("scaler", as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["success"]["count"]) >= len(answers)  # statistics survive reloads


async def test_failed_reload_keeps_the_previous_build(scaler_server: tuple[RunningServer, Path]) -> None:
    server, plugins = scaler_server
    client = tc.InferenceServerClient(server.url)
    (plugins / "scaler.py").write_text("def broken(:\n")
    with pytest.raises(InferenceServerException) as err:
        client.load_model("scaler")
    assert "scaler" in err.value.message()
    result = client.infer("scaler", [one(1.0)])
    assert float(result.as_numpy("OUTPUT0")[0, 0]) == 2.0
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["scaler"]["state"] == "READY" and "reload failed" in index["scaler"]["reason"]
    assert client.is_model_ready("scaler")
    text = __import__("urllib.request").request.urlopen(server.metrics_url).read().decode()
    assert 'modelhub_model_load_failures_total{model="scaler",version="1"} 1.0' in text
    write_scaler(plugins, 7.0)  # a fixed file loads again
    client.load_model("scaler")
    assert float(client.infer("scaler", [one(1.0)]).as_numpy("OUTPUT0")[0, 0]) == 7.0


def test_unload_then_load(scaler_server: tuple[RunningServer, Path]) -> None:
    server, _ = scaler_server
    client = tc.InferenceServerClient(server.url)
    client.unload_model("scaler")
    assert not client.is_model_ready("scaler")
    with pytest.raises(InferenceServerException) as err:
        client.infer("scaler", [one(1.0)])
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert err.value.message().endswith("model 'scaler' version 1 is unloaded")  # not "unloaded: unloaded"
    for impossible in ("", "a/b"):  # refused at once, not NOT_FOUND after every plugin is imported again
        with pytest.raises(InferenceServerException) as err:
            client.load_model(impossible)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value.message()
        assert f"model name '{impossible}' cannot name a model" in err.value.message()
    # As in Triton's explicit mode, the index lists what could be loaded, with its state;
    # `ready` asks for the ready models alone. The same over REST.
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["scaler"]["state"] == "UNAVAILABLE" and index["scaler"]["reason"] == "unloaded"
    assert index["identity_fp32"]["state"] == "READY"
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.url))
    ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=5).models
    assert "scaler" not in {m.name for m in ready} and "identity_fp32" in {m.name for m in ready}
    rest = {m["name"]: m for m in th.InferenceServerClient(server.http_url).get_model_repository_index()}
    assert rest["scaler"] == {"name": "scaler", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b'{"ready": true}')
    ready_rest = json.loads(urllib.request.urlopen(request).read())
    assert "scaler" not in {m["name"] for m in ready_rest} and "identity_fp32" in {m["name"] for m in ready_rest}
    client.load_model("scaler")
    assert client.is_model_ready("scaler")
    assert float(client.infer("scaler", [one(2.0)]).as_numpy("OUTPUT0")[0, 0]) == 4.0
    with pytest.raises(InferenceServerException) as err:
        client.unload_model("nothing_here")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        client.load_model("nothing_here")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def _until(check: Any, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except InferenceServerException:
            pass
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.1)


def reasons(client: tc.InferenceServerClient) -> str:
    return " ".join(m.get("reason", "") for m in client.get_model_repository_index(as_json=True)["models"])


def test_watch_loads_reloads_and_unloads_plugin_files(start_server: Any, tmp_path: Path) -> None:
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    server = start_server(plugins, model_repository=tmp_path / "models", watch=0.2)
    client = tc.InferenceServerClient(server.url)

    def answer() -> float:
        return float(client.infer("scaler", [one(1.0)]).as_numpy("OUTPUT0")[0, 0])

    write_scaler(plugins, 2.0)  # added
    _until(lambda: client.is_model_ready("scaler") and answer() == 2.0)
    write_scaler(plugins, 6.0)  # changed
    _until(lambda: answer() == 6.0)
    invalid = textwrap.dedent(SCALER.format(factor=7.0)).replace("=32", "=32, preferred_batch_sizes=[64]")
    (plugins / "scaler.py").write_text(invalid)  # a spec that does not validate changes nothing else
    _until(lambda: "preferred_batch_sizes" in reasons(client))
    assert "reload failed" in reasons(client) and answer() == 6.0
    (plugins / "scaler.py").write_text("def broken(:\n")  # nor does a syntax error
    _until(lambda: "Error importing" in reasons(client))
    assert answer() == 6.0 and client.is_model_ready("identity_fp32")
    metrics = urllib.request.urlopen(server.metrics_url).read().decode()
    assert 'model="scaler"' in metrics
    (plugins / "scaler.py").unlink()  # removed: gone from the index, the metrics and NOT_FOUND's list
    _until(lambda: "scaler" not in {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]})
    assert not client.is_model_ready("scaler") and client.is_model_ready("identity_fp32")
    with pytest.raises(InferenceServerException) as err:
        client.infer("scaler", [one(1.0)])
    assert err.value.status() == "StatusCode.NOT_FOUND"
    served = err.value.message().split("served models:")[1]
    assert "identity_fp32" in served and "scaler" not in served
    metrics = urllib.request.urlopen(server.metrics_url).read().decode()
    assert 'model="scaler"' not in metrics and 'model="identity_fp32"' in metrics


VERSIONED = """
import numpy as np
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

def spec(version):
    return ModelSpec(
        name="versioned", version=version,
        build=lambda: (lambda inputs: {"OUTPUT0": inputs["INPUT0"] * 0 + version}),
        inputs=[TensorSpec("INPUT0", "FP32", (-1, 1))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (-1, 1))],
        example_inputs={"INPUT0": np.ones((1, 1), np.float32)},
        target="numpy",
        batching=BatchPolicy(max_batch_size=4),
    )

@hookimpl
def register_models(register):
    for version in (1, 2, 3):
        register(spec(version))
"""


@pytest.mark.parametrize(
    ("policy", "served", "config_policy"),
    [
        (None, ["3"], {"latest": {"num_versions": 1}}),
        ({"latest": 2}, ["2", "3"], {"latest": {"num_versions": 2}}),
        ({"all": True}, ["1", "2", "3"], {"all": {}}),
        ({"specific": [1, 3]}, ["1", "3"], {"specific": {"versions": ["1", "3"]}}),
    ],
)
def test_version_policy(start_server: Any, tmp_path: Path, policy: Any, served: list[str], config_policy: Any) -> None:
    from hub.config import DeploymentConfig

    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    (plugins / "versioned.py").write_text(textwrap.dedent(VERSIONED))
    deployment = DeploymentConfig.parse({"models": {"versioned": {"version_policy": policy}}} if policy else {})
    server = start_server(plugins, model_repository=tmp_path / "models", deployment=deployment)
    client = tc.InferenceServerClient(server.url)
    assert client.get_model_metadata("versioned", as_json=True)["versions"] == served
    assert client.get_model_config("versioned", as_json=True)["config"]["version_policy"] == config_policy
    for version in ("1", "2", "3"):
        if version in served:
            result = client.infer("versioned", [one(5.0)], model_version=version)
            assert float(result.as_numpy("OUTPUT0")[0, 0]) == float(version)
            assert result.get_response().model_version == version
        else:
            with pytest.raises(InferenceServerException) as err:
                client.infer("versioned", [one(5.0)], model_version=version)
            assert err.value.status() == "StatusCode.NOT_FOUND"
    newest = client.infer("versioned", [one(5.0)])
    assert newest.get_response().model_version == served[-1]


def test_bad_version_policy_is_rejected() -> None:
    from hub.config import DeploymentConfig
    from hub.errors import SpecError

    for bad in ({"latest": 0}, {"newest": 1}, {"specific": []}, {"all": True, "latest": 1}):
        with pytest.raises(SpecError, match="version_policy"):
            DeploymentConfig.parse({"models": {"m": {"version_policy": bad}}})


def test_watch_counts_a_file_written_while_the_models_load(start_server: Any, tmp_path: Path) -> None:
    """--watch starts from the files as they were before the plugins were read: a plugin file
    written while the models load (here, by a model's own load) is a change, and is loaded."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    writer = LoadHook("writer", "writer", lambda: write_scaler(plugins, 3.0))
    server = start_server(plugins, model_repository=tmp_path / "models", watch=0.2, extra_plugins={"writer": writer})
    client = tc.InferenceServerClient(server.url)
    _until(
        lambda: (
            client.is_model_ready("scaler")
            and float(client.infer("scaler", [one(1.0)]).as_numpy("OUTPUT0")[0, 0]) == 3.0
        )
    )
