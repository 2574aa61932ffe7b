"""Triton's shared-memory extension (issue 16) through the real server, driven by tritonclient's
own helpers (tritonclient.utils.shared_memory) over gRPC and REST: every datatype in and out,
the six RPCs, every refusal, holds across an unregister, the tokens, and a bounded fuzz of
offsets and sizes."""

from __future__ import annotations

import base64
import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from .conftest import TEST_PLUGINS, RunningServer, Workers, link_plugins
from .plugins.identity import DATATYPES, sample

PROTOCOLS = ("grpc", "http")
#: Domain code -> what tritonclient reports as the status on (gRPC, REST).
STATUS = {
    "INVALID_ARGUMENT": ("StatusCode.INVALID_ARGUMENT", "400"),
    "NOT_FOUND": ("StatusCode.NOT_FOUND", "404"),
    "ALREADY_EXISTS": ("StatusCode.ALREADY_EXISTS", "409"),
    "UNIMPLEMENTED": ("StatusCode.UNIMPLEMENTED", "501"),
    "UNAVAILABLE": ("StatusCode.UNAVAILABLE", "503"),
    "UNAUTHENTICATED": ("StatusCode.UNAUTHENTICATED", "401"),
    "RESOURCE_EXHAUSTED": ("StatusCode.RESOURCE_EXHAUSTED", "429"),
}
_keys = itertools.count()


def new_key() -> str:
    return f"/modelhub_test_{os.getpid()}_{next(_keys)}"


@pytest.fixture(scope="module")
def shm_server(start_server: Any, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    folder = link_plugins(
        tmp_path_factory.mktemp("shm-plugins"), TEST_PLUGINS / "identity.py", TEST_PLUGINS / "behaviour.py"
    )
    # inline_compute 0: sleepy computes in a worker thread, never on the event loop (where the
    # CPU time of its sleep may price it), so the server answers while a request of it is held
    # (test_unregister_while_a_request_is_pending).
    return start_server(folder, metrics_port=None, shared_memory=frozenset({"system", "cuda"}), inline_compute=0.0)


@pytest.fixture(scope="module")
def shm_workers(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Workers]:
    """The same plugins behind `--workers 2`: the registry lives in the model process."""
    tmp = tmp_path_factory.mktemp("shm-workers")
    plugins = link_plugins(tmp / "plugins", TEST_PLUGINS / "identity.py", TEST_PLUGINS / "behaviour.py")
    server = Workers(plugins, model_repository, tmp, 2, "--shared-memory", "system,cuda")
    yield server
    assert server.stop() == 0, server.output()


class Side:
    """One protocol's client, tritonclient module and region bookkeeping for a test."""

    def __init__(self, protocol: str, server: RunningServer | Workers, **kwargs: Any) -> None:
        self.protocol = protocol
        self.workers = isinstance(server, Workers)
        self.mod: Any = tc if protocol == "grpc" else th
        url = server.url if protocol == "grpc" else server.http_url
        self.client: Any = self.mod.InferenceServerClient(url, **kwargs)
        self.handles: list[Any] = []

    def region(self, name: str, byte_size: int, *, register: bool = True, offset: int = 0) -> Any:
        """A new system shared memory object of `byte_size` bytes, registered as `name`."""
        key = new_key()
        handle = shm.create_shared_memory_region(name, key, byte_size)
        handle.key = key
        self.handles.append(handle)
        if register:
            self.client.register_system_shared_memory(name, key, byte_size - offset, offset=offset)
        return handle

    def status(self, exc: InferenceServerException) -> str:
        return str(exc.status())

    def expect(self, code: str, call: Any, *fragments: str) -> str:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert self.status(err.value) == STATUS[code][0 if self.protocol == "grpc" else 1], err.value.message()
        message = err.value.message()
        for fragment in fragments:
            assert fragment in message, message
        for handle in self.handles:
            assert handle.key.lstrip("/") not in message, message  # the key is never echoed
        return message

    def close(self) -> None:
        self.client.unregister_system_shared_memory()
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)
        self.client.close()


def _sides(protocol: str, server: RunningServer | Workers) -> Iterator[Side]:
    """A Side for one test; afterwards, no region is left registered."""
    current = Side(protocol, server)
    yield current
    current.close()
    if isinstance(server, Workers):
        assert len(tc.InferenceServerClient(server.url).get_system_shared_memory_status().regions) == 0
    else:
        assert server.server is not None and server.server.shared_memory is not None
        assert server.server.shared_memory.regions() == []


@pytest.fixture(params=PROTOCOLS)
def local_side(request: pytest.FixtureRequest, shm_server: RunningServer) -> Iterator[Side]:
    """A protocol's Side on the one-process server (for tests that look into its registry)."""
    yield from _sides(request.param, shm_server)


@pytest.fixture(params=[*PROTOCOLS, *(f"{p}-workers-2" for p in PROTOCOLS)])
def side(request: pytest.FixtureRequest) -> Iterator[Side]:
    """Each protocol on the one-process server and behind `--workers 2` (the same checks hold)."""
    protocol, _, workers = request.param.partition("-")
    yield from _sides(protocol, request.getfixturevalue("shm_workers" if workers else "shm_server"))


def shm_input(side: Side, name: str, shape: list[int], datatype: str, region: str, size: int, offset: int = 0) -> Any:
    tensor = side.mod.InferInput(name, shape, datatype)
    tensor.set_shared_memory(region, size, offset)
    return tensor


def shm_output(side: Side, name: str, region: str, size: int, offset: int = 0) -> Any:
    output = side.mod.InferRequestedOutput(name)
    output.set_shared_memory(region, size, offset)
    return output


# --- correct answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_in_and_out_of_shared_memory(side: Side, datatype: str) -> None:
    values = sample(datatype)
    if datatype == "BYTES":
        serialized = serialize_byte_tensor(values)
        size, staged = len(serialized.item()), [serialized]
    else:
        size, staged = values.nbytes, [values]
    region_in = side.region(f"in_{datatype}", size)
    side.region(f"out_{datatype}", size + 64)
    shm.set_shared_memory_region(region_in, staged)
    result = side.client.infer(
        f"identity_{datatype.lower()}",
        [shm_input(side, "INPUT0", list(values.shape), datatype, f"in_{datatype}", size)],
        outputs=[shm_output(side, "OUTPUT0", f"out_{datatype}", size + 64)],
    )
    output = result.get_output("OUTPUT0")
    shape = list(output.shape) if side.protocol == "grpc" else output["shape"]
    assert shape == list(values.shape)
    # The data is in the region, not in the response (as Triton: an empty raw entry on gRPC,
    # neither data nor binary_data_size on REST).
    if side.protocol == "grpc":
        assert result.get_response().raw_output_contents[0] == b""
    else:
        assert "data" not in output and "parameters" not in output
    dtype = np.object_ if datatype == "BYTES" else values.dtype
    got = shm.get_contents_as_numpy(side.handles[1], dtype, values.shape)
    np.testing.assert_array_equal(got, values)


TRUNCATED_MEANWHILE = """
import os, sys
import numpy as np
import tritonclient.utils.shared_memory as shm
from hub.errors import InvalidInput
from hub.shm import Holds, SharedMemoryRegistry

key = sys.argv[1]
handle = shm.create_shared_memory_region("meanwhile", key, 4096 + 24)
registry = SharedMemoryRegistry(frozenset({"system"}))
try:
    registry.register_system("meanwhile", key, 4096, 24)  # a region at a page offset of the object
    shm.set_shared_memory_region(handle, [np.arange(6, dtype=np.float32)], offset=4096)
    with Holds(registry) as holds:
        array = holds.read("INPUT0", "FP32", [2, 3], "meanwhile", 0, 24)
        target = holds.output("OUTPUT0", "meanwhile", 0, 24)
        os.truncate("/dev/shm/" + key.lstrip("/"), 0)  # the client shrinks it while the model computes
        print("sum", float(array.sum()))  # read through the mapping, this is a SIGBUS
        try:
            target.write("OUTPUT0", array)
        except InvalidInput as exc:
            print("refused", exc)
finally:
    registry.close()
    shm.destroy_shared_memory_region(handle)
"""


def test_a_region_truncated_while_a_request_holds_it_costs_that_request_only() -> None:
    """The client owns the object and may truncate it at any time. An input is read from the
    region by pread (one copy), and an output written by pwrite, so that a truncation while
    the model computes fails that request (INVALID_ARGUMENT) instead of a SIGBUS that would end
    the process and every request in it. In a subprocess, so that a regression fails the test
    rather than the test run."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", TRUNCATED_MEANWHILE, new_key()], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    assert lines[0] == "sum 15.0"
    assert lines[1].startswith("refused output 'OUTPUT0': shared memory region 'meanwhile' was truncated"), lines


def test_mixed_shared_and_raw_tensors_with_offsets(side: Side) -> None:
    """INPUT0 from a region registered at a non-page offset, INPUT1 as raw/binary data; SUM into
    a region at a tensor offset, DIFF back in the response."""
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 10, np.float32)
    base = side.region("mixed_in", 100 + a.nbytes + 8, offset=100)
    shm.set_shared_memory_region(base, [a], offset=100 + 8)
    out = side.region("mixed_out", 4096)
    second = side.mod.InferInput("INPUT1", [2, 4], "FP32")
    second.set_data_from_numpy(b)
    result = side.client.infer(
        "addsub",
        [shm_input(side, "INPUT0", [2, 4], "FP32", "mixed_in", a.nbytes, offset=8), second],
        outputs=[shm_output(side, "SUM", "mixed_out", a.nbytes, offset=1000), side.mod.InferRequestedOutput("DIFF")],
    )
    np.testing.assert_array_equal(result.as_numpy("DIFF"), a - b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out, np.float32, [2, 4], offset=1000), a + b)


def test_status_register_unregister_all(side: Side) -> None:
    side.region("first", 64)
    side.region("second", 4096, offset=512)
    status = side.client.get_system_shared_memory_status()
    if side.protocol == "grpc":
        regions = {name: (r.key, r.offset, r.byte_size) for name, r in status.regions.items()}
    else:
        regions = {r["name"]: (r["key"], r["offset"], r["byte_size"]) for r in status}
    assert regions == {"first": (side.handles[0].key, 0, 64), "second": (side.handles[1].key, 512, 3584)}
    one = side.client.get_system_shared_memory_status("second")
    assert len(one.regions if side.protocol == "grpc" else one) == 1
    side.client.unregister_system_shared_memory("first")
    side.client.unregister_system_shared_memory("never_registered")  # no error, as in Triton
    side.expect("NOT_FOUND", lambda: side.client.get_system_shared_memory_status("first"), "first")
    side.client.unregister_system_shared_memory()  # every region
    status = side.client.get_system_shared_memory_status()
    assert len(status.regions if side.protocol == "grpc" else status) == 0


# --- refusals -------------------------------------------------------------------------------------


def test_registration_refusals(side: Side) -> None:
    region = side.region("taken", 256)
    register = side.client.register_system_shared_memory
    side.expect("ALREADY_EXISTS", lambda: register("taken", region.key, 256), "taken", "already registered")
    side.expect("INVALID_ARGUMENT", lambda: register("nokey", "/modelhub_no_such_object", 16), "nokey", "no shared")
    side.expect("INVALID_ARGUMENT", lambda: register("big", region.key, 257), "big", "larger than")
    side.expect("INVALID_ARGUMENT", lambda: register("big", region.key, 200, offset=100), "big", "larger than")
    side.expect("INVALID_ARGUMENT", lambda: register("empty", region.key, 0), "byte_size must be positive")
    for key in ("../etc/passwd", "/a/b", "", "/", "x" * 300):
        side.expect("INVALID_ARGUMENT", lambda k=key: register("bad", k, 8), "key must name")  # type: ignore[misc]


def test_symlinks_and_non_files_are_refused(side: Side, tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 64)
    link = Path("/dev/shm") / f"modelhub_link_{os.getpid()}_{side.protocol}"
    link.symlink_to(target)
    try:
        side.expect(
            "INVALID_ARGUMENT", lambda: side.client.register_system_shared_memory("link", "/" + link.name, 8), "link"
        )
    finally:
        link.unlink()


def test_inference_refusals(side: Side, shm_server: RunningServer) -> None:
    x = sample("FP32")
    side.region("r24", x.nbytes)
    side.region("small_out", 8)
    model = "identity_fp32"

    def infer(size: int = x.nbytes, offset: int = 0, region: str = "r24", outputs: list[Any] | None = None) -> Any:
        return side.client.infer(
            model, [shm_input(side, "INPUT0", [2, 3], "FP32", region, size, offset)], outputs=outputs
        )

    side.expect("INVALID_ARGUMENT", lambda: infer(size=20), "needs 24 bytes")
    side.expect("INVALID_ARGUMENT", lambda: infer(size=28), "runs past")
    side.expect("INVALID_ARGUMENT", lambda: infer(offset=4), "runs past")
    side.expect("INVALID_ARGUMENT", lambda: infer(offset=24), "outside the region")
    side.expect("INVALID_ARGUMENT", lambda: infer(offset=1 << 62), "outside the region")
    side.expect("INVALID_ARGUMENT", lambda: infer(region="nowhere"), "'nowhere' is not registered")
    side.expect("INVALID_ARGUMENT", lambda: infer(size=24 + (1 << 40)), "runs past")
    side.expect(
        "INVALID_ARGUMENT",
        lambda: infer(outputs=[shm_output(side, "OUTPUT0", "small_out", 8)]),
        "output 'OUTPUT0' needs 24 bytes",
        "'small_out' is 8 bytes",
    )
    side.expect("INVALID_ARGUMENT", lambda: infer(outputs=[shm_output(side, "OUTPUT0", "small_out", 16)]), "runs past")
    if not side.workers:
        registry = shm_server.server.shared_memory  # type: ignore[union-attr]
        assert all(r.users == 0 for r in registry.regions())  # refused requests hold nothing


def test_incomplete_parameters_on_the_wire(shm_server: RunningServer) -> None:
    """What tritonclient never sends: a region without a byte size, a byte size of the wrong
    type, shared memory together with contents."""
    key = new_key()
    handle = shm.create_shared_memory_region("wire", key, 24)
    client = tc.InferenceServerClient(shm_server.url)
    client.register_system_shared_memory("wire", key, 24)
    try:
        with grpc.insecure_channel(shm_server.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            cases = {
                "needs both": {"shared_memory_region": service_pb2.InferParameter(string_param="wire")},
                "must be an int64_param": {
                    "shared_memory_region": service_pb2.InferParameter(string_param="wire"),
                    "shared_memory_byte_size": service_pb2.InferParameter(string_param="24"),
                },
                "without shared_memory_region": {"shared_memory_offset": service_pb2.InferParameter(int64_param=0)},
            }
            for fragment, parameters in cases.items():
                tensor = service_pb2.ModelInferRequest.InferInputTensor(
                    name="INPUT0", datatype="FP32", shape=[2, 3], parameters=parameters
                )
                request = service_pb2.ModelInferRequest(model_name="identity_fp32", inputs=[tensor])
                with pytest.raises(grpc.RpcError) as err:
                    stub.ModelInfer(request, timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()
            both = service_pb2.ModelInferRequest.InferInputTensor(
                name="INPUT0",
                datatype="FP32",
                shape=[2, 3],
                parameters={
                    "shared_memory_region": service_pb2.InferParameter(string_param="wire"),
                    "shared_memory_byte_size": service_pb2.InferParameter(int64_param=24),
                },
                contents=service_pb2.InferTensorContents(fp32_contents=[0] * 6),
            )
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(service_pb2.ModelInferRequest(model_name="identity_fp32", inputs=[both]), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "also has contents" in err.value.details()
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)


def test_json_types_on_the_rest_wire(shm_server: RunningServer) -> None:
    """What tritonclient.http never sends but curl can: negative, fractional, boolean, string and
    oversized numbers in a registration body and in a tensor's parameters are INVALID_ARGUMENT
    (400) naming the field, and nothing is registered or read."""
    from .test_rest import call

    key = new_key()
    handle = shm.create_shared_memory_region("json", key, 64)
    shm.set_shared_memory_region(handle, [np.arange(6, dtype=np.float32)])
    url, registry = shm_server.http_url, shm_server.server.shared_memory  # type: ignore[union-attr]

    def register(body: dict[str, Any], name: str = "json") -> tuple[int, Any]:
        return call(url, f"/v2/systemsharedmemory/region/{name}/register", json.dumps(body).encode())

    try:
        for field, value, fragment in [
            ("offset", -1, "'offset' must be a non-negative integer"),
            ("byte_size", -64, "'byte_size' must be a non-negative integer"),
            ("byte_size", 24.0, "'byte_size' must be a non-negative integer"),
            ("byte_size", True, "'byte_size' must be a non-negative integer"),
            ("byte_size", "24", "'byte_size' must be a non-negative integer"),
            ("byte_size", 1 << 64, "out of range"),
            ("offset", 10**30, "out of range"),
            ("key", 7, "'key' must be a string"),
        ]:
            status, reply = register({"key": key, "byte_size": 24, field: value})
            assert status == 400 and fragment in reply["error"], (field, value, reply)
            assert key.lstrip("/") not in reply["error"]
        status, reply = register({"key": key, "byte_size": 24}, name="n" * 300)
        assert status == 400 and "longer than 256 characters" in reply["error"], reply
        assert registry.regions() == []
        assert register({"key": key, "byte_size": 24}) == (200, None)

        def infer(parameters: dict[str, Any]) -> tuple[int, Any]:
            tensor = {"name": "INPUT0", "datatype": "FP32", "shape": [2, 3], "parameters": parameters}
            return call(url, "/v2/models/identity_fp32/infer", json.dumps({"inputs": [tensor]}).encode())

        good = {"shared_memory_region": "json", "shared_memory_byte_size": 24}
        for field, value, fragment in [
            ("shared_memory_offset", -4, "shared_memory_offset must be a non-negative integer"),
            ("shared_memory_offset", 0.0, "shared_memory_offset must be a non-negative integer"),
            ("shared_memory_byte_size", -24, "shared_memory_byte_size must be a non-negative integer"),
            ("shared_memory_byte_size", False, "shared_memory_byte_size must be a non-negative integer"),
            ("shared_memory_byte_size", 24 + (1 << 64), "runs past"),
            ("shared_memory_offset", 10**30, "outside the region"),
            ("shared_memory_region", 3, "shared_memory_region must be a string"),
        ]:
            status, reply = infer({**good, field: value})
            assert status == 400 and fragment in reply["error"], (field, value, reply)
        status, reply = infer(good)
        assert status == 200 and reply["outputs"][0]["data"] == list(range(6)), reply
        assert all(r.users == 0 for r in registry.regions())
    finally:
        call(url, "/v2/systemsharedmemory/unregister", b"")
        shm.destroy_shared_memory_region(handle)


def test_the_region_limit(side: Side, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_REGIONS (1,024; 3 here) a registration is RESOURCE_EXHAUSTED; unregistering makes room."""
    from hub.shm import regions

    if side.workers:
        pytest.skip("MAX_REGIONS is patched in this process; behind --workers the registry lives in another")
    monkeypatch.setattr(regions, "MAX_REGIONS", 3)
    handle = side.region("limit_0", 64)
    for index in (1, 2):
        side.client.register_system_shared_memory(f"limit_{index}", handle.key, 64)
    register = side.client.register_system_shared_memory
    side.expect("RESOURCE_EXHAUSTED", lambda: register("limit_3", handle.key, 64), "unregister some first")
    side.client.unregister_system_shared_memory("limit_1")
    register("limit_3", handle.key, 64)


def test_regions_leave_file_descriptors_to_the_rest_of_the_server(model_repository: Path, tmp_path: Path) -> None:
    """Each region holds two file descriptors, so under an open-file limit of 256 a server takes
    64 regions (a quarter of it), saying why, and still accepts connections and loads models.
    It took regions until the descriptors ran out (at about 120 here, the 500th under the usual
    1,024): then a new connection, a model load or a region's open failed, whoever asked."""
    plugins = link_plugins(tmp_path / "plugins", TEST_PLUGINS / "identity.py")
    server = Workers(plugins, model_repository, tmp_path, 1, "--model-control", "--shared-memory", "system",
                     open_files=256)  # fmt: skip
    key = new_key()
    handle = shm.create_shared_memory_region("fds", key, 64)
    try:
        client = tc.InferenceServerClient(server.url)
        registered = 0
        with pytest.raises(InferenceServerException) as refused:
            while registered < 256:
                client.register_system_shared_memory(f"fds_{registered}", key, 64)
                registered += 1
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED", refused.value.message()
        assert registered == 64 and "open-file limit of 256" in refused.value.message()
        # What needs descriptors still gets them: new connections on both protocols, a load.
        clients = [tc.InferenceServerClient(server.url) for _ in range(16)]
        assert all(c.is_server_ready() for c in clients)
        assert all(th.InferenceServerClient(server.http_url).is_server_ready() for _ in range(16))
        client.unload_model("identity_fp32")
        client.load_model("identity_fp32")
        tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_shared_memory("fds_0", 16)
        assert client.infer("identity_fp32", [tensor]).as_numpy("OUTPUT0").shape == (1, 4)
        client.unregister_system_shared_memory()
    finally:
        shm.destroy_shared_memory_region(handle)
        assert server.stop() == 0, server.output()


def test_a_region_larger_than_the_address_space_is_a_limit_not_a_crash(side: Side) -> None:
    """A sparse object costs the client nothing at any size, but the server maps what it
    registers: 2^48 bytes is past the 2^47 of a process's address space (what mmap hands out
    without a hint, even with 5-level paging). The registration is RESOURCE_EXHAUSTED naming
    byte_size, as any limit the server reaches, where it was UNKNOWN with the OSError's text
    (gRPC) or a 500 (REST), and a traceback in the log for each."""
    handle = side.region("vast", 64, register=False)
    os.truncate(Path("/dev/shm") / handle.key.lstrip("/"), 1 << 48)
    register = side.client.register_system_shared_memory
    side.expect("RESOURCE_EXHAUSTED", lambda: register("vast", handle.key, 1 << 48), "'vast'", f"byte_size {1 << 48}")
    register("vast", handle.key, 64)  # the object itself is fine, and nothing was left behind
    assert side.client.get_system_shared_memory_status("vast")


def test_a_key_naming_a_hand_off_arena_is_refused(side: Side) -> None:
    """The arenas of --workers N have names in /dev/shm while a frontend and the model process
    shake hands; a client that registered one then kept a mapping of every tensor through that
    frontend. A key of their form is refused, whether or not such an object exists (this one
    stands in for an arena caught in its handshake; no server here has its pid)."""
    name = f"modelhub-handoff-{os.getpid()}-{os.getpid()}-{900000 + next(_keys)}"
    path = Path("/dev/shm") / name
    path.write_bytes(b"\0" * 4096)
    try:
        register = side.client.register_system_shared_memory
        for key in (name, f"/{name}"):
            side.expect("INVALID_ARGUMENT", partial(register, "arena", key, 4096), "'arena'", "hand-off arenas")
    finally:
        path.unlink()


def test_a_truncated_object_is_refused_not_a_crash(side: Side) -> None:
    handle = side.region("shrinks", 4096)
    os.truncate(Path("/dev/shm") / handle.key.lstrip("/"), 16)
    tensor = shm_input(side, "INPUT0", [2, 3], "FP32", "shrinks", 24)
    side.expect("INVALID_ARGUMENT", lambda: side.client.infer("identity_fp32", [tensor]), "truncated")
    assert side.client.is_server_live()


def test_classification_and_shared_memory_cannot_combine(side: Side) -> None:
    side.region("cls", 64)
    if side.protocol == "http":
        return  # tritonclient.http builds the request, and the server refuses it the same way
    output = side.mod.InferRequestedOutput("SUM", class_count=2)
    output._output.parameters["shared_memory_region"].string_param = "cls"
    output._output.parameters["shared_memory_byte_size"].int64_param = 64
    tensors = [side.mod.InferInput(n, [1, 4], "FP32") for n in ("INPUT0", "INPUT1")]
    for t in tensors:
        t.set_data_from_numpy(np.ones((1, 4), np.float32))
    side.expect(
        "INVALID_ARGUMENT", lambda: side.client.infer("addsub", tensors, outputs=[output]), "cannot be combined"
    )


# --- lifetime -------------------------------------------------------------------------------------


def unregister_while_pending(server: RunningServer, protocol: str, unregister: Any) -> dict[str, Any]:
    """Start a "sleepy" request whose input and output lie in the registered regions
    "pending_in" and "pending_out" (4 bytes each), call `unregister()` (every region) while it
    runs, and wait for its answer; the regions as the registry held them, once their last
    holder has let them go. Shared by the system and the CUDA (tests/cuda_double) tests."""
    registry = server.server.shared_memory  # type: ignore[union-attr]
    regions = {r.name: r for r in registry.regions()}
    outcome: dict[str, Any] = {}

    def call() -> None:
        mod: Any = tc if protocol == "grpc" else th
        client = mod.InferenceServerClient(server.url if protocol == "grpc" else server.http_url)
        tensor = mod.InferInput("INPUT0", [1, 1], "FP32")  # (tritonclient.http's client stays in its thread)
        tensor.set_shared_memory("pending_in", 4)
        output = mod.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory("pending_out", 4)
        try:
            outcome["result"] = client.infer("sleepy", [tensor], outputs=[output])
        except Exception as exc:
            outcome["error"] = exc
        client.close()

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 5
    while regions["pending_in"].users == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert regions["pending_in"].users >= 1
    unregister()
    assert registry.regions() == [] and not regions["pending_in"].closed
    thread.join(10)
    assert "result" in outcome, outcome
    deadline = time.monotonic() + 5  # (a tensor viewing a region goes with its batch's last reference)
    while not all(r.closed for r in regions.values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return regions


def test_unregister_while_a_request_is_pending(local_side: Side, shm_server: RunningServer) -> None:
    """The request holds its regions: it is answered correctly, and the last holder unmaps them."""
    value = np.full((1, 1), 3.0, np.float32)
    handle = local_side.region("pending_in", 4)
    out = local_side.region("pending_out", 4)
    shm.set_shared_memory_region(handle, [value])
    regions = unregister_while_pending(
        shm_server, local_side.protocol, local_side.client.unregister_system_shared_memory
    )
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out, np.float32, [1, 1]), value * 2)
    assert regions["pending_in"].closed and regions["pending_out"].closed


def test_stopping_the_server_releases_every_region(start_server: Any, tmp_path: Path) -> None:
    server = start_server(
        link_plugins(tmp_path / "p", TEST_PLUGINS / "identity.py"),
        metrics_port=None,
        shared_memory=frozenset({"system"}),
    )
    side = Side("grpc", server)
    side.region("kept", 64)
    region = server.server.shared_memory.regions()[0]  # type: ignore[union-attr]
    server.run(server.server.stop(0))  # type: ignore[union-attr]
    assert region.closed
    shm.destroy_shared_memory_region(side.handles[0])


# --- switches and tokens --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_off_by_default(hub_server: RunningServer, protocol: str) -> None:
    side = Side(protocol, hub_server)
    key = new_key()
    handle = shm.create_shared_memory_region("off", key, 24)
    handle.key = key
    side.handles.append(handle)
    try:
        for call in (
            lambda: side.client.register_system_shared_memory("off", key, 24),
            lambda: side.client.get_system_shared_memory_status(),
            lambda: side.client.unregister_system_shared_memory(),
            lambda: side.client.infer("identity_fp32", [shm_input(side, "INPUT0", [2, 3], "FP32", "off", 24)]),
        ):
            side.expect("UNIMPLEMENTED", call, "--shared-memory system", "MODELHUB_SHARED_MEMORY")
        side.expect("UNIMPLEMENTED", lambda: side.client.get_cuda_shared_memory_status(), "--shared-memory cuda")
        # The extension being off is said first, not what is wrong with the handle (not base64).
        not_base64 = b"%%" if protocol == "grpc" else "%%"
        side.expect(
            "UNIMPLEMENTED",
            lambda: side.client.register_cuda_shared_memory("gpu", not_base64, 0, 64),
            "--shared-memory cuda",
        )
        metadata = side.client.get_server_metadata()
        extensions = metadata.extensions if protocol == "grpc" else metadata["extensions"]
        assert "system_shared_memory" not in extensions
    finally:
        shm.destroy_shared_memory_region(handle)


def test_extensions_and_cuda_on_a_cpu_server(side: Side) -> None:
    metadata = side.client.get_server_metadata()
    extensions = list(metadata.extensions if side.protocol == "grpc" else metadata["extensions"])
    assert "system_shared_memory" in extensions and "cuda_shared_memory" not in extensions
    handle = base64.b64encode(bytes(64))  # what tritonclient.utils.cuda_shared_memory.get_raw_handle gives
    side.expect(
        "UNAVAILABLE",
        lambda: side.client.register_cuda_shared_memory(
            "gpu", handle if side.protocol == "grpc" else handle.decode(), 0, 64
        ),
        "CUDA device",
    )
    side.expect("UNAVAILABLE", lambda: side.client.get_cuda_shared_memory_status(), "CUDA device")
    side.expect("UNAVAILABLE", lambda: side.client.unregister_cuda_shared_memory("gpu"), "CUDA device")
    side.client.unregister_cuda_shared_memory()  # all of none: OK, as perf_analyzer needs when it ends


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_registration_takes_the_model_control_token(start_server: Any, tmp_path: Path, protocol: str) -> None:
    server = start_server(
        link_plugins(tmp_path / "p", TEST_PLUGINS / "identity.py"),
        metrics_port=None,
        shared_memory=frozenset({"system"}),
        auth_token="infer-token",
        model_control_token="control-token",
    )
    grpc_headers = {"authorization": "Bearer infer-token"}
    inference = Side(protocol, server)
    control = Side(protocol, server)
    key = new_key()
    handle = shm.create_shared_memory_region("guarded", key, 24)
    handle.key = key
    inference.handles.append(handle)
    headers = {"authorization": "Bearer infer-token"}
    control_headers = {"authorization": "Bearer control-token"}
    register = inference.client.register_system_shared_memory
    inference.expect("UNAUTHENTICATED", lambda: register("guarded", key, 24, headers=headers), "--model-control-token")
    control.client.register_system_shared_memory("guarded", key, 24, headers=control_headers)
    status = inference.client.get_system_shared_memory_status(headers=grpc_headers)
    assert len(status.regions if protocol == "grpc" else status) == 1
    inference.expect(
        "UNAUTHENTICATED",
        lambda: inference.client.unregister_system_shared_memory("guarded", headers=headers),
        "--model-control-token",
    )
    control.client.unregister_system_shared_memory("guarded", headers=control_headers)
    shm.destroy_shared_memory_region(handle)


# --- fuzz -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_region(shm_server: RunningServer) -> Iterator[tuple[Any, tc.InferenceServerClient]]:
    key = new_key()
    handle = shm.create_shared_memory_region("fuzz_object", key, 8192)
    shm.set_shared_memory_region(handle, [np.arange(2048, dtype=np.float32)])
    client = tc.InferenceServerClient(shm_server.url)
    handle.key = key
    yield handle, client
    client.unregister_system_shared_memory()
    shm.destroy_shared_memory_region(handle)


_sizes = st.one_of(st.integers(0, 9000), st.sampled_from([1 << 31, (1 << 63) - 1, 4095, 4096, 4097]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    registered=st.tuples(st.integers(0, 8300), _sizes),
    tensor=st.tuples(_sizes, _sizes),
    rows=st.integers(1, 4),
)
def test_fuzz_offsets_and_sizes(
    fuzz_region: tuple[Any, tc.InferenceServerClient], registered: tuple[int, int], tensor: tuple[int, int], rows: int
) -> None:
    """Any registered extent and any tensor extent: either the right values or INVALID_ARGUMENT,
    never a read outside the object, and the server stays up."""
    handle, client = fuzz_region
    reg_offset, reg_size = registered
    try:
        client.register_system_shared_memory("fuzz", handle.key, reg_size, offset=reg_offset)
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.INVALID_ARGUMENT", exc.message()
        assert reg_size == 0 or reg_offset + reg_size > 8192
        return
    try:
        offset, size = tensor
        shape = [rows, 3]
        inputs = [tc.InferInput("INPUT0", shape, "FP32")]
        inputs[0].set_shared_memory("fuzz", size, offset)
        try:
            result = client.infer("identity_fp32", inputs)
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.INVALID_ARGUMENT", exc.message()
            assert size != rows * 12 or offset + size > reg_size or offset >= reg_size
            return
        assert size == rows * 12 and offset + size <= reg_size
        start = (reg_offset + offset) // 4
        expected = np.arange(2048, dtype=np.float32).view(np.uint8)[reg_offset + offset : reg_offset + offset + size]
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0").view(np.uint8).reshape(-1), expected)
        assert start >= 0
    finally:
        client.unregister_system_shared_memory("fuzz")


def _mapped_by(pid: int, key: str) -> bool:
    return f"/dev/shm/{key.lstrip('/')}" in Path(f"/proc/{pid}/maps").read_text()


def test_workers_share_one_registry_and_the_model_process_maps_the_regions(shm_workers: Workers) -> None:
    """--workers 2: a region registered through one connection is usable by the next request
    on any frontend, and status and unregister agree everywhere. A large tensor in a region is
    read, and its output written, by the model process from its own mapping of the region."""
    shape = [1, 64 << 10]  # 256 KiB of FP32, past the hand-off's inline threshold
    size = 4 * shape[1]
    key_in, key_out = new_key(), new_key()
    handle_in = shm.create_shared_memory_region("w_in", key_in, size)
    handle_out = shm.create_shared_memory_region("w_out", key_out, size)
    grpcs = [tc.InferenceServerClient(shm_workers.url) for _ in range(8)]  # the kernel spreads them
    rests = [th.InferenceServerClient(shm_workers.http_url) for _ in range(2)]
    engine = shm_workers.children("engine")[0]
    try:
        grpcs[0].register_system_shared_memory("w_in", key_in, size)
        rests[0].register_system_shared_memory("w_out", key_out, size)
        assert _mapped_by(engine, key_in) and _mapped_by(engine, key_out)
        for index, client in enumerate([*grpcs, *rests]):
            mod: Any = tc if isinstance(client, tc.InferenceServerClient) else th
            values = np.random.default_rng(index).standard_normal(shape).astype(np.float32)
            shm.set_shared_memory_region(handle_in, [values])
            tensor = mod.InferInput("INPUT0", shape, "FP32")
            tensor.set_shared_memory("w_in", size)
            output = mod.InferRequestedOutput("OUTPUT0")
            output.set_shared_memory("w_out", size)
            client.infer("identity_fp32", [tensor], outputs=[output])
            np.testing.assert_array_equal(shm.get_contents_as_numpy(handle_out, np.float32, shape), values)
            status = client.get_system_shared_memory_status()
            names = set(status.regions) if mod is tc else {r["name"] for r in status}
            assert names == {"w_in", "w_out"}
        rests[1].unregister_system_shared_memory("w_in")
        for client in grpcs:
            with pytest.raises(InferenceServerException) as err:
                client.get_system_shared_memory_status("w_in")
            assert err.value.status() == "StatusCode.NOT_FOUND"
            tensor = tc.InferInput("INPUT0", shape, "FP32")
            tensor.set_shared_memory("w_in", size)
            with pytest.raises(InferenceServerException, match="'w_in' is not registered"):
                client.infer("identity_fp32", [tensor])
        assert not _mapped_by(engine, key_in) and _mapped_by(engine, key_out)
        grpcs[3].unregister_system_shared_memory()
        assert not _mapped_by(engine, key_out)
        assert all(len(c.get_system_shared_memory_status().regions) == 0 for c in grpcs)
    finally:
        grpcs[0].unregister_system_shared_memory()
        for handle in (handle_in, handle_out):
            shm.destroy_shared_memory_region(handle)
        for client in [*grpcs, *rests]:
            client.close()
