"""The model process of a multi-process server: one copy of every model, its batcher and its
statistics, fed by every frontend process over a Unix socket (hub/workers/wire.py).

It runs a Server with no frontends of its own (it owns the models, the model control and the
metrics port); `EngineService` answers the frontends:

- `submit`: a request's forward inputs, already checked and preprocessed by the frontend,
  into the model's batcher; the answer carries the request's rows of the outputs and a
  ticket for its batch. It is answered from its batch's future, with no task per request.
- `cancel`: that request's client went away: it leaves the batcher's queue (and is still
  answered, as cancelled, which frees its input block in the frontend's arena).
- `hello`: a frontend connected: the models' states, and the shared-memory hand-off's
  handshake (its arena mapped here, ours offered; `mapped` says it mapped ours).
- `commit`: a frontend answered these requests; count them (and, with the first of a batch,
  the batch) in the statistics and metrics, in one step, as one process would; free the
  output blocks of our arena it has answered with; and release the tickets of answers whose
  caller had gone when they arrived (`drop`: those requests are committed without a ticket).
- `stats`, `load`, `unload`: the statistics snapshot and model control, for any frontend.
- `shm_register`, `shm_unregister`: Triton's system and CUDA shared memory. The registry of
  client regions lives here (every check of hub/shm/regions.py runs here, and a CUDA IPC
  handle is opened here, in the models' CUDA context); each change is sent to every frontend
  as the whole table (`regions`), and the RPC returns once each has acknowledged it, so the
  next request on any frontend sees it. A request's tensors in a client region arrive as
  (region id, name, offset, size) and are read from this process's own mapping (or on the
  device); its outputs are written straight into the client's region here.
- `state` (sent to every frontend): a model changed state (or reason), or the first load
  finished. Each view carries its build's identity: `cache_key`, and `sources`, the hashes of
  the plugin files it was built from, which a frontend compares with the files it read its
  spec from (it never serves a build from another file's spec).
- `prepare` (asked of every frontend): a reload's new build, before it takes the old one's
  place: each frontend reads the plugins until it holds that build's spec, and says whether it
  does; if one cannot (the files changed again meanwhile), the old build serves on everywhere.
- `gauges` (asked of every frontend at each scrape of /metrics): what it holds queued and in
  flight per model at that moment, which the gauges add to this process's own. Read when they
  are asked for, not sent with the commits: those follow answers, and caught the low point.

A restarted model process honours the unloads in effect before it: the names whose every
version was unloaded are kept beside the socket (the supervisor's private directory, gone with
it), and read back before the first load.

Its supervisor stops it after the frontends have exited. When the supervisor dies instead
(SIGKILL, say), the kernel stops every child at once (PR_SET_PDEATHSIG): the frontends drain,
and this process answers what they still hand over until they have all gone, within their
grace; then, the last process of the server, it removes the supervisor's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hub.core.batching import Batcher, Delivery
from hub.core.models import ModelState, ServedModel, batch_signature
from hub.core.stats import BatchRecord
from hub.core.trace import Tracer
from hub.datatypes import datatype_of
from hub.errors import (
    CANCELLED,
    HubError,
    InvalidInput,
    ModelUnavailable,
    Unsupported,
    client_message,
    code_of,
    shorten,
)
from hub.logs import LogSettings
from hub.metrics import ModelMetrics
from hub.server import Server
from hub.shm import CUDA, Holds, SharedMemoryRegistry
from hub.signals import supervisor_gone
from hub.workers.arena import Arena, remove_leftovers
from hub.workers.counter import TRACE_IDS
from hub.workers.wire import Channel, Header, MessageTooLarge, RegionView, pack_arrays, unpack_arrays

log = logging.getLogger("modelhub.engine")

#: Seconds past --shutdown-grace that the model process of a dead supervisor waits for the
#: frontends to go: they exit within their grace, and their teardown takes under a second.
FRONTEND_EXIT = 2.0

#: How long a register or unregister waits for every frontend to apply the region table.
PUBLISH_TIMEOUT = 10.0
#: How long a scrape of /metrics waits for each frontend's gauges; one that has not answered
#: by then counts with what it said at the last scrape (until it answers, or goes away).
GAUGES_TIMEOUT = 1.0


def model_view(model: ServedModel) -> dict[str, Any]:
    """What a frontend mirrors of a model: its state and its build report."""
    return {
        "name": model.name,
        "version": model.version,
        "state": model.state.value,
        "reason": model.reason,
        "manifest": model.manifest,
        "device": model.device,
        "cache_key": model.manifest.get("cache_key", ""),
        "sources": model.manifest.get("key_parts", {}).get("sources"),
    }


class _Connection:
    """One frontend: its channel, the batches its answered-but-uncounted requests ran in, and
    the arenas of the shared-memory hand-off (hub/workers/arena.py): the frontend's, which
    its inputs come in, and this process's for its outputs."""

    def __init__(self, service: EngineService) -> None:
        self.service = service
        self.channel = Channel(self._received, self._lost)
        self.tickets: dict[int, tuple[ServedModel, BatchRecord]] = {}
        #: Requests in a batcher, by the frontend's ticket: cancelled when it asks or goes away.
        self.running: dict[int, tuple[Batcher, asyncio.Future[Delivery]]] = {}
        #: The models this frontend last reported requests queued or in flight for.
        self.reported: set[ModelMetrics] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.asks: dict[int, asyncio.Future[str | None]] = {}  # tables sent, not yet acknowledged
        self.inputs: Arena | None = None  # the frontend's arena, mapped here
        self.outputs: Arena | None = None  # ours, in use once the frontend said it mapped it
        self._offered: Arena | None = None  # ours, offered in the hello answer
        self.pid = 0  # the frontend's, from its hello (its CPU and memory in /metrics)

    def _received(self, header: Header, frames: list[memoryview]) -> None:
        kind = header["k"]
        if kind == "commit":
            if self.outputs is not None:  # output blocks the frontend has answered with
                for offset in header.get("free", ()):
                    self.outputs.free(offset)
            for ticket in header.get("drop", ()):  # answers whose caller had gone: nothing to count
                self.tickets.pop(ticket, None)
            self.service.commit(self, header["items"])
            return
        if kind == "mapped":
            self._mapped(bool(header.get("ok")))
            return
        if kind == "ack":
            if "gauges" in header:  # the answer to `gauges`
                self.service.gauges(self, header["gauges"])
            asked = self.asks.pop(header.get("a", 0), None)
            if asked is not None and not asked.done():
                asked.set_result(header.get("error"))
            return
        if kind == "submit":  # the hot path: no task per request (EngineService.submit)
            self.service.submit(self, header, frames)
            return
        if kind == "cancel":
            self.service.cancel(self, header.get("c", 0))
            return
        task = asyncio.get_running_loop().create_task(self.service.handle(self, header))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def hello(self, header: Header) -> Header:
        """The hand-off's handshake: map the frontend's arena, offer ours (hub/workers/arena.py)."""
        answer: Header = {"mapped": False}
        pid = header.get("pid")
        self.pid = pid if isinstance(pid, int) else 0
        if header.get("handoff") != "shm":
            return answer
        offer = header.get("arena")
        if offer:
            try:
                self.inputs = Arena.attach(offer.get("name"), offer.get("size"))
                answer["mapped"] = True
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("engine: cannot map a frontend's hand-off arena (%s); its inputs come over the socket", exc)
        if self.service.handoff == "shm":
            self._offered = Arena.create(self.service.arena_size)
            if self._offered is not None:
                answer["offer"] = self._offered.describe()
        return answer

    def _mapped(self, ok: bool) -> None:
        offered, self._offered = self._offered, None
        if offered is None:
            return
        offered.unlink()  # both sides have it mapped (or the frontend could not): the name goes
        if ok:
            self.outputs = offered

    def _lost(self, exc: BaseException | None) -> None:
        self.service.connections.discard(self)
        for asked in self.asks.values():  # a frontend that is gone needs no table
            if not asked.done():
                asked.set_result(None)
        self.asks.clear()
        # The frontend is gone: its arena's mapping goes when the last view of it does (a batch
        # still computing on its inputs keeps it), and nothing will read our output blocks.
        self.inputs = self.outputs = None
        if self._offered is not None:
            self._offered.unlink()
            self._offered = None
        for task in list(self.tasks):
            task.cancel()
        withdrawn: dict[Batcher, list[asyncio.Future[Delivery]]] = {}
        for batcher, future in self.running.values():
            withdrawn.setdefault(batcher, []).append(future)
        self.running.clear()
        for batcher, futures in withdrawn.items():  # one pass over each queue, however many
            batcher.withdraw(*futures)
        if self.tickets:  # answers it had received and not yet committed (it died, say)
            held = len(self.tickets)
            log.info("engine: a frontend (pid %d) went away with %d answered requests not counted", self.pid, held)
        self.tickets.clear()  # that frontend's requests went with it
        for metrics in self.reported:  # and so did what it had queued and in flight
            metrics.gauges_from(self, 0, 0)
        self.reported.clear()

    def send(self, header: Header, frames: list[Any] | None = None) -> str | None:
        """Send a message: None, or why it could not go (too large for the wire: then an answer
        to one of the frontend's calls fails that call instead, and the connection stays)."""
        try:
            self.channel.send(header, frames or ())
        except ConnectionError:
            pass  # the frontend went away; its requests went with it
        except MessageTooLarge as exc:
            log.error("engine: a %r message to a frontend was refused: %s", shorten(str(header.get("k")), 32), exc)
            if header.get("t") and header.get("k") != "error":
                if header.get("o", -1) >= 0 and self.outputs is not None:
                    self.outputs.free(header["o"])  # the outputs it carried will never be read
                self.tickets.pop(header.get("b", 0), None)
                self.send({"k": "error", "t": header["t"], "code": exc.code, "message": client_message(exc)})
            return client_message(exc)
        return None

    def ask(self, header: Header, number: int) -> asyncio.Future[str | None]:
        """Send a message the frontend acknowledges (`ack`, with an error or None)."""
        header["a"] = number
        asked: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.asks[number] = asked
        failure = self.send(header)
        if failure is not None or self.channel.transport is None or self.channel.transport.is_closing():
            self.asks.pop(number, None)
            asked.set_result(failure)
        return asked


class EngineService:
    def __init__(self, server: Server, socket_path: Path) -> None:
        self.server = server
        self.socket_path = socket_path
        #: How tensors cross (socket or shm) and the size of each of our output arenas.
        self.handoff = server.config.handoff
        self.arena_size = server.config.handoff_arena
        self.connections: set[_Connection] = set()
        self._tickets = itertools.count(1)
        self._region_ids = itertools.count(1)
        self._asks = itertools.count(1)
        self._listener: asyncio.AbstractServer | None = None
        self._announcing: asyncio.Task[None] | None = None
        self._logs = LogSettings()  # this process's; it sends them to every frontend
        server.metrics.watch_frontends(lambda: [c.pid for c in list(self.connections) if c.pid])
        #: The models unloaded now, as last written to `_unloaded_path` (see `_remember_unloaded`).
        self._unloaded: list[str] = []

    @property
    def _unloaded_path(self) -> Path:
        return self.socket_path.with_suffix(".unloaded.json")

    async def start(self) -> None:
        repository = self.server.repository
        assert repository is not None
        await self._honour_unloads()
        repository.on_change(self._changed)
        repository.on_change(self._remember_unloaded)
        repository.before_swap = self._prepare
        if self.socket_path.exists():
            self.socket_path.unlink()
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_unix_server(self._connect, str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self._announcing = loop.create_task(self._announce_loaded())

    def _connect(self) -> Channel:
        connection = _Connection(self)
        self.connections.add(connection)
        return connection.channel

    async def _announce_loaded(self) -> None:
        await self.server.wait_until_loaded()
        self.broadcast()

    def snapshot(self) -> Header:
        assert self.server.repository is not None
        return {
            "k": "state",
            "loaded": self.server.is_ready() or self.server._loaded.is_set(),
            "models": [model_view(m) for m in self.server.repository.models()],
        }

    def broadcast(self) -> None:
        header = self.snapshot()
        for connection in list(self.connections):
            connection.send(header)

    def _changed(self, model: ServedModel) -> None:
        self.broadcast()

    async def _honour_unloads(self) -> None:
        """A model process restarted by the supervisor keeps unloaded what was unloaded before
        it died (a load RPC brings a model back, as ever); its models have not started to load.
        The file is absent at the server's first start: the supervisor's directory is new."""
        repository = self.server.repository
        assert repository is not None
        try:
            names = json.loads(self._unloaded_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("engine: cannot read the models unloaded before the restart (%s); loading every model", exc)
            return
        for name in names if isinstance(names, list) else []:
            if isinstance(name, str) and name in repository.names():
                log.info("model '%s' stays unloaded: it was unloaded before the model process restarted", name)
                await repository.unload(name)
        self._unloaded = sorted(n for n in names if isinstance(n, str) and n in repository.names())

    def _remember_unloaded(self, model: ServedModel) -> None:
        """Keep the names of the models unloaded now (every version unloaded by an unload, not
        by a shutdown) where a restarted model process finds them, so that it honours them.
        Written only when they change: an unload, a load, --watch loading an unloaded model."""
        repository = self.server.repository
        if repository is None or self.server._stopping:
            return
        unloaded = sorted(
            name
            for name in repository.names()
            # "unloaded" is an unload's reason; a shutdown leaves none, a replaced build "replaced"
            if all(m.state is ModelState.UNLOADED and m.reason == "unloaded" for m in repository.versions(name))
        )
        if unloaded == self._unloaded:
            return
        self._unloaded = unloaded
        staging = self._unloaded_path.with_name(self._unloaded_path.name + ".tmp")
        try:  # atomically: a model process killed while writing leaves the previous list
            staging.write_text(json.dumps(unloaded))
            staging.replace(self._unloaded_path)
        except OSError as exc:
            log.error("engine: cannot keep the unloaded models for a restart (%s)", exc)
            with contextlib.suppress(OSError):
                staging.unlink()

    async def _prepare(self, new: ServedModel) -> str | None:
        """Before a reload's new build takes the old one's place, every frontend reads the
        plugins until it holds the spec the build came from (its plugin files' hashes). So no
        frontend, once the swap is announced, answers from the old build's spec and copy, nor
        lacks the new one's because the files changed again meanwhile: then the swap does not
        happen, and the old build serves on everywhere, as one process does (ModelRepository.
        _superseded). None, or why not."""
        sources = new.manifest.get("key_parts", {}).get("sources")
        if not isinstance(sources, dict):
            return None
        ask = {"k": "prepare", "name": new.name, "version": new.version, "sources": sources}
        failure = await self._publish(ask, f"spec of the new build of model '{new.spec.key}'")
        return None if failure is None else f"a frontend process could not read the new build's spec: {failure}"

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        supervisor = self.server.config.supervisor
        orphaned = supervisor_gone(supervisor)
        if orphaned and self.connections:
            # The kernel stopped the frontends with us: they are draining into this process.
            # (Stopped by a live supervisor, none is left: it stops this process after them.)
            timeout = self.server.config.shutdown_grace + FRONTEND_EXIT
            log.info("answering %d draining frontends until they exit (at most %.1fs)", len(self.connections), timeout)
            deadline = time.monotonic() + timeout
            while self.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        for connection in list(self.connections):
            if connection.channel.transport is not None:
                connection.channel.transport.close()
        if orphaned and supervisor is not None:
            self._remove_supervisor_leftovers(supervisor)

    def _remove_supervisor_leftovers(self, supervisor: int) -> None:
        """Remove what the dead supervisor would have on exit: its private directory (this
        socket, the port files, the unloaded models) and the hand-off arenas its children left."""
        folder = self.socket_path.parent
        if not folder.name.startswith("modelhub-"):  # (only ever the supervisor's mkdtemp)
            return
        for entry in folder.iterdir():
            if entry.name == self.socket_path.name or entry.name.endswith((".json", ".json.tmp", TRACE_IDS)):
                with contextlib.suppress(OSError):
                    entry.unlink()
        try:
            folder.rmdir()
        except OSError as exc:
            log.warning("could not remove the supervisor's directory %s: %s", folder, exc)
        else:
            log.info("removed the supervisor's directory %s", folder)
        remove_leftovers(supervisor)

    # --- requests ---------------------------------------------------------------------------

    async def handle(self, connection: _Connection, header: Header) -> None:
        """The messages other than a request: the hello, statistics, model control, regions."""
        kind, ticket = header["k"], header.get("t", 0)
        reply: Header
        try:
            if kind == "hello":
                reply = self.snapshot()
                reply["arena"] = connection.hello(header)
                reply["regions"] = self._region_table()
                if self._logs.available():  # a frontend (re)started takes the settings as they are now
                    reply["logging"] = self._logs.current()
                reply["trace"] = self._tracer().state()
            elif kind == "stats":
                reply = self._stats(header)
            elif kind == "load":
                await self.server.plane.load(header["name"], header.get("parameters") or {})  # type: ignore[union-attr]
                await self._publish_models()
                reply = {}
            elif kind == "unload":
                await self.server.plane.unload(header["name"])  # type: ignore[union-attr]
                await self._publish_models()
                reply = {}
            elif kind == "shm_register":
                await self._register_region(header)
                reply = {}
            elif kind == "logging":
                logs = self._logs.apply(header.get("settings") or {})
                reply = await self._settings_changed({"k": "logging", "settings": logs}, "log settings", logs)
            elif kind == "trace_claim":
                reply = {"ok": self._tracer().claim(header.get("model", ""))}
            elif kind == "trace_get":
                reply = {"settings": self._tracer().settings(header.get("model", ""))}
            elif kind == "trace":
                tracer = self._tracer()
                traces = tracer.update(header.get("model", ""), header.get("settings") or {})
                reply = await self._settings_changed({"k": "trace", "state": tracer.state()}, "trace settings", traces)
            elif kind == "shm_unregister":
                self._registry().unregister(header["kind"], header.get("name", ""))
                await self._publish_regions()
                reply = {}
            else:
                raise HubError(f"unknown message kind {kind!r}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._refuse(connection, ticket, kind, exc)
            return
        reply.setdefault("k", "reply")
        reply["t"] = ticket
        connection.send(reply)

    async def _settings_changed(self, header: Header, what: str, settings: Any) -> Header:
        """Send changed settings to every frontend and wait until each has them; the reply."""
        failure = await self._publish(header, what)
        if failure is not None:
            log.error("engine: a frontend could not apply the %s: %s", what, failure)
        return {"settings": settings}

    def _tracer(self) -> Tracer:
        """The trace settings every frontend samples by (this process serves no requests itself)."""
        assert self.server.plane is not None
        return self.server.plane.tracer

    @staticmethod
    def _refuse(connection: _Connection, ticket: int, kind: str, exc: BaseException) -> None:
        if not isinstance(exc, HubError):
            log.exception("engine: %s failed", kind, exc_info=exc)
        connection.send({"k": "error", "t": ticket, "code": code_of(exc), "message": client_message(exc)})

    def submit(self, connection: _Connection, header: Header, frames: list[memoryview]) -> None:
        """A request's inputs into its model's batcher; the answer goes from the batch's
        future's callback. No task or coroutine per request: this process's per-request work
        bounds `--workers N` on a GPU (docs/workers.md)."""
        assert self.server.repository is not None
        ticket = header.get("t", 0)
        holds = Holds(self.server.shared_memory)  # client regions it names stay mapped while it runs
        try:
            model = self.server.repository.get_ready(header["m"], str(header["v"]))
            batcher = model.batcher
            if batcher is None:
                raise ModelUnavailable(f"model '{model.name}' version {model.version} is {model.state.value}")
            inputs: Mapping[str, np.ndarray] = unpack_arrays(
                header["inputs"], frames, connection.inputs, self._region_reader(holds)
            )
            if header.get("device"):  # some lie in CUDA shared memory: to the host, if the runtime asks
                inputs = model.placement(inputs)[0]
            future = batcher.enqueue(
                inputs,
                rows=header["rows"],
                signature=batch_signature(model.spec, inputs),
                timeout=header.get("timeout"),
                request_id=header.get("id", ""),
            )
        except Exception as exc:
            holds.release()
            self._refuse(connection, ticket, "submit", exc)
            return
        if future.done():  # it ran inline
            self._answer(connection, ticket, header, model, holds, future)
            return
        connection.running[ticket] = (batcher, future)
        future.add_done_callback(lambda done: self._answer(connection, ticket, header, model, holds, done))

    def cancel(self, connection: _Connection, ticket: int) -> None:
        """The frontend's client went away: take its request out of the queue. It is still
        answered (as cancelled), which frees its input block in the frontend's arena."""
        running = connection.running.get(ticket)
        if running is not None:
            running[0].withdraw(running[1])

    def _answer(
        self,
        connection: _Connection,
        ticket: int,
        header: Header,
        model: ServedModel,
        holds: Holds,
        future: asyncio.Future[Delivery],
    ) -> None:
        connection.running.pop(ticket, None)
        try:
            if future.cancelled():
                connection.send({"k": "error", "t": ticket, "code": CANCELLED, "message": "cancelled"})
                return
            delivery = future.result()
            outputs = list(delivery.outputs.items())
            written = self._write_targets(holds, header["targets"], outputs) if header.get("targets") else {}
            described, out, block = pack_arrays([o for o in outputs if o[0] not in written], connection.outputs)
            described += [written[name] for name, _ in outputs if name in written]
            number = next(self._tickets)  # its batch, counted when the frontend commits the request
            connection.tickets[number] = (model, delivery.batch)
        except Exception as exc:
            self._refuse(connection, ticket, "submit", exc)
            return
        finally:
            holds.release()
        reply = {
            "k": "reply",
            "t": ticket,
            "outputs": described,
            "inferences": delivery.inferences,
            "queue_ns": delivery.queue_ns,
            "b": number,
            "o": block,
        }
        connection.send(reply, out)

    # --- client shared memory (Triton's extension) with several frontends ---------------------

    def _registry(self) -> SharedMemoryRegistry:
        registry = self.server.shared_memory
        if registry is None:
            raise Unsupported("shared memory is off in the model process")
        return registry

    def _region_table(self) -> list[list[Any]]:
        """[id, kind, status] of every region, as each frontend mirrors it."""
        registry = self.server.shared_memory
        if registry is None:
            return []
        return [[r.id, r.kind, r.status()] for r in registry.regions()]

    async def _register_region(self, header: Header) -> None:
        """Register a region here, with every check of hub/shm/regions.py (a CUDA one is opened
        in this process's CUDA context, the models'), then have every frontend mirror it
        before the register RPC returns."""
        registry = self._registry()
        kind, name = header["kind"], header["name"]
        region = registry.add(kind, name, header["arguments"])
        region.id = next(self._region_ids)
        failure = await self._publish_regions()
        if failure is not None:
            if region in registry.regions():  # (not unregistered meanwhile)
                registry.unregister(kind, name)
                await self._publish_regions()
            raise InvalidInput(f"shared memory region could not be mapped by every frontend process: {failure}")

    async def _publish_regions(self) -> str | None:
        """Send the region table to every frontend and wait until each has applied it (or is
        gone): the first frontend's error, or None."""
        return await self._publish({"k": "regions", "regions": self._region_table()}, "shared-memory region table")

    async def _publish_models(self) -> None:
        """Send the table of models to every frontend and wait until each has applied it, so
        that a load or unload has taken effect in every frontend when it returns: none still
        answers from a replaced build's copy, or NOT_FOUND for a model just loaded."""
        await self._publish(self.snapshot(), "table of models")

    async def _publish(self, header: Header, what: str) -> str | None:
        asked = [c.ask(dict(header), next(self._asks)) for c in list(self.connections)]
        if not asked:
            return None
        try:
            answers = await asyncio.wait_for(asyncio.gather(*asked), PUBLISH_TIMEOUT)
        except TimeoutError:
            log.error("engine: a frontend did not apply the %s within %ss", what, PUBLISH_TIMEOUT)
            return None
        return next((a for a in answers if a), None)

    def _region_reader(self, holds: Holds) -> RegionView:
        limits = self.server.config.limits

        def read(name: str, datatype: str, shape: list[int], offset: int, nbytes: int, number: int, region: str) -> Any:
            self._registration(region, number, f"input '{shorten(name)}'")
            return holds.read(name, datatype, shape, region, offset, nbytes, limits)

        return read

    def _registration(self, region: str, number: int, what: str) -> None:
        """Refuse a request that names a registration other than the one here (it was
        unregistered, and perhaps registered again, while the request was in flight)."""
        found = self._registry().find(region, what)
        if found.id != number:
            raise InvalidInput(
                f"{what}: shared memory region '{shorten(region, 64)}' was unregistered while the request was in flight"
            )

    def _write_targets(
        self, holds: Holds, targets: list[list[Any]], outputs: list[tuple[str, Any]]
    ) -> dict[str, list[Any]]:
        """Write outputs straight into the client regions the request gave them (the frontend
        then describes them without a copy); BYTES outputs into system shared memory are left
        to the frontend. The descriptions of those written, by name."""
        arrays = dict(outputs)
        written: dict[str, list[Any]] = {}
        for name, number, region, offset, byte_size in targets:
            array = arrays.get(name)
            if array is None or not isinstance(array, np.ndarray):
                continue
            what = f"output '{shorten(name)}'"
            self._registration(region, number, what)
            target = holds.output(name, region, offset, byte_size)
            if array.dtype == np.object_ and target.region.kind != CUDA:
                continue
            target.write(name, array)
            written[name] = [name, datatype_of(array), list(array.shape), offset, array.nbytes, number, region]
        return written

    def commit(self, connection: _Connection, items: list[list[Any]]) -> None:
        """Count answered requests: [name, version, code, ns, inferences, queue_ns, batch ticket
        (0 when it did not run here), and for a request the frontend's own copy computed, its
        batch: [rows, input_ns, infer_ns, output_ns, whether it is the first of its batch
        counted] (else None)]. A frontend reports its requests in flight itself (`gauges`), so
        each is counted in flight here only for the moment it is answered."""
        assert self.server.repository is not None
        for name, version, code, ns, inferences, queue_ns, ticket, here in items:
            entry = connection.tickets.pop(ticket, None) if ticket else None
            if entry is not None:
                model, batch = entry
            else:
                try:
                    model, batch = self.server.repository.resolve(name, str(version)), None
                except HubError:
                    continue  # unloaded meanwhile
                if here is not None:
                    rows, input_ns, infer_ns, output_ns, first = here
                    batch = BatchRecord(rows, input_ns, infer_ns, output_ns, counted=not first)
                    if code == "OK":
                        model.metrics.executed_elsewhere(
                            rows, queue_ns / 1e9, (input_ns + infer_ns + output_ns) / 1e9, first
                        )
            model.begin_request()
            delivery = Delivery({}, inferences, queue_ns, batch) if batch is not None else None
            model.end_request(code, ns / 1e9, delivery)

    async def refresh_gauges(self) -> None:
        """Before /metrics is rendered: ask every frontend what it holds queued and in flight
        now (`gauges`), so that the gauges are the server's at the scrape."""
        asked = [c.ask({"k": "gauges"}, next(self._asks)) for c in list(self.connections)]
        if asked:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*asked), GAUGES_TIMEOUT)

    def gauges(self, connection: _Connection, reports: list[list[Any]]) -> None:
        """A frontend's queue depth and requests in flight now, for every model it has any of:
        [name, version, queued, in flight]; none for the others."""
        assert self.server.repository is not None
        for reported in connection.reported:
            reported.gauges_from(connection, 0, 0)
        connection.reported.clear()
        for name, version, queued, handling in reports:
            try:
                metrics = self.server.repository.resolve(name, str(version)).metrics
            except HubError:
                continue
            if isinstance(metrics, ModelMetrics):
                metrics.gauges_from(connection, queued, handling)
                connection.reported.add(metrics)

    def _stats(self, header: Header) -> Header:
        assert self.server.repository is not None
        out = []
        for name, version in header["models"]:
            try:
                model = self.server.repository.resolve(name, str(version))
            except HubError:
                continue
            out.append([name, version, dataclasses.asdict(model.stats)])
        return {"stats": out}
