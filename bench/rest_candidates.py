"""How the REST library was chosen: the same minimal V2 echo server (metadata, config, and an
infer route that parses the JSON header, views the binary input with hub.datatypes.from_buffer
and sends it back as a binary output) written for each candidate, each on the standard
asyncio loop that grpc.aio also needs, driven by perf_analyzer -i http; server CPU per request
from /proc.

    python bench/rest_candidates.py [--concurrency 16,64] [--rounds 2] [--window 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PA = ROOT / "tools" / "perf_analyzer" / "perf_analyzer"
SHAPE = [-1, 1, 8, 8]
METADATA = {
    "name": "echo",
    "versions": ["1"],
    "platform": "python",
    "inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": SHAPE}],
    "outputs": [{"name": "OUTPUT__0", "datatype": "FP32", "shape": SHAPE}],
}
CONFIG = {
    "name": "echo",
    "platform": "python",
    "max_batch_size": 32,
    "input": [{"name": "INPUT__0", "data_type": "TYPE_FP32", "dims": SHAPE[1:]}],
    "output": [{"name": "OUTPUT__0", "data_type": "TYPE_FP32", "dims": SHAPE[1:]}],
}


class Echo:
    """The protocol work both candidates share, so that only the library differs."""

    def __init__(self) -> None:
        self.count = 0

    def infer(self, body: bytes, header_length: str | None) -> tuple[bytes, int]:
        from hub.datatypes import from_buffer

        view = memoryview(body)
        length = int(header_length) if header_length else len(view)
        header = json.loads(view[:length].tobytes())
        tensor = header["inputs"][0]
        size = tensor["parameters"]["binary_data_size"]
        array = from_buffer(tensor["name"], tensor["datatype"], tuple(tensor["shape"]), view[length : length + size])
        raw = array.tobytes()
        out = {
            "id": header.get("id", ""),
            "model_name": "echo",
            "model_version": "1",
            "outputs": [
                {
                    "name": "OUTPUT__0",
                    "datatype": "FP32",
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
        }
        text = json.dumps(out).encode()
        self.count += 1
        return text + raw, len(text)


def serve_aiohttp(sock: socket.socket) -> None:
    from aiohttp import web

    echo = Echo()

    async def meta(request: web.Request) -> web.Response:
        return web.json_response(METADATA)

    async def config(request: web.Request) -> web.Response:
        return web.json_response(CONFIG)

    async def server_meta(request: web.Request) -> web.Response:
        return web.json_response({"name": "echo", "version": "0", "extensions": []})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"model_stats": []})

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"count": echo.count})

    async def infer(request: web.Request) -> web.Response:
        body, length = echo.infer(await request.read(), request.headers.get("Inference-Header-Content-Length"))
        return web.Response(body=body, headers={"Inference-Header-Content-Length": str(length)})

    app = web.Application()
    app.router.add_get("/v2", server_meta)
    app.router.add_get("/v2/models/echo", meta)
    app.router.add_get("/v2/models/echo/config", config)
    app.router.add_get("/v2/models/echo/stats", stats)
    app.router.add_get("/count", count)
    app.router.add_post("/v2/models/echo/infer", infer)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def serve_starlette(sock: socket.socket) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    echo = Echo()

    async def meta(request: Request) -> Response:
        return JSONResponse(METADATA)

    async def config(request: Request) -> Response:
        return JSONResponse(CONFIG)

    async def server_meta(request: Request) -> Response:
        return JSONResponse({"name": "echo", "version": "0", "extensions": []})

    async def stats(request: Request) -> Response:
        return JSONResponse({"model_stats": []})

    async def count(request: Request) -> Response:
        return JSONResponse({"count": echo.count})

    async def infer(request: Request) -> Response:
        body, length = echo.infer(await request.body(), request.headers.get("Inference-Header-Content-Length"))
        return Response(body, headers={"Inference-Header-Content-Length": str(length)})

    app = Starlette(
        routes=[
            Route("/v2", server_meta),
            Route("/v2/models/echo", meta),
            Route("/v2/models/echo/config", config),
            Route("/v2/models/echo/stats", stats),
            Route("/count", count),
            Route("/v2/models/echo/infer", infer, methods=["POST"]),
        ]
    )
    # The standard asyncio loop (grpc.aio shares it), uvicorn's C parser (httptools).
    config_ = uvicorn.Config(app, loop="asyncio", http="httptools", access_log=False, log_level="warning")
    server = uvicorn.Server(config_)
    asyncio.run(server.serve(sockets=[sock]))


CANDIDATES = {"aiohttp": serve_aiohttp, "uvicorn+starlette": serve_starlette}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served(port: int) -> int:
    return int(json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5))["count"])


def measure(name: str, concurrency: int, window_ms: int) -> dict[str, object]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", name, "--fd", str(sock.fileno())],
        pass_fds=[sock.fileno()],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    sock.close()
    try:
        for _ in range(100):
            try:
                served(port)
                break
            except OSError:
                time.sleep(0.1)
        before_cpu, before_n, started = cpu_seconds(proc.pid), served(port), time.monotonic()
        out = subprocess.run(
            [
                str(PA),
                "-m",
                "echo",
                "-i",
                "http",
                "-u",
                f"127.0.0.1:{port}",
                "-a",
                "--concurrency-range",
                str(concurrency),
                "-p",
                str(window_ms),
                "-s",
                "25",
                "-r",
                "6",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
        cpu, n, elapsed = cpu_seconds(proc.pid) - before_cpu, served(port) - before_n, time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(10)
    found = re.findall(r"Throughput: ([\d.]+) infer/sec", out)
    return {
        "candidate": name,
        "concurrency": concurrency,
        "infer_s": float(found[-1]) if found else None,  # None: perf_analyzer found no stable window
        "served_s": round(n / elapsed),  # over the whole run, warm-up and unstable windows included
        "cpu_us_per_request": round(cpu / n * 1e6) if n else None,
        "requests": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=int, default=3000, help="perf_analyzer window in ms")
    parser.add_argument("--serve", choices=sorted(CANDIDATES), help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        CANDIDATES[args.serve](socket.socket(fileno=args.fd))
        return
    for round_ in range(args.rounds):
        names = list(CANDIDATES) if round_ % 2 == 0 else list(reversed(CANDIDATES))
        for name in names:
            for concurrency in map(int, args.concurrency.split(",")):
                print(json.dumps({"round": round_, **measure(name, concurrency, args.window)}), flush=True)


if __name__ == "__main__":
    main()
