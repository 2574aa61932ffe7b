"""ModelSpec.postprocess through the real server (tests/plugins/postprocessed.py), over gRPC and
REST, in one process and behind `--workers 2` (the model process computes every batch and each
frontend postprocesses its own requests): served outputs and metadata, several clients' rows
batched together, a postprocess that refuses, crashes or answers wrongly, shared memory, the
build proving the artifact on the model's outputs, and the spec's and the build's checks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from hub import ModelSpec, TensorSpec
from hub.errors import SpecError

from .conftest import TEST_PLUGINS, RunningServer, Workers, link_plugins
from .plugins.postprocessed import BUG_ABOVE, CRASH_BELOW, LABELS, Scores, spec
from .test_shared_memory import new_key

ROWS = np.array([[0.0, 1.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.5, 2.0]], np.float32)  # dog, cat, bird
STATUS = {"INVALID_ARGUMENT": ("StatusCode.INVALID_ARGUMENT", "400"), "INTERNAL": ("StatusCode.INTERNAL", "500")}


@pytest.fixture(scope="module")
def pp_server(start_server: Any, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    folder = link_plugins(tmp_path_factory.mktemp("pp-plugins"), TEST_PLUGINS / "postprocessed.py")
    return start_server(folder, metrics_port=None, shared_memory=frozenset({"system"}))


@pytest.fixture(scope="module")
def pp_workers(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Workers]:
    """Behind `--workers 2` with no copy in the frontends: every forward runs in the model
    process, and each answer is postprocessed by the frontend that took the request."""
    tmp = tmp_path_factory.mktemp("pp-workers")
    plugins = link_plugins(tmp / "plugins", TEST_PLUGINS / "postprocessed.py")
    server = Workers(plugins, model_repository, tmp, 2, "--model-copies", "none", "--shared-memory", "system")
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def pp_workers_copies(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Workers]:
    """Behind `--workers 2` with each frontend's own copy (the default): batches are computed
    in the frontends too."""
    tmp = tmp_path_factory.mktemp("pp-workers-copies")
    plugins = link_plugins(tmp / "plugins", TEST_PLUGINS / "postprocessed.py")
    server = Workers(plugins, model_repository, tmp, 2, "--shared-memory", "system")
    yield server
    assert server.stop() == 0, server.output()


SERVERS = {"one-process": "pp_server", "workers-2": "pp_workers", "workers-2-copies": "pp_workers_copies"}


@pytest.fixture(params=sorted(SERVERS))
def served(request: pytest.FixtureRequest) -> RunningServer | Workers:
    return request.getfixturevalue(SERVERS[request.param])


def _client(protocol: str, server: RunningServer | Workers) -> Any:
    if protocol == "grpc":
        return tc.InferenceServerClient(server.url)
    return th.InferenceServerClient(server.http_url)


def _infer(protocol: str, server: RunningServer | Workers, model: str, rows: np.ndarray, **kwargs: Any) -> Any:
    module: Any = tc if protocol == "grpc" else th
    tensor = module.InferInput("x", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    return _client(protocol, server).infer(model, [tensor], **kwargs)


def _expect(protocol: str, code: str, call: Any) -> str:
    with pytest.raises(InferenceServerException) as err:
        call()
    assert str(err.value.status()) == STATUS[code][0 if protocol == "grpc" else 1], err.value.message()
    return str(err.value.message())


def _labels(rows: np.ndarray) -> list[bytes]:
    return [LABELS[i].encode() for i in rows.argmax(1)]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_outputs_are_postprocessed(served: RunningServer | Workers, protocol: str) -> None:
    result = _infer(protocol, served, "labeller", ROWS)
    assert result.as_numpy("label").tolist() == [b"dog", b"cat", b"bird"]
    assert result.as_numpy("index").dtype == np.int64
    assert result.as_numpy("index").tolist() == [1, 0, 2]
    assert result.as_numpy("logits") is None  # the model's own output is not served


def test_postprocess_runs_off_the_event_loop(pp_server: RunningServer) -> None:
    threads = pp_server.model("labeller").spec.postprocess.__globals__["THREADS"]  # the server's import
    threads.clear()
    _infer("grpc", pp_server, "labeller", ROWS)
    assert len(threads) == 1 and threads[0] != pp_server.thread.name, list(threads)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_metadata_and_config_show_the_served_outputs(served: RunningServer | Workers, protocol: str) -> None:
    client = _client(protocol, served)
    if protocol == "grpc":
        metadata = client.get_model_metadata("labeller", as_json=True)
        config = client.get_model_config("labeller", as_json=True)["config"]
    else:
        metadata, config = client.get_model_metadata("labeller"), client.get_model_config("labeller")
    outputs = [(o["name"], o["datatype"], [int(d) for d in o["shape"]]) for o in metadata["outputs"]]
    assert outputs == [("label", "BYTES", [-1]), ("index", "INT64", [-1])]
    assert [o["name"] for o in config["output"]] == ["label", "index"]
    assert [i["name"] for i in metadata["inputs"]] == ["x"]


def test_several_clients_batched_together_get_their_own_rows(served: RunningServer | Workers) -> None:
    rng = np.random.default_rng(7)
    requests = [rng.normal(size=(int(rng.integers(1, 4)), len(LABELS))).astype(np.float32) for _ in range(24)]
    stats = tc.InferenceServerClient(served.url)
    before = stats.get_inference_statistics("labeller", as_json=True)["model_stats"][0]

    async def concurrently() -> list[Any]:
        clients = [tc_aio.InferenceServerClient(served.url) for _ in range(4)]
        try:
            calls = []
            for i, rows in enumerate(requests):
                tensor = tc_aio.InferInput("x", list(rows.shape), "FP32")
                tensor.set_data_from_numpy(rows)
                calls.append(clients[i % len(clients)].infer("labeller", [tensor]))
            return list(await asyncio.gather(*calls))
        finally:
            for client in clients:
                await client.close()

    results = asyncio.run(concurrently())
    for rows, result in zip(requests, results, strict=True):
        assert result.as_numpy("label").tolist() == _labels(rows)
        assert result.as_numpy("index").tolist() == rows.argmax(1).tolist()
    after = stats.get_inference_statistics("labeller", as_json=True)["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == sum(len(rows) for rows in requests)
    assert executions < len(requests)  # requests shared forwards: each still got only its own rows


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_postprocess_that_refuses_is_the_clients_error(served: RunningServer | Workers, protocol: str) -> None:
    rows = np.array([[np.nan, 0.0, 0.0]], np.float32)
    message = _expect(protocol, "INVALID_ARGUMENT", lambda: _infer(protocol, served, "labeller", rows))
    assert "model 'labeller'" in message and "cannot label a row whose scores are NaN" in message


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_postprocess_that_crashes_names_the_model_and_the_error_type(
    served: RunningServer | Workers, protocol: str
) -> None:
    rows = np.array([[CRASH_BELOW * 2, 0.0, 0.0]], np.float32)
    message = _expect(protocol, "INTERNAL", lambda: _infer(protocol, served, "labeller", rows))
    assert "model 'labeller'" in message and "postprocess failed: RuntimeError" in message
    assert "secret detail" not in message  # (the details are in the server's log)
    assert _infer(protocol, served, "labeller", ROWS).as_numpy("index").tolist() == [1, 0, 2]  # still serves


@pytest.mark.parametrize(
    ("score", "fragments"),
    [
        (BUG_ABOVE * 2, ["output 'index' has shape [1, 1]", "[-1]"]),
        (-BUG_ABOVE * 2, ["missing output(s) ['index']", "unexpected output(s) ['argmax']"]),
    ],
    ids=["wrong-shape", "wrong-name"],
)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_postprocess_that_answers_wrongly_is_the_models_fault(
    served: RunningServer | Workers, protocol: str, score: float, fragments: list[str]
) -> None:
    rows = np.array([[score, 0.0, 0.0]], np.float32)
    message = _expect(protocol, "INTERNAL", lambda: _infer(protocol, served, "labeller_buggy", rows))
    assert "model 'labeller_buggy': postprocess returned bad outputs" in message
    for fragment in fragments:
        assert fragment in message, message


def test_classification_applies_to_the_served_outputs(served: RunningServer | Workers) -> None:
    top = _infer("grpc", served, "labeller", ROWS, outputs=[tc.InferRequestedOutput("index", class_count=1)])
    assert top.as_numpy("index").reshape(-1).tolist() == [b"1:0", b"0:0", b"2:0"]
    message = _expect(
        "grpc",
        "INVALID_ARGUMENT",
        lambda: _infer("grpc", served, "labeller", ROWS, outputs=[tc.InferRequestedOutput("logits", class_count=1)]),
    )
    assert "'logits' is not an output of model 'labeller'" in message


@pytest.mark.parametrize("model", ["labeller", "labeller_same_name"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_outputs_into_system_shared_memory(served: RunningServer | Workers, protocol: str, model: str) -> None:
    """The served outputs land in the client's regions, sized for them exactly. With --workers N
    the model process computes the model's outputs, which must not be written there even when
    one shares a served output's name (labeller_same_name's FP32 [3, 3] "index" would not fit
    the region of the served INT64 [3] one)."""
    module: Any = tc if protocol == "grpc" else th
    client = _client(protocol, served)
    sizes = {"label": len(serialize_byte_tensor(np.array([b"dog", b"cat", b"bird"], np.object_)).item()), "index": 24}
    handles = []
    try:
        outputs = []
        for name, size in sizes.items():
            key = new_key()
            handle = shm.create_shared_memory_region(f"pp_{name}", key, size)
            handles.append(handle)
            region = f"pp_{name}_{protocol}_{model}"
            client.register_system_shared_memory(region, key, size)
            output = module.InferRequestedOutput(name)
            output.set_shared_memory(region, size)
            outputs.append(output)
        _infer(protocol, served, model, ROWS, outputs=outputs)
        assert shm.get_contents_as_numpy(handles[0], np.object_, [3]).tolist() == [b"dog", b"cat", b"bird"]
        assert shm.get_contents_as_numpy(handles[1], np.int64, [3]).tolist() == [1, 0, 2]
    finally:
        client.unregister_system_shared_memory()
        for handle in handles:
            shm.destroy_shared_memory_region(handle)


def test_the_build_proves_the_model_outputs(pp_server: RunningServer) -> None:
    """Export, parity with eager and batch invariance are about what the artifact computes
    (logits), not what postprocess makes of them."""
    model = pp_server.model("labeller")
    manifest = model.manifest
    assert manifest["status"] == "ok" and manifest["target"] == "onnx"
    validation = manifest["validation"]
    assert set(validation["outputs"]) == {"logits"}
    assert validation["outputs"]["logits"]["within_tolerance"]
    assert set(validation["batch_invariance"]["outputs"]) == {"logits"}
    assert [t["name"] for t in manifest["key_parts"]["spec"]["model_outputs"]] == ["logits"]
    import onnxruntime as ort

    artifact = Path(pp_server.config.model_repository) / "labeller" / "1" / "model.onnx"
    assert [o.name for o in ort.InferenceSession(str(artifact)).get_outputs()] == ["logits"]


BAD_PLUGIN = """
import numpy as np
import torch
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

class Scores(torch.nn.Module):
    def forward(self, x):
        return x * 2.0

def _wrong_name(outputs):
    logits = outputs["logits"]
    return {"label": np.array(["cat"] * len(logits), dtype=object), "idx": logits.argmax(1)}

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="pp_build_refused",
        build=lambda: Scores().eval(),
        inputs=[TensorSpec("x", "FP32", (-1, 3))],
        model_outputs=[TensorSpec("logits", "FP32", (-1, 3))],
        postprocess=_wrong_name,
        outputs=[TensorSpec("label", "BYTES", (-1,)), TensorSpec("index", "INT64", (-1,))],
        example_inputs={"x": np.ones((2, 3), np.float32)},
        target="torch",
        batching=BatchPolicy(max_batch_size=4),
    ))
"""


def test_a_postprocess_wrong_on_the_examples_fails_the_build(start_server: Any, tmp_path: Path) -> None:
    """The spec cannot run its postprocess without a model: the build does, on eager's outputs."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "refused_postprocess.py").write_text(BAD_PLUGIN)
    server = start_server(folder, metrics_port=None)
    client = tc.InferenceServerClient(server.url)
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    entry = index["pp_build_refused"]
    assert entry["state"] == "UNAVAILABLE", entry
    assert "model 'pp_build_refused' (plugin 'refused_postprocess')" in entry["reason"], entry
    assert "missing output(s) ['index']" in entry["reason"], entry
    assert "unexpected output(s) ['idx']" in entry["reason"], entry


def _spec(**changes: Any) -> ModelSpec:
    return spec("pp_spec", lambda outputs: outputs, "torch").with_(**changes)


def test_postprocess_without_model_outputs_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="postprocess needs model_outputs"):
        _spec(model_outputs=()).validate()


def test_model_outputs_without_postprocess_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="model_outputs needs a postprocess"):
        _spec(postprocess=None).validate()


def test_model_outputs_are_checked_as_outputs_are() -> None:
    with pytest.raises(SpecError, match="model output 'logits' must have a leading -1 batch"):
        _spec(model_outputs=[TensorSpec("logits", "FP32", (3,))]).validate()
    with pytest.raises(SpecError, match="postprocess must be callable"):
        _spec(postprocess="label").validate()
    _spec().validate()  # the pair, well formed


def test_a_torch_model_may_not_return_bytes_even_with_a_postprocess(tmp_path: Path) -> None:
    from hub.errors import BuildError
    from hub.runtimes.torch import TorchRuntime

    bad = _spec(model_outputs=[TensorSpec("logits", "BYTES", (-1, 3))])
    with pytest.raises(BuildError, match="model output 'logits' is BYTES"):
        TorchRuntime(Scores().eval(), bad, "cpu")
