"""Deployment configuration: per-model overrides of what plugins declare (TOML, or YAML when
PyYAML is installed), given to `modelhub serve --config FILE` (and to `build` and `models`).

    [models.digits]
    target = "onnx"
    max_batch_size = 32
    max_queue_delay = 0.001        # seconds
    preferred_batch_sizes = [16, 32]
    max_queue_size = 256
    timeout = 2.0                  # seconds; a client's gRPC deadline wins
    instances = 2

    [models.digits.options]         # target options, e.g. for torch-compile
    compile_mode = "max-autotune"
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hub.errors import SpecError, did_you_mean
from hub.spec import BatchPolicy, ModelSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("modelhub.config")

BATCHING_KEYS = {f.name for f in dataclasses.fields(BatchPolicy)}
MODEL_KEYS = BATCHING_KEYS | {"target", "options", "version_policy"}


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which registered versions of a model are served, as Triton's version_policy has it:
    the newest `latest` ones (the default: 1), all of them, or the `specific` ones listed."""

    latest: int | None = 1
    specific: tuple[int, ...] = ()
    all: bool = False

    @classmethod
    def parse(cls, value: Any, where: str) -> VersionPolicy:
        if not isinstance(value, Mapping) or len(value) != 1:
            raise SpecError(
                f"{where}: version_policy must be one of {{latest = N}}, {{all = true}}, {{specific = [..]}}"
            )
        ((kind, arg),) = value.items()
        if kind == "latest" and isinstance(arg, int) and arg >= 1:
            return cls(latest=arg)
        if kind == "all" and arg is True:
            return cls(latest=None, all=True)
        if kind == "specific" and isinstance(arg, list) and arg and all(isinstance(v, int) for v in arg):
            return cls(latest=None, specific=tuple(sorted(arg)))
        raise SpecError(f"{where}: bad version_policy {dict(value)}")

    def select(self, versions: list[int]) -> list[int]:
        versions = sorted(versions)
        if self.all:
            return versions
        if self.specific:
            return [v for v in versions if v in self.specific]
        return versions[-(self.latest or 1) :]


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
            raise SpecError(
                f"{source}: unknown top-level key(s) {_keys_with_hints(unknown, {'models'})}; "
                "expected [models.<name>] tables"
            )
        models = data.get("models", {})
        if not isinstance(models, Mapping):
            raise SpecError(f"{source}: 'models' must be a table of model names")
        for name, overrides in models.items():
            if not isinstance(overrides, Mapping):
                raise SpecError(f"{source}: models.{name} must be a table")
            bad = set(overrides) - MODEL_KEYS
            if bad:
                raise SpecError(
                    f"{source}: models.{name} has unknown key(s) {_keys_with_hints(bad, MODEL_KEYS)}; "
                    f"allowed: {sorted(MODEL_KEYS)}"
                )
            if "version_policy" in overrides:
                VersionPolicy.parse(overrides["version_policy"], f"{source}: models.{name}")
        return cls(models=dict(models))

    def version_policy(self, name: str) -> VersionPolicy:
        value = self.models.get(name, {}).get("version_policy")
        return VersionPolicy() if value is None else VersionPolicy.parse(value, f"models.{name}")

    def apply(self, specs: Iterable[ModelSpec]) -> list[ModelSpec]:
        """The specs to serve, with their overrides: each model's version policy picks its
        versions. SpecError names the model and the key when an override is invalid."""
        specs = list(specs)
        known = self._check_names(specs)
        served = []
        for name in sorted(known):
            versions = {s.version: s for s in specs if s.name == name}
            for version in self.version_policy(name).select(list(versions)):
                served.append(self._apply_one(versions[version]))
        return served

    def override(self, specs: Iterable[ModelSpec]) -> list[ModelSpec]:
        """Every spec with its model's overrides, whichever versions the policy serves: for
        `modelhub models`, which lists each registered version. SpecError as for `apply`."""
        specs = list(specs)
        self._check_names(specs)
        return [self._apply_one(spec) for spec in specs]

    def _check_names(self, specs: list[ModelSpec]) -> set[str]:
        known = {s.name for s in specs}
        for name in self.models:
            if name not in known:
                log.warning("config: no plugin registers a model named '%s' (models: %s)", name, sorted(known))
        return known

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
        options = {**spec.options, **dict(overrides.get("options", {}))}
        changed = spec.with_(batching=policy, target=overrides.get("target", spec.target), options=options)
        try:
            changed.validate()
        except SpecError as exc:
            raise SpecError(f"config for model '{spec.name}': {exc}") from None
        return changed


def _keys_with_hints(unknown: Iterable[str], allowed: Iterable[str]) -> str:
    """The unknown keys of a config table, each with the allowed key it most likely meant:
    "'max_batch' (did you mean 'max_batch_size'?)"."""
    return ", ".join(repr(key) + did_you_mean(key, allowed, quote="'") for key in sorted(unknown))
