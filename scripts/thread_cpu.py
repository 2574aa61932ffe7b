"""CPU per request of each thread of a running server, under the peer kit's loadgen (issue 12).

Reads /proc/<pid>/task/*/stat before and after a window of closed-loop load, and divides each
thread's CPU by the requests answered: the event loop (the thread named after the process),
grpc's poller and EventEngine threads, the batcher's workers. Run it with the kit's client
Python (it starts the kit's loadgen.py):

    ~/.cache/modelhub-peers/venv/client/bin/python scripts/thread_cpu.py \\
        --pid "$(pgrep -f 'grpc-port 9000')" --url 127.0.0.1:9000 --model digits_cnn --concurrency 64

`--pid` may be given once per process (the model process and each frontend of --workers N):
each is shown with its threads and its total. With `--kit` a copy of the kit whose loadgen.py
is scripts/loadgen_channels.py (as `make bench` makes under bench-results/kit-channels) and
LOADGEN_CHANNELS=4, the load comes over four connections.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def threads(pid: int) -> dict[str, tuple[str, int]]:
    """Thread id -> (name, CPU ticks) for one process."""
    found = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended
            continue
        found[task] = (name, int(fields[11]) + int(fields[12]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pid", type=int, action="append", required=True, help="a process to measure (repeatable)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--shape", default="1,8,8", help="per-sample input shape, as loadgen.py takes it")
    parser.add_argument("--concurrency", default="64")
    parser.add_argument("--window", type=float, default=8.0)
    parser.add_argument("--kit", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "bench")
    args = parser.parse_args()
    load = subprocess.Popen(
        [sys.executable, str(args.kit / "loadgen.py"), "--url", args.url, "--model", args.model,
         "--shape", args.shape, "--concurrency", args.concurrency, "--window", str(args.window), "--warmup", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    time.sleep(1.5)
    before, started = {pid: threads(pid) for pid in args.pid}, time.monotonic()
    time.sleep(args.window - 1.0)
    after, seconds = {pid: threads(pid) for pid in args.pid}, time.monotonic() - started
    rate = json.loads(load.communicate()[0])["infer_s"]
    tick = os.sysconf("SC_CLK_TCK")
    print(f"{args.model} c={args.concurrency}: {rate:.0f} requests/s")
    everything = 0.0
    for pid in args.pid:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        print(f"  process {pid}: {command[-60:]}")
        total = 0.0
        for task, (name, ticks) in sorted(after[pid].items()):
            used = (ticks - before[pid].get(task, (name, 0))[1]) / tick / seconds / rate * 1e6
            total += used
            if used >= 1:
                print(f"  {task:>8} {name:<16} {used:6.0f} µs per request")
        print(f"  {'':>8} {'all threads':<16} {total:6.0f} µs per request")
        everything += total
    if len(args.pid) > 1:
        print(f"  {'':>8} {'all processes':<16} {everything:6.0f} µs per request")


if __name__ == "__main__":
    main()
