"""Build (or reuse) a model's artifact in models/<name>/<version>/, check it against eager,
and record the result in manifest.json."""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hub.errors import BuildError, PluginError, TargetUnavailable, did_you_mean, exception_line
from hub.logs import library_output_at_debug
from hub.plugins.manager import hash_files, raised_in
from hub.spec import ArtifactContext, ModelSpec, Runtime, Target

if TYPE_CHECKING:
    from hub.plugins.manager import PluginHost

log = logging.getLogger("modelhub.build")

#: The target every other one is checked against: eager, on the CPU, in the spec's datatypes.
REFERENCE_TARGET = "torch"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_VERSIONED = ("torch", "onnx", "onnxruntime", "numpy", "modelhub")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def _hash_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        if array.dtype == object:
            digest.update(repr(array.tolist()).encode())
        else:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def calibration_record(spec: ModelSpec) -> dict[str, Any]:
    """What a calibrating target observes: the data's source, rows and hash, and the method."""
    source, inputs = spec.calibration()
    rows = len(next(iter(inputs.values()))) if inputs else 0
    return {"source": source, "rows": rows, "inputs": _hash_arrays(inputs), "method": spec.calibration_method}


@dataclass
class Artifact:
    """A loaded, checked artifact."""

    runtime: Runtime
    manifest: dict[str, Any]
    built: bool  # False when the cache was reused


class Builder:
    """Builds artifacts for one model repository; one instance per server or CLI run."""

    def __init__(
        self, repository: Path, targets: dict[str, Target], plugins: PluginHost, device: str, threads: int = 1
    ) -> None:
        self.repository = repository
        self.targets = targets
        self.plugins = plugins
        self.device = device
        self.threads = threads
        #: The attempt key (`attempt_key`) of each model version whose last `ensure` failed: a
        #: --watch that finds it unchanged builds it no more (it would fail, and log, the same
        #: way on every change of any plugin), while an explicit load still tries again.
        self._failed: dict[str, str] = {}

    def target_for(self, spec: ModelSpec) -> Target:
        try:
            return self.targets[spec.target]
        except KeyError:
            hint = did_you_mean(spec.target, self.targets, quote="'")
            raise BuildError(
                f"model '{spec.name}': unknown target '{spec.target}'{hint}; "
                f"registered targets: {', '.join(sorted(self.targets))}"
            ) from None

    def attempt_key(self, spec: ModelSpec) -> str:
        """What `ensure(spec)` depends on with the targets registered now: the cache key, or,
        for a target no plugin registers, that target and the registered ones (a plugin that
        registers it changes the key). Hashes files: off the event loop."""
        target = self.targets.get(spec.target)
        if target is None:
            return f"unknown target {spec.target!r}; registered: {sorted(self.targets)}"
        return self.cache_key(spec, target)[0]

    def failed_key(self, spec: ModelSpec) -> str | None:
        """The `attempt_key` under which the last `ensure` of this model version failed, or None
        (it succeeded, or was never tried): the same key now means the same failure again,
        unless that failure was transient."""
        return self._failed.get(spec.key)

    def directory(self, spec: ModelSpec) -> Path:
        return self.repository / spec.name / str(spec.version)

    def cache_key(self, spec: ModelSpec, target: Target) -> tuple[str, dict[str, Any]]:
        """Hash of everything the artifact depends on, with the parts for the manifest."""
        parts: dict[str, Any] = {
            "sources": sources_fingerprint(spec),
            "weights": hash_files(spec.weights),
            "spec": {
                "name": spec.name,
                "version": spec.version,
                "inputs": [asdict(t) for t in spec.inputs],
                "model_inputs": [asdict(t) for t in spec.model_inputs],
                "outputs": [asdict(t) for t in spec.outputs],
                "tolerance": asdict(spec.tolerance_for(target)),
                "examples": _hash_arrays(spec.examples()),
                "validation": _hash_arrays(spec.validation_data()[0]) if spec.validation_data else None,
                "options": dict(spec.options),
            },
            "target": target.name,
            "versions": library_versions(),
        }
        if spec.model_outputs:  # (only then: the key of every model without a postprocess stays as it was)
            parts["spec"]["model_outputs"] = [asdict(t) for t in spec.model_outputs]
        if target.calibrated:
            parts["calibration"] = calibration_record(spec)
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest(), parts

    def failure_path(self, spec: ModelSpec) -> Path:
        """Where a build that raised leaves its error (beside the version folder, which a build
        replaces whole), so that `modelhub models` can say why there is no artifact."""
        return self.repository / spec.name / f".{spec.version}.build-failure.json"

    def read_failure(self, spec: ModelSpec) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.failure_path(spec).read_text()))
        except (OSError, ValueError):
            return None

    def _record_failure(self, spec: ModelSpec, target: Target, key: str, error: BaseException) -> None:
        record = {
            "cache_key": key,
            "target": target.name,
            "error": str(error),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            self.failure_path(spec).write_text(json.dumps(record, indent=2) + "\n")
        except OSError:  # the repository is read-only, say: the error is raised all the same
            log.debug("model '%s': could not record the build failure", spec.key, exc_info=True)

    def read_manifest(self, spec: ModelSpec) -> dict[str, Any] | None:
        path = self.directory(spec) / MANIFEST
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def ensure(
        self, spec: ModelSpec, *, force: bool = False, on_stage: Callable[[str], None] | None = None
    ) -> Artifact:
        """Load the cached artifact when its key matches, else build, check and load it.

        Raises BuildError (with the validation report) when the artifact is refused.
        `on_stage(name)` is told each stage as it starts (for progress displays).
        """
        stage = on_stage or (lambda name: None)
        self._failed.pop(spec.key, None)
        if spec.target not in self.targets:
            self._failed[spec.key] = self.attempt_key(spec)
            self.target_for(spec)  # raises, naming the nearest registered target
        target = self.targets[spec.target]
        clean_stale_staging(self.directory(spec))
        key, parts = self.cache_key(spec, target)
        try:
            with library_output_at_debug():
                return self._ensure(spec, target, key, parts, force, stage)
        except Exception:
            self._failed[spec.key] = key
            raise

    def _ensure(
        self,
        spec: ModelSpec,
        target: Target,
        key: str,
        parts: dict[str, Any],
        force: bool,
        stage: Callable[[str], None],
    ) -> Artifact:
        manifest = None if force else self.read_manifest(spec)
        if manifest is not None and manifest.get("cache_key") == key:
            if manifest.get("status") != "ok":
                raise BuildError(_refusal(spec, manifest))
            changed = artifact_changes(self.directory(spec), manifest)
            if changed:
                log.warning(
                    "model '%s': artifact files differ from their manifest hashes (%s); rebuilding",
                    spec.key,
                    ", ".join(changed[:8]),
                )
                return self._build(spec, target, key, parts, stage)
            stage("load (cached)")
            runtime = target.load(self._context(spec, self.directory(spec)))
            return Artifact(runtime, manifest, built=False)
        return self._build(spec, target, key, parts, stage)

    def load_built(self, spec: ModelSpec, key: str) -> Artifact:
        """Load the artifact another process built and checked, whose cache key is `key`,
        without ever building: a frontend's copy of a model the model process serves
        (hub/workers/frontend.py). Raises BuildError when the artifact on disk is not that one
        (rebuilt, refused, or its files changed since)."""
        manifest = self.read_manifest(spec)
        if manifest is None or manifest.get("cache_key") != key or manifest.get("status") != "ok":
            raise BuildError(f"model '{spec.key}': the artifact on disk is not the build the model process serves")
        changed = artifact_changes(self.directory(spec), manifest)
        if changed:
            files = ", ".join(changed[:8])
            raise BuildError(f"model '{spec.key}': artifact files differ from their manifest ({files})")
        with library_output_at_debug():
            runtime = self.target_for(spec).load(self._context(spec, self.directory(spec)))
        again = self.read_manifest(spec)
        if again is None or again.get("cache_key") != key:  # rebuilt while it loaded
            runtime.close()
            raise BuildError(f"model '{spec.key}': the artifact was rebuilt while it loaded")
        return Artifact(runtime, manifest, built=False)

    def _context(self, spec: ModelSpec, directory: Path) -> ArtifactContext:
        return ArtifactContext(spec=spec, directory=directory, device=self.device, threads=self.threads)

    def _build(
        self, spec: ModelSpec, target: Target, key: str, parts: dict[str, Any], stage: Callable[[str], None]
    ) -> Artifact:
        final = self.directory(spec)
        staging = final.with_name(f".{spec.version}.staging-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        started = time.perf_counter()
        runtime: Runtime | None = None
        try:
            ctx = self._context(spec, staging)
            stage(f"build {target.name}")
            target.build(ctx)
            build_seconds = time.perf_counter() - started
            # Loaded once: the runtime validation checks is the runtime that serves (a second
            # load would compile or quantise again, and would not be the one checked).
            stage("load")
            runtime = target.load(ctx)
            stage("validate")
            validation = self._validate(spec, target, ctx, runtime)
        except BaseException as exc:
            if runtime is not None:
                runtime.close()
            shutil.rmtree(staging, ignore_errors=True)
            if not isinstance(exc, Exception):
                raise
            # A model that raises (or returns what its spec does not declare) on its own inputs
            # is the plugin's bug: say so, not what the exporter or compiler made of it.
            # (Only where eager is this model's meaning: a target checked against it, or eager itself.)
            eager = target.check_parity or target.name == REFERENCE_TARGET
            fault = self._eager_fault(spec, target, ctx) if eager and not isinstance(exc, TargetUnavailable) else None
            if fault is not None:
                failure = fault
            elif isinstance(exc, BuildError):
                failure = exc
            elif isinstance(exc, PluginError):  # a validator's fault, named by the plugin host
                failure = BuildError(f"model '{spec.name}': building target '{target.name}' failed: {exc}")
            else:  # the caller logs the one line; the traceback is for --log-level debug
                log.debug("model '%s': building target '%s' failed", spec.key, target.name, exc_info=exc)
                failure = BuildError(
                    f"model '{spec.name}': building target '{target.name}' failed: "
                    f"{exception_line(exc)}{raised_in(exc, spec.sources)}"
                )
            if not isinstance(failure, TargetUnavailable):  # that is "not here", not a failed build
                self._record_failure(spec, target, key, failure)
            if failure is exc:
                raise
            raise failure from exc
        manifest = {
            "format": MANIFEST_FORMAT,
            "model": spec.name,
            "version": spec.version,
            "plugin": spec.plugin,
            "target": target.name,
            "target_plugin": target.plugin,
            "platform": target.platform,
            "device": self.device,
            "status": "failed" if validation.get("problems") else "ok",
            "cache_key": key,
            "key_parts": parts,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(build_seconds, 3),
            "files": hash_files(sorted(p for p in staging.iterdir() if p.is_file()), staging),
            "validation": validation,
        }
        if "calibration" in parts:
            manifest["calibration"] = parts["calibration"]
        try:
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            _replace_dir(staging, final)
            self.failure_path(spec).unlink(missing_ok=True)  # the manifest tells this build's outcome
        except BaseException:
            runtime.close()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info(
            "model '%s': built target '%s' in %.2fs (%s)",
            spec.key,
            target.name,
            build_seconds,
            manifest["status"],
        )
        if manifest["status"] != "ok":
            runtime.close()
            raise BuildError(_refusal(spec, manifest))
        return Artifact(runtime, manifest, built=True)

    def _eager_fault(self, spec: ModelSpec, target: Target, ctx: ArtifactContext) -> BuildError | None:
        """After a failed build: the BuildError that says the eager model itself fails on the
        inputs it is checked on, or None when it runs (the target's own failure stands)."""
        where = f"model '{spec.name}': building target '{target.name}' failed"
        try:
            ctx.module()
        except Exception as exc:
            message = f"{where}: its build() raised: {exception_line(exc)}{raised_in(exc, spec.sources)}"
            exc.__suppress_context__ = True  # raised while the build's failure was handled: not its cause
            log.debug("%s", message, exc_info=exc)  # the caller logs the message; this, its traceback
            return BuildError(message)
        try:
            self.reference_outputs(spec, ctx, self._checked_inputs(spec)[0])
        except BuildError as exc:
            return exc  # says what is wrong (outputs the spec does not declare, no reference target)
        except Exception as exc:
            inputs = "validation_data inputs" if spec.validation_data is not None else "example_inputs"
            message = (
                f"{where}: the eager model raises on its {inputs}: {exception_line(exc)}{raised_in(exc, spec.sources)}"
            )
            exc.__suppress_context__ = True  # raised while the build's failure was handled: not its cause
            log.debug("%s", message, exc_info=exc)  # the caller logs the message; this, its traceback
            return BuildError(message)
        return None

    def _checked_inputs(self, spec: ModelSpec) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """What an artifact is checked on, as the model takes them (after `preprocess`): the
        `validation_data` inputs when the spec has some, else its example inputs; and the labels."""
        labels = None
        if spec.validation_data is not None:
            examples, labels = spec.validation_data()
            rows = {name: len(value) for name, value in examples.items()}
            if labels is not None and any(n != len(labels) for n in rows.values()):
                raise BuildError(
                    f"model '{spec.name}': validation_data returned {len(labels)} labels for inputs of "
                    f"{', '.join(f'{n} rows ({name})' for name, n in rows.items())}; give one label per input row"
                )
        else:
            examples = spec.examples()
        return spec.to_forward(examples), labels

    def _validate(self, spec: ModelSpec, target: Target, ctx: ArtifactContext, runtime: Runtime) -> dict[str, Any]:
        examples, labels = self._checked_inputs(spec)
        reference = self.reference_outputs(spec, ctx, examples) if target.check_parity else None
        if spec.postprocess is not None:
            # The spec could not run its postprocess without a model; here the eager model's
            # outputs exist (the reference, or this runtime where it is eager itself).
            _check_postprocess(spec, reference if reference is not None else _run_in_requests(spec, runtime, examples))
        tolerance = spec.tolerance_for(target)
        merged: dict[str, Any] = {"tolerance": asdict(tolerance), "problems": []}
        for result in self.plugins.validate_artifact(spec, runtime, examples, reference, tolerance, labels):
            for name, value in result.items():
                if name == "problems":
                    merged["problems"].extend(value)
                else:
                    merged[name] = value
        return merged

    def reference_outputs(
        self, spec: ModelSpec, ctx: ArtifactContext, examples: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """What an artifact is checked against: the target named REFERENCE_TARGET (the built-in
        eager "torch", or a plugin's that replaces it), loaded on the CPU over a copy of the eager
        module, so the module a target serves is never moved or changed."""
        reference = self.targets.get(REFERENCE_TARGET)
        if reference is None:
            raise BuildError(
                f"model '{spec.name}': no target '{REFERENCE_TARGET}' is registered to check target "
                f"'{spec.target}' against; registered targets: {', '.join(sorted(self.targets))}"
            )
        copied = ArtifactContext(
            spec=spec, directory=ctx.directory, device="cpu", threads=self.threads, _module=copy.deepcopy(ctx.module())
        )
        runtime = reference.load(copied)
        try:
            return runtime.run(examples)
        finally:
            runtime.close()


def _requests(spec: ModelSpec, arrays: Mapping[str, np.ndarray]) -> list[tuple[int, dict[str, np.ndarray]]]:
    """`arrays` cut into the requests a client could send: (rows, arrays) of at most
    max_batch_size rows each; one request for a model that does not batch."""
    if not spec.batching.batching:
        return [(1, dict(arrays))]
    limit = spec.batching.max_batch_size
    rows = len(next(iter(arrays.values()))) if arrays else 0
    return [
        (min(limit, rows - start), {name: value[start : start + limit] for name, value in arrays.items()})
        for start in range(0, rows, limit)
    ]


def _run_in_requests(spec: ModelSpec, runtime: Runtime, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The runtime's outputs on `inputs`, run a request's worth of rows at a time."""
    parts = [runtime.run(chunk) for _, chunk in _requests(spec, inputs)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]} if len(parts) > 1 else parts[0]


def _check_postprocess(spec: ModelSpec, outputs: Mapping[str, np.ndarray]) -> None:
    """BuildError naming the model, its plugin and the output when the spec's postprocess
    raises on the eager model's outputs, or returns what the served `outputs` are not; run a
    request's worth of rows at a time, as serving runs it."""
    inputs = "validation_data inputs" if spec.validation_data is not None else "example_inputs"
    where = f"model '{spec.name}'" + (f" (plugin '{spec.plugin}')" if spec.plugin else "")
    for rows, chunk in _requests(spec, outputs):
        try:
            served = spec.from_forward(chunk)
        except Exception as exc:
            raise BuildError(
                f"{where}: postprocess raised on the eager model's outputs for its {inputs}: "
                f"{exception_line(exc)}{raised_in(exc, spec.sources)}"
            ) from exc
        problem = spec.output_problem(served, rows)
        if problem is not None:
            raise BuildError(
                f"{where}: postprocess of the eager model's outputs for its {inputs} does not match the "
                f"spec's outputs: {problem}"
            )


def _refusal(spec: ModelSpec, manifest: dict[str, Any]) -> str:
    problems = manifest.get("validation", {}).get("problems", [])
    return f"model '{spec.name}' version {spec.version}: artifact refused: " + "; ".join(problems)


def sources_fingerprint(spec: ModelSpec) -> dict[str, str]:
    """sha256 of each file of the plugin that registered `spec`, as its cache key has them
    (manifest `key_parts.sources`): which plugin files a spec, and so a build, was read from.
    A frontend of --workers N compares it with the model process's build (hub/workers)."""
    return hash_files(spec.sources, _common_root(spec.sources))


def _common_root(paths: tuple[Path, ...]) -> Path | None:
    if not paths:
        return None
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def artifact_changes(directory: Path, manifest: Mapping[str, Any]) -> list[str]:
    """The artifact files whose sha256 is not the one the manifest recorded (missing ones
    included), so that a file swapped on disk is rebuilt, never served."""
    recorded = manifest.get("files")
    if not isinstance(recorded, dict):
        return ["the manifest lists no files"]
    changed = []
    for name, digest in sorted(recorded.items()):
        path = directory / name
        if not path.is_file():
            changed.append(f"{name} missing")
        elif hash_files([path], directory).get(name) != digest:
            changed.append(name)
    return changed


#: A build writes into models/<name>/.<version>.staging-<pid> and moves the replaced artifact
#: to .<version>.old-<pid>-<ns> before deleting it: both are left behind by a killed build.
_LEFTOVER = re.compile(r"^\.(?P<version>[^.]+)\.(?:staging-(?P<spid>\d+)|old-(?P<opid>\d+)-\d+)$")


def clean_stale_staging(final: Path) -> list[Path]:
    """Remove the staging and replaced-artifact folders that builds of this version left
    behind when they were killed: those of processes that no longer run. A live process's
    (this one's included: another server in it may be building) are its own business."""
    removed: list[Path] = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = _LEFTOVER.match(path.name)
        if match is None or match["version"] != final.name or not path.is_dir():
            continue
        pid = int(match["spid"] or match["opid"])
        if pid == os.getpid() or _process_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by an interrupted build", path)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _replace_dir(staging: Path, final: Path) -> None:
    """Move a finished build into place; the old artifact is removed only after the move."""
    final.parent.mkdir(parents=True, exist_ok=True)
    trash = None
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        final.rename(trash)
    staging.rename(final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
