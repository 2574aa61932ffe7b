"""Built-in plugin "validation": checks every artifact against its spec and against eager."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hub.datatypes import datatype_of
from hub.plugins.hookspecs import hookimpl
from hub.spec import ModelSpec, Runtime, Tolerance


@hookimpl
def validate_artifact(
    spec: ModelSpec,
    runtime: Runtime,
    examples: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    tolerance: Tolerance,
) -> dict[str, Any]:
    """The outputs honour the spec's contract, and stay within tolerance of eager."""
    outputs = runtime.run(examples)
    problems: list[str] = []
    for tensor in spec.outputs:
        if tensor.name not in outputs:
            problems.append(f"output '{tensor.name}' is missing from the artifact's outputs")
            continue
        got = outputs[tensor.name]
        if datatype_of(got) != tensor.datatype:
            problems.append(f"output '{tensor.name}': expected datatype {tensor.datatype}, got {datatype_of(got)}")
        if not tensor.matches(got.shape):
            problems.append(f"output '{tensor.name}': expected shape {list(tensor.shape)}, got {list(got.shape)}")
    report: dict[str, Any] = {"problems": problems}
    if reference is None or problems:
        return report
    max_abs = max_rel = 0.0
    per_output: dict[str, Any] = {}
    for tensor in spec.outputs:
        got = np.asarray(outputs[tensor.name], dtype=np.float64)
        want = np.asarray(reference[tensor.name], dtype=np.float64)
        if got.shape != want.shape:
            problems.append(f"output '{tensor.name}': shape {list(got.shape)} differs from eager {list(want.shape)}")
            continue
        diff = np.abs(got - want)
        abs_err = float(diff.max(initial=0.0))
        scale = float(np.abs(want).max(initial=0.0))
        rel_err = abs_err / scale if scale > 0 else abs_err
        within = bool(np.all(diff <= tolerance.atol + tolerance.rtol * np.abs(want)))
        entry: dict[str, Any] = {"max_abs_err": abs_err, "max_rel_err": rel_err, "within_tolerance": within}
        if got.ndim == 2 and got.shape[1] > 1:  # classification-like: does the argmax agree?
            entry["top1_agreement"] = float(np.mean(got.argmax(1) == want.argmax(1)))
        per_output[tensor.name] = entry
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
        if not within:
            problems.append(
                f"output '{tensor.name}' strays from eager: max abs error {abs_err:.3g}, "
                f"max rel error {rel_err:.3g}, tolerance atol={tolerance.atol:g} rtol={tolerance.rtol:g}"
            )
    report.update(max_abs_err=max_abs, max_rel_err=max_rel, outputs=per_output)
    return report
