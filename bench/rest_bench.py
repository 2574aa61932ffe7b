"""REST beside gRPC, ours and PyTriton's, in one alternating run: perf_analyzer (-i http and
-i grpc, async, batch 1) per target and concurrency, with server CPU per inference (CPU time
of the process group that listens on the target's port, over the inferences its statistics
count in that time).

    python bench/rest_bench.py --target ours_http=http:127.0.0.1:9001:digits_cnn:9001 \\
        --target ours_grpc=grpc:127.0.0.1:9000:digits_cnn:9001 ... [--concurrency 16,64] [--rounds 2]

A target is NAME=PROTOCOL:HOST:PORT:MODEL:STATS_HTTP_PORT (the REST port whose
/v2/models/MODEL/stats counts that server's inferences, whichever protocol they came by).
PROTOCOL grpc+shm is gRPC with inputs and outputs in system shared memory (perf_analyzer
--shared-memory system), for a server started with --shared-memory system.
Prints one JSON line per measurement, then a Markdown table (median over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("PEERS_WORK", Path.home() / ".cache" / "modelhub-peers"))


@dataclass
class Target:
    name: str
    protocol: str
    host: str
    port: int
    model: str
    stats_port: int

    @classmethod
    def parse(cls, spec: str) -> Target:
        name, _, rest = spec.partition("=")
        protocol, host, port, model, stats = rest.split(":")
        return cls(name, protocol, host, int(port), model, int(stats))

    def flags(self) -> list[str]:
        """perf_analyzer's protocol flags: -i, and shared memory for grpc+shm (64 KiB per
        output holds every bundled model's batch-1 output)."""
        if self.protocol == "grpc+shm":
            return ["-i", "grpc", "--shared-memory", "system", "--output-shared-memory-size", "65536"]
        return ["-i", self.protocol]

    def inferences(self) -> int:
        url = f"http://{self.host}:{self.stats_port}/v2/models/{self.model}/stats"
        with urllib.request.urlopen(url, timeout=10) as response:
            stats = json.load(response)["model_stats"]
        return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)


def listen_pgid(port: int) -> int | None:
    """Process group of the process listening on TCP `port` on this box."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return os.getpgid(int(pid))
        except OSError:
            continue
    return None


def group_cpu_seconds(pgid: int) -> float:
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(pa: str, target: Target, concurrency: int, window_ms: int) -> dict[str, object]:
    pgid = listen_pgid(target.port)
    before_cpu = group_cpu_seconds(pgid) if pgid else 0.0
    before_n = target.inferences()
    command = [pa, "-m", target.model, *target.flags(), "-u", f"{target.host}:{target.port}", "-a",
               "--concurrency-range", str(concurrency), "-p", str(window_ms), "-s", "25", "-r", "8"]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    cpu = (group_cpu_seconds(pgid) - before_cpu) if pgid else float("nan")
    count = target.inferences() - before_n
    out = result.stdout + result.stderr
    block = out[out.rfind("Request concurrency:") :]

    def grab(pattern: str) -> float | None:
        match = re.search(pattern, block)
        return float(match.group(1)) if match else None

    return {
        "target": target.name,
        "concurrency": concurrency,
        "infer_s": grab(r"Throughput: ([\d.]+) infer/sec"),
        "p50_ms": (grab(r"p50 latency: (\d+) usec") or 0) / 1e3,
        "p99_ms": (grab(r"p99 latency: (\d+) usec") or 0) / 1e3,
        "cpu_us_per_inf": round(cpu / count * 1e6) if count else None,
        "served_s": round(count / elapsed),
        "stable": "Failed to obtain stable" not in out,
        "rc": result.returncode,
        "load1": round(os.getloadavg()[0], 2),
    }


def table(rows: list[dict[str, object]], concurrencies: list[int]) -> str:
    names = list(dict.fromkeys(str(r["target"]) for r in rows))
    head = "| target | " + " | ".join(f"c={c} infer/s · CPU µs/inf" for c in concurrencies) + " |"
    lines = [head, "|---|" + "---|" * len(concurrencies)]
    for name in names:
        cells = []
        for c in concurrencies:
            mine = [r for r in rows if r["target"] == name and r["concurrency"] == c]
            rates = [float(r["infer_s"]) for r in mine if r["infer_s"] is not None]  # type: ignore[arg-type]
            cpus = [float(r["cpu_us_per_inf"]) for r in mine if r["cpu_us_per_inf"] is not None]  # type: ignore[arg-type]
            rate = f"{statistics.median(rates):.0f} ({min(rates):.0f}..{max(rates):.0f})" if rates else "n/a"
            cells.append(f"{rate} · {statistics.median(cpus):.0f}" if cpus else rate)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", required=True, type=Target.parse)
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=int, default=3000, help="perf_analyzer window in ms")
    parser.add_argument("--perf-analyzer", default=str(WORK / "perf_analyzer"))
    parser.add_argument("--out", type=Path, help="also append the JSON lines here")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for round_ in range(args.rounds):
        order = args.target if round_ % 2 == 0 else list(reversed(args.target))
        for target in order:
            for concurrency in concurrencies:
                row = {"round": round_, **measure(args.perf_analyzer, target, concurrency, args.window)}
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if args.out:
                    with args.out.open("a") as out:
                        out.write(line + "\n")
    print()
    print(table(rows, concurrencies))


if __name__ == "__main__":
    main()
