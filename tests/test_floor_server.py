"""The benchmarks' floor server (scripts/floor_server.py: the do-nothing grpc.aio server plus the
model's forward) computes what our server computes, from the same built artifact: `make bench`
compares like with like when it sets one beside the other."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from .conftest import ROOT, RunningServer, link_plugins


def test_floor_server_answers_as_ours(hub_server: RunningServer, model_repository: Path, tmp_path: Path) -> None:
    plugins = link_plugins(tmp_path / "plugins", ROOT / "plugins" / "digits")
    command = [sys.executable, "-u", str(ROOT / "scripts" / "floor_server.py"), "--port", "0",
               "--plugins-dir", str(plugins), "--model-repository", str(model_repository)]  # fmt: skip
    floor = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert floor.stdout is not None
        line = floor.stdout.readline()  # once it serves (the artifact is the session's, built by hub_server)
        match = re.match(r"floor server on (\S+): digits$", line.strip())
        assert match, line
        image = np.random.default_rng(7).random((3, 1, 8, 8), dtype=np.float32)
        answers = []
        for url in (match.group(1), hub_server.url):
            with grpcclient.InferenceServerClient(url) as client:
                request = grpcclient.InferInput("image", list(image.shape), "FP32")
                request.set_data_from_numpy(image)
                result = client.infer("digits", [request])
                answers.append({o.name: result.as_numpy(o.name) for o in result.get_response().outputs})
        floor_answer, ours = answers
        assert floor_answer.keys() == ours.keys()
        for name in ours:
            np.testing.assert_array_equal(floor_answer[name], ours[name])
    finally:
        floor.terminate()
        floor.wait(30)
