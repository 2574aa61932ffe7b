"""A frontend process of a multi-process server: it speaks gRPC and REST and does the
protocol work (parse, validate, preprocess, encode) for its share of the connections, and
hands each request's forward inputs to the one model process (hub/workers/engine.py).

Its repository mirrors the model process's: each model's spec comes from this process's
own import of the plugins (so checks and preprocess run here), its state and build report
from the model process, which says whenever they change.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from hub.core.batching import Delivery
from hub.core.models import ModelState, ServedModel
from hub.core.repository import ModelRepository
from hub.core.stats import BatchRecord, BatchStats, Duration, ModelStats
from hub.errors import HubError, ModelUnavailable, error_for_code
from hub.metrics import NullMetrics
from hub.spec import ModelSpec, Target
from hub.workers.wire import Channel, Header, pack_arrays, unpack_arrays

log = logging.getLogger("modelhub.frontend")


@dataclass(eq=False)
class RemoteBatch(BatchRecord):
    """The model process's ticket for the batch a request ran in."""

    ticket: int = 0


class EngineClient:
    """This frontend's connection to the model process, reconnecting when it restarts."""

    def __init__(self, socket_path: Path, on_state: Callable[[Header], None]) -> None:
        self.socket_path = socket_path
        self._on_state = on_state
        self._channel: Channel | None = None
        self._pending: dict[int, asyncio.Future[tuple[Header, list[memoryview]]]] = {}
        self._ids = itertools.count(1)
        self._commits: list[list[Any]] = []
        self._flush_scheduled = False
        self.connected = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_connected())

    async def close(self) -> None:
        self._closing = True
        self._flush()
        if self._task is not None:
            self._task.cancel()
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.close()

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        while not self._closing:
            try:
                _, channel = await loop.create_unix_connection(
                    lambda: Channel(self._received, self._lost), str(self.socket_path)
                )
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            self._channel = channel
            self.connected.set()
            log.info("connected to the model process at %s", self.socket_path)
            try:
                header, _ = await self.request({"k": "hello"})
                self._on_state(header)
            except HubError:
                pass
            await channel.closed

    def _lost(self, exc: BaseException | None) -> None:
        self.connected.clear()
        self._channel = None
        failure = ModelUnavailable("the model process exited; it is being restarted, try again shortly")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(failure)
        self._pending.clear()
        self._commits.clear()
        if not self._closing:
            log.error("lost the model process (%s); reconnecting", exc or "closed")
            self._on_state({"k": "state", "lost": True, "models": []})

    def _received(self, header: Header, frames: list[memoryview]) -> None:
        kind = header.get("k")
        if kind == "state" and not header.get("t"):
            self._on_state(header)
            return
        future = self._pending.pop(header.get("t", 0), None)
        if future is None or future.done():
            return
        if kind == "error":
            future.set_exception(error_for_code(header["code"], header["message"]))
        else:
            future.set_result((header, frames))

    async def request(self, header: Header, frames: Sequence[Any] = ()) -> tuple[Header, list[memoryview]]:
        channel = self._channel
        if channel is None:
            raise ModelUnavailable("the model process is not available; it is being restarted, try again shortly")
        ticket = next(self._ids)
        header["t"] = ticket
        future: asyncio.Future[tuple[Header, list[memoryview]]] = asyncio.get_running_loop().create_future()
        self._pending[ticket] = future
        try:
            channel.send(header, frames)
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(ticket, None) is not None and self._channel is channel:
                try:
                    channel.send({"k": "cancel", "c": ticket})
                except ConnectionError:
                    pass
            raise
        except ConnectionError:
            self._pending.pop(ticket, None)
            raise ModelUnavailable("the model process is not available; try again shortly") from None

    def commit(self, item: list[Any]) -> None:
        """Queue one answered request's accounting; sent once per event-loop turn."""
        self._commits.append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._commits or self._channel is None:
            return
        items, self._commits = self._commits, []
        try:
            self._channel.send({"k": "commit", "items": items})
        except ConnectionError:
            pass


class RemoteBatcher:
    """The model process's batcher for one model version, as the frontend's ServedModel sees it."""

    def __init__(self, client: EngineClient, name: str, version: int) -> None:
        self._client = client
        self._name = name
        self._version = version

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        rows: int = 1,
        signature: tuple[object, ...] = (),
        timeout: float | None = None,
        request_id: str = "",
    ) -> Delivery:
        described, frames = pack_arrays(list(inputs.items()))
        header = {"k": "submit", "m": self._name, "v": self._version, "rows": rows, "inputs": described}
        if timeout is not None:
            header["timeout"] = timeout
        if request_id:
            header["id"] = request_id
        reply, out = await self._client.request(header, frames)
        outputs = unpack_arrays(reply["outputs"], out)
        return Delivery(outputs, reply["inferences"], reply["queue_ns"], RemoteBatch(0, 0, 0, 0, ticket=reply["b"]))

    async def close(self, drain: bool = True) -> None:
        return None


class RemoteModel(ServedModel):
    """A mirror of a model served by the model process. Requests are checked and
    preprocessed here; their accounting is sent to the model process, which keeps the
    statistics and metrics of the whole server."""

    client: EngineClient | None = None

    def begin_request(self) -> None:
        return None  # the model process counts in-flight requests

    def abandon_request(self) -> None:
        return None

    def end_request(self, code: str, seconds: float, delivery: Delivery | None) -> None:
        assert self.client is not None
        batch = delivery.batch if delivery is not None else None
        ticket = batch.ticket if isinstance(batch, RemoteBatch) else 0
        inferences = delivery.inferences if delivery is not None else 0
        queue_ns = delivery.queue_ns if delivery is not None else 0
        self.client.commit([self.name, self.version, code, int(seconds * 1e9), inferences, queue_ns, ticket])


class RemoteRepository(ModelRepository):
    """The frontend's view of the model process's repository."""

    def __init__(
        self,
        socket_path: Path,
        specs: Callable[[], tuple[dict[str, Target], list[ModelSpec]]],
    ) -> None:
        super().__init__(cast(Any, None), NullMetrics())  # the model process keeps the metrics
        self._collect = specs
        self._targets, self._specs = specs()
        self.client = EngineClient(socket_path, self._state)
        self.loaded = asyncio.Event()

    def start(self) -> None:
        self.client.start()

    def _spec(self, name: str, version: int) -> ModelSpec | None:
        for spec in self._specs:
            if spec.name == name and spec.version == version:
                return spec
        return None

    def _state(self, header: Header) -> None:
        """Apply the model process's view: new models, changed states, removed ones."""
        if header.get("lost"):
            for model in self.models():
                if model.state is not ModelState.UNLOADED:
                    self._set_state(model, ModelState.LOADING, "the model process is restarting")
            self.loaded.clear()
            return
        seen = set()
        for view in header["models"]:
            name, version = view["name"], int(view["version"])
            seen.add((name, version))
            current = self._models.get(name, {}).get(version)
            served_key = current.manifest.get("cache_key") if current is not None else None
            rebuilt = bool(served_key and view["cache_key"] and served_key != view["cache_key"])
            if current is None or rebuilt:
                spec = None if rebuilt else self._spec(name, version)
                if spec is None:  # a reload, or a model new to us: take the plugins as they are now
                    self._targets, self._specs = self._collect()
                    spec = self._spec(name, version)
                if spec is None:
                    log.error("the model process serves %s/%d, which this frontend's plugins lack", name, version)
                    continue
                model = RemoteModel(spec=spec, stats=current.stats if current is not None else ModelStats())
                model.client = self.client
                model.batcher = cast(Any, RemoteBatcher(self.client, name, version))
                model.target = self._targets.get(spec.target)
                self._models.setdefault(name, {})[version] = model
            else:
                model = current
            model.manifest = view["manifest"]
            model.device = view["device"]
            state = ModelState(view["state"])
            if state is not model.state or view["reason"] != model.reason:
                self._set_state(model, state, view["reason"])
        for model in self.models():
            if (model.name, model.version) not in seen:
                del self._models[model.name][model.version]
                if not self._models[model.name]:
                    del self._models[model.name]
                self._set_state(model, ModelState.UNLOADED, "unloaded")
        if header.get("loaded"):
            self.loaded.set()

    async def refresh_statistics(self, models: list[ServedModel]) -> None:
        if not models:
            return
        reply, _ = await self.client.request({"k": "stats", "models": [[m.name, m.version] for m in models]})
        fresh = {(name, int(version)): stats for name, version, stats in reply["stats"]}
        for model in models:
            data = fresh.get((model.name, model.version))
            if data is not None:
                model.stats = _stats(data)

    async def close(self, drain: bool = True) -> None:
        await self.client.close()


def _stats(data: dict[str, Any]) -> ModelStats:
    durations = {k: Duration(**v) for k, v in data.items() if isinstance(v, dict) and set(v) == {"count", "ns"}}
    batches = {int(size): BatchStats(**{k: Duration(**v) for k, v in b.items()}) for size, b in data["batches"].items()}
    return ModelStats(
        inference_count=data["inference_count"],
        execution_count=data["execution_count"],
        last_inference_ms=data["last_inference_ms"],
        batches=batches,
        **durations,
    )


class RemoteControl:
    """Model control, done by the model process (which tells every frontend what changed)."""

    def __init__(self, client: EngineClient) -> None:
        self._client = client

    async def load_model(self, name: str) -> None:
        await self._client.request({"k": "load", "name": name})

    async def unload_model(self, name: str) -> None:
        await self._client.request({"k": "unload", "name": name})
