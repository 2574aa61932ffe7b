"""The client commands as a user runs them, each in a subprocess, against a real server with
mutual TLS and a token: infer, models --url, health and top all take --tls-ca/--tls-cert/--tls-key
(or MODELHUB_<COMMAND>_TLS_*) and --token (or MODELHUB_AUTH_TOKEN), and flags that cannot work
are one line naming the flag and exit 2, never grpc's abort or a traceback. Also: `serve
--model-control-token` with nothing for it to guard is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hub.security import TlsConfig
from tests.conftest import ROOT, TEST_PLUGINS, RunningServer, link_plugins
from tests.pki import make_pki

TOKEN = "s3cret-cli-token"
COMMANDS = ("infer", "models", "health", "top")


def modelhub(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`modelhub ARGS` with none of this environment's MODELHUB_* variables but `env`."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("MODELHUB_")}
    return subprocess.run(
        [sys.executable, "-m", "hub.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**clean, **(env or {})},
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_pki(tmp_path_factory.mktemp("cli-pki"))
    (folder / "garbage.pem").write_text("not a certificate\n")
    return folder


@pytest.fixture(scope="module")
def server(start_server: Any, tmp_path_factory: pytest.TempPathFactory, pki: Path) -> RunningServer:
    """Mutual TLS on every port, a token for everything but health, /metrics included."""
    plugins = link_plugins(tmp_path_factory.mktemp("cli-tls-plugins"), TEST_PLUGINS / "identity.py")
    tls = TlsConfig(pki / "server.pem", pki / "server.key", client_ca=pki / "ca.pem")
    started: RunningServer = start_server(plugins, tls=tls, auth_token=TOKEN, metrics_auth=True)
    return started


@pytest.fixture(scope="module")
def npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-tls-input") / "x.npy"
    np.save(path, np.arange(6, dtype=np.float32).reshape(2, 3))
    return path


def command(name: str, server: RunningServer, npy: Path) -> list[str]:
    """`modelhub NAME` pointed at `server`, without TLS flags or token."""
    assert server.server is not None
    return {
        "infer": ["infer", "identity_fp32", "--input", f"INPUT0={npy}", "--url", server.url, "--timeout", "10"],
        "models": ["models", "--url", server.url],
        "health": ["health", "--url", server.url, "--service", "identity_fp32", "--timeout", "10"],
        "top": ["top", "--once", "--interval", "0", "--metrics-url", f"https://127.0.0.1:{server.server.metrics_port}/metrics"],
    }[name]  # fmt: skip


def served(name: str, result: subprocess.CompletedProcess[str]) -> None:
    """What `modelhub NAME` prints when it reached the server, and was let in."""
    assert result.returncode == 0, result.stderr
    if name == "infer":
        assert "OUTPUT0 FP32 [2, 3]" in result.stdout
    elif name == "models":
        (row,) = [line for line in result.stdout.splitlines() if line.startswith("identity_fp32 ")]
        assert " READY " in row, row
    elif name == "health":  # the model's state comes from RepositoryIndex, which needs the token
        assert result.stdout.splitlines() == ["SERVING", "  model 'identity_fp32' version 1: READY"]
    else:
        assert "identity_fp32" in result.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_every_client_command_takes_the_tls_flags_and_the_token(
    server: RunningServer, pki: Path, npy: Path, name: str
) -> None:
    flags = [
        "--tls-ca",
        str(pki / "ca.pem"),
        "--tls-cert",
        str(pki / "client.pem"),
        "--tls-key",
        str(pki / "client.key"),
    ]
    served(name, modelhub(*command(name, server, npy), *flags, "--token", TOKEN))


@pytest.mark.parametrize("name", COMMANDS)
def test_every_client_command_reads_its_variables(server: RunningServer, pki: Path, npy: Path, name: str) -> None:
    """MODELHUB_<COMMAND>_TLS_* (the server's own MODELHUB_TLS_* are its certificate) and the
    server's MODELHUB_AUTH_TOKEN."""
    prefix = f"MODELHUB_{name.upper()}_TLS"
    env = {
        f"{prefix}_CA": str(pki / "ca.pem"),
        f"{prefix}_CERT": str(pki / "client.pem"),
        f"{prefix}_KEY": str(pki / "client.key"),
        "MODELHUB_AUTH_TOKEN": TOKEN,
    }
    served(name, modelhub(*command(name, server, npy), env=env))


def _refused(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """One line on stderr naming what is wrong, exit 2: no grpc abort, log noise or traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(result.stderr.splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert result.stdout == ""


BAD_FLAGS = {
    "key without cert": (["--tls-ca", "{ca}", "--tls-key", "{key}"], {}, ["--tls-key needs --tls-cert"]),
    "cert without key": (["--tls-ca", "{ca}", "--tls-cert", "{cert}"], {}, ["--tls-cert needs --tls-key"]),
    "cert without ca": (["--tls-cert", "{cert}", "--tls-key", "{key}"], {}, ["--tls-cert needs --tls-ca"]),
    "missing ca": (["--tls-ca", "/nonexistent/ca.pem"], {}, ["cannot read --tls-ca /nonexistent/ca.pem"]),
    "missing ca from the variable": (
        [],
        {"MODELHUB_{COMMAND}_TLS_CA": "/nonexistent/ca.pem"},
        ["cannot read --tls-ca (env MODELHUB_{COMMAND}_TLS_CA) /nonexistent/ca.pem"],
    ),
    "garbage ca": (["--tls-ca", "{garbage}"], {}, ["--tls-ca", "cannot be used as the CA", "no PEM certificate"]),
    "key of another certificate": (
        ["--tls-ca", "{ca}", "--tls-cert", "{cert}", "--tls-key", "{server_key}"],
        {},
        ["is not the private key of --tls-cert"],
    ),
    "garbage key": (
        ["--tls-ca", "{ca}", "--tls-cert", "{cert}", "--tls-key", "{garbage}"],
        {},
        ["--tls-key", "holds no PEM private key"],
    ),
}


@pytest.mark.parametrize(
    ("name", "case"),
    [("health", case) for case in BAD_FLAGS]
    + [(name, case) for name in ("infer", "models", "top") for case in ("cert without key", "missing ca")],
)
def test_tls_flags_that_cannot_work_are_one_line_naming_the_flag(
    server: RunningServer, pki: Path, npy: Path, name: str, case: str
) -> None:
    flags, env, fragments = BAD_FLAGS[case]
    files = {
        "ca": pki / "ca.pem",
        "cert": pki / "client.pem",
        "key": pki / "client.key",
        "server_key": pki / "server.key",
        "garbage": pki / "garbage.pem",
    }
    args = [flag.format(**files) for flag in flags]
    variables = {key.format(COMMAND=name.upper()): value for key, value in env.items()}
    result = modelhub(*command(name, server, npy), *args, env=variables)  # refused before it connects
    _refused(result, f"modelhub {name}: ", *(fragment.format(COMMAND=name.upper()) for fragment in fragments))


def test_top_refuses_tls_flags_for_a_plain_http_url(pki: Path) -> None:
    result = modelhub("top", "--once", "--metrics-url", "http://127.0.0.1:1/metrics", "--tls-ca", str(pki / "ca.pem"))
    _refused(result, "--tls-ca is for an https:// --metrics-url")


def test_top_over_https_without_the_ca_says_to_pass_it(server: RunningServer, npy: Path) -> None:
    result = modelhub(*command("top", server, npy), "--token", TOKEN)
    assert result.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr and "--tls-ca" in result.stderr, result.stderr


def test_models_refuses_tls_flags_without_url(pki: Path, tmp_path: Path) -> None:
    result = modelhub("models", "--plugins-dir", str(tmp_path), "--no-entry-points", "--tls-ca", str(pki / "ca.pem"))
    _refused(result, "--tls-ca is for --url")


def test_serve_refuses_a_model_control_token_with_nothing_to_guard(tmp_path: Path) -> None:
    """Without --model-control, --watch or --shared-memory there is no endpoint the token would
    guard: refused, as --metrics-auth without --auth-token is, rather than a silent no-op."""
    serve = ["serve", "--plugins-dir", str(tmp_path), "--model-repository", str(tmp_path / "models"),
             "--no-entry-points", "--device", "cpu", "--threads", "1", "--host", "127.0.0.1",
             "--grpc-port", "0", "--http-port", "0", "--metrics-port", "off"]  # fmt: skip
    try:
        result = modelhub(*serve, "--model-control-token", "ctl-token", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("serve started with a --model-control-token that guards nothing")
    assert result.returncode == 1, result.stderr
    assert "--model-control-token has no effect without --model-control, --watch or --shared-memory" in result.stderr
    assert "ctl-token" not in result.stderr
