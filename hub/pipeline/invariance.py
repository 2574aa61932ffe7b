"""Batch invariance: does a row get the same answer alone as inside a mixed batch?

With dynamic batching one client's rows share a forward with other clients' rows. A runtime
whose arithmetic depends on the batch (ONNX Runtime's dynamic int8 takes one activation scale
per tensor, over the whole batch and its padding; a model that normalises over the batch dim)
then answers a client differently depending on who else was in the batch. Parity against eager
does not see it: it compares whole batches. This check does.

The probe rows are the first row and the extremes of the validation (or example) inputs: the
rows of largest and smallest magnitude and, for padded inputs, the longest and shortest. Each
runs alone (padding trimmed to its own length, as a lone request would be), then all of them
run together inside one batch of the largest served size filled with the other rows (every row
padded to the batch's longest, as the batcher pads), and each probe also runs in a batch of two
beside the row farthest from it. The worst difference between a probe's answers, in the parity
measures (max abs and rel error, cosine, top-1 agreement), is judged by the target's tolerance.

Cost: a few single rows and pairs. The batch of max_batch_size rows, which is nearly all of
the work (resnet: 128 of 137 rows), is the parity pass's first forward (`run_for_parity`): the
validation rows answer parity from it, so it replaces a forward the build ran anyway, and only
the filler rows beyond the validation set cost extra.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hub.spec import ModelSpec, Runtime, TensorSpec, Tolerance

#: At most this many probe rows (first, largest, smallest, longest, shortest).
MAX_PROBES = 5


@dataclass(frozen=True)
class MixedBatch:
    """The check's batch of max_batch_size rows: example row `order[k]` sits at position k.
    The probes sit at `positions` (first, last and spread between); the other rows fill the
    rest in turn, repeated when there are fewer than max_batch_size."""

    order: list[int]
    probes: list[int]
    positions: list[int]
    roles: dict[str, int]
    singles: list[dict[str, np.ndarray]]  # every example row alone, padding trimmed

    def inputs(self, spec: ModelSpec) -> dict[str, np.ndarray]:
        return _stack([self.singles[i] for i in self.order], {t.name: t for t in spec.forward_inputs})


def mixed_batch(spec: ModelSpec, examples: Mapping[str, np.ndarray]) -> MixedBatch | None:
    """The check's mixed batch for these forward inputs; None where the model does not batch
    (or serves one row per forward): no row shares a forward, nothing to check."""
    batch = spec.batching.max_batch_size
    rows = len(next(iter(examples.values()))) if examples else 0
    if not spec.batching.batching or batch < 2 or rows == 0:
        return None
    tensors = {t.name: t for t in spec.forward_inputs}
    padded = {name for name, t in tensors.items() if t.padding is not None}
    singles = [_row(examples, i, tensors) for i in range(rows)]
    probes, roles = _probes(singles, padded)
    positions = [int(p) for p in np.linspace(0, batch - 1, len(probes)).round()]
    others = [i for i in range(rows) if i not in probes] or probes
    placed = dict(zip(positions, probes, strict=True))
    fill = (others[k % len(others)] for k in itertools.count())
    order = [placed[k] if k in placed else next(fill) for k in range(batch)]
    return MixedBatch(order, probes, positions, roles, singles)


def run_for_parity(
    spec: ModelSpec, runtime: Runtime, examples: Mapping[str, np.ndarray], plan: MixedBatch
) -> tuple[dict[str, np.ndarray], tuple[MixedBatch, dict[str, np.ndarray]]]:
    """Every example row's outputs, in row order, for the parity pass, with the check's mixed
    batch `plan` as the first forward: its outputs are returned too, for
    `check_batch_invariance`, which then does not run that largest batch a second time. A row
    that the mixed batch holds takes its answer from there (its first place in it); the rest
    run in chunks of max_batch_size, in row order."""
    full = dict(runtime.run(plan.inputs(spec)))
    rows = len(plan.singles)
    where: dict[int, int] = {}
    for position, index in enumerate(plan.order):
        where.setdefault(index, position)
    rest = [i for i in range(rows) if i not in where]
    limit = spec.batching.max_batch_size
    parts = [runtime.run({k: v[rest[i : i + limit]] for k, v in examples.items()}) for i in range(0, len(rest), limit)]
    held = sorted(where)
    outputs: dict[str, np.ndarray] = {}
    for name, value in full.items():
        value = np.asarray(value)
        if value.ndim == 0 or len(value) != len(plan.order) or any(name not in p for p in parts):
            outputs[name] = value  # not one answer per row: the parity pass reports the shape
            continue
        out = np.empty((rows, *value.shape[1:]), value.dtype)
        out[held] = value[[where[i] for i in held]]
        if rest:
            out[rest] = np.concatenate([p[name] for p in parts])
        outputs[name] = out
    return outputs, (plan, full)


def check_batch_invariance(
    spec: ModelSpec,
    runtime: Runtime,
    examples: Mapping[str, np.ndarray],
    tolerance: Tolerance,
    batched: tuple[MixedBatch, Mapping[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """The batch-invariance report: figures and, under "problems", why batched serving is refused.

    `examples` are the forward inputs (after `preprocess`). A model that does not batch, or
    serves at most one row per forward, is invariant by construction and is not run.
    `batched`: the mixed batch and its outputs where `run_for_parity` already ran it."""
    if batched is None:
        plan = mixed_batch(spec, examples)
        if plan is None:
            reason = f"max_batch_size is {spec.batching.max_batch_size}: no row shares a forward"
            return {"checked": False, "reason": reason}
        full: Mapping[str, np.ndarray] = runtime.run(plan.inputs(spec))
    else:
        plan, full = batched
    batch = len(plan.order)
    tensors = {t.name: t for t in spec.forward_inputs}
    padded = {name for name, t in tensors.items() if t.padding is not None}
    singles, probes = plan.singles, plan.probes
    alone = [dict(runtime.run(_stack([singles[i]], tensors))) for i in probes]
    results: list[tuple[int, str, dict[str, np.ndarray]]] = [
        (index, f"a batch of {batch}", {n: np.asarray(v)[p : p + 1] for n, v in full.items()})
        for index, p in zip(probes, plan.positions, strict=True)
    ]
    for index in probes:  # next to the row most unlike it: the outlier case
        partner = _farthest(singles, index, padded)
        pair = runtime.run(_stack([singles[index], singles[partner]], tensors))
        results.append((index, f"a batch of 2 beside row {partner}", {n: v[:1] for n, v in pair.items()}))

    reference = {index: out for index, out in zip(probes, alone, strict=True)}
    report: dict[str, Any] = {
        "checked": True,
        "batch_size": batch,
        "probe_rows": dict(plan.roles),
        "problems": [],
    }
    outputs: dict[str, Any] = {}
    for tensor in spec.forward_outputs:
        outputs[tensor.name] = _compare(tensor, results, reference, tolerance, report["problems"])
    report["outputs"] = outputs
    report["max_abs_err"] = max((o.get("max_abs_err", 0.0) for o in outputs.values()), default=0.0)
    report["max_rel_err"] = max((o.get("max_rel_err", 0.0) for o in outputs.values()), default=0.0)
    report["batched_serving"] = not report["problems"]
    return report


def _compare(
    tensor: TensorSpec,
    results: Sequence[tuple[int, str, Mapping[str, np.ndarray]]],
    reference: Mapping[int, Mapping[str, np.ndarray]],
    tolerance: Tolerance,
    problems: list[str],
) -> dict[str, Any]:
    name = tensor.name
    if tensor.datatype == "BYTES":  # no arithmetic on bytes: a row's answer must be the same bytes
        changed = [
            (index, where)
            for index, where, outputs in results
            if np.asarray(outputs[name]).tolist() != np.asarray(reference[index][name]).tolist()
        ]
        if changed:
            index, where = changed[0]
            problems.append(
                f"batch invariance: BYTES output '{name}' of row {index} differs between alone and {where} "
                f"({len(changed)} of {len(results)} comparisons); refused for batched serving"
            )
        return {"changed": len(changed), "compared": len(results), "within_tolerance": not changed}
    worst_abs = worst_rel = 0.0
    worst: tuple[float, int, str] | None = None  # (excess over the bound, row, where)
    cosines: list[tuple[float, int, str]] = []
    agreements: list[bool] = []
    for index, where, outputs in results:
        got = np.asarray(outputs[name], dtype=np.float64)
        want = np.asarray(reference[index][name], dtype=np.float64)
        if got.shape != want.shape:
            problems.append(
                f"batch invariance: output '{name}' of row {index} has shape {list(got.shape)} in {where}, "
                f"{list(want.shape)} alone"
            )
            continue
        abs_err = float(np.abs(got - want).max(initial=0.0))
        scale = float(np.abs(want).max(initial=0.0))
        rel_err = abs_err / scale if scale > 0 else abs_err
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
        excess = abs_err - (tolerance.atol + tolerance.rtol * scale)
        if worst is None or excess > worst[0]:
            worst = (excess, index, where)
        if got.ndim == 2 and tolerance.min_cosine is not None:
            norm = float(np.linalg.norm(got) * np.linalg.norm(want))
            cosines.append((float(np.sum(got * want) / max(norm, 1e-12)), index, where))
        if got.ndim == 2 and got.shape[1] > 1:
            agreements.append(bool(got.argmax(1)[0] == want.argmax(1)[0]))
    entry: dict[str, Any] = {"max_abs_err": worst_abs, "max_rel_err": worst_rel}
    if worst is not None and worst[0] > 0:
        _, index, where = worst
        problems.append(
            f"batch invariance: output '{name}' of row {index} differs between alone and {where}: "
            f"max abs error {worst_abs:.3g}, max rel error {worst_rel:.3g}, beyond tolerance "
            f"atol={tolerance.atol:g} rtol={tolerance.rtol:g}; refused for batched serving "
            f"(serve it with max_batch_size 1, or choose a batch-invariant target)"
        )
    entry["within_tolerance"] = worst is None or worst[0] <= 0
    if cosines:
        cosine, index, where = min(cosines)
        entry["min_cosine"] = cosine
        if tolerance.min_cosine is not None and cosine < tolerance.min_cosine:
            problems.append(
                f"batch invariance: output '{name}' of row {index}: cosine {cosine:.4f} between alone and "
                f"{where} is below {tolerance.min_cosine}; refused for batched serving"
            )
    if agreements:
        entry["top1_agreement"] = float(np.mean(agreements))
        if tolerance.min_top1 is not None and entry["top1_agreement"] < tolerance.min_top1:
            problems.append(
                f"batch invariance: output '{name}': top-1 agreement between alone and batched "
                f"{entry['top1_agreement']:.3f} is below {tolerance.min_top1}; refused for batched serving"
            )
    return entry


def _row(examples: Mapping[str, np.ndarray], index: int, tensors: Mapping[str, TensorSpec]) -> dict[str, np.ndarray]:
    """Row `index` with one leading row, its padding trimmed to the row's own length."""
    row = {name: value[index : index + 1] for name, value in examples.items()}
    padded = [name for name in row if name in tensors and tensors[name].padding is not None]
    if not padded:
        return row
    ndim = row[padded[0]].ndim
    keep: list[int] = []
    for axis in range(1, ndim):
        length = 0
        for name in padded:
            value = row[name]
            if value.ndim != ndim:
                continue
            other = tuple(a for a in range(value.ndim) if a != axis)
            real = np.nonzero(np.any(value != tensors[name].padding, axis=other))[0]
            length = max(length, int(real[-1]) + 1 if len(real) else 1)
        keep.append(length)
    for name in padded:
        if row[name].ndim == ndim:
            row[name] = row[name][(slice(None), *(slice(0, k) for k in keep))]
    return row


def _stack(rows: Sequence[Mapping[str, np.ndarray]], tensors: Mapping[str, TensorSpec]) -> dict[str, np.ndarray]:
    """Rows as one batch, padded inputs padded to the longest, the way the batcher does it."""
    out = {}
    for name in rows[0]:
        arrays = [r[name] for r in rows]
        tensor = tensors.get(name)
        if tensor is not None and tensor.padding is not None:
            longest = np.max([a.shape[1:] for a in arrays], axis=0)
            arrays = [
                np.pad(
                    a,
                    [(0, 0), *((0, int(m) - d) for m, d in zip(longest, a.shape[1:], strict=True))],
                    constant_values=tensor.padding,
                )
                for a in arrays
            ]
        out[name] = np.concatenate(arrays)
    return out


def _magnitude(row: Mapping[str, np.ndarray], padded: set[str]) -> float:
    """A row's size: the root mean square of its unpadded numeric inputs (a max would call
    every photo with one white pixel equally large), BYTES elements counted by their length."""
    values = [
        np.array([len(e) for e in v.ravel()], np.float64) if v.dtype == object else v.astype(np.float64).ravel()
        for name, v in row.items()
        if name not in padded
    ]
    flat = np.concatenate(values) if values else np.zeros(0)
    return float(np.sqrt(np.mean(flat * flat))) if flat.size else 0.0


def _length(row: Mapping[str, np.ndarray], padded: set[str]) -> int:
    return max((int(np.prod(v.shape[1:])) for name, v in row.items() if name in padded), default=0)


def _probes(rows: Sequence[Mapping[str, np.ndarray]], padded: set[str]) -> tuple[list[int], dict[str, int]]:
    roles: dict[str, int] = {"first": 0}
    magnitudes = [_magnitude(r, padded) for r in rows]
    if any(magnitudes):
        roles["largest"] = int(np.argmax(magnitudes))
        roles["smallest"] = int(np.argmin(magnitudes))
    if padded:
        lengths = [_length(r, padded) for r in rows]
        roles["longest"] = int(np.argmax(lengths))
        roles["shortest"] = int(np.argmin(lengths))
    probes = list(dict.fromkeys(roles.values()))[:MAX_PROBES]
    return probes, roles


def _farthest(rows: Sequence[Mapping[str, np.ndarray]], index: int, padded: set[str]) -> int:
    """The row most unlike row `index`: by length for padded inputs, else by magnitude."""
    if len(rows) == 1:
        return index
    if padded:
        lengths = np.array([_length(r, padded) for r in rows])
        return int(np.argmax(np.abs(lengths - lengths[index])))
    magnitudes = np.array([_magnitude(r, padded) for r in rows])
    return int(np.argmax(np.abs(magnitudes - magnitudes[index])))


def rows_of(spec: ModelSpec, inputs: Mapping[str, np.ndarray], *, trim: bool) -> list[dict[str, np.ndarray]]:
    """`inputs` one row at a time; with `trim`, padded inputs cut to the row's own length (the
    row then looks as it does served alone)."""
    tensors = {t.name: t for t in spec.forward_inputs} if trim else {}
    rows = len(next(iter(inputs.values()))) if inputs else 0
    return [_row(inputs, i, tensors) for i in range(rows)]
