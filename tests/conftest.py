"""Fixtures: real servers on 127.0.0.1:0, each in its own thread and event loop, so that both
tritonclient's sync and asyncio clients can talk to them from the test."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from hub import logs
from hub.server import Server, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
TEST_PLUGINS = ROOT / "tests" / "plugins"


class RunningServer:
    """A Server running on a private event loop in a daemon thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="modelhub-test-server", daemon=True)
        self.server: Server | None = None

    def start(self, timeout: float = 300) -> RunningServer:
        self.thread.start()
        self.run(self._start(), timeout)
        return self

    async def _start(self) -> None:
        self.server = Server(self.config)
        await self.server.start()
        await self.server.wait_until_loaded()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        """host:port of the REST frontend, as tritonclient.http takes it."""
        assert self.server is not None
        return f"127.0.0.1:{self.server.http_port}"

    @property
    def metrics_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def model(self, name: str, version: int = 1) -> Any:
        assert self.server is not None and self.server.repository is not None
        return self.server.repository.resolve(name, str(version))


class Workers:
    """A `modelhub serve --workers N` subprocess on port 0, with its ports from --port-file."""

    def __init__(
        self,
        plugins: Path,
        repository: Path,
        tmp: Path,
        workers: int = 2,
        *extra: str,
        env: dict[str, str] | None = None,
        new_session: bool = False,
        wait: bool = True,
        open_files: int | None = None,
    ) -> None:
        """`new_session`: in a process group of its own, for a test that signals the whole
        group; `wait`: return once it serves (False: at once, for a test of its start-up);
        `open_files`: its soft limit on open files (`ulimit -n`), for a test of what needs them."""
        self.port_file = tmp / "ports.json"
        # The processes append (O_APPEND) and the test reads the file by its path: a read
        # through the descriptor they share would move their write offset, and a line written
        # meanwhile would land over older ones.
        self.log_path = tmp / "serve.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        # Each frontend computes from its own copy (and queues for it), unless told otherwise.
        self.model_copies = workers > 1 and "none" not in extra
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "serve", "--plugins-dir", str(plugins), "--model-repository",
             str(repository), "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
             "--device", "cpu",
             "--threads", "1", "--no-entry-points", "--workers", str(workers), "--port-file", str(self.port_file),
             "--shutdown-grace", "5", *extra],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=new_session, preexec_fn=None if open_files is None else partial(_limit_files, open_files),
        )  # fmt: skip
        if not wait:
            return
        try:
            self._wait_until_serving(workers, extra)
        except BaseException:  # a server that never came up must not outlive the test
            self.process.kill()  # its children get their stop signal when it dies (PR_SET_PDEATHSIG)
            self.process.wait(60)
            self.log.close()
            raise

    def _wait_until_serving(self, workers: int, extra: tuple[str, ...]) -> None:
        deadline = time.monotonic() + 240
        while not self.port_file.exists():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.1)
        self.ports = json.loads(self.port_file.read_text())
        self.url = f"127.0.0.1:{self.ports['grpc']}"
        self.http_url = f"127.0.0.1:{self.ports['http']}"
        import tritonclient.grpc as tc

        client = tc.InferenceServerClient(self.url)
        while not client.is_server_ready():
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.2)
        if workers > 1 and "none" not in extra:
            # Every frontend loads its own copy of each ready model after the server is ready
            # (requests go to the model process meanwhile): wait, so tests see the copies.
            ready = sum(m.state == "READY" for m in client.get_model_repository_index().models)
            while self.logged("serving from this frontend's copy") + self.logged("no copy in this frontend") < (
                workers * ready
            ):
                assert time.monotonic() < deadline, self.output()
                time.sleep(0.1)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def output(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")[-4000:]

    def logged(self, fragment: str) -> int:
        """How many times the whole log so far holds `fragment`."""
        return self.whole_log().count(fragment)

    def whole_log(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def kill_frontend(self, timeout: float = 120) -> None:
        """SIGKILL a frontend and wait until the supervisor has started its replacement."""
        frontends = self.children("frontend")
        victim = frontends[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while victim in self.children("frontend") or len(self.children("frontend")) < len(frontends):
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.2)

    def children(self, role: str) -> list[int]:
        """The live child processes of this role (from /proc: their parent and command line)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if parent == self.process.pid and b"--role" in argv and argv[argv.index(b"--role") + 1] == role.encode():
                found.append(int(entry.name))
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self.log.close()
        return code


def _limit_files(soft: int) -> None:
    """(In the child, before it runs the server) lower the soft limit on open files."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def link_plugins(folder: Path, *sources: Path) -> Path:
    """A plugins directory holding symlinks to the given plugin files and packages."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        target = folder / source.name
        if not target.exists():
            target.symlink_to(source)
    return folder


@pytest.fixture(autouse=True)
def _server_log_handler_removed() -> Iterator[None]:
    """A test that runs the CLI in-process (`hub.cli.main`) installs modelhub's log handler
    (hub.logs.configure) on this process's root logger: take it off again, so the next test's
    in-process servers leave the log to pytest, as an embedded Server does."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in root.handlers[:]:
        if isinstance(handler, logs.ServerLogHandler):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model repository for the session, so each model is exported once."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def start_server(model_repository: Path) -> Iterator[Any]:
    """Factory: start_server(plugins_dir=..., **config) -> RunningServer, stopped at the end."""
    started: list[RunningServer] = []

    def start(
        plugins_dir: Path | None, *, extra_plugins: Mapping[str, object] | None = None, **config: Any
    ) -> RunningServer:
        options: dict[str, Any] = {
            "plugins_dir": plugins_dir,
            "model_repository": model_repository,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "metrics_port": 0,
            "device": "cpu",
            "threads": 1,
            "entry_points": False,
            "extra_plugins": extra_plugins or {},
        }
        options.update(config)
        server = RunningServer(ServerConfig(**options)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def hub_server(start_server: Any, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    """The shared server: digits plus the test plugins (identity, torch, behaviour)."""
    folder = link_plugins(
        tmp_path_factory.mktemp("plugins"),
        ROOT / "plugins" / "digits",
        *sorted(TEST_PLUGINS.glob("*.py")),
    )
    return start_server(folder)


@pytest.fixture(scope="session")
def workers_server(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Workers]:
    """`modelhub serve --workers 2` (a model process behind two frontends) with the shared
    server's plugins: digits plus the test plugins."""
    tmp = tmp_path_factory.mktemp("workers")
    plugins = link_plugins(tmp / "plugins", ROOT / "plugins" / "digits", *sorted(TEST_PLUGINS.glob("*.py")))
    server = Workers(plugins, model_repository, tmp)
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="session")
def workers_remote_server(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Workers]:
    """`modelhub serve --workers 2 --model-copies none`: the frontends hand every request to the
    model process, which computes them all."""
    tmp = tmp_path_factory.mktemp("workers-remote")
    plugins = link_plugins(tmp / "plugins", ROOT / "plugins" / "digits", *sorted(TEST_PLUGINS.glob("*.py")))
    server = Workers(plugins, model_repository, tmp, 2, "--model-copies", "none")
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="session")
def threads_server(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Workers]:
    """`modelhub serve --grpc-server threads` (one process, grpcio's thread-pool server) with the
    shared server's plugins."""
    tmp = tmp_path_factory.mktemp("threads")
    plugins = link_plugins(tmp / "plugins", ROOT / "plugins" / "digits", *sorted(TEST_PLUGINS.glob("*.py")))
    server = Workers(plugins, model_repository, tmp, 1, "--grpc-server", "threads")
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="session")
def digits_heldout() -> tuple[Any, Any]:
    from safetensors.numpy import load_file

    tensors = load_file(str(ROOT / "plugins" / "digits" / "digits.safetensors"))
    images = tensors["heldout.images"].astype("float32")[:, None, :, :]
    return images, tensors["heldout.labels"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    run_slow = config.getoption("-m") and "slow" in config.getoption("-m")
    skip_slow = pytest.mark.skip(reason="slow: run with `pytest -m slow`")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow and not os.environ.get("MODELHUB_RUN_SLOW"):
            item.add_marker(skip_slow)
