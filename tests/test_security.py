"""Secure defaults, TLS and tokens, through the real server with tritonclient: model control
off unless asked for, loopback by default, bearer tokens (health stays open), TLS and
mutual TLS on gRPC and REST, and the metrics port's token or host."""

from __future__ import annotations

import asyncio
import logging
import threading
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from hub.cli import build_parser, cmd_health, cmd_infer, cmd_serve, cmd_top
from hub.security import TlsConfig
from hub.server import Server, ServerConfig, describe_bind
from tests.conftest import TEST_PLUGINS, RunningServer, link_plugins
from tests.pki import make_pki

TOKEN = "s3cret-inference"
CONTROL_TOKEN = "s3cret-control"
BEARER = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return link_plugins(tmp_path_factory.mktemp("plugins"), TEST_PLUGINS / "identity.py")


def _grpc_infer(client: grpcclient.InferenceServerClient, **kwargs: Any) -> np.ndarray:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    infer_input = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    infer_input.set_data_from_numpy(data)
    result = client.infer("identity_fp32", [infer_input], **kwargs)
    return result.as_numpy("OUTPUT0")


def _http_infer(client: httpclient.InferenceServerClient, **kwargs: Any) -> np.ndarray:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    infer_input = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
    infer_input.set_data_from_numpy(data)
    result = client.infer("identity_fp32", [infer_input], **kwargs)
    return result.as_numpy("OUTPUT0")


EXPECTED = np.arange(6, dtype=np.float32).reshape(2, 3)


# --- defaults -----------------------------------------------------------------------------------


def test_defaults_bind_loopback_without_model_control() -> None:
    config = ServerConfig()
    assert config.host == "127.0.0.1" and not config.control_enabled and not config.tokens.required
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and not args.model_control and args.auth_token is None
    assert describe_bind("127.0.0.1") == "loopback only (127.0.0.1)"
    assert describe_bind("0.0.0.0") == "all interfaces (0.0.0.0)"
    assert ServerConfig(watch=2.0).control_enabled


def test_model_control_is_off_by_default(start_server: Any, plugins: Path) -> None:
    server = start_server(plugins)
    grpc_client = grpcclient.InferenceServerClient(server.url)
    for call in (grpc_client.load_model, grpc_client.unload_model):
        with pytest.raises(InferenceServerException) as caught:
            call("identity_fp32")
        assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "--model-control" in caught.value.message()
    http_client = httpclient.InferenceServerClient(server.http_url)
    for call in (http_client.load_model, http_client.unload_model):
        with pytest.raises(InferenceServerException) as caught:
            call("identity_fp32")
        assert caught.value.status() == "403"
        assert "--model-control" in caught.value.message()
    assert server.model("identity_fp32").ready  # the refused unload changed nothing
    np.testing.assert_array_equal(_grpc_infer(grpc_client), EXPECTED)


def test_start_up_log_names_the_interfaces(start_server: Any, plugins: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="modelhub.server"):
        start_server(plugins, grpc_port=None, metrics_port=None)
    assert "(loopback only (127.0.0.1))" in caplog.text
    assert "security: tls off, auth token off" in caplog.text and "model control off" in caplog.text


# --- tokens -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(start_server: Any, plugins: Path) -> RunningServer:
    server: RunningServer = start_server(
        plugins, auth_token=TOKEN, model_control=True, model_control_token=CONTROL_TOKEN, metrics_auth=True
    )
    return server


def test_grpc_inference_and_metadata_need_the_token(guarded: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(guarded.url)
    for headers in (None, {"authorization": "Bearer wrong-token-value"}, {"authorization": TOKEN}):
        for call in (partial(_grpc_infer, client, headers=headers), partial(client.get_server_metadata, headers)):
            with pytest.raises(InferenceServerException) as caught:
                call()
            assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
            assert "--auth-token" in caught.value.message()
            assert "wrong-token-value" not in caught.value.message()
    np.testing.assert_array_equal(_grpc_infer(client, headers=BEARER), EXPECTED)
    assert client.get_model_metadata("identity_fp32", headers=BEARER).name == "identity_fp32"
    # the control token is not the inference token
    with pytest.raises(InferenceServerException, match="--auth-token"):
        _grpc_infer(client, headers={"authorization": f"Bearer {CONTROL_TOKEN}"})


def test_grpc_stream_needs_the_token(guarded: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(guarded.url)
    errors: list[Any] = []
    refused = threading.Event()
    data = np.ones((1, 3), np.float32)
    infer_input = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
    infer_input.set_data_from_numpy(data)

    def on_error(result: Any, error: Any) -> None:
        errors.append(error)
        refused.set()

    client.start_stream(callback=on_error)
    try:
        client.async_stream_infer("identity_fp32", [infer_input])
    except InferenceServerException:
        pass  # the stream may already be over: the refusal comes through the callback
    assert refused.wait(10)
    client.stop_stream()
    assert "UNAUTHENTICATED" in str(errors[0]) and "--auth-token" in str(errors[0])
    answers: list[Any] = []
    answered = threading.Event()

    def on_answer(result: Any, error: Any) -> None:
        answers.append(error or result)
        answered.set()

    client.start_stream(callback=on_answer, headers=BEARER)
    client.async_stream_infer("identity_fp32", [infer_input])
    assert answered.wait(10)
    client.stop_stream()
    np.testing.assert_array_equal(answers[0].as_numpy("OUTPUT0"), data)


def test_grpc_health_stays_open(guarded: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(guarded.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("identity_fp32")
    with grpc.insecure_channel(guarded.url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_model_control_needs_its_own_token(guarded: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(guarded.url)
    for headers in (None, BEARER):
        for call in (partial(client.unload_model, "identity_fp32"), client.get_log_settings, client.get_trace_settings):
            with pytest.raises(InferenceServerException) as caught:
                call(headers=headers)
            assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
            assert "--model-control-token" in caught.value.message()
    control = {"authorization": f"Bearer {CONTROL_TOKEN}"}
    client.unload_model("identity_fp32", headers=control)
    assert not client.is_model_ready("identity_fp32")
    client.load_model("identity_fp32", headers=control)
    assert client.is_model_ready("identity_fp32")


def test_rest_inference_needs_the_token_and_health_stays_open(guarded: RunningServer) -> None:
    client = httpclient.InferenceServerClient(guarded.http_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("identity_fp32")
    for headers in (None, {"Authorization": "Bearer wrong-token-value"}, {"Authorization": "Basic xyz"}):
        for call in (partial(_http_infer, client, headers=headers), partial(client.get_server_metadata, headers)):
            with pytest.raises(InferenceServerException) as caught:
                call()
            assert caught.value.status() == "401"
            assert "--auth-token" in caught.value.message()
            assert "wrong-token-value" not in caught.value.message()
    np.testing.assert_array_equal(_http_infer(client, headers={"Authorization": f"Bearer {TOKEN}"}), EXPECTED)
    for call in (partial(client.unload_model, "identity_fp32"), client.get_log_settings, client.get_trace_settings):
        with pytest.raises(InferenceServerException) as caught:
            call(headers={"Authorization": f"Bearer {TOKEN}"})
        assert caught.value.status() == "401" and "--model-control-token" in caught.value.message()
    client.load_model("identity_fp32", headers={"Authorization": f"Bearer {CONTROL_TOKEN}"})


@pytest.mark.parametrize(
    "path",
    [
        "/v2/repository/models/a%2Fb/load",
        "/v2/repository/models/a%2Fb/unload",
        "/v2/models/a%2Fb/trace/setting",
        "/v2/models/a%2Fb/versions/1%2F2/stats",  # an inference route: the inference token it is
    ],
)
def test_rest_token_follows_the_route_an_encoded_slash_takes(guarded: RunningServer, path: str) -> None:
    """The router matches with %2F encoded, so these reach load, unload and the trace settings
    with a name holding '/'; the token they need is that route's, not what the decoded path
    (one segment longer) looks like. Read as an inference path, the inference token let a
    client without the control token into load, which re-imports every plugin."""
    control = "stats" not in path
    url = f"http://{guarded.http_url}{path}"
    if control:  # a POST with the inference token
        request = urllib.request.Request(url, data=b"{}", headers={"Authorization": f"Bearer {TOKEN}"})
    else:  # a GET with no token at all
        request = urllib.request.Request(url)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 401
    assert ("--model-control-token" if control else "--auth-token") in caught.value.read().decode()


def test_rest_health_asked_with_another_method_is_405_without_a_token(guarded: RunningServer) -> None:
    """The catch-all route that answers an unknown method keeps its path's access: a POST to a
    health path is told 405 (Allow: GET, HEAD), as on a server without tokens, not 401."""
    request = urllib.request.Request(f"http://{guarded.http_url}/v2/health/ready", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 405 and caught.value.headers["Allow"] == "GET, HEAD"


def test_metrics_can_require_the_token(guarded: RunningServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(guarded.metrics_url, timeout=5)
    assert caught.value.code == 401
    request = urllib.request.Request(guarded.metrics_url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert b"modelhub_model_build_duration_seconds" in reply.read()


def test_the_cli_clients_send_the_token(
    guarded: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`modelhub infer` and `modelhub top` take --token, or the server's own MODELHUB_AUTH_TOKEN."""
    np.save(tmp_path / "x.npy", EXPECTED)
    infer = ["infer", "identity_fp32", "--input", f"INPUT0={tmp_path / 'x.npy'}", "--url", guarded.url]
    top = ["top", "--once", "--interval", "0", "--metrics-url", guarded.metrics_url]
    monkeypatch.delenv("MODELHUB_AUTH_TOKEN", raising=False)
    assert cmd_infer(build_parser().parse_args(infer)) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cmd_top(build_parser().parse_args(top)) == 1
    assert "401" in capsys.readouterr().err
    assert cmd_infer(build_parser().parse_args([*infer, "--token", TOKEN])) == 0
    assert "OUTPUT0 FP32 [2, 3]" in capsys.readouterr().out
    monkeypatch.setenv("MODELHUB_AUTH_TOKEN", TOKEN)
    assert cmd_infer(build_parser().parse_args(infer)) == 0
    assert cmd_top(build_parser().parse_args(top)) == 0
    assert "identity_fp32" in capsys.readouterr().out


def test_metrics_bind_their_own_host(start_server: Any, plugins: Path) -> None:
    server = start_server(plugins, host="0.0.0.0", metrics_host="127.0.0.1")
    assert server.server is not None and server.server._metrics_http is not None
    with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
        assert reply.status == 200


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        ({"metrics_auth": True}, "--auth-token"),
        ({"model_control_token": CONTROL_TOKEN}, "--model-control-token"),  # nothing for it to guard
        ({"auth_token": "has space"}, "--auth-token"),
        ({"tls": TlsConfig(Path("/nonexistent/server.pem"), Path("/nonexistent/server.key"))}, "--tls-cert"),
    ],
)
def test_bad_security_settings_are_refused_naming_the_flag(plugins: Path, settings: Any, flag: str) -> None:
    config = ServerConfig(plugins_dir=plugins, device="cpu", threads=1, grpc_port=0, http_port=0, **settings)
    with pytest.raises(ValueError, match=flag):
        asyncio.run(Server(config).start())  # refused before anything listens


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all made here."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_on_grpc_and_rest(start_server: Any, plugins: Path, pki: Path) -> None:
    server = start_server(plugins, tls=TlsConfig(pki / "server.pem", pki / "server.key"), metrics_port=None)
    ca = str(pki / "ca.pem")  # tritonclient takes file names
    secure = grpcclient.InferenceServerClient(server.url, ssl=True, root_certificates=ca)
    np.testing.assert_array_equal(_grpc_infer(secure), EXPECTED)
    http = httpclient.InferenceServerClient(server.http_url, ssl=True, ssl_options={"ca_certs": ca})
    np.testing.assert_array_equal(_http_infer(http), EXPECTED)
    assert http.is_server_ready()
    plain = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        plain.is_server_live(client_timeout=5)
    with pytest.raises(OSError):  # HTTP spoken to an HTTPS port: the server hangs up
        urllib.request.urlopen(f"http://{server.http_url}/v2/health/live", timeout=5)


def test_mutual_tls_refuses_a_client_without_a_certificate(start_server: Any, plugins: Path, pki: Path) -> None:
    tls = TlsConfig(pki / "server.pem", pki / "server.key", client_ca=pki / "ca.pem")
    server = start_server(plugins, tls=tls, metrics_port=None)
    ca = str(pki / "ca.pem")  # tritonclient takes file names
    anonymous = grpcclient.InferenceServerClient(server.url, ssl=True, root_certificates=ca)
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        anonymous.is_server_live(client_timeout=5)
    anonymous_http = httpclient.InferenceServerClient(
        server.http_url, ssl=True, ssl_options={"ca_certs": ca}, network_timeout=5
    )
    with pytest.raises(Exception) as refused:  # the handshake fails: ssl.SSLError or a reset, by timing
        anonymous_http.is_server_live()
    assert not isinstance(refused.value, AssertionError)
    client = grpcclient.InferenceServerClient(
        server.url,
        ssl=True,
        root_certificates=ca,
        private_key=str(pki / "client.key"),
        certificate_chain=str(pki / "client.pem"),
    )
    np.testing.assert_array_equal(_grpc_infer(client), EXPECTED)
    http = httpclient.InferenceServerClient(
        server.http_url,
        ssl=True,
        ssl_options={
            "ca_certs": ca,
            "certfile": str(pki / "client.pem"),
            "keyfile": str(pki / "client.key"),
        },
    )
    np.testing.assert_array_equal(_http_infer(http), EXPECTED)
    # the exec probe for mutual TLS: `modelhub health` with a client certificate
    probe = ["health", "--url", server.url, "--tls-ca", ca, "--timeout", "5"]
    assert cmd_health(build_parser().parse_args(probe)) == 1  # no client certificate: refused
    with_cert = [*probe, "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
    assert cmd_health(build_parser().parse_args(with_cert)) == 0


def test_security_flags_read_their_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in (
        ("AUTH_TOKEN", TOKEN),
        ("MODEL_CONTROL_TOKEN", CONTROL_TOKEN),
        ("MODEL_CONTROL", "1"),
        ("METRICS_AUTH", "true"),
        ("METRICS_HOST", "127.0.0.1"),
        ("TLS_CERT", str(tmp_path / "c.pem")),
        ("TLS_KEY", str(tmp_path / "k.pem")),
        ("TLS_CLIENT_CA", str(tmp_path / "ca.pem")),
    ):
        monkeypatch.setenv(f"MODELHUB_{name}", value)
    args = build_parser().parse_args(["serve"])
    assert (args.auth_token, args.model_control_token) == (TOKEN, CONTROL_TOKEN)
    assert args.model_control and args.metrics_auth and args.metrics_host == "127.0.0.1"
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (
        tmp_path / "c.pem",
        tmp_path / "k.pem",
        tmp_path / "ca.pem",
    )
    monkeypatch.setenv("MODELHUB_MODEL_CONTROL", "0")  # a 0 turns it off, not on
    assert not build_parser().parse_args(["serve"]).model_control


def test_serve_refuses_half_a_tls_configuration(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="modelhub.cli"):
        assert cmd_serve(build_parser().parse_args(["serve", "--tls-cert", str(tmp_path / "c.pem")])) == 2
    assert "--tls-key" in caplog.text
