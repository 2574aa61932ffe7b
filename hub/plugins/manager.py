"""Plugin discovery and the typed facade over pluggy: built-ins, entry points, then a plugins directory."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pluggy

from hub.errors import HubError, SpecError
from hub.plugins import hookspecs
from hub.spec import ModelSpec, Runtime, Target, Tolerance

log = logging.getLogger("modelhub.plugins")

ENTRY_POINT_GROUP = "modelhub"
#: Built-in behaviour is ordinary plugins, registered under short names.
BUILTINS: dict[str, str] = {
    "torch": "hub.runtimes.torch",
    "onnx": "hub.runtimes.onnx",
    "variants": "hub.runtimes.variants",
    "validation": "hub.build.validation",
}


@dataclass
class PluginRecord:
    """What `modelhub plugins` shows about one plugin."""

    name: str
    source: str  # "builtin", "entry-point" or "directory"
    location: str
    status: str = "loaded"  # "loaded", "failed" or "disabled"
    errors: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    files: tuple[Path, ...] = ()


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def _source_files(module: ModuleType) -> tuple[Path, ...]:
    """The files whose content defines a plugin: its module, or every file of its package."""
    origin = getattr(module, "__file__", None)
    if not origin:
        return ()
    path = Path(origin).resolve()
    if path.name != "__init__.py":
        return (path,)
    files = [
        p for p in path.parent.rglob("*") if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    ]
    return tuple(sorted(files))


def hash_files(paths: Iterable[Path], root: Path | None = None) -> dict[str, str]:
    """sha256 of each file, keyed by its path (relative to `root` when given)."""
    out: dict[str, str] = {}
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        key = str(path.relative_to(root)) if root and path.is_relative_to(root) else path.name
        out[key] = digest.hexdigest()
    return out


class PluginHost:
    """Loads plugins once, collects their models and targets, and calls their hooks.

    Loading is explicit (`load()`), idempotent, and never done at import time. A plugin that
    fails to import or registers something invalid is recorded with its name, file and
    reason, and the others carry on.
    """

    def __init__(
        self,
        plugins_dir: Path | None = None,
        *,
        entry_points: bool = True,
        allow: set[str] | None = None,
        block: set[str] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        self.plugins_dir = plugins_dir
        self.entry_points = entry_points
        self.allow = allow if allow is not None else _env_list("MODELHUB_PLUGINS")
        self.block = block if block is not None else (_env_list("MODELHUB_DISABLE_PLUGINS") or set())
        self.extra = dict(extra or {})
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._loaded = False
        if os.environ.get("MODELHUB_TRACE_HOOKS"):
            self.pm.trace.root.setwriter(lambda msg: log.info("hook: %s", msg.rstrip()))
            self.pm.enable_tracing()

    # --- discovery ------------------------------------------------------------------------

    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for name, module_name in BUILTINS.items():
            self._add(name, "builtin", module_name, functools.partial(importlib.import_module, module_name))
        for name, plugin in self.extra.items():
            self._add(name, "builtin", repr(plugin), functools.partial(_identity, plugin))
        if self.entry_points:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                self._add(ep.name, "entry-point", ep.value, ep.load)
        if self.plugins_dir is not None:
            self._load_directory(self.plugins_dir)

    def refresh(self) -> None:
        """Re-import the plugins directory: changed files take effect, new ones are added and
        removed ones dropped. Built-ins and entry points stay as they were loaded."""
        self.load()
        for name, record in list(self.records.items()):
            if record.source != "directory":
                continue
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            del self.records[name]
            for module in [
                m for m in sys.modules if m == f"modelhub_plugins.{name}" or m.startswith(f"modelhub_plugins.{name}.")
            ]:
                del sys.modules[module]
        if self.plugins_dir is not None:
            self._load_directory(self.plugins_dir)

    def _load_directory(self, folder: Path) -> None:
        if not folder.is_dir():
            log.warning("plugins directory %s does not exist", folder)
            return
        for path in sorted(folder.iterdir()):
            if path.name.startswith((".", "_")):
                continue
            if path.is_file() and path.suffix == ".py":
                self._add(path.stem, "directory", str(path), functools.partial(_import_file, path))
            elif path.is_dir() and (path / "__init__.py").is_file():
                self._add(path.name, "directory", str(path), functools.partial(_import_file, path / "__init__.py"))

    def _add(self, name: str, source: str, location: str, importer: Callable[[], object]) -> None:
        record = PluginRecord(name=name, source=source, location=location)
        if name in self.records:
            record.status = "failed"
            record.errors.append(
                f'plugin "{name}" ({location}) has the same name as one from {self.records[name].location}'
            )
            self.records[f"{name}@{location}"] = record
            log.error("%s", record.errors[-1])
            return
        self.records[name] = record
        if name in self.block or (self.allow is not None and source != "builtin" and name not in self.allow):
            record.status = "disabled"
            return
        try:
            plugin = importer()
        except Exception as exc:
            self._fail(record, f'Error importing plugin "{name}" from {location}: {exc!r}', exc)
            return
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            self._fail(record, f'plugin "{name}" ({location}) is invalid: {exc}', exc)
            return
        if isinstance(plugin, ModuleType):
            record.files = _source_files(plugin)
        record.hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
        log.debug("loaded plugin %s from %s", name, location)

    def _fail(self, record: PluginRecord, message: str, exc: BaseException) -> None:
        record.status = "failed"
        record.errors.append(message)
        log.error("%s\n%s", message, "".join(traceback.format_exception(exc)).rstrip())

    # --- registration ---------------------------------------------------------------------

    def _impls(self, hook: Any) -> Iterable[tuple[PluginRecord, Any]]:
        """Each implementation of a hook with its plugin's record, in registration order, so
        that every result and every error belongs to one plugin."""
        for impl in hook.get_hookimpls():
            yield self.records[impl.plugin_name], impl

    def collect_targets(self) -> dict[str, Target]:
        self.load()
        for record in self.records.values():
            record.targets = []
        targets: dict[str, Target] = {}
        for record, impl in self._impls(self.pm.hook.register_targets):

            def register(target: Target, record: PluginRecord = record) -> None:
                if not isinstance(target, Target):
                    raise SpecError(f"register_targets: expected a hub.Target, got {target!r}")
                if target.name in targets:
                    raise SpecError(
                        f"target '{target.name}' is already registered by plugin \"{targets[target.name].plugin}\""
                    )
                targets[target.name] = dataclasses.replace(target, plugin=record.name)
                record.targets.append(target.name)

            self._guarded(record, "register_targets", impl, register=register)
        return targets

    def collect_models(self) -> list[ModelSpec]:
        self.load()
        for record in self.records.values():
            record.models = []
        specs: dict[tuple[str, int], ModelSpec] = {}
        for record, impl in self._impls(self.pm.hook.register_models):

            def register(spec: ModelSpec, record: PluginRecord = record) -> None:
                try:
                    if not isinstance(spec, ModelSpec):
                        raise SpecError(f"expected a hub.ModelSpec, got {type(spec).__name__}")
                    spec.validate()
                    key = (spec.name, spec.version)
                    if key in specs:
                        raise SpecError(
                            f"model '{spec.name}' version {spec.version} is already registered "
                            f'by plugin "{specs[key].plugin}"'
                        )
                except HubError as exc:
                    self._spec_error(record, str(exc))
                    return
                specs[key] = spec.with_(plugin=record.name, sources=record.files)
                record.models.append(spec.key)

            self._guarded(record, "register_models", impl, register=register)
        return sorted(specs.values(), key=lambda s: (s.name, s.version))

    def _guarded(self, record: PluginRecord, hook: str, impl: Any, **kwargs: Any) -> None:
        try:
            _invoke(impl, **kwargs)
        except HubError as exc:
            self._spec_error(record, str(exc))
        except Exception as exc:
            self._fail(record, f'plugin "{record.name}" ({record.location}) raised in {hook}: {exc!r}', exc)

    def _spec_error(self, record: PluginRecord, message: str) -> None:
        text = f'plugin "{record.name}" ({record.location}): {message}'
        record.errors.append(text)
        log.error("%s", text)

    # --- the typed facade over the remaining hooks -----------------------------------------

    def validate_artifact(
        self,
        spec: ModelSpec,
        runtime: Runtime,
        examples: Mapping[str, np.ndarray],
        reference: Mapping[str, np.ndarray] | None,
        tolerance: Tolerance,
        labels: np.ndarray | None = None,
    ) -> list[dict[str, Any]]:
        return list(
            self.pm.hook.validate_artifact(
                spec=spec, runtime=runtime, examples=examples, reference=reference, tolerance=tolerance, labels=labels
            )
        )

    def server_started(self, server: Any) -> None:
        self._notify(self.pm.hook.server_started, "server_started", server=server)

    def server_stopping(self, server: Any) -> None:
        self._notify(self.pm.hook.server_stopping, "server_stopping", server=server)

    def _notify(self, hook: Any, hook_name: str, **kwargs: Any) -> None:
        for record, impl in self._impls(hook):
            try:
                _invoke(impl, **kwargs)
            except Exception:
                log.exception('plugin "%s" raised in %s', record.name, hook_name)


def _invoke(impl: Any, **kwargs: Any) -> Any:
    """Call one hook implementation with the arguments it asks for (pluggy allows a subset)."""
    return impl.function(*[kwargs[arg] for arg in impl.argnames])


def _identity(plugin: object) -> object:
    return plugin


def _import_file(path: Path) -> ModuleType:
    """Import a loose plugin file or package under a private name, so it cannot shadow real modules."""
    is_package = path.name == "__init__.py"
    stem = path.parent.name if is_package else path.stem
    module_name = f"modelhub_plugins.{stem}"
    if "modelhub_plugins" not in sys.modules:
        namespace = ModuleType("modelhub_plugins")
        namespace.__path__ = []
        sys.modules["modelhub_plugins"] = namespace
    spec = importlib.util.spec_from_file_location(
        module_name, path, submodule_search_locations=[str(path.parent)] if is_package else None
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
