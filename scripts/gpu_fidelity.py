"""Batch invariance of the GPU targets on ResNet-50: build each target with the real build
pipeline (parity against eager, then each probe image alone against inside a batch of 128 and a
pair) and write what the manifest records, refused or not.

    python3 scripts/gpu_fidelity.py --out gpu-results/gpu-fidelity.json [--targets torch-fp16 ...]

Run by scripts/gpu_check.sh. Each target gets its own model repository under --repository
(torch-compile may be pointed at the benchmark's, whose artifact it then reuses).

Prediction, written before any GPU run (2026-12-01, on CPU-only figures): all three pass.
torch-fp16 and torch-bf16 are judged with the half-precision tolerance (atol 1e-2 + 2e-2 of
the logits' scale, about 1.0 on these logits of |max| ~50): cuDNN picks per batch size
algorithms whose fp16 rounding differs by ~1e-2..1e-1 (fp16) and ~1e-1..5e-1 (bf16, 8-bit
mantissa), so bf16 is the one nearest its bound. torch-compile is fp32 with TF32 convolutions
(torch's cuDNN default), judged at atol 1e-4 + 1e-3 of the scale (about 0.05); its parity with
CPU eager already passes that bound, and alone-vs-batched differences are of the same order
(~1e-3..1e-2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--targets", nargs="+", default=["torch-fp16", "torch-bf16", "torch-compile"])
    parser.add_argument("--repository", type=Path, default=Path("/tmp/modelhub-gpu-fidelity"))
    parser.add_argument("--compile-repository", type=Path, help="model repository for torch-compile")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    from hub.errors import BuildError
    from hub.pipeline.builder import Builder
    from hub.pipeline.report import report_parameters
    from hub.plugins.manager import PluginHost

    plugins = args.repository / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    if not (plugins / "resnet").exists():
        (plugins / "resnet").symlink_to(ROOT / "plugins" / "resnet")
    host = PluginHost(plugins, entry_points=False)
    (resnet,) = [s for s in host.collect_models() if s.name == "resnet"]
    results: dict[str, object] = {}
    for target in args.targets:
        repository = args.repository / target
        if target == "torch-compile" and args.compile_repository is not None:
            repository = args.compile_repository
        builder = Builder(repository, host.collect_targets(), host, device=args.device, threads=4)
        spec = dataclasses.replace(resnet, target=target)
        started = time.perf_counter()
        entry: dict[str, object] = {}
        try:
            artifact = builder.ensure(spec)
            artifact.runtime.close()
            entry["status"] = "ok"
        except BuildError as exc:
            entry["status"] = "refused"
            entry["problem"] = str(exc)
        manifest = builder.read_manifest(spec) or {}
        validation = manifest.get("validation", {})
        entry.update(
            seconds=round(time.perf_counter() - started, 1),
            report=report_parameters(manifest),
            batch_invariance=validation.get("batch_invariance"),
            parity={k: validation.get(k) for k in ("max_abs_err", "max_rel_err", "outputs")},
        )
        results[target] = entry
        args.out.write_text(json.dumps(results, indent=2, default=str))  # a run cut short keeps what it has
        report = entry["report"]
        assert isinstance(report, dict)
        print(
            f"{target}: {entry['status']} in {entry['seconds']}s; batch invariance "
            f"{report.get('batch_invariance', '?')} (max abs {report.get('batch_invariance_max_abs_err', '?')}, "
            f"top-1 {report.get('batch_invariance_top1_agreement', '?')}); parity max abs "
            f"{report.get('parity_max_abs_err', '?')}",
            flush=True,
        )
    return 0 if all(isinstance(e, dict) and e["status"] == "ok" for e in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
