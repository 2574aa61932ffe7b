"""An export and an int8 quantisation print only our lines: torch.onnx's "torchvision is not
installed" warnings and ONNX Runtime's quantizer chatter come out under our logger at DEBUG."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from hub import logs

from .conftest import ROOT, link_plugins


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
