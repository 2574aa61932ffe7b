"""`make fuzz`: 100,000+ mutated requests per protocol against `modelhub serve` on 127.0.0.1.

Starts the server in a subprocess (digits and the test plugins; model control and system
shared memory on), sends the cases of tests/fuzzing.py (the default suite's fuzzer, unbounded
here), judges every answer (a defined status with a bounded message, over REST a JSON error;
or a well-formed answer, with a result equal to the model's, computed here), probes the
server's liveness after every chunk, and samples its RSS. --protocol grpc (ModelInfer
messages), rest (KServe V2 HTTP: JSON and binary-extension infer bodies, compressed or not,
odd headers, and every other endpoint with mutated names and bodies), or grpc,rest (both,
chunk by chunk, on one server). Prints the rate; exits 1 on any problem, if the server dies or
stops answering its probe, or if its RSS grew more than --max-growth after the warm-up.

    .venv/bin/python scripts/fuzz.py --cases 100000
    .venv/bin/python scripts/fuzz.py --cases 20000 --protocol rest --workers 2 --model-copies none

With --workers N (and --model-copies, as `modelhub serve` takes them) the server is the
supervisor and its processes, and the RSS sampled is all of theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import fuzzing  # noqa: E402


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == parent:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):  # it exited
                continue
    return found


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:  # it exited
        pass
    return 0


class ServedProcess:
    """`modelhub serve` on 127.0.0.1 with an OS-chosen port; its log goes to a file (a pipe
    nobody reads would fill and block the server)."""

    def __init__(self, plugins: list[Path], work: Path, *extra: str) -> None:
        folder = work / "plugins"
        folder.mkdir(parents=True, exist_ok=True)
        for source in plugins:
            link = folder / source.name
            if not link.exists():
                link.symlink_to(source)
        self.models = work / "models"
        self.log_path = work / "server.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "hub.cli", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
                   "--http-port", "0", "--metrics-port", "0", "--model-control", "--shared-memory", "system",
                   "--device", "cpu", "--no-entry-points", "--plugins-dir", str(folder),
                   "--model-repository", str(self.models), *extra]  # fmt: skip
        self.proc = subprocess.Popen(command, stderr=self.log, cwd=ROOT)
        self.port = self.http_port = 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            text = self.log_path.read_text()
            match = re.search(r"listening: grpc 127\.0\.0\.1:(\d+).*?, http 127\.0\.0\.1:(\d+)", text)
            if match:
                self.port, self.http_port = int(match.group(1)), int(match.group(2))
            if self.port and _server_ready(self.url):
                return
            time.sleep(0.2)
        raise SystemExit("server did not come up:\n" + self.log_path.read_text()[-4000:])

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def address(self, protocol: str) -> str:
        return self.url if protocol == "grpc" else f"127.0.0.1:{self.http_port}"

    def rss_mib(self) -> float:
        """The server's resident memory: its process and, behind --workers N, its children's."""
        return sum(_rss_kib(pid) for pid in (self.proc.pid, *_children(self.proc.pid))) / 1024

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, and the exit code; a server still there 60 s later is killed (its code is
        then -9, a failure) rather than left behind, spinning, after the run."""
        self.proc.terminate()
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            for pid in (*_children(self.proc.pid), self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            code = self.proc.wait(10)
            print("the server did not exit within 60 s of SIGTERM: killed", file=sys.stderr)
        self.log.close()
        return code


def _server_ready(url: str) -> bool:
    import grpc

    from hub.protocol.generated import grpc_service_pb2 as pb

    with grpc.insecure_channel(url) as channel:
        ready = channel.unary_unary("/inference.GRPCInferenceService/ServerReady")
        try:
            return bool(pb.ServerReadyResponse.FromString(ready(b"", timeout=2)).ready)
        except grpc.RpcError:
            return False


def test_plugins() -> list[Path]:
    return [ROOT / "plugins" / "digits", *sorted((ROOT / "tests" / "plugins").glob("*.py"))]


def references(models: Path) -> dict[str, Any]:
    """The fuzzer's references, digits from its built ONNX artifact run here."""
    refs: dict[str, Any] = {name: fuzzing.REFERENCES.get(name) for name in fuzzing.REFERENCES}
    refs["sleepy"] = None
    onnx_file = models / "digits" / "1" / "model.onnx"
    refs["digits"] = None
    if onnx_file.exists():
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        refs["digits"] = lambda inputs: dict(zip(names, session.run(None, {"image": inputs["image"]}), strict=True))
    return refs


def _chunks(cases: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for case in cases:
        chunk.append(case)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tracebacks(log_text: str) -> int:
    """The tracebacks in the server's log, but those of the model made to fail (fragile's
    "poisoned row", which the server logs as it should)."""
    parts = log_text.split("Traceback (most recent call last):")[1:]
    return sum("poisoned row" not in re.split(r"\n\d{4}-\d\d-\d\d ", part, maxsplit=1)[0] for part in parts)


def _cases(protocol: str, count: int, rng: random.Random, shm: str) -> Iterator[Any]:
    if protocol == "grpc":
        return iter(fuzzing.mutations(fuzzing.seed_requests(rng), count, rng))
    return iter(fuzzing.rest_cases(count, rng, shm=shm))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000, help="cases per protocol")
    parser.add_argument("--protocol", default="grpc", choices=["grpc", "rest", "grpc,rest"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--max-growth", type=float, default=0.10, help="RSS growth allowed after warm-up")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "fuzz.json")
    parser.add_argument("--workers", type=int, help="serve with --workers N (the RSS is then every process's)")
    parser.add_argument("--model-copies", choices=["cpu", "none"], help="with --workers: serve with --model-copies")
    args = parser.parse_args()
    protocols = args.protocol.split(",")
    extra = [] if args.workers is None else ["--workers", str(args.workers)]
    if args.model_copies:
        extra += ["--model-copies", args.model_copies]

    # A system shared-memory object for the REST cases to register (as regions fuzz0 and
    # fuzz1) and name in infer requests.
    shm = f"/modelhub-fuzz-{os.getpid()}"
    Path("/dev/shm" + shm).write_bytes(bytes(4096))
    try:
        with tempfile.TemporaryDirectory(prefix="modelhub-fuzz-") as work:
            server = ServedProcess(test_plugins(), Path(work), *extra)
            refs = references(server.models)
            seeds = {p: random.Random(args.seed + (p == "rest")) for p in protocols}
            streams = {p: _chunks(_cases(p, args.cases, seeds[p], shm), 5000) for p in protocols}
            totals = {p: fuzzing.Verdicts() for p in protocols}
            samples: list[tuple[int, float]] = []
            warm = max(1000, args.cases // 20) * len(protocols)
            started = time.monotonic()
            sent = 0
            while streams and server.alive():
                for protocol, stream in list(streams.items()):
                    chunk = next(stream, None)
                    if chunk is None:
                        del streams[protocol]
                        continue
                    address = server.address(protocol)
                    verdicts = asyncio.run(
                        fuzzing.run(address, chunk, refs, protocol=protocol, concurrency=args.concurrency)
                    )
                    sent += len(chunk)
                    totals[protocol].add(verdicts)
                    if server.alive() and not asyncio.run(fuzzing.probe(address, protocol)):
                        totals[protocol].problems.append("the server did not answer its liveness probe in 10 s")
                        streams.clear()
                        break
                if not server.alive():
                    totals[protocols[0]].problems.append("the server died")
                    break
                if samples and samples[-1][0] == sent:  # the streams had ended
                    break
                samples.append((sent, server.rss_mib()))
                print(f"{sent:>8} cases  {sent / (time.monotonic() - started):7.0f}/s  rss {samples[-1][1]:.0f} MiB",
                      flush=True)  # fmt: skip
            elapsed = time.monotonic() - started
            baseline = next((rss for n, rss in samples if n >= warm), samples[0][1])
            final = samples[-1][1]
            growth = final / baseline - 1
            code = server.stop()
            log_text = server.log_path.read_text()
    finally:
        Path("/dev/shm" + shm).unlink(missing_ok=True)
    problems = [problem for p in protocols for problem in totals[p].problems]
    result = {
        "cases": sent,
        "seconds": round(elapsed, 1),
        "rate_per_s": round(sent / elapsed),
        "concurrency": args.concurrency,
        "server": extra,
        **{
            p: {
                "codes": dict(totals[p].codes),
                "checked_results": totals[p].checked,
                "problems": len(totals[p].problems),
            }
            for p in protocols
        },
        "rss_mib": {"after_warmup": round(baseline), "final": round(final), "growth": round(growth, 4)},
        "tracebacks_in_log": _tracebacks(log_text),
        "exit_code": code,
        "problems": problems[:20],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    failed = problems or growth > args.max_growth or result["tracebacks_in_log"] or code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
