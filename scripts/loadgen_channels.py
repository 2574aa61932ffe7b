"""The peer kit's closed-loop loadgen over several connections (issue 12).

The kit's `loadgen.py` sends every request over one channel, so one TCP connection: against
servers that share a port through SO_REUSEPORT (`--workers N`, `--reuse-port`) the kernel hands
that one connection to one process, and the others idle. This runs the kit's own request and
measuring loop (`build_request`, `one_level`, imported from it) over `LOADGEN_CHANNELS`
channels (default 4), each with a subchannel pool of its own so that each is its own
connection; each client task of the loop keeps one. Its output lines are the kit's.

`scripts/bench.sh` puts it in a copy of the kit as `loadgen.py` (the kit's own as
`loadgen_kit.py`), so that the kit's `run.sh` drives it unchanged:

    LOADGEN_CHANNELS=4 bash "$KIT_COPY/run.sh" --cpu --targets echo_grpc_aio ...
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import weakref
from typing import Any

import grpc
from loadgen_kit import METHOD, build_request, one_level, pb  # the kit's loadgen.py, beside this file


async def main(args: argparse.Namespace) -> None:
    shape = tuple(int(s) for s in args.shape.split(","))
    payload = build_request(args.model, shape, args.input, args.output, args.batch)
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    count = int(os.environ.get("LOADGEN_CHANNELS", "4"))
    if count < 1:
        raise SystemExit(f"LOADGEN_CHANNELS must be 1 or more, got {count}")
    channels = [grpc.aio.insecure_channel(args.url, options=[*options, ("loadgen.channel", i)]) for i in range(count)]
    calls = [channel.unary_unary(METHOD) for channel in channels]
    for call in calls:  # connect each before the clock starts
        first = pb.ModelInferResponse.FromString(await call(payload, timeout=30))
        assert first.outputs, first
    turn = itertools.cycle(calls)
    sticky: weakref.WeakKeyDictionary[asyncio.Task[Any], Any] = weakref.WeakKeyDictionary()

    def own_channel(request: bytes, timeout: float) -> Any:
        """Each of `one_level`'s client tasks keeps the channel it first took, as a client
        with a connection of its own does (taking them in turn per request instead holds
        every connection to the pace of the slowest process: 0.83x on two --reuse-port servers)."""
        task = asyncio.current_task()
        assert task is not None
        if (call := sticky.get(task)) is None:
            call = sticky[task] = next(turn)
        return call(request, timeout=timeout)

    for concurrency in (int(c) for c in args.concurrency.split(",")):
        row = await one_level(own_channel, payload, concurrency, args.warmup, args.window, args.timeout)
        row.update(
            model=args.model, url=args.url, tag=args.tag, load1=os.getloadavg()[0],
            out_shape=list(first.outputs[0].shape), channels=count,
        )  # fmt: skip
        print(json.dumps(row), flush=True)
    for channel in channels:
        await channel.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--shape", required=True, help="per-sample input shape, e.g. 1,8,8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input", default="INPUT__0")
    parser.add_argument("--output", default="OUTPUT__0")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--window", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--tag", default="")
    asyncio.run(main(parser.parse_args()))
