"""The served models: name -> version -> ServedModel, how they load, and how a request finds one."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from hub.core.batching import Batcher, BatchObserver, Clock
from hub.core.models import ModelState, ServedModel
from hub.core.stats import ModelStats
from hub.errors import BuildError, HubError, ModelNotFound, ModelUnavailable, exception_line, name_list, shorten
from hub.metrics import Metrics, NullMetrics
from hub.pipeline.builder import Builder, sources_fingerprint
from hub.spec import ModelSpec, Runtime

log = logging.getLogger("modelhub.repository")

#: How a version whose reload failed says so, while its previous build serves on.
RELOAD_FAILED = "reload failed, still serving the previous build: "


class ModelRepository:
    """Owns every ServedModel of one server. All methods run on the event loop thread;
    builds and loads run in a worker thread, one model at a time."""

    def __init__(
        self,
        builder: Builder,
        metrics: Metrics | NullMetrics,
        *,
        clock: Clock | None = None,
        inline_compute: float = 0.0,
        adaptive_delay: float = 0.0,
        on_device_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.builder = builder
        self.metrics = metrics
        self._clock = clock
        #: Told when a batch fails with a sticky CUDA error: this process's device is gone.
        self._on_device_lost = on_device_lost
        self._inline_compute = inline_compute
        self._adaptive_delay = adaptive_delay
        self._models: dict[str, dict[int, ServedModel]] = {}
        self._listeners: list[Callable[[ServedModel], None]] = []
        self._load_lock = asyncio.Lock()
        #: Asked before a reload's new build takes the old one's place: None, or why it must
        #: not (the model process of --workers N has every frontend read its spec first).
        self.before_swap: Callable[[ServedModel], Awaitable[str | None]] | None = None

    def on_change(self, listener: Callable[[ServedModel], None]) -> None:
        """Call `listener(model)` whenever a model changes state."""
        self._listeners.append(listener)

    def _set_state(self, model: ServedModel, state: ModelState, reason: str = "", *, announce: bool = True) -> None:
        model.set_state(state, reason, announce=announce)
        if announce:
            self._announce(model)

    def _announce(self, model: ServedModel) -> None:
        for listener in self._listeners:
            listener(model)

    # --- lookups ----------------------------------------------------------------------------

    def models(self) -> list[ServedModel]:
        return [m for versions in self._models.values() for _, m in sorted(versions.items())]

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[ServedModel]:
        return [m for _, m in sorted(self._models.get(name, {}).items())]

    def resolve(self, name: str, version: str = "") -> ServedModel:
        """The model a request names; "" picks the newest ready version (else the newest)."""
        versions = self._models.get(name)
        if not versions:
            known = name_list(self.names())
            raise ModelNotFound(f"unknown model '{shorten(name)}'; served models: {known}")
        if not version:
            if len(versions) == 1:
                (only,) = versions.values()
                return only
            ready = [v for v, m in versions.items() if m.ready]
            return versions[max(ready or versions)]
        try:
            # ASCII digits only: int() would also read " 1", "1_0" (as 10) and a fullwidth digit one.
            return versions[int(version) if version.isascii() and version.isdigit() else -1]
        except (ValueError, KeyError):
            raise ModelNotFound(
                f"model '{name}' has no version '{shorten(version)}'; versions: {sorted(versions)}"
            ) from None

    def describe(self, name: str, version: str = "") -> ServedModel:
        """The model whose metadata or configuration a request asks for: `resolve`'s (a
        frontend of --workers N refuses one whose spec it could not read, hub/workers)."""
        return self.resolve(name, version)

    async def refresh_statistics(self, models: list[ServedModel]) -> None:
        """Make these models' `stats` current (they are, in one process; see hub/workers)."""

    def get_ready(self, name: str, version: str = "") -> ServedModel:
        model = self.resolve(name, version)
        if not model.ready:
            # An unload's reason is "unloaded" (what Triton's index shows): not said twice.
            reason = model.reason if model.reason and model.reason != model.state.value else ""
            raise ModelUnavailable(
                f"model '{name}' version {model.version} is {model.state.value}" + (f": {reason}" if reason else "")
            )
        return model

    # --- loading ----------------------------------------------------------------------------

    def _new(self, spec: ModelSpec, stats: ModelStats | None = None) -> ServedModel:
        metrics = self.metrics.for_model(spec.name, spec.version)
        # The target is known before the build, so the platform a model reports is the same
        # whether it loads or fails.
        return ServedModel(
            spec=spec,
            target=self.builder.targets.get(spec.target),
            metrics=metrics,
            stats=stats if stats is not None else ModelStats(),
        )

    def add(self, spec: ModelSpec) -> ServedModel:
        model = self._new(spec)
        self._models.setdefault(spec.name, {})[spec.version] = model
        self._set_state(model, ModelState.LOADING)
        return model

    async def replace(self, name: str, specs: list[ModelSpec]) -> None:
        """Load new versions of a model while the current ones serve, then swap and drain.

        For each version: the replacement is built and validated first; only when it is ready
        does it take the old one's place (one dict assignment on the event loop, so every
        request goes to exactly one of them); then the old one finishes its queue and is
        freed. A replacement that fails leaves the old version serving, with the failure in
        its `reason`, and so does one whose plugin files changed while it was built
        (`_superseded`). Versions the plugin no longer registers are unloaded. Raises
        BuildError with the failures, after every version was tried.
        """
        current = dict(self._models.get(name, {}))
        failures = []
        for spec in specs:
            old = current.get(spec.version)
            serving = old is not None and old.ready
            new = self._new(spec, stats=old.stats if old is not None else None)
            if not serving:
                self._models.setdefault(name, {})[spec.version] = new
            await self.load(new, announce=not serving)
            if not new.ready:
                failures.append(new.reason)
                if serving and old is not None:
                    self.note_failed_reload(old, new.reason, logged=True)
                continue
            if serving and old is not None:
                superseded = await self._superseded(new)
                if superseded is not None:
                    await self._retire(new)
                    failures.append(superseded)
                    self.note_failed_reload(old, superseded)
                    continue
            self._models.setdefault(name, {})[spec.version] = new
            self._set_state(new, ModelState.READY)
            if serving and old is not None:
                await self._retire(old)
        wanted = {s.version for s in specs}
        for version, old in current.items():
            if version not in wanted:
                await self._retire(old, announce=True)
        if failures:
            raise BuildError("; ".join(failures))

    async def _superseded(self, new: ServedModel) -> str | None:
        """Why a reload's new build must not take the old one's place, or None.

        Its plugin's files changed while it was built: nothing could read its spec from them
        any more (not a frontend process of --workers N, which reads the plugins itself, nor
        this server after a restart), so the old build serves on, as after a failed reload, and
        the newer files are the change to apply (--watch applies them next). Then whatever
        `before_swap` says."""
        built = new.manifest.get("key_parts", {}).get("sources")
        if isinstance(built, dict):
            try:
                now: dict[str, str] | None = await asyncio.to_thread(sources_fingerprint, new.spec)
            except OSError:  # a file of the plugin went away
                now = None
            if now != built:
                return f"the files of plugin '{new.spec.plugin}' changed while the new build ran; load it again"
        if self.before_swap is not None:
            return await self.before_swap(new)
        return None

    def note_failed_reload(self, model: ServedModel, reason: str, *, logged: bool = False) -> None:
        """A replacement failed: the model keeps serving, and says why in RepositoryIndex and
        metrics (and to every frontend process of --workers N, which mirror the reason).
        `logged`: the failure's line is in the log already (`load` wrote it): one failure, one
        ERROR line."""
        model.reason = f"{RELOAD_FAILED}{reason}"
        model.metrics.load_failed()
        if logged:
            log.info("model '%s': still serving the previous build", model.spec.key)
        else:
            log.error("model '%s': %s", model.spec.key, model.reason)
        self._announce(model)

    def note_up_to_date(self, model: ServedModel) -> None:
        """The plugin files are back to those the serving build came from: a failed reload's
        reason no longer holds."""
        if model.ready and model.reason.startswith(RELOAD_FAILED):
            model.reason = ""
            log.info("model '%s': its plugin files are those of the build it serves again", model.spec.key)
            self._announce(model)

    async def unload(self, name: str) -> None:
        """Stop serving every version of a model: new requests get UNAVAILABLE, queued ones finish."""
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"unknown model '{shorten(name)}'; served models: {name_list(self.names())}")
        for model in list(versions.values()):
            await self._retire(model, announce=True)

    async def remove(self, name: str) -> None:
        """Forget a model no plugin registers any more: it stops serving (queued requests
        finish), and leaves the index, the metrics and the names NOT_FOUND lists. An unloaded
        model, by contrast, stays listed (UNAVAILABLE, "unloaded"): it could be loaded again."""
        versions = self._models.get(name)
        if not versions:
            return
        for model in list(versions.values()):
            if model.state is not ModelState.UNLOADED:
                await self._retire(model, announce=True)
        del self._models[name]
        for model in versions.values():
            self.metrics.forget(model.name, model.version)
            for listener in self._listeners:
                listener(model)
        log.info("model '%s' removed: no plugin registers it", name)

    async def _retire(self, model: ServedModel, *, announce: bool = False) -> None:
        """Drain a model's batcher and free its runtime."""
        if announce:
            self._set_state(model, ModelState.UNLOADED, "unloaded")
        if model.batcher is not None:
            await model.batcher.close(drain=True)
            model.batcher = None
        if model.runtime is not None:
            await asyncio.to_thread(_close_runtime, model)
        if not announce:
            model.set_state(ModelState.UNLOADED, "replaced", announce=False)
        log.info("model '%s' %s: drained and freed", model.spec.key, "unloaded" if announce else "replaced")

    def batcher_for(self, spec: ModelSpec, runtime: Runtime, observer: BatchObserver) -> Batcher:
        """A started batcher for a loaded runtime of `spec`."""
        on_cpu = runtime.device == "cpu"
        batcher = Batcher(
            spec.name,
            spec.batching,
            runtime.run,
            clock=self._clock,
            observer=observer,
            padding={t.name: t.padding for t in spec.forward_inputs if t.padding is not None},
            # On a GPU the loop must never wait for the device: every batch goes to a worker.
            inline_below=self._inline_compute if on_cpu else 0.0,
            # The adaptive queue delay was measured on the CPU only (docs/benchmarks.md); on
            # a GPU, requests that arrive while the device computes batch as they are.
            adaptive_delay=self._adaptive_delay if on_cpu else 0.0,
            on_device_lost=self._on_device_lost,
        )
        batcher.start()
        return batcher

    async def load(self, model: ServedModel, *, announce: bool = True) -> None:
        async with self._load_lock:
            if model.state is ModelState.UNLOADED:
                # Unloaded while it waited for its turn (an unload RPC during the start's
                # loads, or one a restarted model process of --workers N honours): it stays so.
                return
            started = time.perf_counter()
            try:
                artifact = await asyncio.to_thread(self.builder.ensure, model.spec)
            except Exception as exc:
                # The one line of a failed build or load (the builder logs none, and its
                # traceback at DEBUG): the model, its target, the cause, and where to fix it.
                reason = str(exc) if isinstance(exc, HubError) else exception_line(exc)
                self._set_state(model, ModelState.FAILED, reason, announce=announce)
                log.error(
                    "model '%s' (target '%s') failed to load: %s%s",
                    model.spec.key,
                    model.spec.target,
                    reason,
                    _registered_by(model.spec),
                )
                if not isinstance(exc, HubError):  # not a build's failure: a load's, or a bug
                    log.debug("model '%s': the load's traceback", model.spec.key, exc_info=exc)
                return
            if model.state is ModelState.UNLOADED:  # unloaded while it was built: it stays so
                await asyncio.to_thread(artifact.runtime.close)
                return
            model.target = self.builder.target_for(model.spec)
            model.runtime = artifact.runtime
            model.device = artifact.runtime.device
            model.manifest = artifact.manifest
            model.load_seconds = time.perf_counter() - started
            model.batcher = self.batcher_for(model.spec, artifact.runtime, model.metrics)
            build = artifact.manifest.get("build_seconds", 0.0) if artifact.built else 0.0
            model.metrics.loaded(model.load_seconds, build)
            self._set_state(model, ModelState.READY, announce=announce)
            log.info(
                "model '%s' ready in %.2fs (target %s, %s, device %s)",
                model.spec.key,
                model.load_seconds,
                model.spec.target,
                "built" if artifact.built else "cached artifact",
                artifact.runtime.device,
            )

    async def close(self, drain: bool = True) -> None:
        for model in self.models():
            if model.batcher is not None:
                await model.batcher.close(drain=drain)
            if model.runtime is not None:
                _close_runtime(model)
            self._set_state(model, ModelState.UNLOADED)


def _close_runtime(model: ServedModel) -> None:
    """Free a model's runtime. One that fails to close (torch's cache under a lost GPU, a
    plugin's bug) is logged and dropped: an unload or a shutdown goes on."""
    runtime, model.runtime = model.runtime, None
    try:
        if runtime is not None:
            runtime.close()
    except Exception:
        log.exception("model '%s': closing its runtime failed", model.spec.key)


def _registered_by(spec: ModelSpec) -> str:
    """' (registered by plugin "x", FILE)' for a log line: the place to fix a failed model."""
    if not spec.plugin:
        return ""
    files = [str(f) for f in spec.sources]
    where = f", {files[0] if len(files) == 1 else os.path.commonpath(files)}" if files else ""
    return f' (registered by plugin "{spec.plugin}"{where})'
