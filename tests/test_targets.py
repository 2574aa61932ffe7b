"""The built-in targets beyond eager and ONNX: int8, torch.compile, torchao, half precision;
and `modelhub build`."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc

from hub.cli.build import ROUNDS
from hub.config import DeploymentConfig
from hub.errors import BuildError
from hub.pipeline.builder import Builder
from hub.plugins.manager import PluginHost
from hub.runtimes.tolerances import QUANTISED
from hub.spec import ArtifactContext

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


def test_torch_compile_warms_up_and_reuses_its_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from hub import process

    # The Inductor cache is process-wide, set once (hub.process), under the model repository.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    process.configure(torch.get_num_threads(), tmp_path / "models")
    compiles = []
    real_compile = torch.compile

    def counting_compile(*args: Any, **kwargs: Any) -> Any:
        compiles.append(kwargs)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    builder, spec = tiny(tmp_path, "torch-compile")
    started = time.perf_counter()
    first = builder.ensure(spec)
    cold = time.perf_counter() - started
    assert len(compiles) == 1  # one compile: the runtime validated is the runtime served
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    from hub.runtimes.torch import eager_outputs

    reference = eager_outputs(spec.build(), spec, {"x": x})["y"]
    np.testing.assert_allclose(first.runtime.run({"x": x})["y"], reference, rtol=1e-5, atol=1e-5)
    assert first.manifest["validation"]["max_abs_err"] < 1e-4
    cache = tmp_path / "models" / ".inductor"
    assert cache.is_dir() and any(cache.iterdir())
    assert not (tmp_path / "models" / "tiny" / "1" / "inductor").exists()  # no per-artifact cache any more
    # A fresh start in a new process reuses the artifact and the Inductor cache.
    script = f"""
import time, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.test_targets import tiny
from pathlib import Path
from hub import process
process.configure(1, Path({str(tmp_path / "models")!r}))
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


class ArgmaxHead(torch.nn.Module):
    """Scores (FP32) and their argmax (INT64): outputs of two dtypes, which a runtime must keep."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.fc(x)
        return scores, scores.argmax(dim=1)


def argmax_spec() -> Any:
    from hub import BatchPolicy, ModelSpec, TensorSpec

    return ModelSpec(
        name="argmax",
        build=lambda: ArgmaxHead().eval(),
        inputs=[TensorSpec("x", "FP32", (-1, 16))],
        outputs=[TensorSpec("scores", "FP32", (-1, 4)), TensorSpec("label", "INT64", (-1,))],
        example_inputs={"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)},
        target="torch-compile",
        batching=BatchPolicy(max_batch_size=8),
    )


def eager_replay(module: Any, static: Any, names: Any) -> tuple[Any, dict[str, Any]]:
    """What CudaGraphCapture records, replayed eagerly on the CPU: outputs written in place."""
    from hub.runtimes.tensors import as_outputs

    outputs = {name: value.clone() for name, value in as_outputs(module(*static), names).items()}

    def replay() -> None:
        for name, value in as_outputs(module(*static), names).items():
            outputs[name].copy_(value)

    return replay, outputs


def test_cuda_graph_runtime_buckets_pads_slices_and_keeps_each_outputs_dtype() -> None:
    """CudaGraphRuntime's logic around the capture, on the CPU: the bucket a batch goes to, its
    padding and slicing, an INT64 output kept INT64, and results that the next replay leaves alone."""
    from hub.runtimes.cudagraph import CudaGraphRuntime

    spec = argmax_spec()
    module = spec.build()
    runtime = CudaGraphRuntime(module, spec, [8, 2, 4], spec.forward_examples(), device="cpu", capture=eager_replay)
    assert runtime.buckets == [2, 4, 8]
    assert [runtime.bucket_for(n) for n in (1, 2, 3, 5, 8)] == [2, 2, 4, 8, 8]
    rng = np.random.default_rng(3)
    three = rng.standard_normal((3, 16)).astype(np.float32)
    first = runtime.run({"x": three})
    with torch.inference_mode():
        scores, label = module(torch.from_numpy(three))
    assert first["label"].dtype == np.int64 and first["scores"].dtype == np.float32
    assert first["label"].shape == (3,) and first["scores"].shape == (3, 4)
    np.testing.assert_array_equal(first["label"], label.numpy())
    np.testing.assert_allclose(first["scores"], scores.numpy(), rtol=1e-6)
    kept = {name: value.copy() for name, value in first.items()}
    runtime.run({"x": rng.standard_normal((4, 16)).astype(np.float32)})  # the same bucket, replayed again
    for name, value in kept.items():
        np.testing.assert_array_equal(first[name], value)
    readonly = np.frombuffer(three.tobytes(), np.float32).reshape(3, 16)  # as a request's raw bytes arrive
    np.testing.assert_array_equal(runtime.run({"x": readonly})["label"], label.numpy())
    # A tensor where the static inputs are (an input in CUDA shared memory, on a GPU) is copied
    # into them as it is; the runtime says it takes such tensors, so none is copied to numpy first.
    assert runtime.takes_device_tensors
    np.testing.assert_array_equal(runtime.run({"x": torch.from_numpy(three)})["label"], label.numpy())
    with pytest.raises(BuildError, match="larger than the largest CUDA graph bucket 8"):
        runtime.run({"x": np.zeros((9, 16), np.float32)})
    runtime.close()


@pytest.mark.gpu
def test_torch_compile_with_cuda_graphs_keeps_an_int64_output(tmp_path: Path) -> None:
    from hub.pipeline.builder import Builder
    from hub.runtimes.cudagraph import CudaGraphRuntime

    host = PluginHost(None, entry_points=False)
    builder = Builder(tmp_path / "models", host.collect_targets(), host, device="cuda")
    spec = argmax_spec()
    artifact = builder.ensure(spec)
    assert isinstance(artifact.runtime, CudaGraphRuntime)
    x = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)
    result = artifact.runtime.run({"x": x})
    assert result["label"].dtype == np.int64 and result["scores"].dtype == np.float32
    with torch.inference_mode():
        scores, label = spec.build()(torch.from_numpy(x))
    np.testing.assert_array_equal(result["label"], label.numpy())
    np.testing.assert_allclose(result["scores"], scores.numpy(), rtol=1e-3, atol=1e-4)
    artifact.runtime.close()


@pytest.mark.gpu
def test_a_cuda_graph_capture_beside_a_thread_that_serves() -> None:
    """A reload captures its CUDA graphs while the old version serves on other threads: neither
    may fail the other (torch's default capture mode makes the serving thread's copies errors for
    as long as a capture lasts). Eager modules, so no compile: a few seconds."""
    import threading

    from hub.runtimes.cudagraph import CudaGraphRuntime

    spec = argmax_spec()
    examples = spec.examples()
    serving = CudaGraphRuntime(spec.build().cuda(), spec, [1, 2, 4, 8], examples)
    x = examples["x"][:3]
    expected = serving.run({"x": x})
    stop, failures, runs = threading.Event(), [], [0]

    def serve() -> None:
        while not stop.is_set():
            try:
                got = serving.run({"x": x})
                np.testing.assert_array_equal(got["label"], expected["label"])
                runs[0] += 1
            except Exception as exc:
                failures.append(exc)
                return

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for _ in range(5):
            CudaGraphRuntime(spec.build().cuda(), spec, [1, 2, 4, 8, 16, 32, 64], examples).close()
    finally:
        stop.set()
        thread.join()
    assert not failures and runs[0] > 0, failures


def test_compile_modes_keep_all_but_inductors_own_cuda_graphs() -> None:
    """On CUDA Inductor's own CUDA graphs stay off: inside our capture they cannot nest, and
    outside it they asserted across threads. Every mode torch knows ("max-autotune", the docs'
    example, turns them on as "reduce-overhead" does) keeps its other options; an unknown mode
    fails naming the modes."""
    import torch._inductor

    from hub.runtimes.torch_variants import options_without_cudagraphs

    for mode in torch._inductor.list_mode_options():
        options = options_without_cudagraphs(mode)
        assert options.pop("triton.cudagraphs") is False
        assert options == {k: v for k, v in torch._inductor.list_mode_options(mode).items() if k != "triton.cudagraphs"}
    assert options_without_cudagraphs("max-autotune")["max_autotune"] is True
    with pytest.raises(RuntimeError, match="max-autotune-no-cudagraphs"):
        options_without_cudagraphs("fastest")


def test_torch_compile_captures_cuda_graphs_only_for_fixed_shapes_that_batch() -> None:
    """A CUDA graph's input buffers have one shape: a model whose padded length differs from
    batch to batch (minilm's token ids) compiles with dynamic shapes instead, as on the CPU."""
    from hub import TensorSpec
    from hub.runtimes.torch_variants import compile_plan

    fixed = argmax_spec().with_(options={"compile_mode": "max-autotune"})
    capture, keywords = compile_plan(fixed, "cuda")
    assert capture and keywords["dynamic"] is None
    assert keywords["options"]["max_autotune"] and not keywords["options"]["triton.cudagraphs"]

    tokens = fixed.with_(inputs=[TensorSpec("x", "FP32", (-1, -1))])
    assert compile_plan(tokens, "cuda") == (False, {"options": keywords["options"], "dynamic": True})
    assert compile_plan(fixed.with_(options={"cuda_graphs": False}), "cuda")[0] is False
    assert compile_plan(fixed, "cpu") == (False, {"mode": "max-autotune", "dynamic": True})


def test_float8_needs_a_float8_gpu_and_says_so(tmp_path: Path) -> None:
    builder, spec = tiny(tmp_path, "torch-float8")
    with pytest.raises(BuildError, match=r"needs a CUDA GPU with float8 tensor cores \(compute capability 8.9"):
        builder.ensure(spec)


def test_float8_linear_scales_each_row_by_itself() -> None:
    """The float8 arithmetic of torch-float8, run through torch's CPU float8 matmul: Linear
    layers of sizes divisible by 16 are converted (others stay), the answer is near fp32, and a
    row's answer is the same alone as beside an outlier 1000 times larger (per-row scales)."""
    import torch

    from hub.runtimes.float8 import Float8Linear, float8_module

    probe = torch.ones((16, 16)).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(probe, probe.t(), scale_a=torch.ones((16, 1)), scale_b=torch.ones((1, 16)))
    except RuntimeError:  # torch 2.11 (the GPU image's): "only supports per-tensor scaling for CPU backend"
        pytest.skip(f"torch {torch.__version__}'s CPU float8 matmul takes per-tensor scales only")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    converted = float8_module(model)
    first, _, last = converted.children()
    assert isinstance(first, Float8Linear) and type(last) is torch.nn.Linear  # 10 outputs: not a multiple of 16
    assert type(next(model.children())) is torch.nn.Linear  # the eager module is untouched
    rows = torch.randn(6, 64)
    with torch.inference_mode():
        want, got = model(rows), converted(rows)
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) < 0.05 * scale
        outlier = torch.cat([rows[:1], 1000.0 * rows[1:2]])
        beside = float((converted(outlier)[:1] - converted(rows[:1])).abs().max())
        assert beside < 1e-6 * scale  # fp32 summation order only
        # One scale over the batch (per-tensor, as dynamic int8 does) would have moved it 1e4 times more.
        step = outlier.abs().max() / 448
        per_tensor = (outlier / step).to(torch.float8_e4m3fn).float() * step
        assert float((model(per_tensor)[:1] - want[:1]).abs().max()) > 1e-2 * scale
        assert converted(rows.reshape(2, 3, 64)).shape == (2, 3, 10)  # sequence models: per token
    with pytest.raises(BuildError, match=r"float8_exclude: \['decoder\.\*'\] match no Linear"):
        float8_module(model, ["decoder.*"])
    with pytest.raises(BuildError, match="no Linear layer with input and output sizes divisible by 16"):
        float8_module(model, ["0"])


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["torch-fp16", "torch-bf16", "torch-compile", "onnx", "onnx-fp16", "onnx-bf16"])
def test_gpu_targets_validate(tmp_path: Path, target: str) -> None:
    import onnxruntime

    if target in ("onnx-fp16", "onnx-bf16") and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip(f"{target} needs onnxruntime-gpu; this onnxruntime offers {onnxruntime.get_available_providers()}")
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
    if target.startswith("onnx-"):
        assert artifact.runtime.device == "cuda"


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
    assert "batch-invariant" in again.stdout and "yes 0" in again.stdout
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
    assert {"torch", "onnx", "onnx-int8", "onnx-int8-dynamic", "torch-compile", "torch-fp16"} <= set(rows)
    for target in ("torch", "onnx", "torch-compile"):
        assert rows[target]["status"] == "ok", rows[target]
        assert rows[target]["b1"] > 0
        # The best of its interleaved rounds (see measure_interleaved); tiny takes no batch of 32.
        assert ROUNDS // 2 <= len(rows[target]["b1_rounds"]) <= ROUNDS
        assert rows[target]["b1"] == max(rows[target]["b1_rounds"])
        assert rows[target]["b32"] is None and rows[target]["b32_rounds"] is None
        assert rows[target]["batch_invariant"] is True and rows[target]["batch_max_abs_err"] < 1e-4
    assert rows["onnx-int8"]["calibration"] == "minmax/4"  # the 4 example rows: tiny has no validation data
    # Static int8, calibrated on the 4 example rows it is then checked on: within onnx-int8's
    # tolerance (atol 0.05), same argmax everywhere, and batch-invariant (fixed scales).
    int8 = rows["onnx-int8"]
    assert int8["status"] == "ok" and int8["max_abs_err"] < QUANTISED.atol, int8
    assert int8["top1"] == 1.0 and int8["batch_invariant"] is True, int8
    # What cannot run on this machine is skipped, with the reason, not failed.
    for target in ("torch-fp16", "torch-bf16", "onnx-fp16", "onnx-bf16"):
        assert rows[target]["status"] == "skipped" and "needs a CUDA device" in rows[target]["reason"], rows[target]
    if importlib.util.find_spec("torchao") is None:
        assert rows["torch-int8"]["status"] == "skipped" and "needs torchao" in rows["torch-int8"]["reason"]
    assert "tiny [torch-fp16] skipped: model 'tiny': target 'torch-fp16' needs a CUDA device" in result.stderr
    # The progress names each target (rich markup would swallow "[onnx]").
    assert "tiny/1 [torch-fp16]: skipped" in result.stderr and "tiny/1 [onnx]: ok" in result.stderr, result.stderr


def test_compare_table_shows_each_target_against_onnx() -> None:
    from rich.console import Console

    from hub.cli.build import render

    def row(target: str, b1: float | None, b32: float | None, status: str = "ok") -> dict[str, Any]:
        return {"model": "resnet", "version": 1, "target": target, "status": status, "size": 1024, "b1": b1, "b32": b32}

    console = Console(width=400, record=True)
    console.print(render([row("onnx", 10.0, 20.0), row("onnx-int8", 25.0, 70.0), row("torch", 5.0, None)]))
    text = console.export_text()
    lines = {line.split("│")[2].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert "vs onnx b1 / b32" in text
    assert "2.50x / 3.50x" in lines["onnx-int8"] and "0.50x / -" in lines["torch"]
    # The footnote says how the throughput was measured; a table without figures has none.
    assert "best of 20 rounds of 25 ms per cell" in text and "interleaved round-robin" in text, text
    console = Console(width=400, record=True)
    console.print(render([row("onnx", None, None)]))
    assert "rounds" not in console.export_text()


class TimedRuntime:
    """Each call costs `cost` seconds of a fake clock, ten times that while the box is busy."""

    def __init__(self, name: str, cost: float, clock: list[float], busy: tuple[float, float], log: list[Any]) -> None:
        self.name, self.cost, self.clock, self.busy, self.log = name, cost, clock, busy, log

    def run(self, inputs: dict[str, np.ndarray]) -> None:
        busy = self.busy[0] <= self.clock[0] < self.busy[1]
        self.clock[0] += self.cost * (10 if busy else 1)
        self.log.append((self.name, busy))


def test_compare_measures_targets_side_by_side_so_a_busy_moment_skews_no_ratio() -> None:
    """`build` times every target in interleaved rounds and keeps each one's best: a busy
    moment on the box lands on a round of each instead of on one target's only window, so the
    ratio between them comes out as their costs have it."""
    from hub.cli.build import ROUNDS, WINDOW, measure_interleaved
    from hub.spec import BatchPolicy, ModelSpec, TensorSpec

    spec = ModelSpec(
        name="m",
        build=lambda: None,
        inputs=[TensorSpec("x", "FP32", (-1, 2))],
        outputs=[TensorSpec("y", "FP32", (-1, 2))],
        example_inputs={"x": np.zeros((1, 2), np.float32)},
        batching=BatchPolicy(max_batch_size=32),
    )
    clock, log = [0.0], []
    # The busy moment covers the first 0.6 s: all the time one target's 0.5 s window took before.
    fast = TimedRuntime("fast", 0.001, clock, (0.0, 0.6), log)
    slow = TimedRuntime("slow", 0.004, clock, (0.0, 0.6), log)
    rounds: list[int] = []
    (fast_rates, slow_rates) = measure_interleaved(
        [(fast, spec), (slow, spec)], on_round=rounds.append, clock=lambda: clock[0]
    )
    # A busy window of several calls costs a cell no round; slow's busy calls (40 ms) outlast a
    # window and count in full against its 0.5 s, so it has a few rounds fewer.
    assert rounds == list(range(1, ROUNDS + 1))
    assert [len(r) for r in fast_rates.values()] == [ROUNDS, ROUNDS]
    assert all(ROUNDS // 2 <= len(r) < ROUNDS for r in slow_rates.values())
    assert max(fast_rates[1]) == pytest.approx(1000) and max(fast_rates[32]) == pytest.approx(32000)
    assert max(slow_rates[32]) / max(fast_rates[32]) == pytest.approx(0.25)  # not 2.5: the busy moment hit both
    assert {name for name, busy in log if busy} == {"fast", "slow"}
    assert 0.9 * 4 * ROUNDS * WINDOW < clock[0] < 1.5 * 4 * ROUNDS * WINDOW  # each cell took its 0.5 s (+ the busy)

    # A call longer than a cell's whole 0.5 s is timed once, as one window was before.
    clock[0], log[:] = 0.0, []
    glacial = TimedRuntime("glacial", 2.0, clock, (0.0, 0.0), log)
    (glacial_rates, fast_rates) = measure_interleaved([(glacial, spec), (fast, spec)], clock=lambda: clock[0])
    assert [len(r) for r in glacial_rates.values()] == [1, 1] and glacial_rates[32] == [pytest.approx(16)]
    assert [len(r) for r in fast_rates.values()] == [ROUNDS, ROUNDS]
    assert [name for name, _ in log].count("glacial") == 4  # an untimed call and one round, at b1 and b32


def test_models_names_the_target_an_artifact_was_built_for_and_reads_the_serve_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve --config` with another target builds it in the place of the plugin's target's
    artifact: `models` says whose artifact (and report) that is, and `models --config` reads the
    same config as serve and build, so it compares with the target served."""
    from hub.cli import main

    builder, spec = tiny(tmp_path, "onnx")
    config = tmp_path / "int8.toml"
    config.write_text('[models.tiny]\ntarget = "onnx-int8"\n')
    (served,) = DeploymentConfig.load(config).apply([spec])  # what `serve --config int8.toml` builds
    builder.ensure(served).runtime.close()
    listing = ["models", "--plugins-dir", str(tmp_path / "plugins"), "--no-entry-points",
               "--model-repository", str(tmp_path / "models")]  # fmt: skip

    def row(*extra: str) -> tuple[str, str]:
        assert main([*listing, *extra]) == 0
        out, err = capsys.readouterr()
        (line,) = [line for line in out.splitlines() if line.startswith("tiny ")]
        return line, err

    line, err = row()
    assert re.match(r"tiny\s+1\s+tiny\s+onnx\s+4\s+ok \(onnx-int8 built; the plugin's target is onnx\)", line), line
    assert "calibrated minmax on 4 rows" in line  # the report is onnx-int8's, and now says so
    assert "modelhub models --config F" in err
    line, err = row("--config", str(config))
    assert re.match(r"tiny\s+1\s+tiny\s+onnx-int8\s+4\s+ok\s+top1", line), line  # current, not stale
    assert "--config F" not in err
    builder.ensure(spec).runtime.close()  # a `serve` without the config builds onnx in its place
    line, _ = row("--config", str(config))
    assert "ok (onnx built; --config's target is onnx-int8)" in line, line
    line, _ = row()
    assert re.match(r"tiny\s+1\s+tiny\s+onnx\s+4\s+ok\s+top1", line), line

    config.write_text('[models.tiny]\ntarget = "onnx-int8"\nmax_batch = 8\n')
    assert main([*listing, "--config", str(config)]) == 2
    assert "models.tiny has unknown key(s) 'max_batch' (did you mean 'max_batch_size'?)" in capsys.readouterr().err


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


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_onnx_half_precision_needs_cuda_onnxruntime_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """Refused before anything is exported: on a CPU server, and with the CPU onnxruntime wheel."""
    import onnxruntime

    builder, spec = tiny(tmp_path, f"onnx-{dtype}")
    with pytest.raises(BuildError, match=f"model 'tiny': target 'onnx-{dtype}' needs a CUDA device"):
        builder.ensure(spec)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    on_cuda = Builder(builder.repository, builder.targets, builder.plugins, device="cuda")
    with pytest.raises(BuildError) as refused:
        on_cuda.ensure(spec)
    assert f"target 'onnx-{dtype}' needs onnxruntime-gpu with CUDAExecutionProvider" in str(refused.value)
    assert "offers ['CPUExecutionProvider']" in str(refused.value)
    assert not (tmp_path / "models" / "tiny").exists() or not any((tmp_path / "models" / "tiny").iterdir())


def _onnx_types(path: Path) -> tuple[Any, dict[str, str], set[str]]:
    import onnx

    model = onnx.load(str(path))
    name = onnx.TensorProto.DataType.Name
    io = {v.name: name(v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]}
    floats = {name(t.data_type) for t in model.graph.initializer if t.data_type in (1, 10, 11, 16)}
    return model, io, floats


def test_onnx_fp16_digits_validates_against_eager_on_cpu_onnxruntime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The onnx-fp16 artifact for digits (Conv, Gemm, Relu, MaxPool), checked as the pipeline
    checks it, on a CPU session made here: onnxruntime's CPU provider runs fp16 graphs (it
    upcasts ops without an fp16 kernel), so the graph and its fp16 weights are checked
    without a GPU. Serving it stays CUDA-only."""
    import onnxruntime

    from hub.runtimes.onnx import OnnxRuntime
    from hub.runtimes.onnx_variants import export_half_onnx
    from hub.runtimes.tolerances import HALF
    from hub.runtimes.torch import eager_outputs

    host = PluginHost(link_plugins(tmp_path / "p", ROOT / "plugins" / "digits"), entry_points=False)
    (spec,) = host.collect_models()
    module = spec.build()
    path = tmp_path / "model.fp16.onnx"
    export_half_onnx(module, spec, str(path), "fp16")  # onnx.checker passes inside
    model, io, floats = _onnx_types(path)
    assert io == {"image": "FLOAT", "logits": "FLOAT"} and floats == {"FLOAT16"}
    assert model.graph.node[0].op_type == "Cast" and model.graph.node[-1].op_type == "Cast"
    assert {"Conv", "Gemm", "Relu", "MaxPool"} <= {n.op_type for n in model.graph.node}
    assert spec.validation_data is not None
    inputs, labels = spec.validation_data()
    runtime = OnnxRuntime(str(path), spec, "cpu", 1)
    (report,) = [
        r
        for r in host.validate_artifact(spec, runtime, inputs, eager_outputs(module, spec, inputs), HALF, labels)
        if "max_abs_err" in r
    ]
    assert report["problems"] == [], report
    assert report["outputs"]["logits"]["top1_agreement"] >= 0.99
    assert abs(report["accuracy"] - report["eager_accuracy"]) <= 0.01
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        # A provider list that names CUDA while the session still lands on CPU is refused, not served.
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider"])
        with pytest.raises(BuildError, match="target 'onnx-fp16': onnxruntime's CUDAExecutionProvider did not start"):
            host.collect_targets()["onnx-fp16"].load(ArtifactContext(spec, tmp_path, "cuda"))


def test_onnx_bf16_export_casts_only_floating_inputs_at_opset_22(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INT64 token ids reach the graph unchanged, a floating input is cast in. bf16 graphs are
    opset 22 (ONNX types Conv and friends for bfloat16 from there); onnxruntime's CPU provider
    has no bf16 kernels, so the numbers are checked only where it has."""
    import onnxruntime
    import torch

    from hub import BatchPolicy, ModelSpec, TensorSpec
    from hub.runtimes.onnx import OnnxRuntime
    from hub.runtimes.onnx_variants import BF16_OPSET, _load_onnx_half, export_half_onnx
    from hub.runtimes.torch import eager_outputs

    class Bag(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embedding = torch.nn.Embedding(50, 8)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, tokens: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.fc(self.embedding(tokens).mean(1) * scale)

    rng = np.random.default_rng(3)
    examples = {"tokens": rng.integers(0, 50, (4, 6)), "scale": rng.uniform(0.5, 2, (4, 1)).astype(np.float32)}
    spec = ModelSpec(
        name="bag",
        build=lambda: Bag().eval(),
        inputs=[TensorSpec("tokens", "INT64", (-1, 6)), TensorSpec("scale", "FP32", (-1, 1))],
        outputs=[TensorSpec("y", "FP32", (-1, 3))],
        example_inputs=examples,
        batching=BatchPolicy(max_batch_size=8),
    )
    spec.validate()
    module = spec.build()
    reference = eager_outputs(module, spec, examples)["y"]

    bf16 = tmp_path / "model.bf16.onnx"
    export_half_onnx(module, spec, str(bf16), "bf16")  # onnx.checker passes inside
    model, io, floats = _onnx_types(bf16)
    assert io == {"tokens": "INT64", "scale": "FLOAT", "y": "FLOAT"} and floats == {"BFLOAT16"}
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert "tokens" not in {i for n in casts for i in n.input} and "scale" in {i for n in casts for i in n.input}
    assert {o.domain: o.version for o in model.opset_import}[""] == BF16_OPSET
    try:
        out = OnnxRuntime(str(bf16), spec, "cpu", 1).run(examples)["y"]
    except onnxruntime.capi.onnxruntime_pybind11_state.NotImplemented as exc:
        assert "Could not find an implementation for" in str(exc)  # onnxruntime 1.32's CPU provider
    else:
        np.testing.assert_allclose(out, reference, atol=5e-2, rtol=5e-2)
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        # A missing bf16 kernel is named as such, not left as onnxruntime's bare NOT_IMPLEMENTED.
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider"])
        with pytest.raises(BuildError, match="target 'onnx-bf16': this onnxruntime has no bf16 kernel"):
            _load_onnx_half("bf16")(ArtifactContext(spec, tmp_path, "cuda"))


@pytest.mark.parametrize("target", ["onnx-int8", "onnx-int8-dynamic"])
def test_int8_exclude_keeps_named_modules_fp32(tmp_path: Path, target: str) -> None:
    import onnx

    from hub.runtimes.onnx_variants import INT8_DYNAMIC_FILENAME, INT8_FILENAME
    from hub.spec import Tolerance

    filename = INT8_FILENAME if target == "onnx-int8" else INT8_DYNAMIC_FILENAME

    def fc_is_int8(graph: Any) -> bool:
        if target == "onnx-int8-dynamic":  # MatMulInteger fed by DynamicQuantizeLinear
            return any("Integer" in n.op_type for n in graph.node)
        dequantised = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return any(set(n.input) & dequantised for n in graph.node if n.op_type in ("Gemm", "MatMul"))  # QDQ

    builder, spec = tiny(tmp_path, target)
    with pytest.raises(BuildError, match=r"int8_exclude: \['encoder\.\*'\] match no module"):
        builder.ensure(spec.with_(options={"int8_exclude": ["encoder.*"]}))
    artifact = builder.ensure(spec.with_(options={"int8_exclude": ["fc"]}))
    assert artifact.manifest["status"] == "ok"
    assert not fc_is_int8(onnx.load(str(builder.directory(spec) / filename)).graph)
    # A change of options rebuilds; everything quantised, this toy model strays far (loose bounds).
    quantised = builder.ensure(spec.with_(options={}, tolerance=Tolerance(atol=2.0, rtol=1.0)))
    assert quantised.built and fc_is_int8(onnx.load(str(builder.directory(spec) / filename)).graph)


def test_per_target_tolerance_and_min_cosine_refusal(tmp_path: Path) -> None:
    from hub.spec import Tolerance

    builder, spec = tiny(tmp_path, "onnx-int8")
    strict = {"onnx-int8": Tolerance(atol=1.0, rtol=0.0, min_cosine=0.999999999), "onnx": Tolerance()}
    with pytest.raises(BuildError, match=r"cosine similarity with eager 0\.\d+ \(row \d+\) is below 0\.999999999"):
        builder.ensure(spec.with_(tolerance=strict))
    manifest = json.loads((builder.directory(spec) / "manifest.json").read_text())
    assert manifest["validation"]["tolerance"]["min_cosine"] == 0.999999999  # the refusal is on record
    relaxed = builder.ensure(spec.with_(tolerance={**strict, "onnx-int8": Tolerance(atol=1.0, min_cosine=0.5)}))
    assert 0.5 <= relaxed.manifest["validation"]["outputs"]["y"]["min_cosine"] < 0.999999999
