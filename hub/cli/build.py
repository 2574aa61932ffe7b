"""`modelhub build`: build, check and measure artifacts ahead of serving, with a progress
display and a closing table; `--compare MODEL` builds every target for one model."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hub.errors import HubError, TargetUnavailable
from hub.pipeline.builder import Builder
from hub.plugins.manager import PluginHost
from hub.spec import ModelSpec

# How `build` measures throughput: one untimed call per cell (artifact x batch size), then up to
# ROUNDS rounds, each timing every cell for WINDOW seconds, round-robin across the artifacts. A
# cell reports its best round: the noise of a loaded box only ever slows a window down, and it
# lands on every target alike instead of on one target's only sample (docs/benchmarks.md, "How
# `modelhub build` measures throughput"). A cell is timed for ROUNDS x WINDOW = 0.5 s in all, as before.
ROUNDS = 20
WINDOW = 0.025  # seconds
BATCHES = (1, 32)


def batch_inputs(spec: ModelSpec, batch: int) -> dict[str, np.ndarray] | None:
    """The spec's examples tiled to `batch` rows (None when the model cannot take that batch)."""
    policy = spec.batching
    examples = spec.forward_examples()
    if policy.batching:
        if batch > policy.max_batch_size:
            return None
        return {k: np.resize(v, (batch, *v.shape[1:])) for k, v in examples.items()}
    return examples if batch == 1 else None


def _window(
    runtime: Any, inputs: dict[str, np.ndarray], seconds: float, clock: Callable[[], float] = time.perf_counter
) -> tuple[int, float]:
    """Calls made and seconds taken in one window of at least `seconds` (and one call)."""
    count, start = 0, clock()
    while True:
        runtime.run(inputs)
        count += 1
        elapsed = clock() - start
        if elapsed >= seconds:
            return count, elapsed


def throughput(runtime: Any, spec: ModelSpec, batch: int, seconds: float = 0.5) -> float | None:
    """In-process samples per second at one batch size, one window after one untimed call
    (None when the model cannot take the batch). One runtime alone: `measure_interleaved`
    is the one to compare runtimes with."""
    inputs = batch_inputs(spec, batch)
    if inputs is None:
        return None
    runtime.run(inputs)
    count, elapsed = _window(runtime, inputs, seconds)
    return count * batch / elapsed


def measure_interleaved(
    subjects: Sequence[tuple[Any, ModelSpec]],
    batches: Sequence[int] = BATCHES,
    rounds: int = ROUNDS,
    window: float = WINDOW,
    on_round: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict[int, list[float]]]:
    """Samples per second of each (runtime, spec) at each batch size, measured side by side:
    one untimed call per cell, then up to `rounds` rounds, each timing every cell for `window`
    seconds, round-robin (each round starting one cell further on, so none is always first).
    A cell whose calls outlast the window sits the later rounds out once they have taken
    `rounds * window` seconds, so one whose single call outlasts that is timed once. One dict
    per subject: batch size -> the samples/s of each of its rounds; a batch size the model
    cannot take is absent. `on_round(i)` is called before round i (1-based)."""
    cells = [
        (index, batch, runtime, inputs)
        for batch in batches
        for index, (runtime, spec) in enumerate(subjects)
        if (inputs := batch_inputs(spec, batch)) is not None
    ]
    rates: list[dict[int, list[float]]] = [{} for _ in subjects]
    for index, batch, runtime, inputs in cells:
        runtime.run(inputs)  # untimed: first-call allocation, a compiled runtime's new shape
        rates[index][batch] = []
    spent = [0.0] * len(cells)
    for number in range(rounds):
        due = [i for i in range(len(cells)) if spent[i] < rounds * window]
        if not due:
            break
        if on_round is not None:
            on_round(number + 1)
        shift = number % len(due)
        for i in due[shift:] + due[:shift]:
            index, batch, runtime, inputs = cells[i]
            count, elapsed = _window(runtime, inputs, window, clock)
            # A window of several calls counts as `window`, so a busy moment that stretches it
            # costs a fast cell none of its rounds; a call that outlasts it counts in full.
            spent[i] += window if count > 1 else elapsed
            rates[index][batch].append(count * batch / elapsed)
    return rates


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def build_all(
    host: PluginHost,
    specs: list[ModelSpec],
    repository: Path,
    device: str,
    threads: int,
    *,
    force: bool = False,
    measure: bool = True,
    skip_unavailable: bool = False,
) -> list[dict[str, Any]]:
    """Build (and measure) each spec; one result row each. With `skip_unavailable` (for
    `--compare`), a target that cannot build here (TargetUnavailable: no CUDA device, an extra
    not installed) is "skipped" with the reason, not "failed"."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    targets = host.collect_targets()
    results = []
    built: list[tuple[dict[str, Any], Any, ModelSpec, Any, str]] = []  # row, runtime, spec, task, label
    progress_console = Console(stderr=True)  # stdout stays clean for the table or --json
    # markup=False: rich would read the "[onnx]" of "digits/1 [onnx]" as a style tag and drop it.
    with (
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            TimeElapsedColumn(),
            console=progress_console,
        ) as progress,
        contextlib.ExitStack() as loaded,
    ):  # the runtimes kept open to be measured
        for spec in specs:
            label = f"{spec.key} [{spec.target}]"
            task = progress.add_task(f"{label}: start", total=None)
            builder = Builder(repository, targets, host, device, threads)
            row: dict[str, Any] = {"model": spec.name, "version": spec.version, "target": spec.target}
            started = time.perf_counter()

            def stage(name: str, task: Any = task, label: str = label) -> None:
                progress.update(task, description=f"{label}: {name}")

            try:
                artifact = builder.ensure(spec, force=force, on_stage=stage)
            except TargetUnavailable as exc:
                if not skip_unavailable:
                    row.update(status="failed", problem=str(exc))
                    progress.update(task, description=f"{label}: failed")
                else:
                    row.update(status="skipped", reason=str(exc))
                    progress.update(task, description=f"{label}: skipped")
                results.append(row)
                continue
            except HubError as exc:
                row.update(status="failed", problem=str(exc))
                refused = builder.read_manifest(spec)  # a refusal after validation keeps its figures
                if (
                    refused is not None
                    and spec.target in targets  # an unknown target has no key (and no figures)
                    and refused.get("cache_key") == builder.cache_key(spec, builder.target_for(spec))[0]
                ):
                    row.update(_figures(refused))
                progress.update(task, description=f"{label}: failed")
                results.append(row)
                continue
            manifest = artifact.manifest
            row.update(
                status="ok" if artifact.built else "ok (cached)",
                size=_size(builder.directory(spec)),
                build_seconds=manifest.get("build_seconds") if artifact.built else 0.0,
                seconds=time.perf_counter() - started,
                **_figures(manifest),
            )
            results.append(row)
            if not measure:
                artifact.runtime.close()
                progress.update(task, description=f"{label}: {row['status']}")
                continue
            # Measured once all are built, side by side (see `measure_interleaved`).
            loaded.callback(artifact.runtime.close)
            progress.update(task, description=f"{label}: built, to measure")
            built.append((row, artifact.runtime, spec, task, label))
        if built:

            def each_round(number: int) -> None:
                for _, _, _, task, label in built:
                    progress.update(task, description=f"{label}: measure, round {number}/{ROUNDS}")

            rates = measure_interleaved([(runtime, spec) for _, runtime, spec, _, _ in built], on_round=each_round)
            for (row, _, _, task, label), cells in zip(built, rates, strict=True):
                for batch in BATCHES:
                    rounds = cells.get(batch)
                    row[f"b{batch}"] = max(rounds) if rounds else None  # the least disturbed round
                    row[f"b{batch}_rounds"] = rounds
                progress.update(task, description=f"{label}: {row['status']}")
    return results


def _figures(manifest: dict[str, Any]) -> dict[str, Any]:
    """The table's figures from a manifest: parity, accuracy, batch invariance, calibration."""
    validation = manifest.get("validation", {})
    outputs = validation.get("outputs", {})
    top1 = min((o["top1_agreement"] for o in outputs.values() if "top1_agreement" in o), default=None)
    cosine = min((o["min_cosine"] for o in outputs.values() if "min_cosine" in o), default=None)
    invariance = validation.get("batch_invariance") or {}
    inv_outputs = invariance.get("outputs", {})
    calibration = manifest.get("calibration")
    return {
        "max_abs_err": validation.get("max_abs_err"),
        "max_rel_err": validation.get("max_rel_err"),
        "top1": None if cosine is not None else top1,  # an embedding's argmax means nothing
        "min_cosine": cosine,
        "accuracy": validation.get("accuracy"),
        "eager_accuracy": validation.get("eager_accuracy"),
        "batch_invariant": invariance.get("batched_serving") if invariance.get("checked") else None,
        "batch_max_abs_err": invariance.get("max_abs_err"),
        "batch_min_cosine": min((o["min_cosine"] for o in inv_outputs.values() if "min_cosine" in o), default=None),
        "calibration": f"{calibration['method']}/{calibration['rows']}" if calibration else None,
    }


def _invariance_cell(r: dict[str, Any]) -> str:
    if r.get("batch_invariant") is None:
        return "-"
    verdict = "yes" if r["batch_invariant"] else "[red]NO[/red]"
    if r.get("batch_min_cosine") is not None:
        return f"{verdict} cos {r['batch_min_cosine']:.4f}"
    return f"{verdict} {r['batch_max_abs_err']:.2g}"


def compare_specs(host: PluginHost, spec: ModelSpec) -> list[ModelSpec]:
    """One spec per registered target, for `--compare`."""
    return [dataclasses.replace(spec, target=name) for name in sorted(host.collect_targets())]


def render(results: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="modelhub build", title_justify="left")
    for column in (
        "model",
        "target",
        "status",
        "size",
        "build s",
        "max abs err",
        "max rel err",
        "top-1 agree",
        "min cosine",
        "accuracy (eager)",
        "batch-invariant (worst)",
        "calibration",
        "b1 /s",
        "b32 /s",
        "vs onnx b1 / b32",
    ):
        table.add_column(column, no_wrap=column in ("model", "target"))
    if any(r.get("b1") or r.get("b32") for r in results):
        table.caption = (
            f"b1 /s, b32 /s: samples/s in-process, the best of {ROUNDS} rounds of {WINDOW * 1000:g} ms per cell "
            f"(fewer where a call outlasts one: {ROUNDS * WINDOW:g} s in all) after one untimed call, "
            "the targets' rounds interleaved round-robin; vs onnx: the ratio of those figures"
        )
        table.caption_justify = "left"
    # Each target's throughput as a multiple of the same model's onnx row, measured side by side
    # in the same rounds (`measure_interleaved`): on a loaded box a ratio from one run is what carries.
    onnx = {r["model"]: r for r in results if r["target"] == "onnx" and r["status"] != "failed"}

    def ratio(r: dict[str, Any]) -> str:
        base = onnx.get(r["model"])
        if base is None or r["target"] == "onnx":
            return "-"
        cells = [f"{r[b] / base[b]:.2f}x" if r.get(b) and base.get(b) else "-" for b in ("b1", "b32")]
        return " / ".join(cells)

    def num(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in results:
        accuracy = "-" if r.get("accuracy") is None else f"{r['accuracy']:.4f} ({r['eager_accuracy']:.4f})"
        built = r["status"] not in ("failed", "skipped")
        status = {"failed": "[red]failed[/red]", "skipped": "[yellow]skipped[/yellow]"}.get(r["status"], r["status"])
        table.add_row(
            f"{r['model']}/{r['version']}",
            r["target"],
            status,
            f"{r['size'] / 1024:.0f} KiB" if built else "-",
            num(r.get("build_seconds"), ".1f"),
            num(r.get("max_abs_err"), ".2g"),
            num(r.get("max_rel_err"), ".2g"),
            num(r.get("top1"), ".3f"),
            num(r.get("min_cosine"), ".4f"),
            accuracy,
            _invariance_cell(r),
            r.get("calibration") or "-",
            num(r.get("b1"), ",.0f"),
            num(r.get("b32"), ",.0f"),
            ratio(r),
        )
    return table
