"""What one hand-off between a frontend and the model process costs (hub/workers/wire.py).

Two processes on one Unix socket: a client sends a request message (a JSON header and one
tensor frame) and the peer answers with a message of the same size, as a frontend and the
model process do per request. Prints, per payload size and concurrency, round trips per
second and the CPU time of each side per round trip.

    .venv/bin/python scripts/handoff_bench.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from hub.workers.wire import Channel, pack_arrays, unpack_arrays


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peer(path: str, ready: object) -> None:
    async def main() -> None:
        def connect() -> Channel:
            channel: Channel

            def received(header: dict, frames: list[memoryview]) -> None:
                if header["k"] == "cpu":
                    channel.send({"k": "cpu", "t": header["t"], "cpu": _cpu()})
                    return
                arrays = unpack_arrays(header["inputs"], frames)
                described, out = pack_arrays(list(arrays.items()))
                channel.send({"k": "reply", "t": header["t"], "outputs": described}, out)

            channel = Channel(received, lambda exc: None)
            return channel

        server = await asyncio.get_running_loop().create_unix_server(connect, path)
        ready.set()  # type: ignore[attr-defined]
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def client(path: str, seconds: float) -> list[dict[str, float]]:
    futures: dict[int, asyncio.Future] = {}

    def received(header: dict, frames: list[memoryview]) -> None:
        futures.pop(header["t"]).set_result((header, frames))

    loop = asyncio.get_running_loop()
    _, channel = await loop.create_unix_connection(lambda: Channel(received, lambda exc: None), path)
    ids = iter(range(1, 1 << 62))

    async def call(header: dict, frames: list = ()) -> tuple[dict, list[memoryview]]:  # type: ignore[assignment]
        t = next(ids)
        header["t"] = t
        futures[t] = loop.create_future()
        channel.send(header, frames)
        return await futures[t]

    rows = []
    for label, array in (("1 KiB fp32", np.ones(256, np.float32)), ("150 KiB uint8", np.ones((224, 224, 3), np.uint8))):
        for concurrency in (1, 64):
            described, frames = pack_arrays([("x", array)])
            stop = time.perf_counter() + seconds
            done = 0

            async def loop_calls(stop: float = stop, described: list = described, frames: list = frames) -> None:
                nonlocal done
                while time.perf_counter() < stop:
                    header, out = await call({"k": "infer", "inputs": described}, frames)
                    unpack_arrays(header["outputs"], out)
                    done += 1

            peer_before = (await call({"k": "cpu"}))[0]["cpu"]
            mine_before, started = _cpu(), time.perf_counter()
            await asyncio.gather(*[loop_calls() for _ in range(concurrency)])
            elapsed = time.perf_counter() - started
            mine = _cpu() - mine_before
            peer_cpu = (await call({"k": "cpu"}))[0]["cpu"] - peer_before
            rows.append(
                {
                    "payload": label,
                    "concurrency": concurrency,
                    "round_trips_per_s": done / elapsed,
                    "client_us": mine / done * 1e6,
                    "peer_us": peer_cpu / done * 1e6,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    path = str(Path(tempfile.mkdtemp()) / "handoff.sock")
    ready = multiprocessing.Event()
    process = multiprocessing.Process(target=peer, args=(path, ready), daemon=True)
    process.start()
    ready.wait(30)
    try:
        rows = asyncio.run(client(path, args.seconds))
    finally:
        process.terminate()
    print(f"hand-off over a Unix socket (hub/workers/wire.py), {os.cpu_count()} cores")
    print(f"{'payload':<16}{'c':>4}{'round trips/s':>16}{'client µs/rt':>14}{'peer µs/rt':>12}")
    for r in rows:
        print(
            f"{r['payload']:<16}{r['concurrency']:>4}{r['round_trips_per_s']:>16.0f}"
            f"{r['client_us']:>14.1f}{r['peer_us']:>12.1f}"
        )


if __name__ == "__main__":
    main()
