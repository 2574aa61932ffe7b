"""What one hand-off between a frontend and the model process costs (hub/workers/wire.py,
hub/workers/arena.py), over the socket and through shared memory.

Two processes on one Unix socket: a client sends a request message (a header and one
tensor) and the peer answers with a tensor of the same size, as a frontend and the model
process do per request. With `shm` each side copies its tensor into its own arena and only
the header crosses the socket; the peer views the input where it lies, copies its answer
into its arena, and the client views that and gives the block back with its next message
(a frontend gives it back with the commit it sends anyway). With `socket` the tensor is a
frame of the message. Prints, per hand-off, payload and concurrency, round trips per second
and the CPU time of each side per round trip. Hand-offs alternate, run after run, so that a
shared box's load falls on both alike.

    .venv/bin/python scripts/handoff_bench.py [--seconds 2] [--runs 2] [--handoff socket,shm]
        [--sizes 1,150] [--concurrency 1,64]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hub.workers.arena import DEFAULT_SIZE, THRESHOLD, Arena
from hub.workers.wire import Channel, pack_arrays, unpack_arrays


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peer(path: str, ready: Any, threshold: int) -> None:
    async def main() -> None:
        def connect() -> Channel:
            channel: Channel
            arenas: dict[str, Arena | None] = {"in": None, "out": None}

            def received(header: dict, frames: list[memoryview]) -> None:
                kind = header["k"]
                if kind == "cpu":
                    channel.send({"k": "cpu", "t": header["t"], "cpu": _cpu()})
                    return
                if kind == "hello":  # as the model process answers a frontend's hello
                    arenas["in"] = Arena.attach(header["arena"]["name"], header["arena"]["size"])
                    arenas["out"] = Arena.create(header["arena"]["size"])
                    out_arena = arenas["out"]
                    assert out_arena is not None
                    channel.send({"k": "hello", "t": header["t"], "arena": out_arena.describe()})
                    return
                if kind == "mapped":
                    assert arenas["out"] is not None
                    arenas["out"].unlink()
                    return
                out_arena = arenas["out"]
                if out_arena is not None:
                    for offset in header.get("f", ()):
                        out_arena.free(offset)
                arrays = unpack_arrays(header["inputs"], frames, arenas["in"])
                described, out, block = pack_arrays(list(arrays.items()), out_arena, threshold)
                channel.send({"k": "reply", "t": header["t"], "outputs": described, "o": block}, out)

            channel = Channel(received, lambda exc: None)
            return channel

        server = await asyncio.get_running_loop().create_unix_server(connect, path)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def client(
    path: str, handoff: str, seconds: float, sizes: list[float], concurrencies: list[int], threshold: int
) -> list[dict[str, Any]]:
    futures: dict[int, asyncio.Future] = {}

    def received(header: dict, frames: list[memoryview]) -> None:
        futures.pop(header["t"]).set_result((header, frames))

    loop = asyncio.get_running_loop()
    _, channel = await loop.create_unix_connection(lambda: Channel(received, lambda exc: None), path)
    ids = iter(range(1, 1 << 62))
    arena: Arena | None = None
    peer_arena: Arena | None = None
    frees: list[int] = []

    async def call(header: dict, frames: list = ()) -> tuple[dict, list[memoryview]]:  # type: ignore[assignment]
        t = next(ids)
        header["t"] = t
        futures[t] = loop.create_future()
        channel.send(header, frames)
        return await futures[t]

    if handoff == "shm":
        arena = Arena.create(DEFAULT_SIZE)
        assert arena is not None
        reply, _ = await call({"k": "hello", "arena": arena.describe()})
        arena.unlink()
        peer_arena = Arena.attach(reply["arena"]["name"], reply["arena"]["size"])
        channel.send({"k": "mapped"})

    rows = []
    for kib in sizes:
        array = np.ones(int(kib * 1024), np.uint8)
        label = f"{kib:g} KiB"
        for concurrency in concurrencies:
            stop = time.perf_counter() + seconds
            done = 0

            async def loop_calls(stop: float = stop, array: np.ndarray = array) -> None:
                nonlocal done, frees
                while time.perf_counter() < stop:
                    # a frontend copies the request's tensor out of the protobuf buffer: count it
                    described, frames, block = pack_arrays([("x", array)], arena, threshold)
                    header: dict[str, Any] = {"k": "infer", "inputs": described}
                    if frees:
                        header["f"], frees = frees, []
                    reply, out = await call(header, frames)
                    if block >= 0 and arena is not None:
                        arena.free(block)
                    outputs = unpack_arrays(reply["outputs"], out, peer_arena)
                    assert outputs["x"].nbytes == array.nbytes
                    if reply["o"] >= 0:
                        frees.append(reply["o"])
                    done += 1

            peer_before = (await call({"k": "cpu"}))[0]["cpu"]
            mine_before, started = _cpu(), time.perf_counter()
            await asyncio.gather(*[loop_calls() for _ in range(concurrency)])
            elapsed = time.perf_counter() - started
            mine = _cpu() - mine_before
            peer_cpu = (await call({"k": "cpu"}))[0]["cpu"] - peer_before
            rows.append(
                {
                    "handoff": handoff,
                    "payload": label,
                    "concurrency": concurrency,
                    "round_trips_per_s": done / elapsed,
                    "client_us": mine / done * 1e6,
                    "peer_us": peer_cpu / done * 1e6,
                }
            )
    channel.transport.close()
    return rows


def run_once(handoff: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    path = str(Path(tempfile.mkdtemp()) / "handoff.sock")
    ready = multiprocessing.Event()
    process = multiprocessing.Process(target=peer, args=(path, ready, args.threshold), daemon=True)
    process.start()
    ready.wait(30)
    try:
        return asyncio.run(client(path, handoff, args.seconds, args.sizes, args.concurrency, args.threshold))
    finally:
        process.terminate()
        process.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=2, help="alternating runs of each hand-off")
    parser.add_argument("--handoff", default="socket,shm")
    parser.add_argument("--sizes", default="1,150", help="payloads in KiB (150: a 224x224x3 uint8 image)")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument(
        "--threshold", type=int, default=THRESHOLD, help="bytes from which a tensor goes through the arena (0: all)"
    )
    args = parser.parse_args()
    args.sizes = [float(s) for s in args.sizes.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    handoffs = args.handoff.split(",")
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for _ in range(args.runs):
        for handoff in handoffs:
            for row in run_once(handoff, args):
                results.setdefault((row["payload"], row["handoff"], row["concurrency"]), []).append(row)
    load = os.getloadavg()[0]
    print(f"hand-off (hub/workers), {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {load:.1f}, {time.strftime('%Y-%m-%d')}; median of {args.runs} alternating runs")  # fmt: skip
    print(f"{'payload':<12}{'hand-off':<9}{'c':>4}{'round trips/s':>15}{'client µs/rt':>14}{'peer µs/rt':>12}")
    order = sorted(results.items(), key=lambda kv: (float(kv[0][0].split()[0]), kv[0][2], kv[0][1]))
    for (payload, handoff, concurrency), runs in order:

        def median(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return float(np.median([r[key] for r in runs]))

        print(
            f"{payload:<12}{handoff:<9}{concurrency:>4}{median('round_trips_per_s'):>15.0f}"
            f"{median('client_us'):>14.1f}{median('peer_us'):>12.1f}"
        )


if __name__ == "__main__":
    main()
