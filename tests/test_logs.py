"""An export and an int8 quantisation print only our lines: torch.onnx's "torchvision is not
installed" warnings and ONNX Runtime's quantizer chatter come out under our logger at DEBUG."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from hub import logs

from .conftest import ROOT, RunningServer, Workers, link_plugins


@pytest.fixture(scope="module")
def build_logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """stderr of one real `modelhub build digits --target onnx-int8-dynamic` (the dynamic
    quantiser is the one that prints per tensor), at info and at debug level."""
    plugins = link_plugins(tmp_path_factory.mktemp("log-plugins"), ROOT / "plugins" / "digits")
    out = {}
    for level in ("info", "debug"):
        command = [
            sys.executable,
            "-m",
            "hub.cli",
            "--log-level",
            level,
            "build",
            "digits",
            "--target",
            "onnx-int8-dynamic",
        ]
        command += ["--no-measure", "--no-entry-points", "--device", "cpu", "--threads", "1", "--force"]
        command += ["--plugins-dir", str(plugins), "--model-repository", str(tmp_path_factory.mktemp("log-models"))]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        out[level] = result.stderr
    return out


def test_export_and_quantisation_print_only_our_lines(build_logs: dict[str, str]) -> None:
    stderr = build_logs["info"]
    assert "built target 'onnx-int8-dynamic'" in stderr
    assert "torchvision" not in stderr
    assert " root:" not in stderr and "Quantization parameters" not in stderr


def test_the_chatter_is_kept_at_debug_under_our_logger(build_logs: dict[str, str]) -> None:
    lines = build_logs["debug"].splitlines()
    torchvision = [line for line in lines if "torchvision is not installed" in line]
    assert len(torchvision) >= 4
    assert all("DEBUG   modelhub.build.libraries:" in line for line in torchvision)
    quantizer = [line for line in lines if "Quantization parameters for tensor" in line]
    assert quantizer and all("DEBUG   modelhub.build.libraries:" in line for line in quantizer)
    assert not [line for line in lines if " root:" in line]


def test_tame_libraries_is_idempotent_and_leaves_other_records(caplog: pytest.LogCaptureFixture) -> None:
    logs.tame_libraries()
    logs.tame_libraries()
    registration = logging.getLogger(logs.TORCH_ONNX_REGISTRATION)
    assert sum(isinstance(f, logs.Demote) for f in registration.filters) == 1
    assert sum(isinstance(f, logs.Demote) for f in logging.getLogger().filters) == 1
    with caplog.at_level(logging.DEBUG):
        registration.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        registration.warning("a real problem")
        logging.getLogger().warning("someone else's root warning")
    seen = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert ("modelhub.build.libraries", "DEBUG", "torchvision is not installed. Skipping torchvision::nms") in seen
    assert (logs.TORCH_ONNX_REGISTRATION, "WARNING", "a real problem") in seen
    assert ("root", "WARNING", "someone else's root warning") in seen
    assert len(seen) == 3


def test_a_named_process_is_in_every_line_in_either_format() -> None:
    """With --workers N each process names itself (`name_process`): in brackets in the text
    format, in a "process" field in JSON, and still after a client switches the format."""
    handler = logs.ServerLogHandler("info", "text")
    record = logging.LogRecord("modelhub.frontend", logging.INFO, __file__, 1, "lost the %s", ("model process",), None)
    assert "] " not in handler.format(record)
    handler.process = "frontend 1"
    handler.set_format("text")
    assert handler.format(record).endswith(" INFO    [frontend 1] modelhub.frontend: lost the model process")
    handler.set_format("json")
    entry = json.loads(handler.format(record))
    assert entry["process"] == "frontend 1" and entry["msg"] == "lost the model process"
    assert list(entry)[:4] == ["ts", "level", "process", "logger"]
    assert "process" not in json.loads(logs.ServerLogHandler("info", "json").format(record))
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    try:
        logs.name_process("model process")
        assert json.loads(handler.format(record))["process"] == "model process"
        handler.set_format("text")  # as a client's log_format does (LogSettings.apply)
        assert "[model process] modelhub.frontend:" in handler.format(record)
    finally:
        root.handlers[:] = saved


# --- the log of --workers N ------------------------------------------------------------------

#: A line of the text log of a process of --workers N: level, process, logger, message.
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+) +\[([^]]+)\] (\S+): (.*)$")
PROCESSES = {"supervisor", "model process", "frontend 0", "frontend 1"}


def _log_lines(server: Workers, log_format: str) -> list[tuple[str, str, str]]:
    """(process, logger, message) of every line of the server's log, each of which must name
    its process."""
    lines = []
    for line in server.whole_log().splitlines():
        if log_format == "json":
            entry = json.loads(line)
            lines.append((entry.get("process"), entry["logger"], entry["msg"]))
        elif line[:1].isdigit():  # (a traceback's lines continue the one before)
            match = TEXT_LINE.match(line)
            assert match is not None, line
            lines.append((match[2], match[3], match[4]))
    assert lines and {process for process, _, _ in lines} <= PROCESSES, {process for process, _, _ in lines}
    return lines


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_log_names_each_process_and_the_server_listens_in_one_line(tmp_path: Path, log_format: str) -> None:
    """Every child used to log "modelhub listening" and "security:" of its own (the model
    process "grpc off, http off"; each frontend "metrics off ... models none"), again at each
    restart, and nothing told whose line was whose. Now each line names its process (a field
    in JSON), the supervisor writes the server's two lines once, with the real ports, workers
    and models, and a stop says who asked for it."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    env = {"MODELHUB_LOG_FORMAT": log_format}
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--model-copies", "none", env=env)
    try:
        server.kill_frontend()  # a restarted frontend says what it is again, not what the server is
        deadline = time.monotonic() + 60
        while server.logged("frontend listening") < 3:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
    finally:
        assert server.stop() == 0, server.output()
    lines = _log_lines(server, log_format)
    assert {process for process, _, _ in lines} == PROCESSES
    listening = [(p, m) for p, _, m in lines if m.startswith("modelhub listening")]
    assert len(listening) == 1 and listening[0][0] == "supervisor", listening
    ports = server.ports
    for part in (
        f"grpc 127.0.0.1:{ports['grpc']} (aio)",
        f"http 127.0.0.1:{ports['http']}",
        f"metrics 127.0.0.1:{ports['metrics']} (loopback only",
        "2 frontends (pids ",
        "device cpu",
        "identity_fp32/1",
    ):
        assert part in listening[0][1], (part, listening)
    assert [p for p, _, m in lines if m.startswith("security: ")] == ["supervisor"]
    said = {(p, m.split(":")[0]) for p, _, m in lines}
    assert ("model process", "model process started") in said
    restarted = Counter(p for p, _, m in lines if m.startswith("frontend listening"))
    assert sorted(restarted.values()) == [1, 2], restarted  # the frontend killed and restarted: twice
    # SIGTERM to the supervisor: it says so, the frontends drain, the model process is stopped.
    assert ("supervisor", "SIGTERM received") in said
    assert {p for p, _, m in lines if m.startswith("SIGTERM received: draining")} == {"frontend 0", "frontend 1"}
    assert ("model process", "stop requested by the supervisor (SIGUSR1)") in said
    assert not [m for _, _, m in lines if "SIGUSR1 received" in m]


# --- Triton's logging extension (`/v2/logging`, the LogSettings RPC) ---------------------------

DEFAULTS = {
    "log_file": "",
    "log_info": True,
    "log_warning": True,
    "log_error": True,
    "log_verbose_level": 0,
    "log_format": "text",
}


def _grpc_settings(client: Any) -> dict[str, Any]:
    """tritonclient.grpc's answer, as the REST one reads."""
    settings = client.get_log_settings(as_json=True)["settings"]
    return {name: next(iter(value.values())) for name, value in settings.items()}


def _access_lines(server: Workers, clients: list[Any]) -> int:
    """How many access-log lines one request over each client adds (every request is logged:
    --log-requests 1). The frontends write the server's log; give them a moment."""
    before = server.logged("modelhub.access")
    for client in clients:
        tensor = tc.InferInput("INPUT0", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
        client.infer("identity_fp32", [tensor])
    time.sleep(0.5)
    return server.logged("modelhub.access") - before


def _connections(server: Workers, n: int) -> list[Any]:
    """n clients, each on its own connection (SO_REUSEPORT spreads them over the frontends)."""
    own = [("grpc.use_local_subchannel_pool", 1)]
    return [tc.InferenceServerClient(server.url, channel_args=own) for _ in range(n)]


def test_log_settings_over_both_protocols(tmp_path: Path) -> None:
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    server = Workers(plugins, tmp_path / "models", tmp_path, 1, "--log-requests", "1", "--model-control")
    try:
        grpc_client = tc.InferenceServerClient(server.url)
        http_client = th.InferenceServerClient(server.http_url)
        assert "logging" in grpc_client.get_server_metadata(as_json=True)["extensions"]
        assert "logging" in http_client.get_server_metadata()["extensions"]
        assert _grpc_settings(grpc_client) == http_client.get_log_settings() == DEFAULTS
        assert _access_lines(server, [grpc_client]) == 1
        # Off over gRPC: the info lines stop (the access log is at INFO), and both protocols say so.
        changed = grpc_client.update_log_settings({"log_info": False, "log_verbose_level": 3}, as_json=True)
        assert {k: next(iter(v.values())) for k, v in changed["settings"].items()} == {
            **DEFAULTS,
            "log_info": False,
            "log_verbose_level": 3,
        }
        assert http_client.get_log_settings()["log_info"] is False
        assert _access_lines(server, [grpc_client]) == 0
        # Back on over REST, and JSON lines from now on.
        assert http_client.update_log_settings({"log_info": True, "log_verbose_level": 0, "log_format": "json"}) == {
            **DEFAULTS,
            "log_format": "json",
        }
        assert _access_lines(server, [grpc_client]) == 1
        assert '"logger": "modelhub.access"' in server.output()
        assert "log settings changed" in server.output()
        # Refused, naming the setting, and nothing of the request applied.
        refusals = [
            ({"log_file": "/root/.bashrc"}, "CVE-2024-0087"),
            ({"log_info": "yes", "log_error": False}, "log_info must be true or false"),
            ({"log_verbose": 1}, "unknown log setting 'log_verbose'"),
            ({"log_format": "ISO8601"}, "log_format must be one of text, json"),
            ({"log_verbose_level": 2**32}, "log_verbose_level must be an integer"),
        ]
        for settings, fragment in refusals:
            with pytest.raises(InferenceServerException) as caught:
                http_client.update_log_settings(settings)
            assert caught.value.status() == "400" and fragment in caught.value.message(), caught.value
        grpc_refusals = [
            ({"log_file": "/tmp/x"}, "log_file cannot be set"),
            ({"log_info": None}, "log setting 'log_info' has no value"),  # sent with no value set
            ({"log_format": "xml"}, "log_format must be one of text, json"),
            ({"log_levels": True}, "unknown log setting 'log_levels'"),
        ]
        for settings, fragment in grpc_refusals:
            with pytest.raises(InferenceServerException) as caught:
                grpc_client.update_log_settings(settings)
            assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
            assert fragment in caught.value.message(), caught.value
        assert http_client.get_log_settings() == {**DEFAULTS, "log_format": "json"}
    finally:
        assert server.stop() == 0, server.output()


def test_log_and_trace_settings_reach_every_process(tmp_path: Path) -> None:
    """With --workers 2 a change made over one connection is the setting of every frontend and
    of the model process, and a frontend restarted later takes it from the model process."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--log-requests", "1", "--model-control")
    try:
        http_client = th.InferenceServerClient(server.http_url)
        assert _access_lines(server, _connections(server, 8)) == 8
        assert http_client.update_log_settings({"log_info": False})["log_info"] is False
        assert all(_grpc_settings(c)["log_info"] is False for c in _connections(server, 8))
        assert _access_lines(server, _connections(server, 8)) == 0
        assert server.logged("log settings changed") == 1  # said once, by the model process
        server.kill_frontend()
        deadline = time.monotonic() + 120
        clients = _connections(server, 8)
        while not all(c.is_server_ready() for c in clients):
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.2)
        assert all(_grpc_settings(c)["log_info"] is False for c in _connections(server, 8))
        assert _access_lines(server, _connections(server, 8)) == 0
        # Tracing every request, set over one connection: every frontend traces (a trace line
        # is at info, so info lines go back on first), and trace_count is the whole server's.
        http_client.update_log_settings({"log_info": True})
        http_client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
        clients = _connections(server, 8)
        assert all(
            c.get_trace_settings(as_json=True)["settings"]["trace_level"]["value"] == ["TIMESTAMPS"] for c in clients
        )
        before = server.logged("modelhub.trace")
        _access_lines(server, clients)
        assert server.logged("modelhub.trace") - before == 8
        http_client.update_trace_settings(settings={"trace_count": "3"})
        before = server.logged("modelhub.trace")
        _access_lines(server, _connections(server, 8))
        assert server.logged("modelhub.trace") - before == 3
        counts = {c.get_trace_settings(as_json=True)["settings"]["trace_count"]["value"][0] for c in clients}
        assert counts == {"0"}
    finally:
        assert server.stop() == 0, server.output()


def _traces(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "modelhub.trace"]


def test_trace_settings_and_traces(start_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Triton's trace extension over both protocols: sampling by rate and count, a model's own
    settings over the global ones, and each sampled request's timestamps in the log."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    server = start_server(plugins, model_repository=tmp_path / "models", model_control=True)
    grpc_client = tc.InferenceServerClient(server.url)
    http_client = th.InferenceServerClient(server.http_url)
    assert "trace" in http_client.get_server_metadata()["extensions"]
    defaults = {
        "trace_file": "",
        "trace_level": ["OFF"],
        "trace_rate": "1000",
        "trace_count": "-1",
        "log_frequency": "0",
        "trace_mode": "triton",
    }
    assert http_client.get_trace_settings() == defaults
    as_grpc = grpc_client.get_trace_settings(as_json=True)["settings"]
    assert {k: v["value"] for k, v in as_grpc.items()} == {
        k: v if isinstance(v, list) else [v] for k, v in defaults.items()
    }

    def infer(model: str, request_id: str) -> None:
        datatype = model.rpartition("_")[2].upper()  # identity_fp32, identity_int8
        tensor = tc.InferInput("INPUT0", [1, 1], datatype)
        tensor.set_data_from_numpy(np.ones((1, 1), {"FP32": np.float32, "INT8": np.int8}[datatype]))
        grpc_client.infer(model, [tensor], request_id=request_id)

    caplog.set_level(logging.INFO, logger="modelhub.trace")
    # Every second request, three at most.
    changed = http_client.update_trace_settings(
        settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "2", "trace_count": "3"}
    )
    assert changed == {**defaults, "trace_level": ["TIMESTAMPS"], "trace_rate": "2", "trace_count": "3"}
    for i in range(10):
        infer("identity_fp32", f"r{i}")
    traces = _traces(caplog)
    assert [t["request_id"] for t in traces] == ["r1", "r3", "r5"]
    names = [s["name"] for s in traces[0]["timestamps"]]
    assert names == [
        "REQUEST_START",
        "QUEUE_START",
        "COMPUTE_START",
        "COMPUTE_INPUT_END",
        "COMPUTE_OUTPUT_START",
        "COMPUTE_END",
        "REQUEST_END",
    ]
    for trace in traces:
        stamps = [s["ns"] for s in trace["timestamps"]]
        assert stamps[0] <= stamps[1] <= stamps[2] <= stamps[3] <= stamps[4] <= stamps[5] <= stamps[6], trace
        assert (trace["model_name"], trace["model_version"]) == ("identity_fp32", 1)
    assert http_client.get_trace_settings()["trace_count"] == "0"  # what is left, as Triton reports it
    # A model's own settings (over gRPC), then cleared: it follows the global ones again.
    caplog.clear()
    grpc_client.update_trace_settings(model_name="identity_int8", settings={"trace_rate": "1", "trace_count": "2"})
    assert http_client.get_trace_settings(model_name="identity_int8")["trace_rate"] == "1"
    assert http_client.get_trace_settings(model_name="identity_fp32")["trace_rate"] == "2"
    for i in range(4):
        infer("identity_int8", f"m{i}")
    assert [t["request_id"] for t in _traces(caplog)] == ["m0", "m1"]
    cleared = grpc_client.update_trace_settings(model_name="identity_int8", settings={"trace_rate": None}, as_json=True)
    assert cleared["settings"]["trace_rate"]["value"] == ["2"]
    # Refused, naming the setting; an unknown model is NOT_FOUND.
    refusals = [
        ({"trace_file": "/root/trace.json"}, "trace_file cannot be set"),
        ({"trace_level": ["TENSORS"]}, "TENSORS is not offered"),
        ({"trace_rate": "0"}, "trace_rate must be one integer of at least 1"),
        ({"trace_count": "many"}, "trace_count must be one integer"),
        ({"trace_count": "--5"}, "trace_count must be one integer"),
        ({"trace_rate": "9" * 5000}, "trace_rate must be one integer"),
        ({"trace_mode": "opentelemetry"}, "opentelemetry mode is not offered"),
        ({"trace_levels": ["OFF"]}, "unknown trace setting 'trace_levels'"),
        ({"trace_rate": ["1"] * 9}, "trace_rate has 9 values; a trace setting takes at most 8"),
    ]
    for settings, fragment in refusals:
        with pytest.raises(InferenceServerException) as caught:
            http_client.update_trace_settings(settings=settings)
        assert caught.value.status() == "400" and fragment in caught.value.message(), caught.value
        with pytest.raises(InferenceServerException) as caught:
            grpc_client.update_trace_settings(settings=settings)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and fragment in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.get_trace_settings(model_name="nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    # Off again: nothing more is traced.
    http_client.update_trace_settings(settings={"trace_level": ["OFF"]})
    caplog.clear()
    infer("identity_fp32", "after")
    assert _traces(caplog) == []


def test_changing_trace_settings_is_model_control(hub_server: RunningServer) -> None:
    client = th.InferenceServerClient(hub_server.http_url)
    assert client.get_trace_settings()["trace_level"] == ["OFF"]
    with pytest.raises(InferenceServerException) as caught:
        client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    assert caught.value.status() == "403" and "--model-control" in caught.value.message()
    grpc_client = tc.InferenceServerClient(hub_server.url)
    assert grpc_client.get_trace_settings(as_json=True)["settings"]["trace_level"]["value"] == ["OFF"]
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    assert caught.value.status() == "StatusCode.PERMISSION_DENIED" and "--model-control" in caught.value.message()


def test_changing_log_settings_is_model_control(tmp_path: Path) -> None:
    """Off unless --model-control, as load and unload: reading them stays open."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    server = Workers(plugins, tmp_path / "models", tmp_path, 1)
    try:
        grpc_client = tc.InferenceServerClient(server.url)
        http_client = th.InferenceServerClient(server.http_url)
        assert _grpc_settings(grpc_client) == http_client.get_log_settings() == DEFAULTS
        with pytest.raises(InferenceServerException) as caught:
            grpc_client.update_log_settings({"log_error": False})
        assert caught.value.status() == "StatusCode.PERMISSION_DENIED" and "--model-control" in caught.value.message()
        with pytest.raises(InferenceServerException) as caught:
            http_client.update_log_settings({"log_error": False})
        assert caught.value.status() == "403" and "--model-control" in caught.value.message()
        assert http_client.get_log_settings() == DEFAULTS
    finally:
        assert server.stop() == 0, server.output()


def test_log_settings_are_unimplemented_where_the_log_is_the_embedders(hub_server: RunningServer) -> None:
    """A Server run inside another program (here, pytest) leaves its log to that program."""
    client = tc.InferenceServerClient(hub_server.url)
    assert "logging" not in client.get_server_metadata(as_json=True)["extensions"]
    with pytest.raises(InferenceServerException) as caught:
        client.get_log_settings()
    assert caught.value.status() == "StatusCode.UNIMPLEMENTED" and "embedder" in caught.value.message()
