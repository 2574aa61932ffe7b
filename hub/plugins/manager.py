"""Plugin discovery and the typed facade over pluggy: built-ins, entry points, then a plugins directory."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import itertools
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pluggy

from hub.errors import BuildError, HubError, PluginError, SpecError, did_you_mean, exception_line
from hub.plugins import hookspecs
from hub.spec import ModelSpec, Runtime, Target, Tolerance

log = logging.getLogger("modelhub.plugins")

ENTRY_POINT_GROUP = "modelhub"
#: Built-in behaviour is ordinary plugins, registered under short names.
BUILTINS: dict[str, str] = {
    "torch": "hub.runtimes.torch",
    "onnx": "hub.runtimes.onnx",
    "torch-variants": "hub.runtimes.torch_variants",
    "onnx-variants": "hub.runtimes.onnx_variants",
    "float8": "hub.runtimes.float8",
    "validation": "hub.pipeline.validation",
}


@dataclass
class PluginRecord:
    """What `modelhub plugins` shows about one plugin."""

    name: str
    source: str  # "builtin", "entry-point" or "directory"
    location: str
    #: "loaded"; "refused" (it loaded, but every model spec or target it registered was
    #: refused: it contributes nothing) or "partly refused" (some were); "failed" (it did not
    #: load, or raised in a hook); "disabled" (blocked, or not allowed)
    status: str = "loaded"
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    files: tuple[Path, ...] = ()

    @property
    def broken(self) -> bool:
        """Whether the plugin failed, or had something refused: what `modelhub plugins` and
        `modelhub build` exit 1 for (warnings aside, a plugin that is not disabled and has an
        error)."""
        return self.status != "disabled" and bool(self.errors)

    def settle(self) -> None:
        """After registration: a loaded plugin whose registrations were refused says so in its
        status, not only below the table ("loaded" beside a plugin that serves nothing misled)."""
        if self.status in ("loaded", "refused", "partly refused") and self.errors:
            self.status = "partly refused" if self.models or self.targets else "refused"

    def describe(self) -> dict[str, Any]:
        """Everything `modelhub plugins` prints about this plugin, for its table and its --json alike."""
        return {
            "name": self.name,
            "source": self.source,
            "location": self.location,
            "status": self.status,
            "hooks": list(self.hooks),
            "models": list(self.models),
            "targets": list(self.targets),
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }


#: The hooks a plugin may implement, from the spec module.
HOOK_NAMES: frozenset[str] = frozenset(
    name for name, obj in vars(hookspecs).items() if callable(obj) and hasattr(obj, f"{hookspecs.PROJECT}_spec")
)
#: Each PluginHost imports its directory plugins under its own package in sys.modules.
_HOST_NUMBERS = itertools.count(1)
_NAMESPACE_ROOT = "modelhub_plugins"


def _raised_where(exc: BaseException, ours: Callable[[Path], bool]) -> str:
    """' (raised at FILE line N)': the innermost frame of `exc` whose (resolved) file is `ours`, or ''."""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if ours(Path(frame.filename).resolve()):
            where = f" (raised at {frame.filename} line {frame.lineno})"
    return where


def _raised_at(exc: BaseException, location: str) -> str:
    """' (raised at FILE line N)': the innermost frame of the plugin's own files, or ''."""
    base = Path(location).resolve()  # relative for a relative --plugins-dir (the default); frames are absolute
    root = base.parent if base.name == "__init__.py" else base
    return _raised_where(exc, lambda path: path == base or root in path.parents)


def raised_in(exc: BaseException, files: Iterable[Path]) -> str:
    """' (raised at FILE line N)': the innermost frame of `exc` in one of `files` (a plugin's
    sources), or ''."""
    sources = {str(path) for path in files}
    return _raised_where(exc, lambda path: str(path) in sources)


def _raised_by_run(exc: BaseException, runtime: object) -> bool:
    """Whether `exc` came out of `runtime.run` (the artifact failing on what it was given),
    rather than from the validator's own code around it."""
    run = getattr(type(runtime), "run", None)
    code = getattr(run, "__code__", None)
    return code is not None and any(frame.f_code is code for frame, _ in traceback.walk_tb(exc.__traceback__))


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
    return _package_files(path.parent)


def _package_files(folder: Path) -> tuple[Path, ...]:
    files = [
        p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    ]
    return tuple(sorted(files))


def _installed_files(module_name: str) -> tuple[Path, ...]:
    """The files of an entry point's plugin: every file of the outermost regular package that
    holds its module (`my_package/` for `my_package.plugin`, whose models are most often built
    by a sibling module), or the module's own file when it is a top-level module. Namespace
    packages above it (`google.` in `google.mine.plugin`) are not walked: they span other
    distributions."""
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:depth]))
        origin = getattr(module, "__file__", None) if module is not None else None
        if not origin:  # a namespace package (or not imported): look further in
            continue
        path = Path(origin).resolve()
        return _package_files(path.parent) if path.name == "__init__.py" else (path,)
    return ()


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

    Every hook is called through pluggy, one plugin at a time (`_per_plugin`), so pluggy's
    order (tryfirst, then registration order newest first, then trylast), hookwrappers and
    `MODELHUB_TRACE_HOOKS` tracing apply, and each result or error belongs to one plugin.
    """

    def __init__(
        self,
        plugins_dir: Path | None = None,
        *,
        entry_points: bool = True,
        allow: set[str] | None = None,
        block: set[str] | None = None,
        extra: Mapping[str, object] | None = None,
        report: bool = True,
    ) -> None:
        self.plugins_dir = plugins_dir
        self.report = report
        #: The errors and warnings logged for this load of the plugins, and for the one before
        #: (`_report`): what an unchanged plugin says again is not news.
        self._reported: set[str] = set()
        self._reported_before: set[str] = set()
        self.entry_points = entry_points
        self.allow = allow if allow is not None else _env_list("MODELHUB_PLUGINS")
        self.block = block if block is not None else (_env_list("MODELHUB_DISABLE_PLUGINS") or set())
        self.extra = dict(extra or {})
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        #: This host's package in sys.modules for directory plugins: two hosts loading the same
        #: folder get their own module objects (and a package plugin's relative imports work).
        self.namespace = f"{_NAMESPACE_ROOT}.host{next(_HOST_NUMBERS)}"
        self._loaded = False
        self._tracing = bool(os.environ.get("MODELHUB_TRACE_HOOKS"))
        if self._tracing:
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
        self._warn_unmatched_names()

    def _warn_unmatched_names(self) -> None:
        """An allow or block list naming no plugin (a typo) would otherwise be silent."""
        known = sorted({record.name for record in self.records.values()})
        for variable, names in (("MODELHUB_PLUGINS", self.allow), ("MODELHUB_DISABLE_PLUGINS", self.block)):
            for name in sorted(set(names or ()) - set(known)):
                log.warning(
                    '%s names "%s", but no plugin is called that%s; plugins: %s',
                    variable,
                    name,
                    did_you_mean(name, known),
                    ", ".join(known),
                )

    def refresh(self) -> None:
        """Re-import the plugins directory: changed files take effect, new ones are added and
        removed ones dropped. Built-ins and entry points stay as they were loaded."""
        self.load()
        self._reported_before, self._reported = self._reported, set()
        for name, record in list(self.records.items()):
            if record.source != "directory":
                continue
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            del self.records[name]
            self._forget_modules(f"{self.namespace}.{name}")
        if self.plugins_dir is not None:
            self._load_directory(self.plugins_dir)

    def close(self) -> None:
        """Drop this host's directory plugins from sys.modules (the host is not used again)."""
        self._forget_modules(self.namespace)

    def _forget_modules(self, prefix: str) -> None:
        for module in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
            del sys.modules[module]

    def _load_directory(self, folder: Path) -> None:
        if not folder.is_dir():
            log.warning("plugins directory %s does not exist", folder)
            return
        for path in sorted(folder.iterdir()):
            if path.name.startswith((".", "_")):
                continue
            if path.is_file() and path.suffix == ".py":
                importer = functools.partial(_import_file, path, self.namespace)
                self._add(path.stem, "directory", str(path), importer)
            elif path.is_dir() and (path / "__init__.py").is_file():
                importer = functools.partial(_import_file, path / "__init__.py", self.namespace)
                self._add(path.name, "directory", str(path), importer)

    def _add(self, name: str, source: str, location: str, importer: Callable[[], object]) -> None:
        record = PluginRecord(name=name, source=source, location=location)
        if name in self.records:
            record.status = "failed"
            record.errors.append(
                f'plugin "{name}" ({location}) has the same name as one from {self.records[name].location}, '
                f"so it is not loaded: a plugin's name is its file, folder or entry point name; rename this one"
            )
            self.records[f"{name}@{location}"] = record
            self._report(logging.ERROR, record.errors[-1])
            return
        self.records[name] = record
        if name in self.block or (self.allow is not None and source != "builtin" and name not in self.allow):
            record.status = "disabled"
            return
        try:
            plugin = importer()
        except Exception as exc:
            if isinstance(exc, SyntaxError) and exc.filename:  # its repr is a tuple of positions, and no frame
                why = f"SyntaxError: {exc.msg} (at {exc.filename} line {exc.lineno})"
            else:
                why = f"{exc!r}{_raised_at(exc, location)}"
            self._fail(record, f'Error importing plugin "{name}" from {location}: {why}', exc)
            return
        if not isinstance(plugin, Hashable):  # pluggy's per-plugin hook callers keep plugins in sets
            record.status = "failed"
            record.errors.append(
                f'plugin "{name}" ({location}) is an unhashable {type(plugin).__name__}; register a module or an '
                "ordinary class instance (a dataclass plugin needs eq=False)"
            )
            self._report(logging.ERROR, record.errors[-1])
            return
        unknown = self._unknown_hooks(plugin)
        if unknown:
            record.status = "failed"
            for hook in unknown:
                record.errors.append(
                    f'plugin "{name}" ({location}) implements unknown hook "{hook}"{did_you_mean(hook, HOOK_NAMES)}'
                )
                self._report(logging.ERROR, record.errors[-1])
            return
        mismatched = self._mismatched_signatures(plugin)
        if mismatched:
            record.status = "failed"
            for problem in mismatched:
                record.errors.append(f'plugin "{name}" ({location}) {problem}')
                self._report(logging.ERROR, record.errors[-1])
            return
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            self._fail(record, f'plugin "{name}" ({location}) is invalid: {exc}', exc)
            return
        if source == "entry-point":  # location is the entry point's value, "module[:attr]"
            record.files = _installed_files(location.partition(":")[0].strip())
        elif isinstance(plugin, ModuleType):
            record.files = _source_files(plugin)
        if isinstance(plugin, ModuleType):
            for hook in self._unmarked_hooks(plugin):
                record.warnings.append(
                    f'plugin "{name}" ({getattr(plugin, "__file__", location)}): function "{hook}" is named like '
                    f"a hook but is not marked @hookimpl, so it is never called; add `@hookimpl` "
                    f"(from hub import hookimpl) above it, or rename it"
                )
                self._report(logging.WARNING, record.warnings[-1])
        record.hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
        if not record.hooks and not record.warnings and source != "builtin":
            record.warnings.append(
                f'plugin "{name}" ({location}) implements no hook, so it contributes nothing; mark its hook '
                f"functions `@hookimpl` (from hub import hookimpl), or put a helper module inside a package plugin"
            )
            self._report(logging.WARNING, record.warnings[-1])
        log.debug("loaded plugin %s from %s", name, location)

    def _unknown_hooks(self, plugin: object) -> list[str]:
        """Names marked @hookimpl that are no hook (pluggy's check_pending would say so without a hint)."""
        unknown = []
        for attr in dir(plugin):
            opts = self.pm.parse_hookimpl_opts(plugin, attr)
            if opts is not None and (opts.get("specname") or attr) not in HOOK_NAMES:
                unknown.append(opts.get("specname") or attr)
        return unknown

    def _mismatched_signatures(self, plugin: object) -> list[str]:
        """Implementations asking for parameters their hook does not pass (pluggy's own message
        is three lines and a traceback, and does not say what the hook takes)."""
        problems = []
        for attr in dir(plugin):
            opts = self.pm.parse_hookimpl_opts(plugin, attr)
            if opts is None:
                continue
            hook = opts.get("specname") or attr
            caller = getattr(self.pm.hook, hook, None)
            if caller is None or caller.spec is None:
                continue
            try:
                parameters = inspect.signature(getattr(plugin, attr)).parameters.values()
            except (TypeError, ValueError):
                continue
            positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            wanted = [p.name for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty]
            extra = [n for n in wanted if n not in caller.spec.argnames]
            if extra:
                takes = ", ".join(caller.spec.argnames)
                problems.append(
                    f'implements hook "{hook}" with parameter(s) {", ".join(map(repr, extra))} that the hook does '
                    f"not pass: the hook is {hook}({takes}); take those names, or a subset of them, and nothing else"
                )
        return problems

    def _unmarked_hooks(self, module: ModuleType) -> list[str]:
        """Module-level functions named like a hook but not marked, which pluggy silently ignores."""
        return sorted(
            hook
            for hook in HOOK_NAMES
            if callable(getattr(module, hook, None)) and self.pm.parse_hookimpl_opts(module, hook) is None
        )

    def _fail(self, record: PluginRecord, message: str, exc: BaseException) -> None:
        record.status = "failed"
        record.errors.append(message)
        self._report(logging.ERROR, message, exc)

    # --- calling hooks ----------------------------------------------------------------------

    def _per_plugin(self, hook_name: str) -> Iterator[tuple[PluginRecord, pluggy.HookCaller]]:
        """Each plugin implementing `hook_name`, in the order pluggy calls them, with a hook
        caller that runs that plugin's implementation alone (hookwrappers still wrap it).

        One `pm.hook.X()` call for all plugins would stop at the first exception, hiding every
        later plugin's contribution, and would not say whose implementation raised; pluggy's
        subset callers keep the ordering, tracing and argument handling and give both.
        """
        impls = [i for i in getattr(self.pm.hook, hook_name).get_hookimpls() if not (i.hookwrapper or i.wrapper)]
        for impl in reversed(impls):  # pluggy runs its list from the end: tryfirst first, trylast last
            others = [other.plugin for other in impls if other is not impl]
            if self._tracing:  # pluggy's own trace lines do not say whose implementation runs
                log.info('hook: %s: plugin "%s"', hook_name, impl.plugin_name)
            yield self.records[impl.plugin_name], self.pm.subset_hook_caller(hook_name, others)

    def is_builtin(self, record: PluginRecord) -> bool:
        """One of modelhub's own plugins (BUILTINS), whose hooks are `trylast` defaults."""
        return record.source == "builtin" and BUILTINS.get(record.name) == record.location

    def collect_targets(self) -> dict[str, Target]:
        self.load()
        for record in self.records.values():
            record.targets = []
        targets: dict[str, Target] = {}
        for record, call in self._per_plugin("register_targets"):

            def register(target: Target, record: PluginRecord = record) -> None:
                if not isinstance(target, Target):
                    raise SpecError(f"register_targets: expected a hub.Target, got {target!r}")
                if target.name in targets:
                    if self.is_builtin(record):  # a plugin called before the built-in (trylast) replaces it
                        log.info(
                            'target "%s" of plugin "%s" replaces the built-in one of "%s"',
                            target.name,
                            targets[target.name].plugin,
                            record.name,
                        )
                        return
                    raise SpecError(
                        f"target '{target.name}' is already registered by plugin \"{targets[target.name].plugin}\""
                    )
                targets[target.name] = dataclasses.replace(target, plugin=record.name)
                record.targets.append(target.name)

            self._guarded(record, "register_targets", call, register=register)
        for record in self.records.values():
            record.settle()
        return targets

    def collect_models(self) -> list[ModelSpec]:
        self.load()
        for record in self.records.values():
            record.models = []
        specs: dict[tuple[str, int], ModelSpec] = {}
        for record, call in self._per_plugin("register_models"):

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

            self._guarded(record, "register_models", call, register=register)
        for record in self.records.values():
            record.settle()
        return sorted(specs.values(), key=lambda s: (s.name, s.version))

    def _guarded(self, record: PluginRecord, hook: str, call: pluggy.HookCaller, **kwargs: Any) -> None:
        try:
            returned = call(**kwargs)
        except HubError as exc:
            self._spec_error(record, str(exc))
        except Exception as exc:
            self._fail(record, f'plugin "{record.name}" ({record.location}) raised in {hook}: {exc!r}', exc)
        else:
            if returned:  # pluggy leaves None results out: a registration hook returned something
                what = "ModelSpec" if hook == "register_models" else "Target"
                self._spec_error(
                    record,
                    f"{hook} returned a {type(returned[0]).__name__}, which is ignored: call "
                    f"register(...) once per {what} instead, and return nothing",
                )

    def _spec_error(self, record: PluginRecord, message: str) -> None:
        text = f'plugin "{record.name}" ({record.location}): {message}'
        record.errors.append(text)
        self._report(logging.ERROR, text)

    def _report(self, level: int, message: str, exc: BaseException | None = None) -> None:
        """Log a plugin's error or warning (with the traceback of `exc`, as pytest reports a
        plugin's import error), once: the same message from the same files again, when
        `refresh` re-imports every plugin for a change elsewhere (--watch) or a registration
        hook runs twice, goes to DEBUG. A host that does not `report` (a frontend of
        --workers N, which reads the plugins the model process reports on) logs at DEBUG."""
        again = message in self._reported or message in self._reported_before
        self._reported.add(message)
        if again or not self.report:
            level = logging.DEBUG
        if exc is None:
            log.log(level, "%s", message)
        else:
            log.log(level, "%s\n%s", message, "".join(traceback.format_exception(exc)).rstrip())

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
        """Every validator's figures, in hook order (None results left out).

        A BuildError raised under a validator (the artifact's runtime failing) passes through as
        it is. Raises PluginError, naming the plugin and its file, when a validator raises or returns
        something other than None or a JSON-able dict whose "problems" (if present) is a list of strings:
        a validator that cannot give a verdict must fail the build, not pass the artifact.
        """
        results: list[dict[str, Any]] = []
        for record, call in self._per_plugin("validate_artifact"):
            where = f'plugin "{record.name}" ({record.location})'
            try:
                returned = call(
                    spec=spec,
                    runtime=runtime,
                    examples=examples,
                    reference=reference,
                    tolerance=tolerance,
                    labels=labels,
                )
            except BuildError:
                raise  # the artifact failed under the validator (runtime.run raised): its own message says why
            except Exception as exc:
                if _raised_by_run(exc, runtime):  # the artifact's (the model's) fault, not the validator's
                    message = (
                        f"model '{spec.name}': the artifact raised while {where} checked it: "
                        f"{exception_line(exc)}{raised_in(exc, spec.sources)}"
                    )
                    log.debug("%s", message, exc_info=exc)  # the build's caller logs the message
                    raise BuildError(message) from exc
                log.debug("%s raised in validate_artifact", where, exc_info=exc)
                raise PluginError(f"{where} raised in validate_artifact for model '{spec.key}': {exc!r}") from exc
            for result in returned:
                problem = _malformed_validation(result)
                if problem:
                    raise PluginError(f"{where}: validate_artifact for model '{spec.key}' {problem}")
                results.append(result)
        return results

    def server_started(self, server: Any) -> None:
        self._notify("server_started", server=server)

    def server_stopping(self, server: Any) -> None:
        self._notify("server_stopping", server=server)

    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        for record, call in self._per_plugin(hook_name):
            try:
                call(**kwargs)
            except Exception:
                log.exception('plugin "%s" (%s) raised in %s', record.name, record.location, hook_name)


def _malformed_validation(result: object) -> str:
    """Why a validate_artifact result breaks the hook's contract, or '' when it keeps it."""
    if not isinstance(result, dict):
        return f"returned {type(result).__name__} {result!r:.80}; expected None or a dict"
    if any(not isinstance(key, str) for key in result):
        return f"returned a dict with non-string keys {sorted(map(repr, result))}"
    problems = result.get("problems", [])
    if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
        return f'returned "problems" = {problems!r:.80}; expected a list of strings'
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:  # a numpy scalar or array, most often
        return (
            f"returned figures that manifest.json cannot hold ({exc}); return plain Python numbers, strings, "
            "lists and dicts (float(x), array.tolist())"
        )
    return ""


def _identity(plugin: object) -> object:
    return plugin


def _import_file(path: Path, namespace: str) -> ModuleType:
    """Import a loose plugin file or package as `<namespace>.<name>`, so that it cannot shadow
    real modules, a package plugin's relative imports resolve, and hosts do not share modules."""
    is_package = path.name == "__init__.py"
    stem = path.parent.name if is_package else path.stem
    module_name = f"{namespace}.{stem}"
    parts = namespace.split(".")
    for depth in range(1, len(parts) + 1):
        package = ".".join(parts[:depth])
        if package not in sys.modules:
            holder = ModuleType(package)
            holder.__path__ = []
            sys.modules[package] = holder
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
