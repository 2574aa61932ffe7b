"""SIGTERM and SIGINT as a service manager, a terminal or `kill` send them, to `modelhub serve`
in a subprocess, one process or --workers 2, driven with tritonclient: every request accepted
before the signal is answered, every later one is refused at once (UNAVAILABLE, never
CANCELLED), and every process exits 0 within --shutdown-grace, whether the signal reaches the
server alone, the whole process group, twice, or during the start-up."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc.aio as tc_aio
import tritonclient.http.aio as tc_http
from tritonclient.utils import InferenceServerException

from hub.errors import ModelUnavailable
from hub.workers.counter import TRACE_IDS, SharedCounter
from hub.workers.frontend import EngineClient, _Call
from hub.workers.supervisor import ORPHANED_AT_START, _child_signals

from .conftest import TEST_PLUGINS, Workers, link_plugins
from .test_workers import _leftovers

OK = "OK"
UNAVAILABLE = "StatusCode.UNAVAILABLE"

#: asyncio's default thread pool in the server, where each request's preprocess runs.
POOL = min(32, (os.cpu_count() or 1) + 4)


def _plugins(tmp_path: Path) -> Path:
    return link_plugins(tmp_path / "plugins", TEST_PLUGINS / "identity.py", TEST_PLUGINS / "lingering.py")


@contextmanager
def _serving(tmp_path: Path, workers: int, *extra: str, new_session: bool = False) -> Iterator[Workers]:
    """`modelhub serve` (--workers `workers`), killed at the end if a test left it running."""
    server = Workers(_plugins(tmp_path), tmp_path / "models", tmp_path, workers, *extra, new_session=new_session)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()  # its children get their stop signal when it dies
            server.process.wait(60)
        server.log.close()


def _client(url: str) -> tc_aio.InferenceServerClient:
    """A client on a connection of its own (with --workers, the kernel picks a frontend per
    connection)."""
    return tc_aio.InferenceServerClient(url, channel_args=[("grpc.use_local_subchannel_pool", 1)])


async def _linger(client: tc_aio.InferenceServerClient, seconds: float) -> str:
    """A request to `lingering`, whose preprocess sleeps `seconds`: OK, or its status."""
    tensor = tc_aio.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), seconds, np.float32))
    try:
        result = await client.infer("lingering", [tensor], client_timeout=60)
    except InferenceServerException as exc:
        return str(exc.status())
    assert float(result.as_numpy("OUTPUT0")[0, 0]) == 2 * np.float32(seconds)
    return OK


async def _late(url: str, count: int) -> list[str]:
    """`count` requests one after another, each on a new connection."""
    outcomes = []
    for _ in range(count):
        client = _client(url)
        outcomes.append(await _linger(client, 0.0))
        await client.close()
    return outcomes


async def _exit(server: Workers, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while server.process.poll() is None:
        assert time.monotonic() < deadline, server.output()
        await asyncio.sleep(0.02)
    return server.process.returncode


def test_sigterm_refuses_new_requests_at_once_while_preprocess_jobs_queue(tmp_path: Path) -> None:
    """Every thread of the pool busy with a preprocess and four more waiting, then SIGTERM: a
    request sent after it is refused at once. The refusal used to wait for the plugins'
    `server_stopping`, which queued in that pool behind every waiting preprocess, so requests
    sent seconds after the signal were still accepted (and answered)."""
    with _serving(tmp_path, 1, "--shutdown-grace", "20") as server:

        async def scenario() -> tuple[list[str], str, float, int]:
            client = _client(server.url)
            accepted = [asyncio.ensure_future(_linger(client, 1.0)) for _ in range(POOL + 4)]
            await asyncio.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            started = time.monotonic()
            late = await _linger(client, 0.0)
            late_seconds = time.monotonic() - started
            results = await asyncio.gather(*accepted)
            await client.close()
            return results, late, late_seconds, await _exit(server)

        results, late, late_seconds, code = asyncio.run(scenario())
    assert results == [OK] * (POOL + 4)
    assert late == UNAVAILABLE and late_seconds < 0.5, (late, late_seconds)
    assert code == 0, server.output()


def test_sigterm_exits_within_the_grace_however_much_work_waits(tmp_path: Path) -> None:
    """More accepted work than --shutdown-grace 2 allows: the server exits once the grace is
    out, and past it only by what a preprocess already running takes to return (a thread
    cannot be interrupted: here until 2.5 s after the signal); the queued ones never start.
    Before, the stop waited for a free pool thread (2.5 s), then the full grace, then the
    queued preprocesses it had let start: 6 s."""
    with _serving(tmp_path, 1, "--shutdown-grace", "2") as server:

        async def scenario() -> tuple[float, int]:
            client = _client(server.url)
            accepted = [asyncio.ensure_future(_linger(client, 3.0)) for _ in range(POOL + 4)]
            await asyncio.sleep(0.5)
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = await _exit(server)
            took = time.monotonic() - started
            await asyncio.gather(*accepted)
            await client.close()
            return took, code

        took, code = asyncio.run(scenario())
    assert code == 0, server.output()
    assert took < 4.5, (took, server.output())


def test_workers_sigterm_refuses_in_every_frontend_at_once(tmp_path: Path) -> None:
    """--workers 2 with long requests in both frontends, then SIGTERM to the supervisor: every
    request sent after it is refused, whichever frontend the kernel gives its connection to.
    The supervisor used to signal the frontends one after another, each once the previous one
    had exited, so the second served new requests until the first had drained."""
    with _serving(tmp_path, 2, "--shutdown-grace", "8") as server:

        async def scenario() -> tuple[list[str], list[str], float, int]:
            clients = [_client(server.url) for _ in range(12)]  # both frontends get some
            accepted = [asyncio.ensure_future(_linger(client, 3.0)) for client in clients]
            await asyncio.sleep(0.5)
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            late = await _late(server.url, 10)
            results = await asyncio.gather(*accepted)
            code = await _exit(server)
            took = time.monotonic() - started
            for client in clients:
                await client.close()
            return results, late, took, code

        results, late, took, code = asyncio.run(scenario())
    assert results == [OK] * 12
    assert late == [UNAVAILABLE] * 10
    assert code == 0 and "exit codes [0, 0, 0]" in server.output(), server.output()
    assert took < 8, took


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_drains_and_exits_0(tmp_path: Path, signum: int) -> None:
    """Ctrl-C in a terminal, systemd's KillMode=control-group, `kill -- -PGID`: every process
    of --workers 2 gets the signal. The model process used to stop at once, failing what the
    frontends still handed it ("the model process exited"), and a child that got the
    supervisor's SIGTERM too while it tore down died of it (exit codes [-15, -15, -15], the
    supervisor 1). Now it is the supervisor's to stop, after the frontends."""
    with _serving(tmp_path, 2, "--model-copies", "none", new_session=True) as server:

        async def scenario() -> tuple[list[str], int]:
            clients = [_client(server.url) for _ in range(8)]
            accepted = [asyncio.ensure_future(_linger(client, 1.5)) for client in clients]
            await asyncio.sleep(0.5)
            os.killpg(server.process.pid, signum)
            results = await asyncio.gather(*accepted)
            for client in clients:
                await client.close()
            return results, await _exit(server)

        results, code = asyncio.run(scenario())
    assert results == [OK] * 8, server.output()
    assert code == 0 and "exit codes [0, 0, 0]" in server.output(), server.output()
    # Each process says what stopped it, in the order it came: a frontend gets the signal and
    # then its supervisor's SIGTERM (ignored, saying why); the model process ignores the
    # signal, and says it is its supervisor that stops it (it used to say "SIGUSR1 received").
    log = server.whole_log()
    name = signal.Signals(signum).name
    for frontend in ("[frontend 0]", "[frontend 1]"):
        first = log.find(f"{frontend} modelhub.cli: {name} received: draining in-flight requests")
        assert first >= 0, log[-4000:]
        if signum == signal.SIGINT:
            again = log.find(f"{frontend} modelhub.signals: SIGTERM received while stopping: ignored (the supervisor")
            assert first < again, log[-4000:]
    assert "[model process] modelhub.cli: stop requested by the supervisor (SIGUSR1): draining" in log, log[-4000:]
    assert f"[supervisor] modelhub.supervisor: {name} received: the frontends drain" in log, log[-4000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_repeated_signals_while_stopping_change_nothing(tmp_path: Path, signum: int) -> None:
    """The signal again and again until the server exits: the drain goes on, and the exit is
    0. The second used to land after the event loop had closed, when asyncio had put back the
    default action: exit -15 (SIGTERM) or a KeyboardInterrupt traceback (SIGINT)."""
    with _serving(tmp_path, 1) as server:

        async def scenario() -> tuple[str, int]:
            client = _client(server.url)
            accepted = asyncio.ensure_future(_linger(client, 1.0))
            await asyncio.sleep(0.3)
            while server.process.poll() is None:
                server.process.send_signal(signum)
                await asyncio.sleep(0.05)
            result = await accepted
            await client.close()
            return result, server.process.returncode

        result, code = asyncio.run(scenario())
    assert result == OK
    assert code == 0, server.output()
    assert "received while stopping: ignored" in server.output()
    assert "Traceback" not in server.output()


def test_grpc_clients_get_unavailable_not_cancelled_while_the_server_stops(tmp_path: Path) -> None:
    """24 gRPC and 8 REST clients that retry whatever fails 20 ms later, then SIGTERM: no gRPC
    client sees CANCELLED, which clients do not retry. grpc.aio cancels the calls it has
    received but not yet handed to a handler when its server stops (1 to 20 of them here);
    now the refusals of the last moments wait for that stop, so each client's call is in a
    handler then, answered UNAVAILABLE, and the client sends no other meanwhile."""
    with _serving(tmp_path, 1) as server:

        async def scenario() -> tuple[Counter[str], int]:
            outcomes: Counter[str] = Counter()
            signalled = asyncio.Event()

            async def hammer(client: Any, tensor: Any) -> None:
                while server.process.poll() is None:
                    try:
                        await client.infer("identity_fp32", [tensor])
                        outcome = OK
                    except InferenceServerException as exc:
                        outcome = str(exc.status())
                    except aiohttp.ClientError:  # REST, once the listener has closed
                        outcome = "closed"
                    if signalled.is_set():
                        outcomes[outcome] += 1
                    if outcome != OK:
                        await asyncio.sleep(0.005)
                await client.close()

            def grpc_hammer() -> Any:
                tensor = tc_aio.InferInput("INPUT0", [1, 4], "FP32")
                tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
                return hammer(_client(server.url), tensor)

            def rest_hammer() -> Any:
                tensor = tc_http.InferInput("INPUT0", [1, 4], "FP32")
                tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
                return hammer(tc_http.InferenceServerClient(server.http_url), tensor)

            hammers = [asyncio.ensure_future(grpc_hammer()) for _ in range(32)]
            hammers += [asyncio.ensure_future(rest_hammer()) for _ in range(8)]
            await asyncio.sleep(1.0)
            signalled.set()
            server.process.send_signal(signal.SIGTERM)
            code = await _exit(server)
            await asyncio.gather(*hammers)
            return outcomes, code

        outcomes, code = asyncio.run(scenario())
    assert code == 0, server.output()
    assert outcomes[UNAVAILABLE] > 0, outcomes
    assert "StatusCode.CANCELLED" not in outcomes, outcomes


def test_a_signal_during_start_up_stops_the_children_as_a_shutdown_does(tmp_path: Path) -> None:
    """SIGTERM while the children of --workers 2 still start: they start, drain (nothing) and
    exit 0, the model process last, and so does the supervisor. It used to return 1 at once
    and SIGKILL them."""
    server = Workers(_plugins(tmp_path), tmp_path / "models", tmp_path, 2, wait=False)
    try:
        deadline = time.monotonic() + 60
        while len(server.children("frontend")) < 2 or not server.children("engine"):
            assert time.monotonic() < deadline and server.process.poll() is None, server.output()
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(60)
        server.log.close()
    assert code == 0, server.output()
    assert server.logged("signalled during start-up") == 1
    assert "exit codes [0, 0, 0]" in server.output(), server.output()


async def test_killing_the_supervisor_answers_what_the_frontends_accepted_and_leaves_nothing(tmp_path: Path) -> None:
    """SIGKILL to the supervisor: the kernel stops its children at once (PR_SET_PDEATHSIG). The
    model process used to stop within milliseconds, so the frontends failed every request they
    still had for it, saying it was being restarted (nothing restarts it), and the supervisor's
    directory (/tmp/modelhub-*: the socket, the port files) was left behind. Now the frontends
    drain as on SIGTERM, the model process answers them until they have exited, and then
    removes the directory: every accepted request is answered, and nothing is left."""
    server = Workers(_plugins(tmp_path), tmp_path / "models", tmp_path, 2, "--model-copies", "none", new_session=True)
    try:
        engine = server.children("engine")[0]
        children = [engine, *server.children("frontend")]
        argv = Path(f"/proc/{engine}/cmdline").read_bytes().split(b"\0")
        socket = Path(argv[argv.index(b"--engine-socket") + 1].decode())
        folder = socket.parent
        assert folder.is_dir() and folder.name.startswith("modelhub-")
        ids = SharedCounter(socket.with_suffix(TRACE_IDS))  # as a frontend's first trace draws its id
        assert ids() == 1
        ids.close()
        # Each request spends a second in its frontend's preprocess, then goes to the model
        # process: when the supervisor dies, every one of them still needs it.
        clients = [_client(server.url) for _ in range(6)]
        flights = [asyncio.ensure_future(_linger(client, 1.0)) for client in clients]
        await asyncio.sleep(0.5)
        os.kill(server.process.pid, signal.SIGKILL)
        outcomes = await asyncio.gather(*flights)
        for client in clients:
            await client.close()
        assert outcomes == [OK] * 6, (outcomes, server.whole_log()[-4000:])
        deadline = time.monotonic() + 60
        while any(_running(pid) for pid in children):
            assert time.monotonic() < deadline, server.whole_log()[-4000:]
            await asyncio.sleep(0.05)
        log = server.whole_log()
        assert not folder.exists(), (list(folder.iterdir()), log[-4000:])
        assert _leftovers(server) == []
        assert "[model process] modelhub.cli: the supervisor exited (SIGUSR1)" in log, log[-4000:]
        assert log.count("modelhub.cli: the supervisor exited (SIGTERM): the server is stopping") == 2, log[-4000:]
        assert "being restarted" not in log and "lost the model process" not in log, log[-4000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)  # whatever a failure left running
        server.process.wait(60)
        server.log.close()


def _running(pid: int) -> bool:
    """Whether a process runs (one that exited is gone, or a zombie its new parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


async def test_a_frontend_whose_supervisor_is_gone_says_the_server_is_stopping() -> None:
    """The model process gone and the supervisor gone too: nothing restarts it, so the requests
    it had fail saying the server is stopping (not "it is being restarted, try again")."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    orphan = EngineClient(Path("unused"), lambda header: None, supervisor=os.getpid())  # not our parent
    orphan._pending[1] = _Call(future)
    orphan._lost(None)
    with pytest.raises(ModelUnavailable, match=r"^the server is stopping \(its supervisor exited\)"):
        future.result()
    with pytest.raises(ModelUnavailable, match="the server is stopping"):
        await orphan.request({"k": "stats", "models": []})
    supervised = EngineClient(Path("unused"), lambda header: None, supervisor=os.getppid())
    with pytest.raises(ModelUnavailable, match="it is being restarted"):
        await supervised.request({"k": "stats", "models": []})


def test_a_child_whose_supervisor_died_before_it_asked_to_outlive_it_exits_before_exec() -> None:
    """PR_SET_PDEATHSIG is asked for in the child after the fork: a supervisor that died in
    between sends nothing, so the child checks its parent once the prctl is made. Here the
    'supervisor' it is given is not its parent, as when the real one died first: it exits
    before running its command. Given its true parent, it runs the command."""
    orphaned = subprocess.run(
        ["sleep", "30"], preexec_fn=functools.partial(_child_signals, signal.SIGTERM, os.getpid() + 1), timeout=10
    )
    assert orphaned.returncode == ORPHANED_AT_START
    supervised = subprocess.run(
        [sys.executable, "-c", "print('ran')"],
        preexec_fn=functools.partial(_child_signals, signal.SIGTERM, os.getpid()),
        capture_output=True,
        timeout=30,
    )
    assert supervised.returncode == 0 and supervised.stdout == b"ran\n"
