"""`modelhub serve --workers N`: one model process and N frontend processes, kept running.

The supervisor (this process) starts the model process (`--role engine`: every model, its
batcher, statistics, model control, metrics) and N frontends (`--role frontend`: gRPC and
REST on the same ports through SO_REUSEPORT, each doing the protocol work for the
connections the kernel gives it). It restarts a process that dies, and on SIGTERM or SIGINT
drains the frontends first, all at once (each answers what it accepted), then stops the model
process (hub/signals.py: it ignores SIGTERM and SIGINT, which a signal to the whole process
group would bring it while the frontends still drain into it). It removes the shared-memory
hand-off arenas a child left behind (hub/workers/arena.py) when the child dies and when it
exits itself.

It writes the server's start-up lines ("modelhub listening", "security"), each child only
what it is; every process names itself in each line of the log they share (hub/logs.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.signals import ENGINE_STOP, STOP_SIGNALS
from hub.workers.arena import remove_leftovers

log = logging.getLogger("modelhub.supervisor")

#: How long a process may take to listen before the supervisor gives up on the start.
START_TIMEOUT = 600.0
#: Seconds past --shutdown-grace a child has to exit before the supervisor kills it.
KILL_AFTER = 10.0


def default_workers() -> int:
    """Frontend processes by default: 1 on a box of 2 cores or fewer (the model needs the
    other core), then one per two cores, at most 8."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(8, cores // 2)


#: The exit status of a child whose supervisor died before the child could ask to outlive it.
ORPHANED_AT_START = 70


def _child_signals(stop: signal.Signals, supervisor: int) -> None:  # pragma: no cover - runs in the child before exec
    """The child gets `stop` if the supervisor (pid `supervisor`) dies (Linux
    prctl(PR_SET_PDEATHSIG)), and starts with its stop signals blocked (a mask survives exec):
    one sent before it has a handler (hub/signals.py unblocks them) waits for it instead of
    killing a child that is still importing, and the supervisor stops it as it stops a running
    one. A supervisor that died between the fork and the prctl sends nothing: such a child
    exits here, before exec, with nothing in flight."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, stop)
    if os.getppid() != supervisor:
        os._exit(ORPHANED_AT_START)
    signal.pthread_sigmask(signal.SIG_BLOCK, {*STOP_SIGNALS, ENGINE_STOP})


def reserve_port(host: str, port: int, shared: bool = False) -> tuple[int, socket.socket | None]:
    """A concrete port for `port` (0: a free one), held by a bound, non-listening
    SO_REUSEPORT socket so that every frontend can bind the same number.

    The frontends bind with SO_REUSEPORT, which would let them join another server already
    listening there with it (another `--workers` server, say): two servers answering on one
    port, each for its own models and statistics. Unless that is asked for (`shared`,
    --reuse-port), a given port must be free: OSError naming it otherwise, as one process
    refuses it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port != 0:
        if not shared:
            probe = socket.socket(family, socket.SOCK_STREAM)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (a closed connection's TIME_WAIT is no owner)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise OSError(exc.errno, f"port {port} on {host} cannot be served: {exc.strerror}") from None
            finally:
                probe.close()
        return port, None
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, 0))
    return holder.getsockname()[1], holder


@dataclass
class _Child:
    #: As the log names it: "model process", "frontend 0" ... (hub/logs.py, `name_process`).
    name: str
    argv: list[str]
    port_file: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ports: dict[str, Any] = field(default_factory=dict)
    #: What stops it: SIGTERM for a frontend; ENGINE_STOP for the model process.
    stop: signal.Signals = signal.SIGTERM

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(self.argv, preexec_fn=functools.partial(_child_signals, self.stop, os.getpid()))

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        workers: int,
        *,
        host: str,
        grpc_port: int | None,
        http_port: int | bool | None,
        port_file: Path | None,
        shutdown_grace: float,
        shared_ports: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.shared_ports = shared_ports  # --reuse-port: joining another server's ports is asked for
        self.workers = workers
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.port_file = port_file
        self.shutdown_grace = shutdown_grace
        self._stop = False
        self._signal: signal.Signals | None = None  # the first that asked to stop
        self._holders: list[socket.socket] = []
        # A signal wakes the supervisor's waits at once (signal.set_wakeup_fd writes here), so
        # the frontends learn of it now rather than at the end of a 0.2 s sleep.
        self._wake, self._wake_writer = socket.socketpair()
        self._dir = Path(tempfile.mkdtemp(prefix="modelhub-"))

    def _command(self, name: str, *extra: str) -> list[str]:
        # Later flags win in argparse, so the role's settings override the user's.
        return [
            sys.executable, "-m", "hub.cli", *self.argv, "--workers", "1",
            "--process-name", name, "--supervisor-pid", str(os.getpid()), *extra,
        ]  # fmt: skip

    def run(self) -> int:
        for end in (self._wake, self._wake_writer):
            end.setblocking(False)
        signal.set_wakeup_fd(self._wake_writer.fileno(), warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._signalled)
        socket_path = self._dir / "engine.sock"
        ports: dict[str, int | None] = {}
        for name, port in (("grpc", self.grpc_port), ("http", self.http_port)):
            if port is None or port is False:
                ports[name] = None
                continue
            try:
                number, holder = reserve_port(self.host, port, self.shared_ports)
            except OSError as exc:
                flag = "--grpc-port" if name == "grpc" else "--http-port"
                log.error("modelhub could not start: %s (%s; --reuse-port to share it on purpose)", exc.strerror, flag)
                for held in self._holders:
                    held.close()
                shutil.rmtree(self._dir, ignore_errors=True)
                return 1
            ports[name] = number
            if holder is not None:
                self._holders.append(holder)
        http = self.http_port is not False  # False: this build has no REST frontend
        common = ["--engine-socket", str(socket_path)]
        engine = _Child(
            "model process",
            self._command("model process", "--role", "engine", *common, "--grpc-port", "off",
                          *(["--http-port", "off"] if http else []), "--port-file", str(self._dir / "engine.json")),
            self._dir / "engine.json",
            stop=ENGINE_STOP,
        )  # fmt: skip
        common += ["--metrics-port", "off", "--grpc-port", _flag(ports["grpc"])]
        common += ["--http-port", _flag(ports["http"])] if http else []
        frontends = [
            _Child(
                f"frontend {i}",
                self._command(
                    f"frontend {i}", "--role", "frontend", *common, "--port-file", str(self._dir / f"frontend-{i}.json")
                ),
                self._dir / f"frontend-{i}.json",
            )
            for i in range(self.workers)
        ]
        children = [engine, *frontends]
        try:
            for child in children:
                child.start()
            if not self._wait_listening(children):
                return 1
            if self._stop:
                log.info("signalled during start-up; stopping")
            else:
                self._announce(engine, frontends, ports)
            while not self._stop:
                self._sleep(0.2)
                for child in children:
                    if not self._stop and not child.alive():
                        code = child.process.returncode if child.process is not None else None
                        if child.process is not None:  # a hand-off arena it made that its peer had not mapped yet
                            remove_leftovers(os.getpid(), child.process.pid)
                        child.restarts += 1
                        log.error("%s exited (code %s); restarting it (restart %d)", child.name, code, child.restarts)
                        child.start()
            return self._shutdown(engine, frontends)
        finally:
            for child in children:
                if child.alive() and child.process is not None:
                    child.process.kill()
            for child in children:
                if child.process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.process.wait(5)
            for holder in self._holders:
                holder.close()
            signal.set_wakeup_fd(-1)
            self._wake.close()
            self._wake_writer.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            remove_leftovers(os.getpid())

    def _signalled(self, signum: int, frame: Any) -> None:
        if self._signal is None:
            self._signal = signal.Signals(signum)
        self._stop = True

    def _sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or until a signal arrives."""
        if self._stop:
            return
        select.select([self._wake], [], [], seconds)
        with contextlib.suppress(OSError):
            while self._wake.recv(512):
                pass

    def _wait_listening(self, children: list[_Child]) -> bool:
        """Wait until every child listens, or a signal asks to stop (True); False if one
        exited or START_TIMEOUT ran out."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and not self._stop:
            for child in children:
                if not child.alive():
                    log.error(
                        "%s exited during start (code %s)", child.name, child.process and child.process.returncode
                    )
                    return False
                if not child.ports and child.port_file.exists():
                    with contextlib.suppress(ValueError):
                        child.ports = json.loads(child.port_file.read_text())
            if all(child.ports for child in children):
                return True
            self._sleep(0.05)
        return self._stop

    def _announce(self, engine: _Child, frontends: list[_Child], ports: dict[str, int | None]) -> None:
        """The server's start-up lines, as one process writes them: where the frontends listen
        (the first frontend's parts of its line), the workers, and the model process's parts
        (metrics, device, plugins, models) and security settings."""
        listening = {**ports, "metrics": engine.ports.get("metrics"), "workers": self.workers, "pid": os.getpid()}
        fronts, back = frontends[0].ports.get("listening") or {}, engine.ports.get("listening") or {}
        pids = ", ".join(str(child.process.pid) for child in frontends if child.process is not None)
        parts = [
            fronts.get("grpc", f"grpc {ports['grpc'] or 'off'}"),
            fronts.get("http", f"http {ports['http'] or 'off'}"),
            back.get("metrics", f"metrics {listening['metrics'] or 'off'}"),
            f"{self.workers} frontends (pids {pids})",
            f"model process pid {engine.process.pid if engine.process is not None else '?'}",
            *(back[part] for part in ("device", "threads", "plugins", "models") if part in back),
        ]
        log.info("modelhub listening: %s", ", ".join(parts))
        if engine.ports.get("security"):
            log.info("security: %s", engine.ports["security"])
        if self.port_file is not None:
            write_port_file(self.port_file, listening)

    def _shutdown(self, engine: _Child, frontends: list[_Child]) -> int:
        """Drain the frontends, all at once (one still serving took new requests while another
        drained, and their grace periods added up); then stop the model process, which they
        reach until they exit."""
        # Stopping already: a repeated signal must not kill the supervisor (nor Python's
        # finalization, which puts back the default action for a handler of its own).
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        log.info(
            "%s received: the frontends drain (grace %.1fs), then the model process stops",
            self._signal.name if self._signal is not None else "stop signal",
            self.shutdown_grace,
        )
        timeout = self.shutdown_grace + KILL_AFTER
        deadline = time.monotonic() + timeout
        for child in frontends:
            _signal(child)
        codes = [_wait(child, deadline, timeout) for child in frontends]
        _signal(engine)
        codes.append(_wait(engine, time.monotonic() + timeout, timeout))
        log.info("modelhub stopped (exit codes %s)", codes)
        return 0 if all(code == 0 for code in codes) else 1


def _signal(child: _Child) -> None:
    if child.process is not None and child.process.poll() is None:
        child.process.send_signal(child.stop)


def _wait(child: _Child, deadline: float, timeout: float) -> int | None:
    """The child's exit code, once it exits or is killed at `deadline`."""
    process = child.process
    if process is None:
        return None
    try:
        return process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        log.error("%s did not stop within %.0fs; killing it", child.name, timeout)
        process.kill()
        return process.wait()


def _flag(port: int | None) -> str:
    return "off" if port is None else str(port)


def write_port_file(path: Path, ports: dict[str, Any]) -> None:
    """Write the listening ports atomically (a reader never sees half a file)."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(ports))
    staging.replace(path)
