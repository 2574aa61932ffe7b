"""Time from `modelhub serve` to ServerReady, with an empty model repository (cold: export,
validate, compile) and again with the artifacts cached. Prints one line per case.

    .venv/bin/python scripts/cold_start.py [--target onnx --target torch-compile ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from hub.protocol.generated import grpc_service_pb2 as pb
from hub.protocol.generated import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


def time_to_ready(plugins: Path, repository: Path, config: Path | None, port: int) -> float:
    args = [sys.executable, "-m", "hub.cli", "--log-level", "warning", "serve", "--plugins-dir", str(plugins),
            "--no-entry-points", "--model-repository", str(repository), "--host", "127.0.0.1",
            "--grpc-port", str(port), "--metrics-port", "off", "--device", "cpu"]  # fmt: skip
    if config is not None:
        args += ["--config", str(config)]
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                        return time.perf_counter() - started
                except grpc.RpcError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError("server exited before it was ready")
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plugins", default="digits", help="plugin folder under plugins/ (or a path)")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--target", action="append", default=[])
    parser.add_argument("--port", type=int, default=18501)
    args = parser.parse_args()
    plugin = Path(args.plugins) if "/" in args.plugins else ROOT / "plugins" / args.plugins
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "plugins"
        folder.mkdir()
        (folder / plugin.name).symlink_to(plugin.resolve())
        for target in args.target or ["onnx"]:
            config = Path(tmp) / f"{target}.toml"
            config.write_text(f'[models.{args.model}]\ntarget = "{target}"\n')
            repository = Path(tmp) / f"models-{target}"
            cold = time_to_ready(folder, repository, config, args.port)
            cached = time_to_ready(folder, repository, config, args.port)
            print(f"{args.model} [{target}]: cold {cold:.1f}s, cached {cached:.1f}s (serve to ServerReady)")
            shutil.rmtree(repository, ignore_errors=True)


if __name__ == "__main__":
    main()
