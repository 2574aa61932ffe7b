"""`make soak`: a bounded soak of `modelhub serve` on 127.0.0.1 at concurrency 32.

Each of 32 workers loops over good requests (digits, checked against its ONNX artifact run
here; BYTES through identity_bytes; a ModelStreamInfer of 8) and the bad ones of issue 13 (a
BYTES count its buffer cannot hold, an overflowing shape, an undecodable message, a 64 KB
model name, a missing input), each of which must get its own status. The server's RSS is
sampled every second. Fails on any unexpected answer, or RSS growth over --max-growth from the
end of the warm-up (the first fifth) to the end.

    .venv/bin/python scripts/soak.py --seconds 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from fuzz import ServedProcess, references, test_plugins  # noqa: E402

from hub.protocol.generated import grpc_service_pb2 as pb  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _request(model: str, tensors: list[tuple[str, str, list[int], bytes]], request_id: str = "") -> bytes:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    for name, datatype, shape, data in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(data)
    return request.SerializeToString()


BAD: dict[str, tuple[bytes, grpc.StatusCode]] = {
    "bytes count over buffer": (
        _request("identity_bytes", [("INPUT0", "BYTES", [1, 1 << 26], b"\0" * 36)]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "overflowing shape": (
        _request("identity_fp32", [("INPUT0", "FP32", [0, 1 << 62, 1 << 62], b"")]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "undecodable": (b"\xff\xff\xff\xff\x0f", grpc.StatusCode.INVALID_ARGUMENT),
    "64 KB model name": (pb.ModelInferRequest(model_name="m" * 65536).SerializeToString(), grpc.StatusCode.NOT_FOUND),
    "missing input (1 MiB)": (
        _request("addsub", [("INPUT0", "FP32", [1, 1 << 18], np.ones(1 << 18, np.float32).tobytes())]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
}


class Soak:
    def __init__(self, url: str, digits: Any, images: np.ndarray) -> None:
        self.url = url
        self.digits = digits
        self.images = images
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.latencies: list[float] = []

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)

    async def worker(self, index: int, until: float) -> None:
        options = [("grpc.max_receive_message_length", -1)]
        async with grpc.aio.insecure_channel(self.url, options=options) as channel:
            infer = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
            stream = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)
            step = index
            bad_step = index
            while time.monotonic() < until:
                step += 1
                kind = step % 10
                if kind < 5:
                    await self.good_digits(infer, step)
                elif kind == 5:
                    await self.good_bytes(infer, step)
                elif kind == 6:
                    await self.good_stream(stream, step)
                else:
                    bad_step += 1
                    await self.bad(infer, list(BAD)[bad_step % len(BAD)])

    async def good_digits(self, infer: Any, step: int) -> None:
        image = self.images[step % len(self.images)][None]
        started = time.monotonic()
        try:
            raw = await infer(_request("digits", [("image", "FP32", [1, 1, 8, 8], image.tobytes())]), timeout=30)
        except grpc.aio.AioRpcError as exc:
            self.error(f"digits: {exc.code().name}: {exc.details()}")
            return
        self.latencies.append(time.monotonic() - started)
        response = pb.ModelInferResponse.FromString(raw)
        logits = np.frombuffer(response.raw_output_contents[0], np.float32)
        if self.digits is not None:
            want = self.digits({"image": image})["logits"].reshape(-1)
            if not np.allclose(logits, want, rtol=1e-4, atol=1e-5):
                self.error("digits: logits differ from the in-process artifact")
        self.counts["digits OK"] += 1

    async def good_bytes(self, infer: Any, step: int) -> None:
        items = [f"sentence {step} {'x' * (step % 50)}".encode() for _ in range(4)]
        data = b"".join(struct.pack("<I", len(t)) + t for t in items)
        try:
            raw = await infer(_request("identity_bytes", [("INPUT0", "BYTES", [2, 2], data)]), timeout=30)
        except grpc.aio.AioRpcError as exc:
            self.error(f"identity_bytes: {exc.code().name}: {exc.details()}")
            return
        if pb.ModelInferResponse.FromString(raw).raw_output_contents[0] != data:
            self.error("identity_bytes: the answer differs from the request")
        self.counts["bytes OK"] += 1

    async def good_stream(self, stream: Any, step: int) -> None:
        requests = [
            _request("identity_fp32", [("INPUT0", "FP32", [1, 1], np.float32(i).tobytes())], str(i)) for i in range(8)
        ]
        seen = []
        try:
            async for raw in stream(iter(requests), timeout=30):
                response = pb.ModelStreamInferResponse.FromString(raw)
                if response.error_message:
                    self.error(f"stream: {response.error_message}")
                out = np.frombuffer(response.infer_response.raw_output_contents[0], np.float32)[0]
                if float(out) != float(response.infer_response.id):
                    self.error("stream: an answer differs from its request")
                seen.append(response.infer_response.id)
        except grpc.aio.AioRpcError as exc:
            self.error(f"stream: {exc.code().name}: {exc.details()}")
            return
        if sorted(seen, key=int) != [str(i) for i in range(8)]:
            self.error(f"stream: answered {seen}")
        self.counts["stream OK"] += 1

    async def bad(self, infer: Any, name: str) -> None:
        data, expected = BAD[name]
        try:
            await infer(data, timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != expected or len(exc.details() or "") > 1100:
                self.error(f"{name}: {exc.code().name} ({len(exc.details() or '')} chars), expected {expected.name}")
            self.counts[f"{name} refused"] += 1
            return
        self.error(f"{name}: answered OK")


async def sample(server: ServedProcess, until: float, samples: list[tuple[float, float]]) -> None:
    start = time.monotonic()
    while time.monotonic() < until and server.alive():
        samples.append((time.monotonic() - start, server.rss_mib()))
        await asyncio.sleep(1.0)


async def soak(server: ServedProcess, seconds: float, concurrency: int) -> tuple[Soak, list[tuple[float, float]]]:
    from safetensors.numpy import load_file

    tensors = load_file(str(ROOT / "plugins" / "digits" / "digits.safetensors"))
    images = tensors["heldout.images"].astype(np.float32)[:, None, :, :]
    refs = references(server.models)
    run = Soak(server.url, refs["digits"], images)
    until = time.monotonic() + seconds
    samples: list[tuple[float, float]] = []
    await asyncio.gather(sample(server, until, samples), *(run.worker(i, until) for i in range(concurrency)))
    return run, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "soak.json")
    parser.add_argument("--workers", type=int, help="serve with --workers N (the RSS is then every process's)")
    parser.add_argument("--model-copies", choices=["cpu", "none"], help="with --workers: serve with --model-copies")
    args = parser.parse_args()
    extra = [] if args.workers is None else ["--workers", str(args.workers)]
    if args.model_copies:
        extra += ["--model-copies", args.model_copies]
    with tempfile.TemporaryDirectory(prefix="modelhub-soak-") as work:
        server = ServedProcess(test_plugins(), Path(work), *extra)
        started = time.monotonic()
        run, samples = asyncio.run(soak(server, args.seconds, args.concurrency))
        elapsed = time.monotonic() - started
        alive = server.alive()
        code = server.stop()
        tracebacks = server.log_path.read_text().count("Traceback")
    warm_end = args.seconds / 5
    after_warm = [rss for t, rss in samples if t >= warm_end]
    baseline = statistics.median(after_warm[:5]) if after_warm else samples[0][1]
    final = statistics.median(after_warm[-5:]) if after_warm else samples[-1][1]
    growth = final / baseline - 1
    requests = sum(run.counts.values())
    lat = sorted(run.latencies)
    result = {
        "seconds": round(elapsed, 1),
        "concurrency": args.concurrency,
        "server": extra,
        "operations": dict(run.counts),
        "operations_per_s": round(requests / elapsed),
        "digits_latency_ms": {
            "p50": round(lat[len(lat) // 2] * 1e3, 2) if lat else None,
            "p99": round(lat[int(len(lat) * 0.99)] * 1e3, 2) if lat else None,
        },
        "rss_mib": {
            "start": round(samples[0][1]),
            "after_warmup": round(baseline),
            "final": round(final),
            "peak": round(max(r for _, r in samples)),
            "growth": round(growth, 4),
            "every_10s": [round(r) for t, r in samples[::10]],
        },
        "errors": run.errors,
        "server_alive_at_end": alive,
        "exit_code": code,
        "tracebacks_in_log": tracebacks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    failed = run.errors or growth > args.max_growth or not alive or code != 0 or tracebacks
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
