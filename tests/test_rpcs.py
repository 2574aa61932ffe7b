"""Every implemented RPC through tritonclient, health per model, reflection, and UNIMPLEMENTED."""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from .conftest import RunningServer


@pytest.fixture()
def client(hub_server: RunningServer) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(hub_server.url)


def test_live_and_ready(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "7")
    assert not client.is_model_ready("no_such_model")


def test_server_metadata(client: tc.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "modelhub"
    assert meta.version
    assert set(meta.extensions) == {"classification", "model_configuration", "model_repository", "statistics", "trace"}


def test_model_metadata_has_batch_dimension(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("digits", as_json=True)
    assert meta["name"] == "digits"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]


def test_model_metadata_without_batching(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("nobatch", as_json=True)
    assert meta["inputs"][0]["shape"] == ["2", "3"]
    config = client.get_model_config("nobatch", as_json=True)["config"]
    assert config.get("max_batch_size", 0) == 0
    assert config["input"][0]["dims"] == ["2", "3"]
    assert "dynamic_batching" not in config


def test_model_config(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("digits", as_json=True)["config"]
    assert config["name"] == "digits"
    assert config["max_batch_size"] == 64
    assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": ["1", "8", "8"]}]
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": ["10"]}]
    assert "dynamic_batching" in config
    assert config["instance_group"][0]["count"] == 1
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    # The parity report of the build is exposed.
    params = config["parameters"]
    assert float(params["parity_max_abs_err"]["string_value"]) < 1e-3
    assert params["state"]["string_value"] == "ready"


def test_model_config_bytes_is_type_string(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("identity_bytes", as_json=True)["config"]
    assert config["input"][0]["data_type"] == "TYPE_STRING"


def test_statistics_shapes(client: tc.InferenceServerClient) -> None:
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {s["name"] for s in everything} >= {"digits", "addsub", "identity_fp32"}
    one = client.get_inference_statistics("digits", "1", as_json=True)["model_stats"]
    assert [(s["name"], s["version"]) for s in one] == [("digits", "1")]
    with pytest.raises(InferenceServerException) as err:
        client.get_inference_statistics("no_such_model")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_repository_index(client: tc.InferenceServerClient, hub_server: RunningServer) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    by_name = {m["name"]: m for m in index}
    assert by_name["digits"]["state"] == "READY"
    assert by_name["digits"]["version"] == "1"
    with grpc.insecure_channel(hub_server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready_only = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=5).models
    assert ready_only and all(m.state == "READY" for m in ready_only)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_model_metadata("no_such_model"),
        lambda c: c.get_model_config("no_such_model"),
        lambda c: c.get_model_metadata("digits", "9"),
        lambda c: c.get_model_config("digits", "latest"),
    ],
)
def test_unknown_model_is_not_found(client: tc.InferenceServerClient, call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as err:
        call(client)
    assert err.value.status() == "StatusCode.NOT_FOUND"


#: Off unless --shared-memory (tests/test_shared_memory.py has them on): UNIMPLEMENTED, saying so.
SHARED_MEMORY_OFF = {
    "SystemSharedMemoryStatus": (service_pb2.SystemSharedMemoryStatusRequest(), "--shared-memory system"),
    "SystemSharedMemoryRegister": (service_pb2.SystemSharedMemoryRegisterRequest(name="r"), "--shared-memory system"),
    "SystemSharedMemoryUnregister": (service_pb2.SystemSharedMemoryUnregisterRequest(name="r"), "--shared-memory"),
    "CudaSharedMemoryStatus": (service_pb2.CudaSharedMemoryStatusRequest(), "--shared-memory cuda"),
    "CudaSharedMemoryRegister": (service_pb2.CudaSharedMemoryRegisterRequest(name="r"), "--shared-memory cuda"),
    "CudaSharedMemoryUnregister": (service_pb2.CudaSharedMemoryUnregisterRequest(name="r"), "--shared-memory cuda"),
}


@pytest.mark.parametrize("method", sorted(SHARED_MEMORY_OFF))
def test_shared_memory_rpcs_are_off_by_default(hub_server: RunningServer, method: str) -> None:
    request, flag = SHARED_MEMORY_OFF[method]
    with grpc.insecure_channel(hub_server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, method)(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert flag in err.value.details() and "off on this server" in err.value.details()


def test_health_overall_and_per_model(hub_server: RunningServer) -> None:
    with grpc.insecure_channel(hub_server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == serving
        assert stub.Check(health_pb2.HealthCheckRequest(service="digits"), timeout=5).status == serving
        assert stub.Check(health_pb2.HealthCheckRequest(service="addsub"), timeout=5).status == serving
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(hub_server: RunningServer) -> None:
    with grpc.insecure_channel(hub_server.url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        # grpcurl's describe: the file that defines the service resolves, with its dependency.
        replies = list(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")])
            )
        )
        assert replies[0].file_descriptor_response.file_descriptor_proto
