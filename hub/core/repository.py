"""The served models: name -> version -> ServedModel, how they load, and how a request finds one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from hub.build.pipeline import Builder
from hub.core.batching import Batcher, Clock
from hub.core.models import ModelState, ServedModel
from hub.errors import HubError, ModelNotFound, ModelUnavailable
from hub.metrics import Metrics
from hub.spec import ModelSpec

log = logging.getLogger("modelhub.repository")


class ModelRepository:
    """Owns every ServedModel of one server. All methods run on the event loop thread;
    builds and loads run in a worker thread, one model at a time."""

    def __init__(self, builder: Builder, metrics: Metrics | None, *, clock: Clock | None = None) -> None:
        self.builder = builder
        self.metrics = metrics
        self._clock = clock
        self._models: dict[str, dict[int, ServedModel]] = {}
        self._listeners: list[Callable[[ServedModel], None]] = []
        self._load_lock = asyncio.Lock()

    def on_change(self, listener: Callable[[ServedModel], None]) -> None:
        """Call `listener(model)` whenever a model changes state."""
        self._listeners.append(listener)

    def _set_state(self, model: ServedModel, state: ModelState, reason: str = "") -> None:
        model.set_state(state, reason)
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
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"unknown model '{name}'; served models: {known}")
        if not version:
            ready = [v for v, m in versions.items() if m.ready]
            return versions[max(ready or versions)]
        try:
            return versions[int(version)]
        except (ValueError, KeyError):
            raise ModelNotFound(f"model '{name}' has no version '{version}'; versions: {sorted(versions)}") from None

    def get_ready(self, name: str, version: str = "") -> ServedModel:
        model = self.resolve(name, version)
        if not model.ready:
            raise ModelUnavailable(
                f"model '{name}' version {model.version} is {model.state.value}"
                + (f": {model.reason}" if model.reason else "")
            )
        return model

    @property
    def settled(self) -> bool:
        """Every model has finished loading, one way or the other."""
        return all(m.state is not ModelState.LOADING for m in self.models())

    # --- loading ----------------------------------------------------------------------------

    def add(self, spec: ModelSpec) -> ServedModel:
        metrics = self.metrics.for_model(spec.name, spec.version) if self.metrics is not None else None
        model = ServedModel(spec=spec, metrics=metrics)
        self._models.setdefault(spec.name, {})[spec.version] = model
        self._set_state(model, ModelState.LOADING)
        return model

    async def load(self, model: ServedModel) -> None:
        async with self._load_lock:
            started = time.perf_counter()
            try:
                artifact = await asyncio.to_thread(self.builder.ensure, model.spec)
            except HubError as exc:
                self._set_state(model, ModelState.FAILED, str(exc))
                log.error("model '%s' failed to load: %s", model.spec.key, exc)
                return
            except Exception as exc:
                self._set_state(model, ModelState.FAILED, f"{type(exc).__name__}: {exc}")
                log.exception("model '%s' failed to load", model.spec.key)
                return
            model.target = self.builder.target_for(model.spec)
            model.runtime = artifact.runtime
            model.manifest = artifact.manifest
            model.load_seconds = time.perf_counter() - started
            model.batcher = Batcher(
                model.name,
                model.spec.batching,
                artifact.runtime.run,
                model.stats,
                clock=self._clock,
                observer=model.metrics,
            )
            model.batcher.start()
            if model.metrics is not None:
                build = artifact.manifest.get("build_seconds", 0.0) if artifact.built else 0.0
                model.metrics.loaded(model.load_seconds, build)
            self._set_state(model, ModelState.READY)
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
                model.runtime.close()
                model.runtime = None
            self._set_state(model, ModelState.UNLOADED)
