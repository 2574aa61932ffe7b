"""`modelhub serve --workers 2 --watch`: every frontend answers from the build the model process
serves, with that build's spec (config, checks) and copy, when a plugin file changes again while
its new build runs, or is broken when a frontend reads it; and a later edit converges. The
same edits to one process (`--workers 1`) give the same answers."""

from __future__ import annotations

import itertools
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from .conftest import ROOT, Workers, link_plugins

#: A numpy model whose build waits while the file GATE exists (having written GATE.held), so
#: that a test can change the plugin file while a new build runs, at a known moment.
GATED = """
import os
import time

import numpy as np
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

FACTOR = {factor}
GATE = {gate!r}


def build():
    if os.path.exists(GATE):
        open(GATE + ".held", "w").close()
        while os.path.exists(GATE):
            time.sleep(0.02)
    return lambda inputs: {{"OUTPUT0": inputs["INPUT0"] * FACTOR}}


@hookimpl
def register_models(register):
    register(ModelSpec(
        name="gated",
        build=build,
        inputs=[TensorSpec("INPUT0", "FP32", (-1, 1))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (-1, 1))],
        example_inputs={{"INPUT0": np.ones((1, 1), np.float32)}},
        target="numpy",
        batching=BatchPolicy(max_batch_size={batch}),
    ))
"""

BROKEN = "this is not python\n"
_channels = itertools.count()


def write_gated(plugins: Path, gate: Path, factor: float, batch: int) -> None:
    (plugins / "gated.py").write_text(textwrap.dedent(GATED.format(factor=factor, gate=str(gate), batch=batch)))


def connection(server: Workers) -> tc.InferenceServerClient:
    """A client on a connection of its own, which the kernel places on either frontend (gRPC
    channels share one per target unless each has its own pool and distinct arguments)."""
    options = [("grpc.use_local_subchannel_pool", 1), ("modelhub.test.channel", next(_channels))]
    return tc.InferenceServerClient(server.url, channel_args=options)


def answer(client: tc.InferenceServerClient, rows: int = 1) -> str:
    """What a connection says of `gated`: its config's max_batch_size, its index reason, and
    the answer to a request of `rows` rows (the factor, or the error)."""
    try:
        batch = client.get_model_config("gated", as_json=True)["config"]["max_batch_size"]
    except InferenceServerException as exc:
        batch = f"{exc.status()}"
    index = client.get_model_repository_index(as_json=True)["models"]
    reason = next(m.get("reason", "") for m in index if m["name"] == "gated")
    tensor = tc.InferInput("INPUT0", [rows, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, 1), np.float32))
    try:
        result = f"x{float(client.infer('gated', [tensor]).as_numpy('OUTPUT0')[0, 0])}"
    except InferenceServerException as exc:
        result = f"{exc.status()}: {exc.message()}"
    return f"config {batch} | {reason.split(' from /')[0]} | {result}"  # (without the plugin's path)


def everywhere(server: Workers, check: Callable[[set[str]], bool], timeout: float = 60, n: int = 16) -> set[str]:
    """What `n` fresh connections answer, once `check` holds for it (asserted within `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        clients = [connection(server) for _ in range(n)]
        seen = {answer(c, rows=12) for c in clients}
        for client in clients:
            client.close()
        if check(seen):
            return seen
        assert time.monotonic() < deadline, (seen, server.output())
        time.sleep(0.2)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_edit_while_its_build_runs_gives_one_answer_everywhere(tmp_path: Path, workers: int) -> None:
    """A plugin edit X (max_batch_size 16 -> 8, factor 2 -> 3) is being built when the file is
    saved broken. The files X came from are gone: nothing can read its spec again (a frontend
    that reads the plugins after the swap could not), so X does not take the old build's place,
    in one process as in several: the old build serves on everywhere, config and copy alike,
    and says why. Saving X again then serves X on every connection."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    gate = tmp_path / "gate"
    write_gated(plugins, gate, 2.0, 16)
    server = Workers(plugins, tmp_path / "models", tmp_path, workers, "--watch", "0.2")
    try:
        old = "config 16 |  | x2.0"
        assert everywhere(server, lambda seen: seen == {old}) == {old}
        gate.touch()
        write_gated(plugins, gate, 3.0, 8)  # X, held in its build
        deadline = time.monotonic() + 60
        while not gate.with_name("gate.held").exists():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.02)
        (plugins / "gated.py").write_text(BROKEN)
        gate.unlink()
        broken = 'config 16 | reload failed, still serving the previous build: Error importing plugin "gated" | x2.0'
        assert everywhere(server, lambda seen: seen == {broken}) == {broken}
        write_gated(plugins, gate, 3.0, 8)  # X again: served everywhere, with its config
        new = "config 8 |  | StatusCode.INVALID_ARGUMENT: input 'INPUT0': batch size 12 exceeds max_batch_size 8"
        assert everywhere(server, lambda seen: seen == {new}) == {new}
        assert {answer(connection(server)) for _ in range(8)} == {"config 8 |  | x3.0"}
    finally:
        assert server.stop() == 0, server.output()


def test_a_frontend_that_cannot_read_the_served_build_refuses_until_it_can(tmp_path: Path) -> None:
    """A frontend restarted while the plugin file is broken cannot read the spec of the build
    the model process serves: it lists the model, but answers UNAVAILABLE for it (requests,
    config), never NOT_FOUND nor from another build; the other frontend serves on. Putting the
    file back as it was (nothing to build) converges: the model process tells every frontend,
    which reads the plugins again and serves."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    gate = tmp_path / "gate"
    write_gated(plugins, gate, 2.0, 16)
    server = Workers(plugins, tmp_path / "models", tmp_path, 2, "--watch", "0.2")
    try:
        (plugins / "gated.py").write_text(BROKEN)
        broken = 'config 16 | reload failed, still serving the previous build: Error importing plugin "gated" | x2.0'
        everywhere(server, lambda seen: seen == {broken})
        server.kill_frontend()
        refused = (
            "config StatusCode.UNAVAILABLE | this frontend process has not read the plugin files its build came "
            "from (they changed since, or no longer import); it reads them again at each change | "
            "StatusCode.UNAVAILABLE: model 'gated' version 1 is loading: this frontend process has not read "
            "the plugin files its build came from (they changed since, or no longer import); it reads them "
            "again at each change"
        )
        seen = everywhere(server, lambda seen: refused in seen, n=24)
        assert seen == {broken, refused}
        write_gated(plugins, gate, 2.0, 16)  # as it was: nothing to build
        everywhere(server, lambda seen: seen == {"config 16 |  | x2.0"}, n=24)
    finally:
        assert server.stop() == 0, server.output()


#: A model whose build raises: a plugin whose weights are not there yet, say.
FAILING = """
import numpy as np
from hub import ModelSpec, TensorSpec, hookimpl


def build():
    raise FileNotFoundError({why!r})


@hookimpl
def register_models(register):
    register(ModelSpec(
        name="failing",
        build=build,
        inputs=[TensorSpec("INPUT0", "FP32", (-1, 1))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (-1, 1))],
        example_inputs={{"INPUT0": np.ones((1, 1), np.float32)}},
        target="numpy",
    ))
"""


def _errors(server: Workers) -> list[str]:
    return [line for line in server.whole_log().splitlines() if " ERROR " in line]


def _wait_for(server: Workers, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.2)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failure_is_one_error_line_and_a_change_elsewhere_builds_nothing(tmp_path: Path, workers: int) -> None:
    """With --watch, a model whose build failed was built again at every change of any file of
    the plugins directory (another plugin's), and each failure logged its error two to four
    times (the builder's traceback, the repository, the watcher, a failed reload); a plugin
    that no longer imports was reported by every process of --workers N, twice each, and again
    at every change elsewhere. Now: one ERROR line per failure, naming the model, its target
    and the cause; nothing is built or logged again until the model's own files change."""
    plugins = link_plugins(tmp_path / "plugins", ROOT / "tests" / "plugins" / "identity.py")
    (plugins / "failing.py").write_text(textwrap.dedent(FAILING.format(why="weights.pt")))
    write_gated(plugins, tmp_path / "no-gate", 2.0, 4)
    server = Workers(plugins, tmp_path / "models", tmp_path, workers, "--watch", "0.2")
    client = tc.InferenceServerClient(server.url)

    def index() -> dict[str, str]:
        return {m["name"]: m.get("reason", "") for m in client.get_model_repository_index(as_json=True)["models"]}

    try:
        (line,) = _errors(server)
        assert "model 'failing/1' (target 'numpy') failed to load: " in line, line
        assert "FileNotFoundError: weights.pt" in line and 'registered by plugin "failing"' in line, line
        assert "Traceback" not in server.whole_log()  # at DEBUG, under --log-level debug
        (plugins / "gated.py").write_text(BROKEN)  # a served model's plugin no longer imports
        _wait_for(server, lambda: index()["gated"].startswith("reload failed"))
        time.sleep(1)  # the frontends of --workers 2 hear of it, and read the plugins again
        first, imports = _errors(server)
        assert first == line and 'Error importing plugin "gated"' in imports, _errors(server)
        # A change elsewhere: a new plugin, which loads after the others (names in order).
        (plugins / "zz_other.py").write_text(
            GATED.format(factor=5.0, gate=str(tmp_path / "no-gate"), batch=4).replace("gated", "other")
        )
        _wait_for(server, lambda: client.is_model_ready("other"))
        time.sleep(1)
        assert _errors(server) == [line, imports]
        assert server.logged("model 'failing/1'") == 1, server.whole_log()  # not built again
        (plugins / "failing.py").write_text(textwrap.dedent(FAILING.format(why="weights2.pt")))  # its own change
        _wait_for(server, lambda: "weights2.pt" in index()["failing"])
        time.sleep(1)
        (*_, again) = _errors(server)
        assert len(_errors(server)) == 3 and "(target 'numpy') failed to load: " in again and "weights2.pt" in again
    finally:
        client.close()
        assert server.stop() == 0, server.output()
