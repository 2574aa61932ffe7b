"""ResNet-50 throughput on one machine (GPU or CPU): served, bare, and eager against compiled.

    python3 scripts/bench_gpu.py --out bench-results/gpu-bench.json          # make bench-gpu

1. served: `modelhub serve` in a subprocess (free ports, only plugins/resnet), driven by
   Triton's perf_analyzer (tools/perf_analyzer, `make perf-analyzer`) at each client
   concurrency, one image per request: the dynamic batcher forms the batches. Throughput,
   p50/p99 latency, the average batch the server executed, and where the server's CPU went per
   request (from /proc, over the requests its statistics counted): the event loop of the
   process that batches (the model process of --workers N, else the one server) and how busy
   it was, that process in all, and the frontends.
2. bare: the same target's artifact in-process (Runtime.run: numpy uint8 in, logits out, so host
   to device copies included, no RPC), at each batch size. On CUDA torch-compile runs through
   CudaGraphRuntime: a batch of 1 is padded to the bucket of 2.
3. compare (issue 4): eager fp32, eager fp16, compiled fp32 and compiled fp16 (the torch-compile
   target's own path: one Inductor compile, a CUDA graph per bucket) at batch 1 and 128. On CPU
   only eager fp32 against the served target.

Default target: torch-compile on CUDA, onnx on CPU (--target). Defaults on CPU are smaller
(concurrency 1,4,8, batches 1,4,16, shorter windows), so the script can be checked end to end
without a GPU. Results: a table on stdout and JSON at --out, rewritten after each step so that
a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # hub/ and plugins/ from this checkout, also when run as a script

MODEL = "resnet"
PLUGIN = ROOT / "plugins" / "resnet"
#: `make perf-analyzer` installs it under tools/; `make gpu-wheels` stages a slim copy for a device machine.
PERF_ANALYZERS = (
    ROOT / "tools" / "perf_analyzer" / "perf_analyzer",
    ROOT / "wheels-gpu" / "perf_analyzer" / "perf_analyzer",
)


def log(message: str) -> None:
    print(message, flush=True)


def failure(exc: BaseException) -> str:
    """An exception as the log needs it: its type and message (tritonclient's exceptions have
    an empty repr)."""
    return f"{type(exc).__name__}: {exc}"


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    model = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores (torch {torch.__version__})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


class Results:
    """What was measured so far; written to --out after every step."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            **header,
            "served": [],
            "cuda_shm": [],
            "bare": [],
            "compare": [],
            "loads": [],
            "errors": [],
        }

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.data[section].append(row)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


# --- served ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(
    args: argparse.Namespace, plugins: Path, config: Path, server_log: Path, workers: int = 1, shm: str = ""
) -> Iterator[tuple[str, int]]:
    """`modelhub serve` in its own process group, until the model is ready: its URL and pid;
    stopped on exit."""
    import tritonclient.grpc as tc

    grpc_port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "hub.cli", "serve", "--plugins-dir", str(plugins), "--no-entry-points",
               "--model-repository", str(args.model_repository), "--host", "127.0.0.1",
               "--grpc-port", str(grpc_port), "--http-port", "0", "--metrics-port", str(metrics_port),
               "--device", args.device, "--threads", str(args.threads), "--config", str(config),
               "--workers", str(workers)]  # fmt: skip
    if shm:
        command += ["--shared-memory", shm]
    log(f"starting: {' '.join(command)} (log: {server_log})")
    server_log.parent.mkdir(parents=True, exist_ok=True)
    with server_log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"127.0.0.1:{grpc_port}"
    try:
        started = time.perf_counter()
        client = tc.InferenceServerClient(url)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}; see {server_log}")
            with contextlib.suppress(Exception):
                if client.is_model_ready(MODEL):
                    break
            if time.perf_counter() - started > args.ready_timeout:
                raise RuntimeError(f"'{MODEL}' not ready after {args.ready_timeout:.0f}s; see {server_log}")
            time.sleep(0.5)
        log(f"server ready in {time.perf_counter() - started:.1f}s (build, validation and load included)")
        yield url, process.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def warm_sizes(concurrency: int, max_batch_size: int) -> list[int]:
    """The batch sizes the server may form from `concurrency` requests of one image: the powers
    of two and the largest, never above the model's max_batch_size (which refuses a larger
    request; 0: no batching, so no limit of its own)."""
    top = min(concurrency, max_batch_size) if max_batch_size > 0 else concurrency
    return sorted({2**i for i in range(top.bit_length())} | {top})


def warm_served(url: str, concurrency: int, images: np.ndarray) -> None:
    """One request per batch size the server may form at `concurrency`, twice, before
    perf_analyzer measures: the server's graphs are captured at load, but the first requests
    still warm the gRPC and allocator paths."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url)
    for size in warm_sizes(concurrency, client.get_model_config(MODEL).config.max_batch_size):
        batch = np.resize(images, (size, *images.shape[1:]))
        tensor = tc.InferInput("image", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        for _ in range(2):
            client.infer(MODEL, [tensor], client_timeout=300)


#: perf_analyzer's flags for inputs and outputs in CUDA shared memory (resnet's logits: 4,000 bytes).
CUDA_SHM = ("--shared-memory", "cuda", "--output-shared-memory-size", "4096")


def perf_analyzer(
    binary: Path, url: str, concurrency: int, seconds: float, extra: tuple[str, ...] = (), spread: bool = False
) -> dict[str, Any]:
    """perf_analyzer at one concurrency: three windows of seconds/3 (a lenient stability check,
    so that it ends after three), requests of one image each.

    Asynchronous (`--async`) unless `spread`. `--async` sends every request over one connection,
    and SO_REUSEPORT hands a connection to one frontend, so with --workers N > 1 all but one
    would idle. Synchronous, it runs a client per concurrency slot, six to a channel: about
    c/6 connections, which the kernel spreads over the frontends (counted with `ss` on the 2-core
    box: 3 connections at c=16 and 22 at c=128, against 3 at c=16, 64 and 128 with --async)."""
    window_ms = max(500, int(seconds * 1000 / 3))
    command = ["sh", str(binary), "-m", MODEL, "-i", "grpc", "-u", url, "-b", "1",
               *(() if spread else ("--async",)),
               "--concurrency-range", str(concurrency), "-p", str(window_ms), "-r", "3", "-s", "1000",
               "--input-data", "random", *extra]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds * 4 + 120)
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer exited {result.returncode}: {text[-2000:]}")

    def number(pattern: str) -> float | None:
        found = re.findall(pattern, text)
        return float(found[-1]) if found else None

    inferences = number(r"Inference count: (\d+)")
    executions = number(r"Execution count: (\d+)")
    p50, p99 = number(r"p50 latency: (\d+) usec"), number(r"p99 latency: (\d+) usec")
    return {
        "concurrency": concurrency,
        "images_per_s": number(r"Throughput: ([\d.]+) infer/sec"),
        "p50_ms": p50 / 1000 if p50 is not None else None,
        "p99_ms": p99 / 1000 if p99 is not None else None,
        "avg_batch": round(inferences / executions, 1) if inferences and executions else None,
        "window_ms": window_ms,
        "mode": "sync" if spread else "async",
        "server_us": server_time(text),
    }


#: perf_analyzer's server-side split of a request's time, from the server's ModelStatistics.
_SERVER_TIME = re.compile(
    r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ compute input (\d+) usec "
    r"\+ compute infer (\d+) usec \+ compute output (\d+) usec\)"
)


def server_time(text: str) -> dict[str, int] | None:
    """Where a request's time went in the server, µs on average (the last such line in
    perf_analyzer's output): what the issue asks recorded when served throughput misses."""
    found = _SERVER_TIME.findall(text)
    if not found:
        return None
    names = ("request", "overhead", "queue", "compute_input", "compute_infer", "compute_output")
    return dict(zip(names, map(int, found[-1]), strict=True))


def run_served(args: argparse.Namespace, results: Results, images: np.ndarray) -> None:
    binary = args.perf_analyzer or next((p for p in PERF_ANALYZERS if p.exists()), PERF_ANALYZERS[0])
    if not binary.exists():
        results.data["errors"].append(f"served: {binary} is missing (make perf-analyzer)")
        log(f"served: skipped, {binary} is missing (make perf-analyzer)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        plugins = Path(tmp) / "plugins"
        plugins.mkdir()
        (plugins / PLUGIN.name).symlink_to(PLUGIN)
        config = Path(tmp) / "deploy.toml"
        config.write_text(f'[models.{MODEL}]\ntarget = "{args.target}"\n')
        for workers in args.workers:
            served_log = args.out.with_suffix(f".server-w{workers}.log")
            # Client CUDA shared memory (issue 16): in one process, and behind the most frontends,
            # where the model process opens the regions and reads them for every frontend.
            shm = ""
            if args.device == "cuda" and args.cuda_shm_concurrency and workers in (1, max(args.workers)):
                shm = "cuda"
            try:  # one worker count failing (a start, the warm-up) leaves the others to measure
                with serving(args, plugins, config, served_log, workers, shm) as (url, pid):
                    warm_served(url, max(args.concurrency) if args.device == "cuda" else 1, images)
                    measure_served(args, binary, url, workers, results, pid)
                    if shm:
                        measure_cuda_shm(args, binary, url, workers, results)
            except Exception as exc:
                results.data["errors"].append(f"served workers={workers}: {failure(exc)}")
                results.save()
                log(f"served workers={workers}: FAILED {failure(exc)}")


def measure_point(
    args: argparse.Namespace,
    binary: Path,
    url: str,
    concurrency: int,
    label: str,
    results: Any,
    extra: tuple[str, ...],
    spread: bool = False,
) -> dict[str, Any] | None:
    """One perf_analyzer measurement; if too few requests complete per window, once more with
    windows 3x longer. A failure is recorded in the results and gives None."""
    try:
        return perf_analyzer(binary, url, concurrency, args.seconds, extra, spread)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        log(f"{label} c={concurrency}: {str(exc).splitlines()[-1]}; again with longer windows")
    try:
        return perf_analyzer(binary, url, concurrency, args.seconds * 3, extra, spread)
    except (RuntimeError, subprocess.TimeoutExpired) as again:
        results.data["errors"].append(f"{label} c={concurrency}: {again}")
        log(f"{label} c={concurrency}: FAILED {again}")
        return None


def ticks(pid: int, tid: int | None = None) -> int:
    """CPU clock ticks (user + system) of a process, or of one of its threads."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rpartition(")")[2].split()
    except OSError:  # it exited
        return 0
    return int(fields[11]) + int(fields[12])


def roles(root: int) -> dict[int, str]:
    """The server's processes by pid: "server" (one process), or "supervisor" with its children
    "engine" (the model process) and "frontend" (from their --role)."""
    found = {root: "server"}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == root and b"--role" in argv:
            found[int(entry.name)] = argv[argv.index(b"--role") + 1].decode()
            found[root] = "supervisor"
    return found


class ServerCPU:
    """Where a running server's CPU goes per request over a measurement: its requests come from
    its own statistics (every request a perf_analyzer run sent, warm-up included), its CPU
    from /proc. The event loop of the batching process is its main thread (tid = pid)."""

    def __init__(self, url: str, root: int) -> None:
        import tritonclient.grpc as tc

        self.client = tc.InferenceServerClient(url)
        self.root = root

    def requests(self) -> int:
        stats = self.client.get_inference_statistics(MODEL, as_json=True)
        return sum(int(m.get("inference_stats", {}).get("success", {}).get("count", 0)) for m in stats["model_stats"])

    def snapshot(self) -> tuple[int, dict[str, int]]:
        by_role: dict[str, int] = {"loop": 0, "batching": 0, "frontends": 0}
        for pid, role in roles(self.root).items():
            if role in ("server", "engine"):
                by_role["loop"] += ticks(pid, pid)
                by_role["batching"] += ticks(pid)
            if role in ("server", "frontend"):
                by_role["frontends"] += ticks(pid)
        return self.requests(), by_role

    @staticmethod
    def per_request(before: tuple[int, dict[str, int]], after: tuple[int, dict[str, int]]) -> dict[str, Any]:
        count = after[0] - before[0]
        if count <= 0:
            return {}
        tick = 1e6 / os.sysconf("SC_CLK_TCK")
        return {f"{role}_us": round((after[1][role] - before[1][role]) * tick / count) for role in after[1]}


def measure_served(
    args: argparse.Namespace, binary: Path, url: str, workers: int, results: Any, pid: int | None = None
) -> None:
    """perf_analyzer at each concurrency against one running server: several frontends are
    driven over several connections (`perf_analyzer`, `spread`), one process over one. With
    the server's pid, each row also says where its CPU went per request (`ServerCPU`)."""
    cpu = ServerCPU(url, pid) if pid is not None else None
    for concurrency in args.concurrency:
        before = cpu.snapshot() if cpu is not None else None
        started = time.perf_counter()
        row = measure_point(args, binary, url, concurrency, "served", results, (), spread=workers > 1)
        if row is not None:
            row["workers"] = workers
            if cpu is not None and before is not None:
                after = cpu.snapshot()
                row.update(cpu.per_request(before, after))
                if "loop_us" in row:  # the share of the run the loop was on a core
                    served = (after[0] - before[0]) / (time.perf_counter() - started)
                    row["loop_busy"] = round(row["loop_us"] * served / 1e6, 2)
            results.add("served", row)
            log(f"served workers={workers} c={concurrency}: {row}")


def measure_cuda_shm(args: argparse.Namespace, binary: Path, url: str, workers: int, results: Any) -> None:
    """resnet with its image and logits in CUDA shared memory against raw gRPC, alternating at
    each concurrency (issue 16): what the socket copy and the host-to-device copy cost. Behind
    several frontends, synchronous and spread over connections, as measure_served drives them."""
    for concurrency in args.cuda_shm_concurrency:
        for transport, extra in (("grpc", ()), ("cuda-shm", CUDA_SHM), ("grpc", ()), ("cuda-shm", CUDA_SHM)):
            label = f"workers={workers} {transport}"
            row = measure_point(args, binary, url, concurrency, label, results, extra, spread=workers > 1)
            if row is not None:
                row["transport"], row["workers"] = transport, workers
                results.add("cuda_shm", row)
                log(f"{transport} c={concurrency}: {row}")


# --- in-process --------------------------------------------------------------------------------------


def measure(run: Callable[[dict[str, np.ndarray]], Any], images: np.ndarray, batch: int, seconds: float) -> float:
    """Images per second through run() at one batch size (warm calls first: compiles and
    CUDA-graph recordings happen there)."""
    inputs = {"image": np.resize(images, (batch, *images.shape[1:]))}
    for _ in range(3):
        run(inputs)
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        run(inputs)
        count += 1
    return count * batch / (time.perf_counter() - start)


def compiled_graphs() -> int:
    with contextlib.suppress(Exception):
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    return -1


def load_variant(name: str, load: Callable[[], Any], results: Results) -> Any:
    before, started = compiled_graphs(), time.perf_counter()
    runtime = load()
    row = {"variant": name, "seconds": round(time.perf_counter() - started, 1)}
    if compiled_graphs() >= 0:
        row["dynamo_graphs_compiled"] = compiled_graphs() - before
    if hasattr(runtime, "buckets"):
        row["cuda_graph_buckets"] = list(runtime.buckets)
    results.add("loads", row)
    log(f"loaded {name}: {row}")
    return runtime


def run_bare(args: argparse.Namespace, results: Results, images: np.ndarray) -> None:
    run_in_process(args, results, images, bare=True)


def run_compare(args: argparse.Namespace, results: Results, images: np.ndarray) -> None:
    run_in_process(args, results, images, bare=False)


def run_in_process(args: argparse.Namespace, results: Results, images: np.ndarray, *, bare: bool) -> None:
    """The served artifact in-process (`bare`), or the eager and compiled variants (issue 4),
    which reuse the bare figures where they are the same model."""
    import torch

    from hub.config import DeploymentConfig
    from hub.pipeline.builder import Builder
    from hub.plugins.manager import PluginHost
    from hub.process import set_torch_threads
    from hub.spec import ArtifactContext

    set_torch_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        plugins = Path(tmp) / "plugins"
        plugins.mkdir()
        (plugins / PLUGIN.name).symlink_to(PLUGIN)
        host = PluginHost(plugins, entry_points=False)
        targets = host.collect_targets()
        (spec,) = DeploymentConfig.parse({"models": {MODEL: {"target": args.target}}}).apply(host.collect_models())
        builder = Builder(args.model_repository, targets, host, args.device, args.threads)
        if bare:
            # The served artifact (built by gpu_fidelity.py into the same repository, or now; the
            # server then loads it from there).
            runtime = load_variant(f"{args.target} (served artifact)", lambda: builder.ensure(spec).runtime, results)
            for batch in args.batches:
                rate = measure(runtime.run, images, batch, args.bare_seconds)
                results.add("bare", {"target": args.target, "batch": batch, "images_per_s": round(rate, 1)})
                log(f"bare {args.target} b{batch}: {rate:,.1f} images/s")
            runtime.close()
            if args.device == "cuda":
                torch.cuda.empty_cache()
            return
        served = {row["batch"]: row["images_per_s"] for row in results.data["bare"]}
        cuda = args.device == "cuda"
        variants: list[tuple[str, str, Callable[[], Any]]] = [("eager fp32", "torch", spec.build)]
        if cuda:
            variants.append(("eager fp16", "torch-fp16", spec.build))
            variants.append(("compiled fp32", "torch-compile", spec.build))
            # Half weights and buffers: the model casts its uint8 input to its buffers' dtype.
            variants.append(("compiled fp16", "torch-compile", lambda: spec.build().half()))
        else:
            variants.append((f"{args.target} (served target)", args.target, spec.build))
        for index, (name, target, build) in enumerate(variants):
            reuse = target == args.target and build is spec.build and served
            if reuse and all(b in served for b in args.compare_batches):
                for batch in args.compare_batches:
                    row = {"variant": name, "target": target, "batch": batch, "images_per_s": round(served[batch], 1)}
                    results.add("compare", row)
                    log(f"compare {name} b{batch}: {served[batch]:,.1f} images/s (the bare run above)")
                continue
            variant_spec = spec.with_(build=build, target=target)
            ctx = ArtifactContext(spec=variant_spec, directory=Path(tmp) / f"variant{index}", device=args.device,
                                  threads=args.threads)  # fmt: skip
            ctx.directory.mkdir()
            try:
                runtime = load_variant(name, lambda t=target, c=ctx: targets[t].load(c), results)
                for batch in args.compare_batches:
                    rate = measure(runtime.run, images, batch, args.bare_seconds)
                    results.add("compare", {"variant": name, "target": target, "batch": batch,
                                            "images_per_s": round(rate, 1)})  # fmt: skip
                    log(f"compare {name} b{batch}: {rate:,.1f} images/s")
                runtime.close()
            except Exception as exc:  # one variant failing leaves the others to measure
                results.data["errors"].append(f"compare {name}: {failure(exc)}")
                results.save()
                log(f"compare {name}: FAILED {failure(exc)}")
            if cuda:
                torch.cuda.empty_cache()


# --- report ----------------------------------------------------------------------------------------


def against_bare(row: dict[str, Any], bare: list[dict[str, Any]]) -> str:
    """A served row against the bare model: its images/s over the bare model's at the smallest
    measured batch that holds the average batch the server formed (the largest measured if none
    does), and at c=1 its p50 minus the bare batch-1 latency."""
    rates = {int(b["batch"]): b["images_per_s"] for b in bare if b.get("images_per_s")}
    if not rates or not row.get("images_per_s") or not row.get("avg_batch"):
        return "-"
    batch = min((b for b in rates if b >= row["avg_batch"]), default=max(rates))
    text = f"{row['images_per_s'] / rates[batch]:.2f}x b{batch}"
    if row["concurrency"] == 1 and 1 in rates and row.get("p50_ms") is not None:
        text += f", p50 {row['p50_ms'] - 1000 / rates[1]:+.2f} ms"
    return text


def report(data: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str = "") -> str:
        if value is None:
            return "-"
        return format(value, spec or (",.0f" if value >= 100 else ".1f"))

    lines = [f"ResNet-50 ({MODEL}, UINT8 224x224x3 -> 1000 logits) on {data['device_name']}",
             f"target {data['target']}, {data['threads']} threads per runtime"]  # fmt: skip
    if data["served"]:
        lines += ["", "served (perf_analyzer, 1 image per request, the batcher forms batches)",
                  "CPU µs per request: the batching process's event loop (and the share of the run it was busy),",
                  "that process in all, and the frontends (the one process itself with workers 1). Server µs:",
                  "a request's average time in the server (ModelStatistics, by perf_analyzer) as queue + compute",
                  "input + infer + output, the rest in the protocol (perf_analyzer's \"overhead\"). Against bare:",
                  "images/s over the bare model's at the smallest measured batch that holds the average batch",
                  "formed; at c=1 also p50 minus the bare batch-1 latency (issue 12: >= 0.8x at c=128, <= 1 ms)",
                  "| workers | perf_analyzer | concurrency | images/s | against bare | p50 ms | p99 ms | avg batch "
                  "| loop µs (busy) | batching process µs | frontends µs "
                  "| server µs: queue + in + infer + out (rest) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in data["served"]:
            split = row.get("server_us") or {}
            lines.append(
                f"| {row.get('workers', 1)} | {row.get('mode', 'async')} | {row['concurrency']} "
                f"| {fmt(row['images_per_s'])} | {against_bare(row, data['bare'])} | {fmt(row['p50_ms'], '.1f')} "
                f"| {fmt(row['p99_ms'], '.1f')} | {fmt(row['avg_batch'], '.1f')} "
                f"| {fmt(row.get('loop_us'))} ({fmt(row.get('loop_busy'), '.2f')}) "
                f"| {fmt(row.get('batching_us'))} | {fmt(row.get('frontends_us'))} "
                + (
                    f"| {split['request']:,}: {split['queue']:,} + {split['compute_input']:,} + "
                    f"{split['compute_infer']:,} + {split['compute_output']:,} ({split['overhead']:,}) |"
                    if split
                    else "| - |"
                )
            )
    if data["cuda_shm"]:
        lines += ["", "resnet from CUDA shared memory against raw gRPC (alternating)",
                  "| workers | mode | transport | concurrency | images/s | p50 ms | p99 ms |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in data["cuda_shm"]:
            lines.append(
                f"| {row.get('workers', 1)} | {row.get('mode', 'async')} | {row['transport']} | {row['concurrency']} "
                f"| {fmt(row['images_per_s'])} "
                f"| {fmt(row['p50_ms'], '.1f')} | {fmt(row['p99_ms'], '.1f')} |"
            )
    if data["bare"]:
        lines += ["", f"bare {data['target']} in-process (Runtime.run, numpy in and out)", "| batch | images/s |",
                  "|---|---|"]  # fmt: skip
        lines += [f"| {row['batch']} | {fmt(row['images_per_s'])} |" for row in data["bare"]]
    if data["compare"]:
        batches = sorted({row["batch"] for row in data["compare"]})
        names = list(dict.fromkeys(row["variant"] for row in data["compare"]))
        cells = {(row["variant"], row["batch"]): row["images_per_s"] for row in data["compare"]}
        lines += ["", "eager against compiled, in-process, images/s",
                  "| variant | " + " | ".join(f"b{b}" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]  # fmt: skip
        lines += [f"| {name} | " + " | ".join(fmt(cells.get((name, b))) for b in batches) + " |" for name in names]
    if data["loads"]:
        lines += ["", "loads: " + "; ".join(f"{row['variant']} {row['seconds']}s" for row in data["loads"])]
    lines += [f"error: {error}" for error in data["errors"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--target", help="default: torch-compile on CUDA, onnx on CPU")
    parser.add_argument("--seconds", type=float, help="per served concurrency (default: 10 on CUDA, 6 on CPU)")
    parser.add_argument("--bare-seconds", type=float, help="per in-process batch size (default: 3 on CUDA, 2 on CPU)")
    parser.add_argument("--concurrency", type=ints, help="default: 1,16,128 on CUDA; 1,4,8 on CPU")
    parser.add_argument("--workers", type=ints, default=[1], help="frontend processes to serve with, one run each")
    parser.add_argument(
        "--cuda-shm-concurrency",
        type=ints,
        default=[128],
        help="on CUDA, with workers 1 and the most workers: perf_analyzer with CUDA shared memory against raw "
        "gRPC at these (default: 128)",
    )
    parser.add_argument("--batches", type=ints, help="bare batch sizes (default: 1,16,128 on CUDA; 1,4,16 on CPU)")
    parser.add_argument("--compare-batches", type=ints, help="default: 1,128 on CUDA; 1,4 on CPU")
    parser.add_argument("--no-served", dest="served", action="store_false", help="skip the served measurement")
    parser.add_argument("--no-bare", dest="bare", action="store_false", help="skip the bare measurement")
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="skip eager against compiled")
    parser.add_argument("--threads", type=int, default=0, help="compute threads per runtime (default: the server's)")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "bench-results" / "gpu-bench-models")
    parser.add_argument("--perf-analyzer", type=Path, help="default: tools/ (make perf-analyzer), else wheels-gpu/")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for the server to get ready")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "gpu-bench.json")
    args = parser.parse_args()
    # `timeout` sends SIGTERM: exit through the finally blocks, so the server subprocess stops too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from hub.server import default_threads, resolve_device

    args.device = resolve_device(args.device)
    cuda = args.device == "cuda"
    args.target = args.target or ("torch-compile" if cuda else "onnx")
    args.seconds = args.seconds or (10.0 if cuda else 6.0)
    args.bare_seconds = args.bare_seconds or (3.0 if cuda else 2.0)
    args.concurrency = args.concurrency or ([1, 16, 128] if cuda else [1, 4, 8])
    args.batches = args.batches or ([1, 16, 128] if cuda else [1, 4, 16])
    args.compare_batches = args.compare_batches or ([1, 128] if cuda else [1, 4])
    args.threads = args.threads or default_threads()
    args.model_repository = args.model_repository.resolve()
    # Inductor compiles Triton kernels in parallel worker processes; the default here is the
    # runtime's thread count, far fewer than the cores a one-off benchmark box has.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(os.cpu_count() or 1))

    sys.path.insert(0, str(PLUGIN.parent))
    from resnet.model import example_images

    images = example_images(4)
    results = Results(
        args.out,
        {
            "model": MODEL,
            "device": args.device,
            "device_name": device_name(args.device),
            "target": args.target,
            "threads": args.threads,
            "seconds_per_served_point": args.seconds,
            "seconds_per_bare_point": args.bare_seconds,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    results.save()
    log(f"{results.data['device_name']}: target {args.target}, results to {args.out}")
    # The bare model first: issue 12's ratio needs it, and a budget cut short loses the last
    # step (issue 4's comparison), not the denominator.
    steps = [("bare", args.bare, run_bare), ("served", args.served, run_served), ("compare", args.compare, run_compare)]
    for name, wanted, step in steps:
        if not wanted:
            continue
        try:
            step(args, results, images)
        except Exception as exc:  # report it, and go on with the next step
            results.data["errors"].append(f"{name}: {failure(exc)}")
            results.save()
            log(f"{name}: FAILED {failure(exc)}")
    log("")
    log(report(results.data))
    return 1 if results.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
