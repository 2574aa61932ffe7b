"""plugins/resnet (ResNet-50, UINT8 HWC images in, 1000 logits out) served through the real server:
as onnx and onnx-int8 on CPU, and as torch-compile (CUDA graphs per bucket) and torch-fp16 on CUDA.

On CPU a ResNet-50 export, build and validation take tens of seconds, so each server is started
once per module and the tests share it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc

from hub.config import DeploymentConfig

from .conftest import ROOT, RunningServer, link_plugins

PLUGIN = ROOT / "plugins" / "resnet"


def _serve(start_server: Any, folder: Path, target: str, **config: Any) -> tuple[RunningServer, float]:
    started = time.perf_counter()
    server = start_server(
        link_plugins(folder / "plugins", PLUGIN),
        model_repository=folder / "models",
        deployment=DeploymentConfig.parse({"models": {"resnet": {"target": target}}}),
        **config,
    )
    return server, time.perf_counter() - started


def _infer(url: str, images: np.ndarray) -> np.ndarray:
    client = tc.InferenceServerClient(url)
    tensor = tc.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return client.infer("resnet", [tensor]).as_numpy("logits")


def _manifest(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "models" / "resnet" / "1" / "manifest.json").read_text()))


@pytest.fixture(scope="module")
def resnet() -> Any:
    """The plugin package, imported from its folder the way the plugin host does."""
    name = "resnet_plugin_under_test"
    spec = importlib.util.spec_from_file_location(
        name, PLUGIN / "__init__.py", submodule_search_locations=[str(PLUGIN)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def eager(resnet: Any) -> Any:
    return resnet.build_model()


@pytest.fixture(scope="module")
def images(resnet: Any) -> np.ndarray:
    """Five images that are neither the examples nor the validation set."""
    return np.asarray(resnet.model.synthetic_images(5, seed=7))


@pytest.fixture(scope="module")
def reference(eager: Any, images: np.ndarray) -> np.ndarray:
    """Eager fp32 logits on CPU. The server builds its own model: equal logits also show that
    build() is deterministic, which the artifact cache relies on."""
    import torch

    with torch.inference_mode():
        return eager(torch.from_numpy(images)).numpy()


@pytest.fixture(scope="module")
def onnx_server(start_server: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunningServer, Path]:
    folder = tmp_path_factory.mktemp("resnet-onnx")
    server, seconds = _serve(start_server, folder, "onnx")
    print(f"resnet onnx: built, validated and served in {seconds:.1f}s")
    return server, folder


def test_resnet_is_registered_with_its_contract(resnet: Any, tmp_path: Path) -> None:
    from hub.plugins.manager import PluginHost

    host = PluginHost(link_plugins(tmp_path / "plugins", PLUGIN), entry_points=False)
    (spec,) = host.collect_models()
    assert spec.name == "resnet" and spec.target == resnet.default_target()
    assert [(t.name, t.datatype, t.shape) for t in spec.inputs] == [("image", "UINT8", (-1, 224, 224, 3))]
    assert [(t.name, t.datatype, t.shape) for t in spec.outputs] == [("logits", "FP32", (-1, 1000))]
    assert spec.batching.max_batch_size == 128 and spec.batching.max_queue_delay > 0


def test_onnx_serves_eager_logits_and_batches_like_single_requests(
    onnx_server: tuple[RunningServer, Path], reference: np.ndarray, images: np.ndarray
) -> None:
    server, folder = onnx_server
    client = tc.InferenceServerClient(server.url)
    assert client.get_model_config("resnet", as_json=True)["config"]["runtime"] == "onnx"
    metadata = client.get_model_metadata("resnet", as_json=True)
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": ["-1", "224", "224", "3"]}]
    batched = _infer(server.url, images)
    assert batched.shape == (5, 1000) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, reference, rtol=1e-4, atol=1e-3)
    assert len(set(reference.argmax(1).tolist())) >= 3  # a classifier, not a constant
    # One image per request, sent together so that the batcher forms batches of its own.
    results: dict[int, Any] = {}
    for i in range(len(images)):
        tensor = tc.InferInput("image", [1, 224, 224, 3], "UINT8")
        tensor.set_data_from_numpy(images[i : i + 1])
        done = functools.partial(lambda index, result, error: results.__setitem__(index, (result, error)), i)
        client.async_infer("resnet", [tensor], callback=done)
    deadline = time.monotonic() + 60
    while len(results) < len(images) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(results) == list(range(len(images))), results
    for i, (result, error) in results.items():
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("logits")[0], batched[i], rtol=1e-5, atol=1e-4)
    validation = _manifest(folder)["validation"]
    assert validation["outputs"]["logits"]["top1_agreement"] == 1.0
    assert validation["max_rel_err"] < 1e-4


def test_onnx_int8_builds_and_serves(
    start_server: Any, tmp_path_factory: pytest.TempPathFactory, reference: np.ndarray, images: np.ndarray
) -> None:
    """Static int8, Conv included, calibrated on the 16 validation images; batch-invariant."""
    folder = tmp_path_factory.mktemp("resnet-int8")
    server, seconds = _serve(start_server, folder, "onnx-int8")
    print(f"resnet onnx-int8: built, validated and served in {seconds:.1f}s")
    client = tc.InferenceServerClient(server.url)
    assert client.get_model_config("resnet", as_json=True)["config"]["runtime"] == "onnx-int8"
    assert (folder / "models" / "resnet" / "1" / "model.int8.onnx").exists()
    manifest = _manifest(folder)
    assert manifest["status"] == "ok", manifest["validation"]
    assert manifest["validation"]["outputs"]["logits"]["top1_agreement"] >= 0.95
    assert manifest["calibration"]["source"] == "validation_data" and manifest["calibration"]["rows"] == 16
    invariance = manifest["validation"]["batch_invariance"]
    assert invariance["batch_size"] == 128 and invariance["batched_serving"] is True
    assert invariance["max_abs_err"] < 1e-3  # fixed activation scales: a row's answer is its own
    import onnx

    graph = onnx.load(str(folder / "models" / "resnet" / "1" / "model.int8.onnx"), load_external_data=False).graph
    dequantised = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 53 and all(set(n.input) & dequantised for n in convs)  # every Conv is int8 (QDQ)
    logits = _infer(server.url, images)
    assert (logits.argmax(1) == reference.argmax(1)).all()
    assert float(np.abs(logits - reference).max()) <= 0.1 * float(np.abs(reference).max())


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["torch-compile", "torch-fp16"])
def test_gpu_targets_serve_resnet(
    start_server: Any, tmp_path_factory: pytest.TempPathFactory, reference: np.ndarray, images: np.ndarray, target: str
) -> None:
    """On CUDA through the server: torch-compile (one Inductor compile, a CUDA graph per batch
    bucket) and torch-fp16 agree with eager fp32 on CPU."""
    folder = tmp_path_factory.mktemp(f"resnet-{target}")
    server, seconds = _serve(start_server, folder, target, device="cuda", threads=4)
    manifest = _manifest(folder)
    print(f"resnet {target}: built, validated and served in {seconds:.1f}s; validation {manifest['validation']}")
    assert manifest["status"] == "ok", manifest["validation"]
    client = tc.InferenceServerClient(server.url)
    assert client.get_model_config("resnet", as_json=True)["config"]["runtime"] == target
    runtime = server.model("resnet").runtime
    assert runtime.device == "cuda"
    if target == "torch-compile":
        assert runtime.buckets == [2, 4, 8, 16, 32, 64, 128]  # CudaGraphRuntime: one CUDA graph each
    scale = float(np.abs(reference).max())
    for rows in (1, 3, 5):  # padded to the buckets 2, 4 and 8
        logits = _infer(server.url, images[:rows])
        assert logits.shape == (rows, 1000) and logits.dtype == np.float32
        assert (logits.argmax(1) == reference[:rows].argmax(1)).all()
        error = float(np.abs(logits - reference[:rows]).max())
        bound = (1e-3 if target == "torch-compile" else 2e-2) * scale
        assert error <= bound, (rows, error, scale)
