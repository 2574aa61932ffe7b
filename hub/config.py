"""Deployment configuration: per-model overrides of what plugins declare (TOML, or YAML when
PyYAML is installed), given to `modelhub serve --config FILE`.

    [models.digits]
    target = "onnx"
    max_batch_size = 32
    max_queue_delay = 0.001        # seconds
    preferred_batch_sizes = [16, 32]
    max_queue_size = 256
    timeout = 2.0                  # seconds; a client's gRPC deadline wins
    instances = 2
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hub.errors import SpecError
from hub.spec import BatchPolicy, ModelSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("modelhub.config")

BATCHING_KEYS = {f.name for f in dataclasses.fields(BatchPolicy)}
MODEL_KEYS = BATCHING_KEYS | {"target"}


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
    models: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> DeploymentConfig:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise SpecError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use TOML") from None
            data = yaml.safe_load(text) or {}
        else:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise SpecError(f"{path}: {exc}") from None
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: Mapping[str, Any], source: str = "config") -> DeploymentConfig:
        unknown = set(data) - {"models"}
        if unknown:
            raise SpecError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected [models.<name>] tables")
        models = data.get("models", {})
        if not isinstance(models, Mapping):
            raise SpecError(f"{source}: 'models' must be a table of model names")
        for name, overrides in models.items():
            if not isinstance(overrides, Mapping):
                raise SpecError(f"{source}: models.{name} must be a table")
            bad = set(overrides) - MODEL_KEYS
            if bad:
                raise SpecError(
                    f"{source}: models.{name} has unknown key(s) {sorted(bad)}; allowed: {sorted(MODEL_KEYS)}"
                )
        return cls(models=dict(models))

    def apply(self, specs: Iterable[ModelSpec]) -> list[ModelSpec]:
        """The specs with their overrides; SpecError names the model and the key when one is invalid."""
        specs = list(specs)
        known = {s.name for s in specs}
        for name in self.models:
            if name not in known:
                log.warning("config: no plugin registers a model named '%s' (models: %s)", name, sorted(known))
        return [self._apply_one(spec) for spec in specs]

    def _apply_one(self, spec: ModelSpec) -> ModelSpec:
        overrides = self.models.get(spec.name)
        if not overrides:
            return spec
        batching = {k: v for k, v in overrides.items() if k in BATCHING_KEYS}
        if "preferred_batch_sizes" in batching:
            batching["preferred_batch_sizes"] = tuple(batching["preferred_batch_sizes"])
        try:
            policy = dataclasses.replace(spec.batching, **batching)
        except SpecError as exc:
            raise SpecError(f"config for model '{spec.name}': {exc}") from None
        except TypeError as exc:
            raise SpecError(f"config for model '{spec.name}': {exc}") from None
        changed = spec.with_(batching=policy, target=overrides.get("target", spec.target))
        try:
            changed.validate()
        except SpecError as exc:
            raise SpecError(f"config for model '{spec.name}': {exc}") from None
        return changed
