"""Model control: load, reload and unload from the plugins directory (the RepositoryModelLoad
and Unload calls of either frontend), and `--watch`'s reconciliation of what changed."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hub.config import DeploymentConfig
from hub.core.models import ModelState, ServedModel
from hub.core.repository import RELOAD_FAILED, ModelRepository
from hub.errors import HubError, ModelNotFound
from hub.plugins.manager import PluginHost
from hub.spec import ModelSpec

log = logging.getLogger("modelhub.control")


class ModelController:
    """Changes what a repository serves, one change at a time, without dropping requests."""

    def __init__(
        self,
        repository: ModelRepository,
        plugins: PluginHost,
        deployment: DeploymentConfig,
        plugins_dir: Path | None,
    ) -> None:
        self.repository = repository
        self.plugins = plugins
        self.deployment = deployment
        self.plugins_dir = plugins_dir
        self._lock = asyncio.Lock()

    async def load_model(self, name: str) -> None:
        """(Re)load a model from the plugins directory as it is now, without dropping requests.

        The plugins are re-imported, so an edited plugin file takes effect; the new build is
        validated while the current one serves, then swapped in, then the old one drains.
        """
        async with self._lock:
            _, specs = await self._rediscover()
            wanted = [s for s in specs if s.name == name]
            if not wanted:
                problems = [e for r in self.plugins.records.values() for e in r.errors]
                hint = f"; plugin errors: {' | '.join(problems)}" if problems else ""
                error = f"no plugin registers a model named '{name[:128]}'{hint}"
                for model in self.repository.versions(name):
                    if model.ready:
                        self.repository.note_failed_reload(model, error)
                raise ModelNotFound(error)
            log.info("loading model '%s' (versions %s)", name, [s.version for s in wanted])
            await self.repository.replace(name, wanted)

    async def unload_model(self, name: str) -> None:
        async with self._lock:
            await self.repository.unload(name)

    async def watch(
        self,
        interval: float,
        started: Callable[[], Awaitable[Any]],
        seen: dict[str, tuple[int, int, int]] | None = None,
    ) -> None:
        """`--watch`: load, reload or unload what changed in the plugins directory.

        Polls file stamps (portable, no extra dependency), off the event loop. Each change goes
        through the same path as RepositoryModelLoad/Unload, so a broken file changes nothing
        else. `seen`: the stamps the served models were read from (taken before the plugins
        were imported), so that what changed while they loaded counts as a change.
        """
        folder = self.plugins_dir
        if folder is None:
            return
        await started()
        if seen is None:
            seen = await asyncio.to_thread(plugin_stamps, folder)
        while True:
            await asyncio.sleep(interval)
            now = await asyncio.to_thread(plugin_stamps, folder)
            if now == seen:
                continue
            changed = {p for p in set(now) | set(seen) if now.get(p) != seen.get(p)}
            seen = now
            log.info("plugins changed: %s", ", ".join(sorted(changed)))
            try:
                await self.apply_plugin_changes()
            except Exception:  # the watcher must survive any one bad change
                log.exception("applying plugin changes failed")

    async def _rediscover(self) -> tuple[dict[str, Any], list[ModelSpec]]:
        """Re-import the plugins directory; the targets and the specs to serve, as it is now."""
        await asyncio.to_thread(self.plugins.refresh)
        targets = await asyncio.to_thread(self.plugins.collect_targets)
        specs = self.deployment.apply(await asyncio.to_thread(self.plugins.collect_models))
        self.repository.builder.targets = targets
        return targets, specs

    async def apply_plugin_changes(self) -> None:
        async with self._lock:
            _, specs = await self._rediscover()
        by_name: dict[str, list[ModelSpec]] = {}
        for spec in specs:
            by_name.setdefault(spec.name, []).append(spec)
        # A plugin that failed to import, or registered a spec that does not validate, is a
        # broken file: its models keep their old build, as a failed RepositoryModelLoad does.
        broken = {r.name: r for r in self.plugins.records.values() if r.broken}
        for name in sorted(set(by_name) | set(self.repository.names())):
            current = self.repository.versions(name)
            if name not in by_name:
                if any(m.spec.plugin in broken for m in current):
                    for model in current:
                        record = broken.get(model.spec.plugin)
                        if model.ready and record is not None:
                            reason = " | ".join(record.errors) or f"plugin '{record.name}' failed to import"
                            if model.reason != f"{RELOAD_FAILED}{reason}":  # news, not a change elsewhere
                                # The plugin host logged the errors themselves.
                                self.repository.note_failed_reload(model, reason, logged=True)
                    continue
                async with self._lock:  # its plugin is gone: so is the model, from every list
                    await self.repository.remove(name)
                continue
            fresh = by_name[name]
            served = await asyncio.to_thread(self._settled, current, fresh)
            if served is not None:
                # Nothing to build. The served builds are what the plugins say (again, after a
                # file broken and put back: told to every frontend of --workers N, which reads
                # the plugins again if it could not match the build before); the rest failed
                # under these very files, and would fail (and log) the same way again.
                for model in served:
                    self.repository.note_up_to_date(model)
                continue
            try:
                async with self._lock:
                    await self.repository.replace(name, fresh)
            except HubError as exc:  # each failure was logged, once, where it happened
                log.debug("watch: model '%s' did not load: %s", name, exc)

    def _settled(self, current: list[ServedModel], fresh: list[ModelSpec]) -> list[ServedModel] | None:
        """None when a version of these specs needs building; else the versions that serve
        their spec's build (same cache key). The others failed under the key they have now: a
        failed model, or a failed reload behind a serving build, whose plugin files (and
        weights, and target) are unchanged, for a change elsewhere in the plugins directory
        must not build it again. An unloaded model is built (--watch loads it). Hashes files:
        run it in a thread."""
        models = {m.version: m for m in current}
        if set(models) != {s.version for s in fresh}:
            return None
        builder = self.repository.builder
        served = []
        for spec in fresh:
            model = models[spec.version]
            try:
                key = builder.attempt_key(spec)
            except Exception:  # a spec whose inputs cannot be read (hashed): its build says why
                log.debug("model '%s': cannot compute its cache key", spec.key, exc_info=True)
                return None
            if model.ready and model.manifest.get("cache_key") == key:
                served.append(model)
                continue
            reload_failed = model.ready and model.reason.startswith(RELOAD_FAILED)
            if (model.state is ModelState.FAILED or reload_failed) and builder.failed_key(spec) == key:
                continue
            return None
        return served


def plugin_stamps(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(mtime, size, crc32 of small files) of every file under the plugins directory, caches
    aside. The checksum catches an edit of the same length within one tick of the file
    system's clock, which mtime and size alone miss. Runs in a thread."""
    if not folder.is_dir():
        return {}
    out = {}
    for path in folder.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts or path.name.startswith("."):
            continue
        stat = path.stat()
        checksum = zlib.crc32(path.read_bytes()) if stat.st_size <= 1 << 20 else 0
        out[str(path.relative_to(folder))] = (stat.st_mtime_ns, stat.st_size, checksum)
    return out
