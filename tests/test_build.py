"""The build pipeline: manifest, parity against eager, the cache, and refused artifacts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from hub import hookimpl
from hub.errors import BuildError
from hub.pipeline.builder import Builder
from hub.plugins.manager import PluginHost

from .conftest import ROOT, RunningServer

AFFINE = """
import numpy as np
import torch
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

SCALE = {scale}

class Scale(torch.nn.Module):
    def forward(self, x):
        return x * SCALE

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="scale",
        build=lambda: Scale().eval(),
        inputs=[TensorSpec("x", "FP32", (-1, 3))],
        outputs=[TensorSpec("y", "FP32", (-1, 3))],
        example_inputs={{"x": np.arange(6, dtype=np.float32).reshape(2, 3)}},
        target="onnx",
        batching=BatchPolicy(max_batch_size=8),
    ))
"""

SKEWED = """
import numpy as np
import torch
from hub import BatchPolicy, ModelSpec, Target, TensorSpec, hookimpl
from hub.runtimes.torch import TorchRuntime

class Skewed(TorchRuntime):
    def run(self, inputs):
        return {name: value + 0.5 for name, value in super().run(inputs).items()}

@hookimpl
def register_targets(register):
    register(Target(name="skewed", build=lambda ctx: None,
                    load=lambda ctx: Skewed(ctx.module(), ctx.spec, "cpu")))

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="drifting",
        build=lambda: torch.nn.Identity(),
        inputs=[TensorSpec("x", "FP32", (-1, 2))],
        outputs=[TensorSpec("y", "FP32", (-1, 2))],
        example_inputs={"x": np.ones((2, 2), np.float32)},
        target="skewed",
        batching=BatchPolicy(max_batch_size=4),
    ))
"""


def builder_for(plugins: Path, repository: Path) -> tuple[Builder, list[Any]]:
    host = PluginHost(plugins, entry_points=False)
    targets = host.collect_targets()
    return Builder(repository, targets, host, device="cpu"), host.collect_models()


def test_digits_manifest_records_hashes_versions_and_parity(hub_server: RunningServer, model_repository: Path) -> None:
    manifest = json.loads((model_repository / "digits" / "1" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["target"] == "onnx"
    assert set(manifest["key_parts"]["versions"]) >= {"torch", "onnx", "onnxruntime"}
    assert "digits.safetensors" in manifest["key_parts"]["sources"]
    assert "model.onnx" in manifest["files"]
    validation = manifest["validation"]
    assert validation["problems"] == []
    assert 0 <= validation["max_abs_err"] < 1e-4
    assert validation["outputs"]["logits"]["top1_agreement"] == 1.0
    assert (model_repository / "digits" / "1" / "model.onnx").stat().st_size > 1000


def test_unchanged_model_is_not_rebuilt_and_a_changed_one_is(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    source = plugins / "scale.py"
    source.write_text(textwrap.dedent(AFFINE.format(scale=2.0)))
    repository = tmp_path / "models"

    builder, (spec,) = builder_for(plugins, repository)
    first = builder.ensure(spec)
    assert first.built
    onnx = repository / "scale" / "1" / "model.onnx"
    stamp = onnx.stat().st_mtime_ns
    np.testing.assert_allclose(first.runtime.run({"x": np.ones((3, 3), np.float32)})["y"], 2.0)

    builder, (spec,) = builder_for(plugins, repository)  # a fresh start
    again = builder.ensure(spec)
    assert not again.built
    assert onnx.stat().st_mtime_ns == stamp

    source.write_text(textwrap.dedent(AFFINE.format(scale=3.0)))
    os.utime(source)
    builder, (spec,) = builder_for(plugins, repository)
    changed = builder.ensure(spec)
    assert changed.built
    np.testing.assert_allclose(changed.runtime.run({"x": np.ones((1, 3), np.float32)})["y"], 3.0)


def test_artifact_outside_tolerance_is_refused(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "skewed.py").write_text(textwrap.dedent(SKEWED))
    builder, (spec,) = builder_for(plugins, tmp_path / "models")
    with pytest.raises(BuildError) as err:
        builder.ensure(spec)
    assert "drifting" in str(err.value) and "strays from eager" in str(err.value)
    manifest = json.loads((tmp_path / "models" / "drifting" / "1" / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["validation"]["max_abs_err"] == pytest.approx(0.5)
    # The refusal is cached too: no rebuild, same answer.
    builder, (spec,) = builder_for(plugins, tmp_path / "models")
    with pytest.raises(BuildError):
        builder.ensure(spec)


def test_refused_model_is_failed_while_others_serve(tmp_path: Path, start_server: Any) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "skewed.py").write_text(textwrap.dedent(SKEWED))
    (plugins / "scale.py").write_text(textwrap.dedent(AFFINE.format(scale=2.0)))
    server = start_server(plugins)
    client = tc.InferenceServerClient(server.url)
    assert client.is_model_ready("scale")
    assert not client.is_model_ready("drifting")
    assert client.is_server_ready()  # failed models do not hold readiness (see --require-all-models)
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["drifting"]["state"] == "UNAVAILABLE"
    assert "strays from eager" in index["drifting"]["reason"]
    # The platform is the target's whether the model loaded or not ("skewed" declares none: "python").
    assert client.get_model_metadata("drifting").platform == "python"
    assert client.get_model_config("drifting").config.platform == "python"
    assert client.get_model_metadata("scale").platform == "onnxruntime_onnx"
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as err:
        request = service_pb2.ModelInferRequest(model_name="drifting")
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "strays from eager" in err.value.details()
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = lambda name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status  # noqa: E731
        assert check("drifting") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert check("scale") == health_pb2.HealthCheckResponse.SERVING
        assert check("") == health_pb2.HealthCheckResponse.SERVING
    listing = subprocess.run(
        [
            sys.executable,
            "-m",
            "hub.cli",
            "models",
            "--plugins-dir",
            str(plugins),
            "--no-entry-points",
            "--model-repository",
            str(server.config.model_repository),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    models = {m["model"]: m for m in json.loads(listing.stdout)}
    assert models["drifting"]["artifact"] == "failed"
    assert any("strays from eager" in p for p in models["drifting"]["problems"]), models["drifting"]
    assert models["scale"]["artifact"] == "ok" and models["scale"]["problems"] == []
    assert "parity" not in models["scale"]  # the report is told once: report and report_parameters
    assert float(models["scale"]["report_parameters"]["parity_max_abs_err"]) < 1e-4
    table = subprocess.run(listing.args[:-1], capture_output=True, text=True, check=True).stdout
    (drifting,) = [line for line in table.splitlines() if line.startswith("drifting")]
    assert "failed" in drifting and "refused:" in drifting and "strays from eager" in drifting


def test_require_all_models_makes_a_failure_unready(tmp_path: Path, start_server: Any) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "skewed.py").write_text(textwrap.dedent(SKEWED))
    server = start_server(plugins, require_all_models=True)
    assert not tc.InferenceServerClient(server.url).is_server_ready()


def test_unknown_target_fails_only_that_model(tmp_path: Path, start_server: Any) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "scale.py").write_text(textwrap.dedent(AFFINE.format(scale=2.0)).replace('"onnx"', '"tensorrt"'))
    (plugins / "digits").symlink_to(ROOT / "plugins" / "digits")
    server = start_server(plugins)
    index = {
        m["name"]: m for m in tc.InferenceServerClient(server.url).get_model_repository_index(as_json=True)["models"]
    }
    assert index["digits"]["state"] == "READY"
    assert index["scale"]["state"] == "UNAVAILABLE" and "tensorrt" in index["scale"]["reason"]


def test_third_party_validation_adds_figures_and_can_refuse(tmp_path: Path) -> None:
    from hub import hookimpl

    class Inspector:
        def __init__(self, refuse: bool) -> None:
            self.refuse = refuse
            self.seen: list[Any] = []

        @hookimpl
        def validate_artifact(self, spec, runtime, examples, reference, tolerance):  # type: ignore[no-untyped-def]
            self.seen.append((spec.name, sorted(examples), reference is not None, tolerance.atol))
            outputs = runtime.run(examples)
            report: dict[str, Any] = {"mean_output": float(np.mean(outputs["y"]))}
            if self.refuse:
                report["problems"] = ["outputs look suspicious"]
            return report

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "scale.py").write_text(textwrap.dedent(AFFINE.format(scale=2.0)))
    for refuse in (False, True):
        inspector = Inspector(refuse)
        host = PluginHost(plugins, entry_points=False, extra={"inspector": inspector})
        builder = Builder(tmp_path / f"models-{refuse}", host.collect_targets(), host, device="cpu")
        (spec,) = host.collect_models()
        if refuse:
            with pytest.raises(BuildError, match="outputs look suspicious"):
                builder.ensure(spec)
        else:
            artifact = builder.ensure(spec)
            assert artifact.manifest["validation"]["mean_output"] == pytest.approx(5.0)
            assert artifact.manifest["validation"]["max_abs_err"] < 1e-5  # the built-in check ran too
        assert inspector.seen == [("scale", ["x"], True, 1e-4)]


UNEXPORTABLE = """
import numpy as np
import torch
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

class Leaky(torch.nn.Module):
    def forward(self, x):
        # Leaves torch for numpy mid-graph: eager runs it, no exporter can trace it.
        return torch.from_numpy(np.sort(x.numpy(), axis=1))

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="leaky",
        build=lambda: Leaky().eval(),
        inputs=[TensorSpec("x", "FP32", (-1, 3))],
        outputs=[TensorSpec("y", "FP32", (-1, 3))],
        example_inputs={"x": np.ones((2, 3), np.float32)},
        target="onnx",
        batching=BatchPolicy(max_batch_size=4),
    ))
"""


def test_unexportable_model_fails_naming_model_and_stage(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "leaky.py").write_text(textwrap.dedent(UNEXPORTABLE))
    builder, (spec,) = builder_for(plugins, tmp_path / "models")
    with pytest.raises(BuildError) as err:
        builder.ensure(spec)
    assert "model 'leaky'" in str(err.value) and "building target 'onnx' failed" in str(err.value)
    assert not (tmp_path / "models" / "leaky" / "1").exists()  # nothing half-built is left behind


FAULTY = """
import numpy as np
import torch
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

class Faulty(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        {body}

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="{name}",
        build=lambda: Faulty().eval(),
        inputs=[TensorSpec("x", "FP32", (-1, 3))],
        outputs=[TensorSpec("y", "FP32", (-1, 3))],
        example_inputs={{"x": np.ones((2, 3), np.float32)}},
        target="{target}",
        batching=BatchPolicy(max_batch_size=4),
    ))
"""


def test_a_models_own_fault_at_build_is_one_line_naming_it(tmp_path: Path) -> None:
    """What a plugin author sees in `modelhub build` (and serve's log, and the client's
    UNAVAILABLE) when the model itself is wrong: the model's own error and line, not torch.onnx's
    pages (in terminal colours) around it, and not a fault of the built-in "validation" plugin."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    cases = {
        "raises_onnx": ("onnx", 'raise RuntimeError("weights not loaded")'),
        "raises_torch": ("torch", 'raise RuntimeError("weights not loaded")'),
        "raises_compiled": ("torch-compile", 'raise RuntimeError("weights not loaded")'),
        "numpy_out": ("onnx", "return self.lin(x).detach().numpy()"),
        "unexportable": ("onnx-int8", "return torch.from_numpy(np.sort(self.lin(x).detach().numpy(), axis=1))"),
        "build_raises": ("onnx", "return self.lin(x)"),
        "fixed_batch": ("onnx", "return self.lin(x).view(2, 3)"),  # a literal batch size: eager runs on 2 rows
        "fixed_batch_compiled": ("torch-compile", "return self.lin(x).view(2, 3)"),
    }
    for name, (target, body) in cases.items():
        (plugins / f"{name}.py").write_text(textwrap.dedent(FAULTY).format(name=name, target=target, body=body))
    text = (plugins / "build_raises.py").read_text()
    (plugins / "build_raises.py").write_text(
        text.replace("super().__init__()", 'raise FileNotFoundError("weights.pt")')
    )
    result = subprocess.run(
        [sys.executable, "-m", "hub.cli", "build", "--plugins-dir", str(plugins), "--no-entry-points",
         "--model-repository", str(tmp_path / "models"), "--device", "cpu", "--threads", "1", "--no-measure", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    problems = {row["model"]: row["problem"] for row in json.loads(result.stdout)}
    for name, problem in problems.items():
        assert "\n" not in problem and "\x1b" not in problem and "Next steps" not in problem, (name, problem)
    for name, target in (("raises_onnx", "onnx"), ("raises_torch", "torch"), ("raises_compiled", "torch-compile")):
        assert problems[name] == (
            f"model '{name}': building target '{target}' failed: the eager model raises on its example_inputs: "
            f"RuntimeError: weights not loaded (raised at {plugins / name}.py line 12)"
        )  # not torch.export's TorchExportError, nor 'plugin "validation" raised in validate_artifact'
    assert problems["build_raises"] == (
        "model 'build_raises': building target 'onnx' failed: its build() raised: "
        f"FileNotFoundError: weights.pt (raised at {plugins / 'build_raises'}.py line 8)"
    )
    assert problems["numpy_out"] == (
        "model 'numpy_out': forward returned a numpy.ndarray; return a torch.Tensor, a tuple of them in the "
        "order of the spec's outputs ['y'], or a dict keyed by those names"
    )  # not "forward returned 2 outputs": a numpy array's len is its rows
    assert problems["unexportable"].startswith(
        "model 'unexportable': building target 'onnx-int8' failed: torch.onnx.export could not export the model: "
    )
    assert "serve it with a target that needs no export ('torch', 'torch-compile')" in problems["unexportable"]
    assert "Failed to export the model with torch.export" not in result.stderr  # its traceback is at DEBUG
    assert problems["fixed_batch"].startswith(
        "model 'fixed_batch': building target 'onnx' failed: torch.onnx.export could not export the model: "
    )
    assert (
        "(the model fixes a dimension the spec declares -1: a view or reshape with a literal size?)"
        in (problems["fixed_batch"])
    )
    assert problems["fixed_batch_compiled"].startswith(
        "model 'fixed_batch_compiled': building target 'torch-compile' failed: TorchRuntimeError: "
    )  # the message on one line, not the exception's repr


def test_a_failed_build_shows_its_line_and_torchs_output_only_at_debug(tmp_path: Path) -> None:
    """torch logs through handlers of its own (glog's layout, `W1207 ... tensor.py:1759] Graph
    break`, `E1207 ... fake_tensor.py`) and torch.export prints its graph to sys.stderr: a failed
    ONNX export or torch.compile showed pages of both around the build's one line. They go to
    modelhub.build.libraries at DEBUG: gone from the default output, there under --log-level debug."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    cases = {  # a graph break (torch's warning), then a failure; a graph dump, then a failure
        "breaks": ("torch-compile", "return int(x.sum().item()) * 0 + self.lin(x).view(2, 3)"),
        "dumps": (
            "onnx",
            "return torch.from_numpy(np.sort(self.lin(x)[: len(x) + int(x.sum().item()) * 0].detach().numpy(), 1))",
        ),
    }
    for name, (target, body) in cases.items():
        (plugins / f"{name}.py").write_text(textwrap.dedent(FAULTY).format(name=name, target=target, body=body))

    def build(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hub.cli", *flags, "build", "--plugins-dir", str(plugins), "--no-entry-points",
             "--model-repository", str(tmp_path / "models"), "--device", "cpu", "--threads", "1", "--no-measure"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    glog = re.compile(r"^[EWI]\d{4} ", re.M)
    quiet = build()
    assert quiet.returncode == 1, quiet.stderr
    assert not glog.search(quiet.stderr) and "def forward" not in quiet.stderr, quiet.stderr
    assert "Traceback" not in quiet.stderr and " ERROR " not in quiet.stderr, quiet.stderr
    assert "breaks [torch-compile]: model 'breaks': building target 'torch-compile' failed: " in quiet.stderr
    assert "dumps [onnx]: model 'dumps': building target 'onnx' failed: torch.onnx.export " in quiet.stderr
    debug = build("--log-level", "debug")
    assert debug.returncode == 1 and not glog.search(debug.stderr), debug.stderr
    assert "DEBUG   modelhub.build.libraries: torch._dynamo" in debug.stderr and "Graph break" in debug.stderr
    assert "DEBUG   modelhub.build.libraries: stderr:\n" in debug.stderr and "def forward" in debug.stderr


SWAPPED = """
import numpy as np
import torch
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

class Pool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 4)

    def forward(self, input_ids, attention_mask):
        return (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(1)

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="swapped_{target}",
        build=lambda: Pool().eval(),
        inputs=[TensorSpec("attention_mask", "INT64", (-1, 8)), TensorSpec("input_ids", "INT64", (-1, 8))],
        outputs=[TensorSpec("pooled", "FP32", (-1, 4))],
        example_inputs={{"input_ids": np.arange(32).reshape(4, 8) % 100, "attention_mask": np.ones((4, 8), np.int64)}},
        target="{target}",
        batching=BatchPolicy(max_batch_size=8),
    ))
"""


def test_inputs_declared_in_another_order_than_forwards_parameters_fail_the_build(tmp_path: Path) -> None:
    """forward(input_ids, attention_mask), inputs [attention_mask, input_ids], both INT64: the hub
    passes inputs positionally, so the model computed on swapped tensors, and eager (the parity
    reference) swapped them too: the build passed and served garbage."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for target in ("onnx", "torch"):
        (plugins / f"swapped_{target}.py").write_text(textwrap.dedent(SWAPPED).format(target=target.replace("-", "_")))
    result = subprocess.run(
        [sys.executable, "-m", "hub.cli", "build", "--plugins-dir", str(plugins), "--no-entry-points",
         "--model-repository", str(tmp_path / "models"), "--device", "cpu", "--threads", "1", "--no-measure", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    rows = {row["model"]: row for row in json.loads(result.stdout)}
    for name in ("swapped_onnx", "swapped_torch"):
        assert rows[name]["status"] == "failed", rows[name]
        assert rows[name]["problem"] == (
            f"model '{name}': forward takes (input_ids, attention_mask) but the spec's inputs are "
            "['attention_mask', 'input_ids']: the hub passes them positionally in the spec's order, so they would "
            "arrive swapped; declare the inputs in forward's order"
        )


BYTES_MODELS = """
import numpy as np
import torch
from hub import ModelSpec, TensorSpec, hookimpl

class Count(torch.nn.Module):
    def forward(self, x):
        return x.sum(1)

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="text_in", build=lambda: Count().eval(),
        inputs=[TensorSpec("text", "BYTES", (-1,))], outputs=[TensorSpec("y", "FP32", (-1,))],
        example_inputs={"text": np.array([b"a", b"b"], dtype=object)},
    ))
    register(ModelSpec(
        name="label_out", build=lambda: Count().eval(),
        inputs=[TensorSpec("x", "FP32", (-1, 3))], outputs=[TensorSpec("label", "BYTES", (-1,))],
        example_inputs={"x": np.eye(3, dtype=np.float32)},
    ))
"""


def test_a_torch_model_declared_with_bytes_tensors_is_told_what_to_use(tmp_path: Path) -> None:
    """BYTES in or out of a torch module: the build names the model and tensor and says what to
    use (a preprocess; labels), where it said 'BYTES tensors cannot be passed to a torch module'
    (no model, no tensor) for an input, and 'expected datatype BYTES, got FP32' for an output."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bytes_models.py").write_text(textwrap.dedent(BYTES_MODELS))
    result = subprocess.run(
        [sys.executable, "-m", "hub.cli", "build", "--plugins-dir", str(plugins), "--no-entry-points",
         "--model-repository", str(tmp_path / "models"), "--device", "cpu", "--threads", "1", "--no-measure", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    problems = {row["model"]: row["problem"] for row in json.loads(result.stdout)}
    assert problems["text_in"].startswith(
        "model 'text_in': input 'text' is BYTES, which a torch module cannot take; give the spec a preprocess"
    )
    assert problems["label_out"].startswith(
        "model 'label_out': output 'label' is BYTES, which a torch module cannot return; return scores or class "
        "indices, and name the classes with TensorSpec(..., labels=[...])"
    )


class CountingTargets:
    """A plugin whose target counts its builds, loads and closes, and which counts the
    artifacts validated (validate_artifact), to pin "build once, load once"."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"build": 0, "load": 0, "close": 0, "validate": 0}

    @hookimpl
    def register_targets(self, register: Any) -> None:
        from hub import Target
        from hub.runtimes.torch import TorchRuntime

        calls = self.calls

        class Counted(TorchRuntime):
            def close(self) -> None:
                calls["close"] += 1
                super().close()

        def build(ctx: Any) -> None:
            calls["build"] += 1
            (ctx.directory / "weights.bin").write_bytes(b"counted")
            ctx.module()

        def load(ctx: Any) -> Counted:
            calls["load"] += 1
            assert (ctx.directory / "weights.bin").read_bytes() == b"counted"
            return Counted(ctx.module(), ctx.spec, "cpu")

        register(Target(name="counted", build=build, load=load, artifact="weights.bin"))

    @hookimpl
    def validate_artifact(self, spec: Any, runtime: Any) -> None:
        self.calls["validate"] += 1


COUNTED = """
import numpy as np
import torch
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

CONSTRUCTED = []

def build():
    CONSTRUCTED.append(1)
    return torch.nn.Identity()

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="counted",
        build=build,
        inputs=[TensorSpec("x", "FP32", (-1, 2))],
        outputs=[TensorSpec("y", "FP32", (-1, 2))],
        example_inputs={"x": np.ones((2, 2), np.float32)},
        target="counted",
        batching=BatchPolicy(max_batch_size=4),
    ))
"""


def test_a_fresh_build_loads_and_validates_its_artifact_once_and_serves_that_runtime(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "counted.py").write_text(textwrap.dedent(COUNTED))
    counting = CountingTargets()
    host = PluginHost(plugins, entry_points=False, extra={"counting": counting})
    builder = Builder(tmp_path / "models", host.collect_targets(), host, device="cpu")
    (spec,) = host.collect_models()
    artifact = builder.ensure(spec)
    assert artifact.built
    assert counting.calls == {"build": 1, "load": 1, "close": 0, "validate": 1}
    plugin_module = sys.modules[f"{host.namespace}.counted"]
    assert len(plugin_module.CONSTRUCTED) == 1  # the eager reference runs a copy, not a second build
    # The runtime validated is the one returned, alive after its staging folder moved into place.
    np.testing.assert_array_equal(artifact.runtime.run({"x": np.full((1, 2), 3, np.float32)})["y"], [[3, 3]])
    assert (tmp_path / "models" / "counted" / "1" / "weights.bin").is_file()
    artifact.runtime.close()
    # A cached start: one load, no build, no validation.
    cached = Builder(tmp_path / "models", host.collect_targets(), host, device="cpu").ensure(spec)
    assert not cached.built
    assert counting.calls == {"build": 1, "load": 2, "close": 1, "validate": 1}
    assert len(plugin_module.CONSTRUCTED) == 2
    cached.runtime.close()


def test_a_refused_build_closes_the_runtime_it_validated(tmp_path: Path) -> None:
    class Refuser(CountingTargets):
        @hookimpl
        def validate_artifact(self, spec: Any, runtime: Any) -> dict[str, Any]:
            self.calls["validate"] += 1
            return {"problems": ["refused by the test"]}

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "counted.py").write_text(textwrap.dedent(COUNTED))
    counting = Refuser()
    host = PluginHost(plugins, entry_points=False, extra={"counting": counting})
    builder = Builder(tmp_path / "models", host.collect_targets(), host, device="cpu")
    (spec,) = host.collect_models()
    with pytest.raises(BuildError, match="refused by the test"):
        builder.ensure(spec)
    assert counting.calls == {"build": 1, "load": 1, "close": 1, "validate": 1}


MISNAMED = """
import numpy as np
import torch
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

class Named(torch.nn.Module):
    def forward(self, x):
        return {"logits": x, "probs": x.softmax(1)}

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="misnamed",
        build=lambda: Named().eval(),
        inputs=[TensorSpec("x", "FP32", (-1, 2))],
        outputs=[TensorSpec("y", "FP32", (-1, 2))],
        example_inputs={"x": np.ones((2, 2), np.float32)},
        target="torch",
        batching=BatchPolicy(max_batch_size=4),
    ))
    register(ModelSpec(
        name="mislabelled",
        build=lambda: torch.nn.Identity(),
        inputs=[TensorSpec("x", "FP32", (-1, 2))],
        outputs=[TensorSpec("y", "FP32", (-1, 2))],
        example_inputs={"x": np.ones((2, 2), np.float32)},
        validation_data=lambda: ({"x": np.ones((5, 2), np.float32)}, np.zeros(3, np.int64)),
        target="torch",
        batching=BatchPolicy(max_batch_size=4),
    ))
"""


def test_mismatched_output_names_and_label_counts_name_both_sides(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "mismatched.py").write_text(textwrap.dedent(MISNAMED))
    builder, specs = builder_for(plugins, tmp_path / "models")
    by_name = {s.name: s for s in specs}
    with pytest.raises(BuildError) as err:
        builder.ensure(by_name["misnamed"])
    message = str(err.value)
    assert "model 'misnamed'" in message and "['logits', 'probs']" in message and "['y']" in message, message
    with pytest.raises(BuildError) as err:
        builder.ensure(by_name["mislabelled"])
    message = str(err.value)
    assert "model 'mislabelled'" in message and "3 labels" in message and "5 rows (x)" in message, message


def test_load_built_loads_only_the_build_it_names_and_never_builds(tmp_path: Path) -> None:
    """A frontend's copy of a model (--workers N, --model-copies cpu) loads the model process's
    artifact by its cache key: the same build, or nothing."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "scale.py").write_text(textwrap.dedent(AFFINE.format(scale=2.0)))
    repository = tmp_path / "models"
    builder, (spec,) = builder_for(plugins, repository)
    key = builder.ensure(spec).manifest["cache_key"]

    copy = builder.load_built(spec, key)
    assert not copy.built
    np.testing.assert_allclose(copy.runtime.run({"x": np.ones((2, 3), np.float32)})["y"], 2.0)
    copy.runtime.close()

    with pytest.raises(BuildError, match="not the build the model process serves"):
        builder.load_built(spec, "0" * len(key))
    onnx = repository / "scale" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # swapped on disk since the model process checked it
    with pytest.raises(BuildError, match=r"artifact files differ from their manifest \(model\.onnx\)"):
        builder.load_built(spec, key)
    onnx.unlink()
    with pytest.raises(BuildError, match=r"model\.onnx missing"):
        builder.load_built(spec, key)
    assert not onnx.exists()  # refused, never rebuilt
