"""Secure defaults: model control off unless asked for, Triton's `config`/`file:` load
overrides refused, and loopback binding unless asked for."""

from __future__ import annotations

import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from hub.cli import build_parser
from hub.server import ServerConfig

from .conftest import RunningServer


def test_model_control_is_off_by_default_on_both_frontends(hub_server: RunningServer) -> None:
    grpc_client = tc.InferenceServerClient(hub_server.url)
    http_client = th.InferenceServerClient(hub_server.http_url)
    for call in (lambda: grpc_client.load_model("digits"), lambda: grpc_client.unload_model("digits")):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "--model-control" in err.value.message()
    for call in (lambda: http_client.load_model("digits"), lambda: http_client.unload_model("digits")):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert str(err.value.status()) == "403" and "--model-control" in err.value.message()
    assert grpc_client.is_model_ready("digits")  # nothing was unloaded


@pytest.mark.parametrize("override", ["config", "file:1/model.onnx"])
def test_load_overrides_are_refused_naming_the_parameter(hub_server: RunningServer, override: str) -> None:
    client = tc.InferenceServerClient(hub_server.url)
    with pytest.raises(InferenceServerException) as err:
        if override == "config":
            client.load_model("digits", config="{}")
        else:
            client.load_model("digits", files={override: b"\0"})
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"'{override}'" in err.value.message()


def test_a_bare_serve_binds_loopback() -> None:
    assert ServerConfig().host == "127.0.0.1"
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert build_parser().parse_args(["serve"]).model_control is False
