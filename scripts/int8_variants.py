"""resnet's static int8 against fp32 ONNX, variant by variant, in-process: what each
quantisation choice and session option does to the batch-1 (or batch-N) speed-up and top-1.

    python3 scripts/int8_variants.py [--variants build qoperator s8s8 ...] [--batch 1] [--threads 1]
        [--reps 5] [--seconds 1.5] [--graphs] [--profile] [--work /tmp/modelhub-int8-variants]

Exports resnet once (hub.runtimes.onnx.export_onnx, as the onnx target does), pre-processes it
as onnx-int8 does, quantises each variant with ONNX Runtime's quantize_static on the 16
validation images (minmax, one image a step), then measures in one process, alternating fp32
and each variant (A, B, A, B...), with the server's session options (ORT_ENABLE_ALL, spinning
off, --threads intra-op threads; variant "...@extended" uses ORT_ENABLE_EXTENDED). Prints each
variant's top-1 agreement with fp32 on the validation images, its median rate, and the
per-pair ratios to fp32 with their median (on a shared box the ratio within a pair is what
carries). --graphs saves ORT's optimised graph of each and counts its op types (a Conv left
fp32, or DequantizeLinear -> Conv unfused, is what to look for); --profile prints ORT's
per-op-type kernel time; --other N the top-1 agreement on N images outside the validation set
(synthetic, seeds 7, 9, ...), which 16 validation images are too few to tell apart.
docs/benchmarks.md has the figures of 2026-12-02.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: quantize_static arguments per variant; "build" is what the onnx-int8 target does for resnet.
#: "fold" quantises the graph after hub.runtimes.onnx_folding (option int8_fold_scales).
VARIANTS: dict[str, dict[str, Any]] = {
    "build": {"quant_format": "QDQ", "reduce_range": True},
    "fold": {"quant_format": "QDQ", "reduce_range": True, "folded": True},
    "8bit": {"quant_format": "QDQ", "reduce_range": False},
    "qoperator": {"quant_format": "QOperator", "reduce_range": True},
    "s8s8": {"quant_format": "QDQ", "reduce_range": False, "activation_type": "QInt8"},
    "per-tensor": {"quant_format": "QDQ", "reduce_range": True, "per_channel": False},
    "first-conv-fp32": {"quant_format": "QDQ", "reduce_range": True, "exclude_first_conv": True},
}


def prepare(work: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The export, pre-processed as onnx-int8 does (prepared.onnx before the folding rewrite,
    folded.onnx after it), and resnet's validation and example images."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from hub.plugins.manager import PluginHost
    from hub.runtimes.onnx import export_onnx
    from hub.runtimes.onnx_folding import fold_scales_into_conv

    fp32, prepared = work / "fp32.onnx", work / "prepared.onnx"
    plugins = work / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    if not (plugins / "resnet").exists():
        (plugins / "resnet").symlink_to(ROOT / "plugins" / "resnet")
    (spec,) = [s for s in PluginHost(plugins, entry_points=False).collect_models() if s.name == "resnet"]
    assert spec.validation_data is not None  # resnet's 16 validation images
    validation = spec.to_forward(spec.validation_data()[0])["image"]
    examples = spec.forward_examples()["image"]
    if not prepared.exists():
        export_onnx(spec.build(), spec, str(fp32))
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    if not (work / "folded.onnx").exists():
        model = onnx.load(str(prepared))
        fold_scales_into_conv(model)
        onnx.save(model, str(work / "folded.onnx"))
    return prepared, validation, examples


def quantise(prepared: Path, out: Path, validation: np.ndarray, options: dict[str, Any]) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if out.exists():
        return
    rows = iter([{"image": validation[i : i + 1]} for i in range(len(validation))])

    class Reader:
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(rows, None)

    if options.get("folded"):
        prepared = prepared.with_name("folded.onnx")
    exclude = []
    if options.get("exclude_first_conv"):
        exclude = [next(n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv")]
    quantize_static(
        str(prepared),
        str(out),
        Reader(),
        quant_format=getattr(QuantFormat, options["quant_format"]),
        per_channel=options.get("per_channel", True),
        activation_type=getattr(QuantType, options.get("activation_type", "QUInt8")),
        weight_type=QuantType.QInt8,
        reduce_range=options["reduce_range"],
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=exclude,
    )


def session(path: Path, threads: int, extended: bool, optimised: Path | None = None, profile: str = "") -> Any:
    import onnxruntime as ort

    from hub.runtimes.onnx import session_options

    options: Any = session_options(threads)  # the server's: ORT_ENABLE_ALL, spinning off
    if extended:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if optimised is not None:
        options.optimized_model_filepath = str(optimised)
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in graph.node))


def kernel_profile(sess: Any, image: np.ndarray, runs: int = 10) -> dict[str, float]:
    """Milliseconds of kernel time per run, by op type, from ORT's profiler."""
    for _ in range(runs):
        sess.run(None, {"image": image})
    path = Path(sess.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    total: collections.Counter[str] = collections.Counter()
    count = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"]["op_name"]] += event["dur"]
    return {op: round(us / max(count, 1) / 1000, 2) for op, us in total.most_common(8)}


def rate(sess: Any, inputs: dict[str, np.ndarray], seconds: float) -> float:
    sess.run(None, inputs)
    rows, count, start = len(inputs["image"]), 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        sess.run(None, inputs)
        count += 1
    return count * rows / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["build", "qoperator", "8bit"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--graphs", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--other", type=int, default=0, help="also top-1 on this many other images (multiple of 32)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/modelhub-int8-variants"))
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    prepared, validation, examples = prepare(args.work)
    fp32 = args.work / "fp32.onnx"
    sessions: dict[str, Any] = {"fp32": session(fp32, args.threads, False)}
    for name in args.variants:
        base, _, level = name.partition("@")
        path = args.work / f"{base}.onnx"
        quantise(prepared, path, validation, VARIANTS[base])
        sessions[name] = session(path, args.threads, level == "extended")
    if args.graphs:
        for name in sessions:
            path = fp32 if name == "fp32" else args.work / f"{name.partition('@')[0]}.onnx"
            optimised = args.work / f"optimised-{name}.onnx"
            session(path, args.threads, name.endswith("@extended"), optimised)
            print(f"{name}: optimised graph {op_counts(optimised)}")
    if args.profile:
        for name in sessions:
            path = fp32 if name == "fp32" else args.work / f"{name.partition('@')[0]}.onnx"
            profiled = session(path, args.threads, name.endswith("@extended"), profile=str(args.work / "profile"))
            print(f"{name}: kernel ms per run at batch 1 {kernel_profile(profiled, examples[:1])}")
    reference = sessions["fp32"].run(None, {"image": validation})[0].argmax(1)
    for name, sess in sessions.items():
        top1 = float(np.mean(sess.run(None, {"image": validation})[0].argmax(1) == reference))
        print(f"{name}: top-1 agreement with fp32 on {len(validation)} validation images {top1:.4f}")
    if args.other:
        from plugins.resnet.model import synthetic_images

        other = np.concatenate([np.asarray(synthetic_images(32, seed=7 + 2 * k)) for k in range(args.other // 32)])
        want = sessions["fp32"].run(None, {"image": other})[0]
        for name, sess in sessions.items():
            got = sess.run(None, {"image": other})[0]
            agree = int(np.sum(got.argmax(1) == want.argmax(1)))
            rms = float(np.sqrt(np.mean((got - want) ** 2)))
            print(f"{name}: top-1 agreement with fp32 on {len(other)} other images {agree}/{len(other)}, RMS {rms:.4f}")
    inputs = {"image": np.resize(examples, (args.batch, *examples.shape[1:]))}
    rates: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(args.reps):
        for name, sess in sessions.items():  # fp32 first in every round: each variant pairs with it
            rates[name].append(rate(sess, inputs, args.seconds))
    base = np.array(rates["fp32"])
    print(f"batch {args.batch}, {args.threads} thread(s), {args.reps} rounds of {args.seconds} s:")
    for name, values in rates.items():
        ratios = np.array(values) / base
        print(
            f"  {name:20s} median {np.median(values):8.2f}/s  ratio to fp32 per round "
            f"{np.round(ratios, 2).tolist()}  median {np.median(ratios):.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
