"""The command line as a user runs it: serve in a subprocess, infer, health, models, clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import ROOT, TEST_PLUGINS, link_plugins


def modelhub(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hub.cli", *args], capture_output=True, text=True, **kwargs)


class ServeProcess:
    def __init__(self, *args: str, python: str = sys.executable, cwd: Path = ROOT) -> None:
        self.proc = subprocess.Popen(
            [
                python,
                "-m",
                "hub.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--metrics-port",
                "0",
                "--device",
                "cpu",
                "--no-entry-points",
                *args,
            ],
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
        self.log: list[str] = []
        self.port = 0
        deadline = time.monotonic() + 120
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            match = re.search(r"listening: grpc 127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
            if " ready in " in line or "failed to load" in line:
                return
        raise AssertionError("server did not come up:\n" + "".join(self.log))

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, signum: int | None = signal.SIGTERM) -> tuple[int, str]:
        """Send `signum` (None: it was sent already) and wait for the exit."""
        if signum is not None:
            self.proc.send_signal(signum)
        _, rest = self.proc.communicate(timeout=60)
        return self.proc.returncode, "".join(self.log) + rest


@pytest.fixture(scope="module")
def served(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    plugins = tmp_path_factory.mktemp("cli-plugins")
    (plugins / "digits").symlink_to(ROOT / "plugins" / "digits")
    server = ServeProcess("--plugins-dir", str(plugins), "--model-repository", str(model_repository))
    yield server
    if server.proc.poll() is None:
        server.stop(signal.SIGKILL)


def test_infer_command_prints_outputs(served: ServeProcess, tmp_path: Path, digits_heldout: Any) -> None:
    images, labels = digits_heldout
    np.save(tmp_path / "image.npy", images[:3])
    result = modelhub(
        "infer",
        "digits",
        "--input",
        f"image={tmp_path / 'image.npy'}",
        "--url",
        served.url,
        "--save",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    assert "logits FP32 [3, 10]" in result.stdout
    logits = np.load(tmp_path / "out" / "logits.npy")
    assert list(logits.argmax(1)) == list(labels[:3])


def test_infer_command_reports_errors(served: ServeProcess, tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((1, 8, 8), np.float32))
    result = modelhub("infer", "digits", "--input", f"image={tmp_path / 'bad.npy'}", "--url", served.url)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "image" in result.stderr


def test_infer_command_names_an_input_file_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hub.cli import build_parser, cmd_infer

    (tmp_path / "text.npy").write_text("not an array")
    for path in (tmp_path / "missing.npy", tmp_path / "text.npy"):
        assert cmd_infer(build_parser().parse_args(["infer", "digits", "--input", f"image={path}"])) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"--input image: cannot read '{path}'") and "Traceback" not in error


def test_infer_command_says_how_to_save_text_for_a_bytes_input(tmp_path: Path) -> None:
    """The README's BYTES array is dtype=object, which np.save pickles and infer will not load:
    the error says to save str or bytes (which the command sends as BYTES)."""
    np.save(tmp_path / "texts.npy", np.array([b"A man is playing a guitar."], dtype=object))
    result = modelhub("infer", "minilm", "--input", f"text={tmp_path / 'texts.npy'}", "--url", "127.0.0.1:1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "for a BYTES input save the text as str or bytes" in result.stderr, result.stderr


def test_health_command(served: ServeProcess) -> None:
    assert modelhub("health", "--url", served.url).stdout.strip() == "SERVING"
    assert modelhub("health", "--url", served.url, "--service", "digits").returncode == 0
    assert modelhub("health", "--url", served.url, "--service", "nothing").returncode == 1


def test_models_command(model_repository: Path, served: ServeProcess) -> None:
    result = modelhub(
        "models",
        "--plugins-dir",
        str(ROOT / "plugins"),
        "--no-entry-points",
        "--model-repository",
        str(model_repository),
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"digits\s+1\s+digits\s+onnx\s+64\s+ok", result.stdout), result.stdout


def test_help_documents_every_command() -> None:
    text = modelhub("--help").stdout
    for command in ("serve", "plugins", "models", "infer", "health"):
        assert command in text
    serve = modelhub("serve", "--help").stdout
    for flag in ("--plugins-dir", "--model-repository", "--grpc-port", "--metrics-port", "--device"):
        assert flag in serve


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly(model_repository: Path, tmp_path: Path, signum: int) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "digits").symlink_to(ROOT / "plugins" / "digits")
    server = ServeProcess("--plugins-dir", str(plugins), "--model-repository", str(model_repository))
    code, log = server.stop(signum)
    assert code == 0, log
    assert "Traceback" not in log
    assert "modelhub stopped" in log


def test_env_configures_serve_flags() -> None:
    env = dict(os.environ, MODELHUB_GRPC_PORT="9123", MODELHUB_DEVICE="cpu")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from hub.cli import build_parser; a = build_parser().parse_args(['serve']);print(a.grpc_port, a.device)",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert out.split() == ["9123", "cpu"]


def test_a_misspelt_config_key_names_the_key_it_meant(tmp_path: Path) -> None:
    """`serve --config` with a misspelt key listed the allowed keys and left the reader to find
    the one meant among nine; it says which, as a misspelt hook does."""
    (tmp_path / "plugins").mkdir()
    config = tmp_path / "deploy.toml"
    for text, expected in (
        ("[models.digits]\nmax_batch = 8\n", "unknown key(s) 'max_batch' (did you mean 'max_batch_size'?)"),
        ("[model.digits]\nmax_batch_size = 8\n", "unknown top-level key(s) 'model' (did you mean 'models'?)"),
    ):
        config.write_text(text)
        result = modelhub(
            "serve", "--config", str(config), "--plugins-dir", str(tmp_path / "plugins"), "--no-entry-points",
            "--grpc-port", "0", "--http-port", "0", "--metrics-port", "off", timeout=60,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr, result.stderr
    assert "allowed: ['instances', 'max_batch_size'," not in result.stderr  # a top-level key: not a model's


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("max_batch_size = 4611686018427387904", "batching.max_batch_size must be 0 to 2147483647"),
        ("max_batch_size = 8\nmax_queue_delay = nan", "batching.max_queue_delay must be 0 to "),
        ("max_batch_size = 8\ntimeout = inf", "batching.timeout must be over 0 and at most "),
        ("max_queue_size = 4611686018427387904", "batching.max_queue_size must be 0 to 4294967295"),
        ("instances = 1000000", "batching.instances must be 1 to 1024 (each is a compute thread)"),
    ],
)
def test_absurd_batching_values_are_refused_naming_the_key(tmp_path: Path, setting: str, expected: str) -> None:
    """A config file's batching values past what the server can honour stopped nothing: a
    million instances started a million threads (2.8 GB, never ready), a delay or timeout of
    nan or inf held every request of the model for good, and ModelConfig answered UNKNOWN on
    the values the server took. `serve` refuses them (exit 2), naming the model and the key."""
    plugins = link_plugins(tmp_path / "plugins", TEST_PLUGINS / "identity.py")
    config = tmp_path / "deploy.toml"
    config.write_text(f"[models.identity_fp32]\n{setting}\n")
    result = modelhub(
        "serve", "--config", str(config), "--plugins-dir", str(plugins), "--no-entry-points",
        "--model-repository", str(tmp_path / "models"), "--device", "cpu",
        "--grpc-port", "0", "--http-port", "0", "--metrics-port", "off", timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"config for model 'identity_fp32': {expected}" in result.stderr, result.stderr


def test_serve_starts_tasks_eagerly_where_python_can() -> None:
    """`modelhub serve`'s loop runs each new task's first step at once on 3.12+ (each RPC's
    handler a loop turn sooner); on 3.11 it is asyncio's plain loop."""
    import asyncio

    from hub.cli import _run

    started: list[str] = []

    async def main() -> int:
        async def step() -> None:
            started.append("task")

        task = asyncio.get_running_loop().create_task(step())
        started.append("create_task returned")
        await task
        return 0

    assert _run(main()) == 0
    if sys.version_info >= (3, 12):
        assert started == ["task", "create_task returned"]
    else:
        assert started == ["create_task returned", "task"]


def test_streams_under_load_leave_the_server_serving(model_repository: Path, tmp_path: Path) -> None:
    """Many short ModelStreamInfer streams at once through `modelhub serve`. A stream's answers
    can all finish in the loop turn in which its reader learns the stream has ended, before
    the callbacks that forget them run; a reader that waited for its answers in a loop (`while
    tasks: await gather(...)`) then never gave the loop a turn on Python 3.12, which completes
    a gather of done tasks without yielding, and the whole server hung at 100% CPU. Found by
    `make soak` on 3.12, where `modelhub serve` runs eager tasks and this happens within seconds;
    on 3.11 the same load passes either way."""
    import asyncio

    import grpc
    import tritonclient.grpc as tc
    from tritonclient.grpc import service_pb2

    plugins = link_plugins(tmp_path / "plugins", TEST_PLUGINS / "identity.py")
    server = ServeProcess("--plugins-dir", str(plugins), "--model-repository", str(model_repository))
    method = "/inference.GRPCInferenceService/ModelStreamInfer"

    def request(i: int) -> bytes:
        message = service_pb2.ModelInferRequest(model_name="identity_fp32", id=str(i))
        message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
        message.raw_input_contents.append(np.float32(i).tobytes())
        return message.SerializeToString()

    requests = [request(i) for i in range(8)]

    deadline = time.monotonic() + 120  # ServeProcess returns at the first model ready, not every one
    while not tc.InferenceServerClient(server.url).is_model_ready("identity_fp32") and time.monotonic() < deadline:
        time.sleep(0.1)

    async def load() -> int:
        async with grpc.aio.insecure_channel(server.url) as channel:
            stream = channel.stream_stream(method, request_serializer=None, response_deserializer=None)

            async def client() -> int:
                streams = 0
                for _ in range(25):
                    answers = [
                        service_pb2.ModelStreamInferResponse.FromString(raw)
                        async for raw in stream(iter(requests), timeout=20)
                    ]
                    assert sorted(int(a.infer_response.id) for a in answers) == list(range(8))
                    assert not any(a.error_message for a in answers), [a.error_message for a in answers][:3]
                    streams += 1
                return streams

            return sum(await asyncio.gather(*(client() for _ in range(16))))

    try:
        assert asyncio.run(load()) == 400
        code, log = server.stop()
        assert code == 0, log[-3000:]
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)


def test_adaptive_delay_default_follows_the_grpc_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 ms under grpc.aio, off under the thread-pool server (its handler threads would pay a
    switch per waiting request); the flag and MODELHUB_ADAPTIVE_DELAY_US win over both."""
    from hub.cli import build_parser
    from hub.server import ServerConfig

    assert ServerConfig().adaptive_seconds == 0.002
    assert ServerConfig(grpc_server="threads").adaptive_seconds == 0.0
    assert ServerConfig(grpc_server="threads", adaptive_delay=0.001).adaptive_seconds == 0.001
    assert build_parser().parse_args(["serve"]).adaptive_delay_us is None
    assert build_parser().parse_args(["serve", "--adaptive-delay-us", "500"]).adaptive_delay_us == 500.0
    monkeypatch.setenv("MODELHUB_ADAPTIVE_DELAY_US", "0")
    assert build_parser().parse_args(["serve"]).adaptive_delay_us == 0.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--adaptive-delay-us", "-1"])


def test_reuse_port_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from hub.cli import build_parser

    assert build_parser().parse_args(["serve"]).reuse_port is False
    assert build_parser().parse_args(["serve", "--reuse-port"]).reuse_port is True
    monkeypatch.setenv("MODELHUB_REUSE_PORT", "1")
    assert build_parser().parse_args(["serve"]).reuse_port is True


@pytest.mark.parametrize(
    ("variable", "value", "choices"),
    [
        ("MODELHUB_GRPC_SERVER", "bogus", "aio or threads"),
        ("MODELHUB_HANDOFF", "pipe", "shm or socket"),
        ("MODELHUB_MODEL_COPIES", "gpu", "cpu or none"),
    ],
)
def test_a_bad_choice_from_the_environment_is_refused(variable: str, value: str, choices: str) -> None:
    """argparse checks a choice typed on the command line, not a default taken from MODELHUB_*:
    serve does, before it starts anything."""
    result = subprocess.run(
        [sys.executable, "-m", "hub.cli", "serve", "--grpc-port", "0", "--http-port", "off", "--metrics-port", "off"],
        cwd=ROOT, env={**os.environ, variable: value}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{variable} must be {choices}, got {value!r}" in result.stderr


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_adaptive_delay_us_refuses_what_is_not_a_duration(
    value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the command line and from MODELHUB_ADAPTIVE_DELAY_US: exit 2, naming the flag."""
    from hub.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--adaptive-delay-us", value])
    assert exit_.value.code == 2
    assert "--adaptive-delay-us" in capsys.readouterr().err
    monkeypatch.setenv("MODELHUB_ADAPTIVE_DELAY_US", value)
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve"])
    assert exit_.value.code == 2
    assert "--adaptive-delay-us" in capsys.readouterr().err


def test_sigterm_under_load_answers_every_accepted_request(model_repository: Path, tmp_path: Path) -> None:
    """Requests in flight when SIGTERM arrives get their answers; later ones are refused cleanly."""
    import asyncio

    import tritonclient.grpc.aio as tc_aio

    from .plugins.behaviour import call_sleepy

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "behaviour.py").symlink_to(ROOT / "tests" / "plugins" / "behaviour.py")
    (plugins / "identity.py").symlink_to(ROOT / "tests" / "plugins" / "identity.py")
    server = ServeProcess("--plugins-dir", str(plugins), "--model-repository", str(model_repository),
                          "--shutdown-grace", "20")  # fmt: skip
    import tritonclient.grpc as tc

    deadline = time.monotonic() + 120
    while not tc.InferenceServerClient(server.url).is_server_ready():
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.2)

    async def scenario() -> tuple[list[Any], list[Any]]:
        client = tc_aio.InferenceServerClient(server.url)

        def call(i: int) -> Any:
            return call_sleepy(client, float(i))

        # sleepy computes one request per 50 ms and queues 4: these 5 are all accepted.
        accepted = [asyncio.ensure_future(call(i)) for i in range(5)]
        await asyncio.sleep(0.1)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        late = [await call(100 + i) for i in range(3)]
        results = await asyncio.gather(*accepted)
        await client.close()
        return results, late

    results, late = asyncio.run(scenario())
    code, log = server.stop(None)
    assert results == [2.0 * i for i in range(5)], (results, log)
    assert all(isinstance(r, str) and "UNAVAILABLE" in r for r in late), late
    assert code == 0 and "Traceback" not in log


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "fast"])
def test_inline_compute_us_refuses_what_is_not_a_duration(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from hub.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--inline-compute-us", value])
    assert exit_.value.code == 2
    assert "--inline-compute-us" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--inline-compute-us", "0"]).inline_compute_us == 0.0
    # One default, said twice (the CLI does not import the server to build its parser).
    from hub.server import ServerConfig

    assert build_parser().parse_args(["serve"]).inline_compute_us == ServerConfig.inline_compute * 1e6 == 1000.0


def test_a_reader_that_leaves_early_is_no_error() -> None:
    """`modelhub plugins | head -1`: once the pipe's reader is gone, the command stops quietly
    (exit 0, no BrokenPipeError traceback)."""
    read, write = os.pipe()
    os.close(read)  # the reader has left before the first write
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hub.cli", "plugins", "--plugins-dir", str(ROOT / "plugins")],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
    finally:
        os.close(write)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
