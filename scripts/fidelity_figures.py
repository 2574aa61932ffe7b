"""The CPU figures of issue 14, in-process: each bundled model built as onnx, onnx-int8 and
onnx-int8-dynamic through the real build pipeline (parity, accuracy, batch invariance), then
resnet's onnx against onnx-int8 throughput at batch 1 and 32, alternating, repeated.

    python3 scripts/fidelity_figures.py --out bench-results/fidelity.json [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ("onnx", "onnx-int8", "onnx-int8-dynamic")
PLUGINS = {"digits": "digits", "minilm": "embeddings", "resnet": "resnet"}


def rate(runtime: Any, inputs: dict[str, np.ndarray], seconds: float) -> float:
    """Images per second over at least `seconds` and at least 3 runs, after one warm-up run."""
    runtime.run(inputs)
    rows = len(next(iter(inputs.values())))
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        runtime.run(inputs)
        count += 1
    return count * rows / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repository", type=Path, default=Path("/tmp/modelhub-fidelity"))
    parser.add_argument("--models", nargs="+", default=list(PLUGINS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from hub.errors import BuildError
    from hub.pipeline.builder import Builder
    from hub.pipeline.report import report_parameters
    from hub.plugins.manager import PluginHost
    from hub.process import set_torch_threads

    set_torch_threads(args.threads)
    plugins = args.repository / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    for name in {PLUGINS[m] for m in args.models}:
        if not (plugins / name).exists():
            (plugins / name).symlink_to(ROOT / "plugins" / name)
    host = PluginHost(plugins, entry_points=False)
    specs = {s.name: s for s in host.collect_models()}
    results: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "reports": {}}
    runtimes: dict[str, Any] = {}
    for model in args.models:
        for target in TARGETS:
            spec = dataclasses.replace(specs[model], target=target)
            builder = Builder(args.repository / target, host.collect_targets(), host, "cpu", args.threads)
            started = time.perf_counter()
            try:
                artifact = builder.ensure(spec)
                status = "ok" if artifact.built else "ok (cached)"
                if model == "resnet" and target in ("onnx", "onnx-int8"):
                    runtimes[target] = artifact.runtime
                else:
                    artifact.runtime.close()
            except BuildError as exc:
                status = f"refused: {exc}"
            report = report_parameters(builder.read_manifest(spec) or {})
            results["reports"][f"{model} {target}"] = {
                "status": status,
                "seconds": round(time.perf_counter() - started, 1),
                **report,
            }
            print(f"{model} {target}: {status[:300]}\n  {report}", flush=True)
            args.out.write_text(json.dumps(results, indent=2))
    if set(runtimes) == {"onnx", "onnx-int8"}:
        images = specs["resnet"].examples()["image"]
        throughput: dict[str, list[float]] = {}
        for rep in range(args.reps):
            for batch in (1, 32):
                inputs = {"image": np.resize(images, (batch, *images.shape[1:]))}
                for target in ("onnx", "onnx-int8"):
                    value = rate(runtimes[target], inputs, args.seconds)
                    throughput.setdefault(f"{target} b{batch}", []).append(round(value, 2))
                    print(f"rep {rep} resnet {target} b{batch}: {value:.2f} img/s", flush=True)
        results["resnet_throughput"] = throughput
        # On a shared box the load drifts between reps: the ratio within each alternating pair
        # is the figure that carries over, and its median across reps.
        paired = {
            f"b{b}": [
                round(i / f, 2) for i, f in zip(throughput[f"onnx-int8 b{b}"], throughput[f"onnx b{b}"], strict=True)
            ]
            for b in (1, 32)
        }
        results["resnet_speedup_per_rep"] = paired
        results["resnet_speedup"] = {b: float(np.median(r)) for b, r in paired.items()}
        print("speed-up per rep:", paired, "median:", results["resnet_speedup"], flush=True)
        from hub.pipeline.invariance import check_batch_invariance

        spec = specs["resnet"]
        inputs = spec.to_forward(spec.validation_data()[0]) if spec.validation_data else spec.forward_examples()
        cost = {}
        for target in ("onnx", "onnx-int8"):
            started = time.perf_counter()
            check_batch_invariance(spec, runtimes[target], inputs, spec.tolerance_for(host.collect_targets()[target]))
            cost[target] = round(time.perf_counter() - started, 1)
        results["resnet_invariance_seconds"] = cost
        print("resnet batch-invariance check, seconds:", cost, flush=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
