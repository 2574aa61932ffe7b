"""The built-in targets beyond eager and ONNX: int8, torch.compile, torchao, half precision;
and `modelhub build`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc

from hub.build.pipeline import Builder
from hub.config import DeploymentConfig
from hub.errors import BuildError
from hub.plugins.manager import PluginHost

from .conftest import ROOT, link_plugins

TINY = """
import numpy as np
import torch
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(16, 4)
    def forward(self, x):
        return torch.relu(self.fc(x)) * 2.0

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="tiny",
        build=lambda: Tiny().eval(),
        inputs=[TensorSpec("x", "FP32", (-1, 16))],
        outputs=[TensorSpec("y", "FP32", (-1, 4))],
        example_inputs={"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)},
        target="{target}",
        batching=BatchPolicy(max_batch_size=4),
    ))
"""


def tiny(tmp_path: Path, target: str) -> tuple[Builder, Any]:
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "tiny.py").write_text(textwrap.dedent(TINY.replace("{target}", target)))
    host = PluginHost(plugins, entry_points=False)
    builder = Builder(tmp_path / "models", host.collect_targets(), host, device="cpu")
    (spec,) = host.collect_models()
    return builder, spec


def test_digits_as_onnx_int8_keeps_its_accuracy(start_server: Any, tmp_path: Path, digits_heldout: Any) -> None:
    images, labels = digits_heldout
    int8 = start_server(
        link_plugins(tmp_path / "p", ROOT / "plugins" / "digits"),
        model_repository=tmp_path / "models",
        deployment=DeploymentConfig.parse({"models": {"digits": {"target": "onnx-int8"}}}),
    )
    client = tc.InferenceServerClient(int8.url)
    assert client.get_model_config("digits", as_json=True)["config"]["runtime"] == "onnx-int8"
    predictions = []
    for start in range(0, len(images), 64):
        tensor = tc.InferInput("image", list(images[start : start + 64].shape), "FP32")
        tensor.set_data_from_numpy(images[start : start + 64])
        predictions.append(client.infer("digits", [tensor]).as_numpy("logits").argmax(1))
    accuracy = float(np.mean(np.concatenate(predictions) == labels))
    manifest = json.loads((tmp_path / "models" / "digits" / "1" / "manifest.json").read_text())
    validation = manifest["validation"]
    assert (tmp_path / "models" / "digits" / "1" / "model.int8.onnx").exists()
    assert validation["validation_rows"] == len(labels)
    assert abs(accuracy - validation["eager_accuracy"]) <= 0.01, (accuracy, validation)
    assert validation["accuracy"] == pytest.approx(accuracy)


def test_torch_compile_warms_up_and_reuses_its_cache(tmp_path: Path) -> None:
    builder, spec = tiny(tmp_path, "torch-compile")
    started = time.perf_counter()
    first = builder.ensure(spec)
    cold = time.perf_counter() - started
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    from hub.runtimes.torch import eager_outputs

    reference = eager_outputs(spec.build(), spec, {"x": x})["y"]
    np.testing.assert_allclose(first.runtime.run({"x": x})["y"], reference, rtol=1e-5, atol=1e-5)
    assert first.manifest["validation"]["max_abs_err"] < 1e-4
    cache = tmp_path / "models" / "tiny" / "1" / "inductor"
    assert cache.is_dir() and any(cache.iterdir())
    # A fresh start in a new process reuses the artifact and the Inductor cache.
    script = f"""
import time, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.test_targets import tiny
from pathlib import Path
builder, spec = tiny(Path({str(tmp_path)!r}), "torch-compile")
t = time.perf_counter(); artifact = builder.ensure(spec); print(time.perf_counter() - t, artifact.built)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    warm, built = out.stdout.split()
    assert built == "False"
    print(f"torch-compile: cold {cold:.1f}s, cached {float(warm):.1f}s")


def test_torch_int8_uses_torchao_or_says_it_is_missing(tmp_path: Path) -> None:
    builder, spec = tiny(tmp_path, "torch-int8")
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(BuildError, match="torchao"):
            builder.ensure(spec)
        return
    artifact = builder.ensure(spec)
    assert artifact.manifest["status"] == "ok"
    assert artifact.manifest["validation"]["max_rel_err"] < 0.1


def test_half_precision_needs_cuda_and_says_so(tmp_path: Path) -> None:
    builder, spec = tiny(tmp_path, "torch-fp16")
    with pytest.raises(BuildError, match="needs a CUDA device"):
        builder.ensure(spec)


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["torch-fp16", "torch-bf16", "torch-compile", "onnx"])
def test_gpu_targets_validate(tmp_path: Path, target: str) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tiny.py").write_text(textwrap.dedent(TINY.replace("{target}", target)))
    host = PluginHost(plugins, entry_points=False)
    builder = Builder(tmp_path / "models", host.collect_targets(), host, device="cuda")
    (spec,) = host.collect_models()
    artifact = builder.ensure(spec)
    assert artifact.manifest["status"] == "ok", artifact.manifest["validation"]
    out = artifact.runtime.run({"x": np.ones((3, 16), np.float32)})["y"]
    assert out.shape == (3, 4) and out.dtype == np.float32


def test_build_command_table_and_json(tmp_path: Path) -> None:
    plugins = link_plugins(tmp_path / "p", ROOT / "plugins" / "digits")
    command = [sys.executable, "-m", "hub.cli", "build", "--plugins-dir", str(plugins), "--no-entry-points",
               "--model-repository", str(tmp_path / "models"), "--device", "cpu"]  # fmt: skip
    result = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["status"] == "ok" and row["target"] == "onnx" and row["accuracy"] >= 0.95
    assert row["b1"] > 0 and row["b32"] > row["b1"]
    again = subprocess.run([*command, "digits"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ok (cached)" in again.stdout
    assert "max abs err" in again.stdout and "b32 /s" in again.stdout
    bad = subprocess.run([*command, "--target", "torch-fp16"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "needs a CUDA device" in bad.stderr


def test_build_compare_lists_every_target(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "tiny.py").write_text(textwrap.dedent(TINY.replace("{target}", "onnx")))
    result = subprocess.run(
        [sys.executable, "-m", "hub.cli", "build", "--plugins-dir", str(tmp_path / "plugins"), "--no-entry-points",
         "--model-repository", str(tmp_path / "models"), "--device", "cpu", "--compare", "tiny", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {r["target"]: r for r in json.loads(result.stdout)}
    assert {"torch", "onnx", "onnx-int8", "torch-compile", "torch-fp16"} <= set(rows)
    for target in ("torch", "onnx", "torch-compile"):
        assert rows[target]["status"] == "ok", rows[target]
        assert rows[target]["b1"] > 0
    # int8 on a 16x4 random layer is far from eager; the comparison shows the refusal and why.
    int8 = rows["onnx-int8"]
    assert int8["status"] == "ok" or "strays from eager" in int8["problem"], int8
    assert rows["torch-fp16"]["status"] == "failed" and "CUDA" in rows["torch-fp16"]["problem"]


@pytest.mark.parametrize("target", ["torch", "onnx", "onnx-int8", "torch-compile", "torch-int8"])
def test_each_cpu_target_serves_digits(start_server: Any, tmp_path: Path, digits_heldout: Any, target: str) -> None:
    """Every target that runs on CPU builds digits, passes validation and serves it accurately."""
    images, labels = digits_heldout
    server = start_server(
        link_plugins(tmp_path / "p", ROOT / "plugins" / "digits"),
        model_repository=tmp_path / "models",
        deployment=DeploymentConfig.parse({"models": {"digits": {"target": target}}}),
    )
    client = tc.InferenceServerClient(server.url)
    if target == "torch-int8" and importlib.util.find_spec("torchao") is None:
        index = client.get_model_repository_index(as_json=True)["models"]
        assert "torchao" in index[0]["reason"]  # the optional dependency is named, the server still runs
        return
    assert client.get_model_config("digits", as_json=True)["config"]["runtime"] == target
    predictions = []
    for start in range(0, len(images), 64):
        batch = images[start : start + 64]
        tensor = tc.InferInput("image", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        predictions.append(client.infer("digits", [tensor]).as_numpy("logits").argmax(1))
    assert float(np.mean(np.concatenate(predictions) == labels)) >= 0.95


def test_half_precision_runtime_keeps_fp32_on_the_wire(tmp_path: Path) -> None:
    """The cast path the torch-fp16/bf16 targets use, exercised on CPU with bf16."""
    import torch

    from hub.runtimes.torch import TorchRuntime, eager_outputs

    _, spec = tiny(tmp_path, "torch")
    module = spec.build()
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    reference = eager_outputs(module, spec, {"x": x})["y"]
    runtime = TorchRuntime(module.to(torch.bfloat16), spec, "cpu", move=False, compute_dtype=torch.bfloat16)
    out = runtime.run({"x": x})["y"]
    assert out.dtype == np.float32 and out.shape == (3, 4)
    np.testing.assert_allclose(out, reference, rtol=5e-2, atol=5e-2)
