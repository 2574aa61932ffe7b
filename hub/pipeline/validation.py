"""Built-in plugin "validation": checks every artifact against its spec and against eager."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hub.datatypes import datatype_of
from hub.pipeline.invariance import check_batch_invariance, mixed_batch, run_for_parity
from hub.plugins.hookspecs import hookimpl
from hub.spec import ModelSpec, Runtime, Tolerance


@hookimpl(trylast=True)  # built-in checks run after a plugin's validators
def validate_artifact(
    spec: ModelSpec,
    runtime: Runtime,
    examples: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    tolerance: Tolerance,
    labels: np.ndarray | None,
) -> dict[str, Any]:
    """The outputs honour the spec's contract, stay within tolerance of eager, (with labels)
    score an accuracy no further below eager's than the tolerance allows, and each row's
    answer does not depend on its batch-mates (hub/pipeline/invariance.py)."""
    # The invariance check's batch of max_batch_size rows doubles as the parity pass's first
    # forward: the largest batch, nearly all of the check's cost, runs once.
    plan = mixed_batch(spec, examples)
    if plan is None:
        outputs, batched = run_chunked(runtime, spec, examples), None
    else:
        outputs, batched = run_for_parity(spec, runtime, examples, plan)
    problems: list[str] = []
    declared = [t.name for t in spec.forward_outputs]
    what = "model_outputs" if spec.postprocess is not None else "outputs"
    missing = [name for name in declared if name not in outputs]
    if missing:
        problems.append(
            f"the artifact returns outputs {sorted(outputs)}, the spec's {what} are {declared} (missing {missing})"
        )
    for tensor in spec.forward_outputs:
        if tensor.name not in outputs:
            continue
        got = outputs[tensor.name]
        if datatype_of(got) != tensor.datatype:
            problems.append(f"output '{tensor.name}': expected datatype {tensor.datatype}, got {datatype_of(got)}")
        if not tensor.matches(got.shape):
            problems.append(f"output '{tensor.name}': expected shape {list(tensor.shape)}, got {list(got.shape)}")
    report: dict[str, Any] = {"problems": problems}
    if problems:
        return report
    invariance = check_batch_invariance(spec, runtime, examples, tolerance, batched)
    problems.extend(invariance.pop("problems", []))
    report["batch_invariance"] = invariance
    if reference is None:
        return report
    max_abs = max_rel = 0.0
    per_output: dict[str, Any] = {}
    for tensor in spec.forward_outputs:
        got = np.asarray(outputs[tensor.name], dtype=np.float64)
        want = np.asarray(reference[tensor.name], dtype=np.float64)
        if got.shape != want.shape:
            problems.append(f"output '{tensor.name}': shape {list(got.shape)} differs from eager {list(want.shape)}")
            continue
        diff = np.abs(got - want)
        abs_err = float(diff.max(initial=0.0))
        scale = float(np.abs(want).max(initial=0.0))
        rel_err = abs_err / scale if scale > 0 else abs_err
        within = abs_err <= tolerance.atol + tolerance.rtol * scale
        entry: dict[str, Any] = {"max_abs_err": abs_err, "max_rel_err": rel_err, "within_tolerance": within}
        if got.ndim == 2 and tolerance.min_cosine is not None:  # embedding-like: does each row point the same way?
            norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
            cosine = np.sum(got * want, axis=1) / np.maximum(norms, 1e-12)
            entry["min_cosine"] = float(cosine.min(initial=1.0))
            entry["mean_cosine"] = float(cosine.mean()) if len(cosine) else 1.0
            if entry["min_cosine"] < tolerance.min_cosine:
                worst = int(cosine.argmin())
                figure = against(entry["min_cosine"], tolerance.min_cosine)
                problems.append(
                    f"output '{tensor.name}': cosine similarity with eager {figure} "
                    f"(row {worst}) is below {tolerance.min_cosine}"
                )
        if got.ndim == 2 and got.shape[1] > 1:  # classification-like: does the argmax agree?
            top1 = float(np.mean(got.argmax(1) == want.argmax(1)))
            entry["top1_agreement"] = top1
            if tolerance.min_top1 is not None and top1 < tolerance.min_top1:
                problems.append(
                    f"output '{tensor.name}': top-1 agreement with eager {top1:.3f} is below {tolerance.min_top1}"
                )
        per_output[tensor.name] = entry
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
        if not within:
            problems.append(
                f"output '{tensor.name}' strays from eager: max abs error {abs_err:.3g}, "
                f"max rel error {rel_err:.3g}, tolerance atol={tolerance.atol:g} rtol={tolerance.rtol:g}"
            )
    report.update(max_abs_err=max_abs, max_rel_err=max_rel, outputs=per_output)
    first = spec.forward_outputs[0].name
    if labels is not None and outputs[first].ndim == 2:
        report["accuracy"] = float(np.mean(outputs[first].argmax(1) == labels))
        report["eager_accuracy"] = float(np.mean(np.asarray(reference[first]).argmax(1) == labels))
        report["validation_rows"] = len(labels)
        drop = report["eager_accuracy"] - report["accuracy"]
        if tolerance.max_accuracy_drop is not None and drop > tolerance.max_accuracy_drop + 1e-12:
            problems.append(
                f"accuracy {report['accuracy']:.4f} is {100 * drop:.2f} points below eager's "
                f"{report['eager_accuracy']:.4f} on {len(labels)} labelled rows; the tolerance allows "
                f"{100 * tolerance.max_accuracy_drop:.2f} (max_accuracy_drop={tolerance.max_accuracy_drop:g})"
            )
    return report


def against(value: float, bound: float, digits: int = 4) -> str:
    """`value` with enough decimals to tell it from `bound` (0.99999999 against 0.999999999
    must not read 1.0000)."""
    while digits < 15 and f"{value:.{digits}f}" in (f"{bound:.{digits}f}", f"{round(bound):.{digits}f}"):
        digits += 1
    return f"{value:.{digits}f}"


def run_chunked(runtime: Runtime, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a set larger than max_batch_size in batches the runtime accepts."""
    limit = spec.batching.max_batch_size
    rows = len(next(iter(inputs.values()))) if inputs else 0
    if not spec.batching.batching or rows <= limit:
        return dict(runtime.run(inputs))
    parts = [runtime.run({k: v[i : i + limit] for k, v in inputs.items()}) for i in range(0, rows, limit)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
