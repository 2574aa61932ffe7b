"""CUDA shared memory (issue 16) without a GPU: the real server, in one process and behind
`--workers 2`, with the CUDA runtime's few calls replaced by tests/cuda_double (a "device
allocation" is a POSIX shared-memory object, its "IPC handle" the object's name). Registration,
status and unregister over gRPC and REST, every fixed-size datatype in and out, every refusal,
one allocation under two names, an unregister while a request is pending, a fuzz of sizes and
offsets, and, behind --workers 2, the model process opening the regions and reading and
writing them for every frontend; and the device tensor's description read by torch itself. The
real calls: tests/test_shared_memory_cuda.py, on a GPU."""

from __future__ import annotations

import base64
import importlib.util
import itertools
import os
import queue
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from hub.server import ServerConfig

from .conftest import ROOT, TEST_PLUGINS, RunningServer, Workers, link_plugins
from .plugins.identity import DATATYPES, sample
from .test_shared_memory import unregister_while_pending

DOUBLE = ROOT / "tests" / "cuda_double"
_keys = itertools.count()


def _double() -> Any:
    spec = importlib.util.spec_from_file_location("modelhub_cuda_double", DOUBLE / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_process(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    plugins = link_plugins(
        tmp_path_factory.mktemp("cuda-double"),
        TEST_PLUGINS / "torch_models.py",
        TEST_PLUGINS / "identity.py",
        TEST_PLUGINS / "preprocessed.py",
        TEST_PLUGINS / "postprocessed.py",
        TEST_PLUGINS / "behaviour.py",
    )
    with pytest.MonkeyPatch.context() as patch:
        _double().install(patch.setattr)
        server = _serve(plugins, model_repository)
        yield server
        server.stop()


def _serve(plugins: Path, repository: Path) -> RunningServer:
    """One process with both kinds of shared memory on (the stand-in installed by the caller)."""
    return RunningServer(
        ServerConfig(
            plugins_dir=plugins, model_repository=repository, host="127.0.0.1", grpc_port=0, http_port=0,
            metrics_port=None, device="cpu", threads=1, entry_points=False,
            shared_memory=frozenset({"system", "cuda"}), inline_compute=0.0,
        )
    ).start()  # fmt: skip


@pytest.fixture(scope="module")
def two_workers(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    """--workers 2 with each frontend's own copy of the CPU models (the default): a request
    that names CUDA shared memory must still run in the model process."""
    tmp = tmp_path_factory.mktemp("cuda-double-workers")
    plugins = link_plugins(
        tmp / "plugins",
        TEST_PLUGINS / "torch_models.py",
        TEST_PLUGINS / "identity.py",
        TEST_PLUGINS / "preprocessed.py",
        TEST_PLUGINS / "postprocessed.py",
    )
    # ROOT after the stand-in: the server's processes import this checkout's hub, as the test
    # process does, not whichever one the environment has installed.
    env = {"PYTHONPATH": f"{DOUBLE}{os.pathsep}{ROOT}", "MODELHUB_CUDA_DOUBLE": "1"}
    server = Workers(plugins, model_repository, tmp, 2, "--shared-memory", "system,cuda", env=env)
    yield server
    assert server.stop() == 0, server.output()


class Device:
    """A client's stand-in device memory for one test: shared-memory objects registered as
    CUDA regions, each under its object's name as the handle."""

    def __init__(self, server: RunningServer | Workers, protocol: str) -> None:
        self.mod: Any = tc if protocol == "grpc" else th
        self.protocol = protocol
        self.workers = isinstance(server, Workers)
        self.client: Any = self.mod.InferenceServerClient(server.url if protocol == "grpc" else server.http_url)
        self.handles: list[Any] = []
        self.double = _double()

    def allocate(self, name: str, size: int, *, register: bool = True) -> Any:
        key = f"/modelhub_cuda_double_{os.getpid()}_{next(_keys)}"
        handle = shm.create_shared_memory_region(name, key, size)
        handle.key = key
        self.handles.append(handle)
        if register:
            self.register(name, key, size)
        return handle

    def register(self, name: str, key: str, size: int, device_id: int = 0, raw: bytes | None = None) -> None:
        handle = self.double.handle_for(key) if raw is None else raw
        self.client.register_cuda_shared_memory(name, base64.b64encode(handle), device_id, size)

    def status(self) -> dict[str, tuple[int, int]]:
        status = self.client.get_cuda_shared_memory_status()
        if self.protocol == "grpc":
            return {name: (r.device_id, r.byte_size) for name, r in status.regions.items()}
        return {r["name"]: (r["device_id"], r["byte_size"]) for r in status}

    def expect(self, code: str, call: Any, *fragments: str) -> None:
        with pytest.raises(InferenceServerException) as err:
            call()
        grpc_code, http_code = STATUS[code]
        assert str(err.value.status()) == (grpc_code if self.protocol == "grpc" else http_code), err.value.message()
        for fragment in fragments:
            assert fragment in err.value.message(), err.value.message()

    def close(self) -> None:
        self.client.unregister_cuda_shared_memory()
        assert self.status() == {}
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)
        self.client.close()


STATUS = {
    "INVALID_ARGUMENT": ("StatusCode.INVALID_ARGUMENT", "400"),
    "ALREADY_EXISTS": ("StatusCode.ALREADY_EXISTS", "409"),
    "NOT_FOUND": ("StatusCode.NOT_FOUND", "404"),
}


@pytest.fixture(params=["grpc", "http", "grpc-workers-2", "http-workers-2"])
def device(request: pytest.FixtureRequest) -> Iterator[Device]:
    protocol, _, workers = request.param.partition("-")
    current = Device(request.getfixturevalue("two_workers" if workers else "one_process"), protocol)
    yield current
    current.close()


def _infer(device: Device, model: str, region_in: str, values: np.ndarray, region_out: str, out_size: int) -> Any:
    tensor = device.mod.InferInput("x", list(values.shape), "FP32")
    tensor.set_shared_memory(region_in, values.nbytes)
    wanted = device.mod.InferRequestedOutput("y")
    wanted.set_shared_memory(region_out, out_size)
    return device.client.infer(model, [tensor], outputs=[wanted, device.mod.InferRequestedOutput("total")])


@pytest.mark.parametrize("model", ["affine_torch", "affine_onnx"])
def test_inputs_and_outputs_in_cuda_regions(device: Device, model: str) -> None:
    """A torch model (takes the tensor on its device) and an ONNX one (a copy to the host):
    the input read from the region, y written into another, total in the response."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    source = device.allocate("in", x.nbytes)
    target = device.allocate("out", 4096)
    for round_ in range(3):  # (behind --workers 2 the requests reach both frontends' copies)
        values = x + round_
        shm.set_shared_memory_region(source, [values])
        result = _infer(device, model, "in", values, "out", 4096)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(target, np.float32, [2, 4]), values * 2 + 1)
        np.testing.assert_array_equal(result.as_numpy("total").ravel(), values.sum(axis=1))
    assert device.status() == {"in": (0, x.nbytes), "out": (0, 4096)}


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BYTES"])
def test_every_fixed_size_datatype_in_and_out_of_cuda_regions(device: Device, datatype: str) -> None:
    """The identity models (a numpy runtime: each input comes to the host once) with the input
    and the output in CUDA regions, for every datatype CUDA shared memory takes."""
    values = sample(datatype)
    source = device.allocate("in", values.nbytes)
    target = device.allocate("out", values.nbytes + 64)
    shm.set_shared_memory_region(source, [values])
    tensor = device.mod.InferInput("INPUT0", list(values.shape), datatype)
    tensor.set_shared_memory("in", values.nbytes)
    wanted = device.mod.InferRequestedOutput("OUTPUT0")
    wanted.set_shared_memory("out", values.nbytes + 64)
    device.client.infer(f"identity_{datatype.lower()}", [tensor], outputs=[wanted])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(target, values.dtype, values.shape), values)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unregister_while_a_request_is_pending(one_process: RunningServer, protocol: str) -> None:
    """A request holds its CUDA regions (the tensor viewing the input holds it too): it is
    answered correctly after an unregister, and the last holder closes the IPC handles."""
    device = Device(one_process, protocol)
    value = np.full((1, 1), 3.0, np.float32)
    source = device.allocate("pending_in", 4)
    target = device.allocate("pending_out", 4)
    shm.set_shared_memory_region(source, [value])
    regions = unregister_while_pending(one_process, protocol, device.client.unregister_cuda_shared_memory)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(target, np.float32, [1, 1]), value * 2)
    assert regions["pending_in"].closed and regions["pending_out"].closed
    device.close()


def test_stopping_the_server_closes_every_cuda_handle(model_repository: Path, tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        _double().install(patch.setattr)
        server = _serve(link_plugins(tmp_path / "p", TEST_PLUGINS / "torch_models.py"), model_repository)
        device = Device(server, "grpc")
        try:
            first = device.allocate("kept", 64)
            device.allocate("also_kept", 64)
            device.register("same_allocation", first.key, 64)
            registry = server.server.shared_memory  # type: ignore[union-attr]
            regions, ipc = registry.regions(), registry._cuda
            assert len(regions) == 3 and ipc is not None and len(ipc._opened) == 2
        finally:
            server.stop()
        assert all(region.closed for region in regions) and ipc._opened == {}
        for handle in device.handles:
            shm.destroy_shared_memory_region(handle)
        device.client.close()


@pytest.mark.parametrize("server", ["one_process", "two_workers"])
def test_a_stream_of_requests_in_cuda_regions(request: pytest.FixtureRequest, server: str) -> None:
    """ModelStreamInfer: requests on one stream run concurrently, each with its input and its
    output at its own offset of CUDA regions (each request's regions are its own: held, checked
    and handed over per request)."""
    device = Device(request.getfixturevalue(server), "grpc")
    count = 6
    source = device.allocate("stream_in", count * 16)
    target = device.allocate("stream_out", count * 16)
    rows = np.arange(count * 4, dtype=np.float32).reshape(count, 4)
    shm.set_shared_memory_region(source, [rows])
    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    device.client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(count):
            tensor = tc.InferInput("x", [1, 4], "FP32")
            tensor.set_shared_memory("stream_in", 16, offset=16 * i)
            wanted = tc.InferRequestedOutput("y")
            wanted.set_shared_memory("stream_out", 16, offset=16 * i)
            device.client.async_stream_infer("affine_torch", [tensor], outputs=[wanted], request_id=str(i))
        results = [answers.get(timeout=30) for _ in range(count)]
    finally:
        device.client.stop_stream()
    assert [error for _, error in results] == [None] * count
    assert sorted(result.get_response().id for result, _ in results) == [str(i) for i in range(count)]
    np.testing.assert_array_equal(shm.get_contents_as_numpy(target, np.float32, [count, 4]), rows * 2 + 1)
    device.close()


def test_status_and_unregister_agree_in_every_frontend(two_workers: Workers) -> None:
    """Only the model process opens a region (in the models' CUDA context); each frontend
    knows it by name, device and size, and agrees with the others once a call returns."""
    grpcs = [Device(two_workers, "grpc") for _ in range(6)]  # the kernel spreads the connections
    rest = Device(two_workers, "http")
    engine, frontends = two_workers.children("engine"), two_workers.children("frontend")
    assert len(engine) == 1 and len(frontends) == 2
    try:
        a = grpcs[0].allocate("a", 64)
        rest.allocate("b", 128)
        assert all(d.status() == {"a": (0, 64), "b": (0, 128)} for d in [*grpcs, rest])
        assert _mapped_by(engine[0], a.key) and not any(_mapped_by(pid, a.key) for pid in frontends)
        grpcs[1].client.unregister_cuda_shared_memory("a")
        assert not _mapped_by(engine[0], a.key)
        assert all(d.status() == {"b": (0, 128)} for d in [*grpcs, rest])
        for client in grpcs:
            client.expect(
                "INVALID_ARGUMENT",
                lambda c=client: _infer(c, "affine_torch", "a", np.zeros((1, 4), np.float32), "b", 128),  # type: ignore[misc]
                "'a' is not registered",
            )
    finally:
        for client in [*grpcs, rest]:
            client.close()


def _mapped_by(pid: int, key: str) -> bool:
    return f"/dev/shm/{key.lstrip('/')}" in Path(f"/proc/{pid}/maps").read_text()


def test_one_allocation_under_two_names(device: Device) -> None:
    """CUDA opens a handle once per process: an allocation registered under two names (its
    input and output in one cudaMalloc) is opened once, serves both, and is closed with the
    second unregister."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    both = device.allocate("first_name", 4096)
    device.register("second_name", both.key, 4096)
    shm.set_shared_memory_region(both, [x])
    tensor = device.mod.InferInput("x", [2, 4], "FP32")
    tensor.set_shared_memory("first_name", x.nbytes)
    wanted = device.mod.InferRequestedOutput("y")
    wanted.set_shared_memory("second_name", x.nbytes, offset=1024)
    device.client.infer("affine_torch", [tensor], outputs=[wanted])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(both, np.float32, [2, 4], offset=1024), x * 2 + 1)
    device.client.unregister_cuda_shared_memory("first_name")
    wanted.set_shared_memory("second_name", x.nbytes, offset=2048)
    tensor.set_shared_memory("second_name", x.nbytes)
    device.client.infer("affine_torch", [tensor], outputs=[wanted])  # the handle is still open for it
    np.testing.assert_array_equal(shm.get_contents_as_numpy(both, np.float32, [2, 4], offset=2048), x * 2 + 1)
    device.client.unregister_cuda_shared_memory("second_name")
    device.register("again", both.key, 4096)  # closed with its last region, so it opens again
    assert device.status() == {"again": (0, 4096)}


def test_cuda_registration_refusals(device: Device) -> None:
    handle = device.allocate("taken", 256)
    register = device.register
    device.expect("ALREADY_EXISTS", lambda: register("taken", handle.key, 256), "already registered")
    device.expect("INVALID_ARGUMENT", lambda: register("big", handle.key, 257), "smaller than byte_size 257")
    device.expect("INVALID_ARGUMENT", lambda: register("gone", "/modelhub_no_such_allocation", 16), "cannot be opened")
    device.expect("INVALID_ARGUMENT", lambda: register("dev", handle.key, 16, device_id=3), "device_id 3")
    device.expect("INVALID_ARGUMENT", lambda: register("short", "", 16, raw=b"x" * 10), "64-byte", "got 10")
    device.expect("INVALID_ARGUMENT", lambda: register("empty", handle.key, 0), "byte_size must be positive")
    assert device.status() == {"taken": (0, 256)}


def test_cuda_status_and_unregister_of_names_it_does_not_hold(device: Device) -> None:
    """Status of an unknown name, or of a system region asked as CUDA, is NOT_FOUND naming it;
    unregistering either is no error and leaves the system region alone (as in Triton)."""
    system = device.allocate("as_system", 64, register=False)
    device.client.register_system_shared_memory("as_system", system.key, 64)
    try:
        device.expect(
            "NOT_FOUND", lambda: device.client.get_cuda_shared_memory_status("nowhere"), "'nowhere' is registered"
        )
        device.expect(
            "NOT_FOUND",
            lambda: device.client.get_cuda_shared_memory_status("as_system"),
            "'as_system' is registered as system shared memory, not CUDA",
        )
        device.client.unregister_cuda_shared_memory("nowhere")
        device.client.unregister_cuda_shared_memory("as_system")
        status = device.client.get_system_shared_memory_status()
        names = set(status.regions) if device.protocol == "grpc" else {r["name"] for r in status}
        assert names == {"as_system"}
    finally:
        device.client.unregister_system_shared_memory()


def test_cuda_inference_refusals(device: Device) -> None:
    device.allocate("in", 64)
    device.allocate("out", 64)
    values = np.zeros((2, 4), np.float32)
    outside = device.mod.InferInput("x", [2, 4], "FP32")
    outside.set_shared_memory("in", 32, offset=48)
    device.expect("INVALID_ARGUMENT", lambda: device.client.infer("affine_torch", [outside]), "runs past the region")
    wrong = device.mod.InferInput("x", [2, 4], "FP32")
    wrong.set_shared_memory("in", 16)
    device.expect("INVALID_ARGUMENT", lambda: device.client.infer("affine_torch", [wrong]), "needs 32 bytes")
    text = device.mod.InferInput("INPUT0", [1], "BYTES")
    text.set_shared_memory("in", 16)
    device.expect(
        "INVALID_ARGUMENT", lambda: device.client.infer("identity_bytes", [text]), "BYTES inputs are not taken"
    )
    device.expect("INVALID_ARGUMENT", lambda: _infer(device, "affine_torch", "in", values, "out", 16), "needs 32 bytes")
    assert device.status() == {"in": (0, 64), "out": (0, 64)}


def test_bytes_outputs_into_cuda_regions(device: Device) -> None:
    """BYTES out is written length-prefixed, as into system shared memory."""
    target = device.allocate("text_out", 256)
    values = np.array([[b"cuda", b"shared"]], dtype=np.object_)
    tensor = device.mod.InferInput("INPUT0", [1, 2], "BYTES")
    tensor.set_data_from_numpy(values)
    wanted = device.mod.InferRequestedOutput("OUTPUT0")
    wanted.set_shared_memory("text_out", 256)
    device.client.infer("identity_bytes", [tensor], outputs=[wanted])
    got = shm.get_contents_as_numpy(target, np.object_, [1, 2])
    assert [bytes(v) for v in got.ravel()] == [b"cuda", b"shared"]


def test_a_preprocessed_model_behind_workers(device: Device) -> None:
    """Behind --workers N a spec's preprocess runs in the frontends, which cannot read CUDA
    memory: refused by name. In one process the input comes to the host for the preprocess,
    which is given numpy arrays (numpy cannot read a device tensor, nor the stand-in's)."""
    values = np.arange(4, dtype=np.float32).reshape(1, 4)
    source = device.allocate("pre_in", values.nbytes)
    shm.set_shared_memory_region(source, [values])
    tensor = device.mod.InferInput("x", [1, 4], "FP32")
    tensor.set_shared_memory("pre_in", values.nbytes)
    if device.workers:
        device.expect(
            "INVALID_ARGUMENT",
            lambda: device.client.infer("halve_then_double", [tensor]),
            "'halve_then_double' preprocesses its inputs in each frontend process",
        )
    else:
        result = device.client.infer("halve_then_double", [tensor])
        np.testing.assert_array_equal(result.as_numpy("y"), values)


def test_a_postprocessed_model_behind_workers(device: Device) -> None:
    """Behind --workers N a spec's postprocess runs in the frontends, which cannot write CUDA
    memory, and the model process's outputs are not the served ones: a served output asked into
    a CUDA region is refused by name. In one process the served output is written there."""
    values = np.array([[0.0, 1.0, 0.0], [3.0, 0.0, 1.0]], np.float32)
    target = device.allocate("post_out", 16)
    tensor = device.mod.InferInput("x", [2, 3], "FP32")
    tensor.set_data_from_numpy(values)
    wanted = device.mod.InferRequestedOutput("index")
    wanted.set_shared_memory("post_out", 16)
    if device.workers:
        device.expect(
            "INVALID_ARGUMENT",
            lambda: device.client.infer("labeller_same_name", [tensor], outputs=[wanted]),
            "'labeller_same_name' postprocesses its outputs in each frontend process",
        )
    else:
        device.client.infer("labeller_same_name", [tensor], outputs=[wanted])
        assert shm.get_contents_as_numpy(target, np.int64, [2]).tolist() == [1, 0]


# --- fuzz: offsets and sizes against a CUDA region, behind --workers 2 ----------------------------


@pytest.fixture(scope="module")
def cuda_fuzz(two_workers: Workers) -> Iterator[tuple[Any, Any, Device]]:
    device = Device(two_workers, "grpc")
    source = device.allocate("fuzz_in_object", 8192, register=False)
    target = device.allocate("fuzz_out", 8192)
    shm.set_shared_memory_region(source, [np.arange(2048, dtype=np.float32)])
    yield source, target, device
    device.close()


_sizes = st.one_of(st.integers(0, 9000), st.sampled_from([1 << 31, (1 << 63) - 1, 4095, 4096, 4097]))
_extents = st.one_of(_sizes, st.sampled_from([16, 32, 48, 64, 4096, 8192]))  # (some that fit)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    byte_size=_extents,
    tensor=st.tuples(_extents, _extents),
    output=st.tuples(_extents, _extents),
    rows=st.integers(1, 4),
)
@example(byte_size=8192, tensor=(16, 32), output=(64, 4096), rows=2)  # (answered, at offsets)
@example(byte_size=48, tensor=(16, 32), output=(8160, 32), rows=2)  # (each at the end of its region)
def test_fuzz_cuda_offsets_and_sizes(
    cuda_fuzz: tuple[Any, Any, Device],
    byte_size: int,
    tensor: tuple[int, int],
    output: tuple[int, int],
    rows: int,
) -> None:
    """Any registered size, input extent and output extent: the right values or
    INVALID_ARGUMENT, never a read or write outside the allocation, and the server stays up."""
    source, target, device = cuda_fuzz
    try:
        device.register("fuzz_in", source.key, byte_size)
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.INVALID_ARGUMENT", exc.message()
        assert byte_size == 0 or byte_size > 8192
        return
    try:
        (offset, size), (out_offset, out_size) = tensor, output
        x = tc.InferInput("x", [rows, 4], "FP32")
        x.set_shared_memory("fuzz_in", size, offset)
        y = tc.InferRequestedOutput("y")
        y.set_shared_memory("fuzz_out", out_size, out_offset)
        try:
            device.client.infer("affine_torch", [x], outputs=[y])
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.INVALID_ARGUMENT", exc.message()
            fits_in = size == rows * 16 and offset < byte_size and offset + size <= byte_size
            fits_out = out_size >= rows * 16 and out_offset < 8192 and out_offset + out_size <= 8192
            assert not (fits_in and fits_out), exc.message()
            return
        assert size == rows * 16 and offset + size <= byte_size
        values = np.arange(2048, dtype=np.float32).view(np.uint8)[offset : offset + size].view(np.float32)
        got = shm.get_contents_as_numpy(target, np.float32, [rows * 4], offset=out_offset)
        np.testing.assert_array_equal(got, values * 2 + 1)
    finally:
        device.client.unregister_cuda_shared_memory("fuzz_in")


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(torch_cuda_available(), reason="with CUDA, tests/test_shared_memory_cuda.py runs the real tensor")
@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BYTES"])
def test_the_device_tensor_is_described_as_torch_takes_it(datatype: str) -> None:
    """The one line the stand-in replaces, `CudaIpc.tensor`, run for real as far as a torch
    without CUDA goes: torch reads our __cuda_array_interface__ and fails only for want of a
    device (it refuses, for one, a read-only flag, which every input on a GPU would have met).
    The region's hold is given back when the tensor is never made."""
    from hub.limits import DEFAULT_LIMITS
    from hub.shm.cuda import CudaIpc

    double = _double()
    key = f"/modelhub_cuda_double_{os.getpid()}_{next(_keys)}"
    handle = shm.create_shared_memory_region("described", key, 64)
    try:
        ipc = CudaIpc(*double._libraries(), 1)  # the real class: its tensor() is not replaced
        region = ipc.open("described", double.handle_for(key), 0, 64)
        with pytest.raises((AssertionError, RuntimeError)) as failed:
            region.read("x", datatype, (2,), 0, 2 * sample(datatype, 2).itemsize, DEFAULT_LIMITS)
        assert not isinstance(failed.value, TypeError)
        assert re.search("CUDA|NVIDIA", str(failed.value)), failed.value
        del failed  # (its traceback holds the frames that held the region)
        assert region.users == 0
        region.retire()
        assert region.closed and not ipc._opened
    finally:
        shm.destroy_shared_memory_region(handle)


def test_cuda_calls_leave_the_thread_as_they_found_it() -> None:
    """These calls run on the event loop's thread, which also makes torch's CUDA calls for
    requests (wrapping inputs, copying them to the host for ONNX Runtime). A failed call's error
    is cleared: left pending, torch's check after a later kernel launch there would raise it for
    another client's request. And the thread's current device is restored: left on a region's
    device, torch's "cuda" would follow it there."""
    from hub.errors import InvalidInput
    from hub.shm.cuda import CudaIpc

    double = _double()
    runtime, driver = double._libraries()
    ipc = CudaIpc(runtime, driver, 2)
    with pytest.raises(InvalidInput, match="cannot be opened on device 1"):
        ipc.open("stale", double.handle_for("/modelhub_cuda_double_no_such_object"), 1, 64)
    assert double.last_error() == 0
    assert double.current_device() == 0

    key = f"/modelhub_cuda_double_{os.getpid()}_{next(_keys)}"
    handle = shm.create_shared_memory_region("on_one", key, 64)
    try:
        region = ipc.open("on_one", double.handle_for(key), 1, 64)
        assert double.current_device() == 0

        values = np.arange(4, dtype=np.float32)
        region.write("y", values, 16, values.nbytes)  # landed on return: its stream was synchronised
        assert double.current_device() == 0 and double.last_error() == 0
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [4], offset=16), values)
        region.retire()
        assert region.closed and not ipc._opened and double.current_device() == 0
    finally:
        shm.destroy_shared_memory_region(handle)
