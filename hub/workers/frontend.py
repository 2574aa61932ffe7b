"""A frontend process of a multi-process server: it speaks gRPC and REST and does the
protocol work (parse, validate, preprocess, encode) for its share of the connections, and
hands each request's forward inputs to the one model process (hub/workers/engine.py).

Its repository mirrors the model process's: each model's spec comes from this process's
own import of the plugins (so checks and preprocess run here), its state and build report
from the model process, which says whenever they change. A spec serves a build only if it
was read from the plugin files the build came from (their hashes travel with the build).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from hub.core.batching import Delivery
from hub.core.models import ModelState, ServedModel, all_numpy
from hub.core.repository import ModelRepository
from hub.core.stats import BatchRecord, BatchStats, Duration, ModelStats
from hub.core.trace import Tracer
from hub.core.trace import check as check_trace_settings
from hub.datatypes import NUMPY_DTYPES
from hub.errors import (
    HubError,
    InvalidInput,
    ModelExecutionError,
    ModelUnavailable,
    client_message,
    error_for_code,
    shorten,
)
from hub.limits import Limits
from hub.logs import LogSettings, check_log_settings
from hub.metrics import NullMetrics
from hub.pipeline.builder import Builder, sources_fingerprint
from hub.shm import CUDA, Region, SharedMemoryRegistry
from hub.shm.regions import (
    SystemRegion,
    check_cuda_input,
    check_region_name,
    check_registration,
    current_holds,
)
from hub.signals import supervisor_gone
from hub.spec import ModelSpec, Target
from hub.workers.arena import DEFAULT_SIZE, Arena
from hub.workers.wire import Channel, Header, MessageTooLarge, RegionView, pack_arrays, unpack_arrays

log = logging.getLogger("modelhub.frontend")

#: Seconds between two tries to reach a restarting model process. Fixed, not backing off: a
#: backoff that grew to a second let one frontend report ready (and serve) up to a second
#: before another, whose clients were refused meanwhile. A failed connect to a Unix socket
#: costs microseconds.
RECONNECT_INTERVAL = 0.05
#: Seconds before a frontend that lacks the spec of a build the model process serves reads the
#: plugins again, doubling up to RETRY_MAX (it also reads them at every change announced).
RETRY_INTERVAL = 0.5
RETRY_MAX = 8.0


#: A block of the model process's arena that a request's outputs lie in: given back once the
#: response is encoded (RemoteModel.end_request).
Lease = tuple[Arena, int]


@dataclass(eq=False)
class RemoteBatch(BatchRecord):
    """The model process's ticket for the batch a request ran in, the connection to it that
    the ticket was issued on (EngineClient.connection: a restarted model process numbers its
    tickets anew), and the block of its arena the request's outputs lie in (None: they came
    as frames)."""

    ticket: int = 0
    connection: int = 0
    lease: Lease | None = None


@dataclass(eq=False)
class _Call:
    """A request to the model process: its answer's future and the block of our arena its
    inputs lie in (freed when the answer comes, even after the caller went away)."""

    future: asyncio.Future[tuple[Header, list[memoryview]]]
    block: Lease | None = None


class EngineClient:
    """This frontend's connection to the model process, reconnecting when it restarts.

    With the shared-memory hand-off (`handoff="shm"`, hub/workers/arena.py) each connection
    has two arenas: ours, which large inputs are copied into (announced in the hello; a new
    one for every connection), and the model process's for our outputs."""

    def __init__(
        self,
        socket_path: Path,
        on_state: Callable[[Header], None],
        *,
        handoff: str = "shm",
        arena_size: int = DEFAULT_SIZE,
        supervisor: int | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._on_state = on_state
        #: The supervisor's pid (ServerConfig.supervisor): once it is gone, so is the server.
        self.supervisor = supervisor
        self.handoff = handoff
        self.arena_size = arena_size
        self._channel: Channel | None = None
        #: Which connection to the model process `_channel` is (counted from 1): its tickets
        #: mean nothing to the next one.
        self.connection = 0
        self._pending: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._commits: list[list[Any]] = []
        self._frees: list[int] = []  # blocks of the model process's arena to give back
        #: Tickets of answers nobody read (their caller had gone): released with the next commit.
        self._drops: list[int] = []
        #: What this frontend holds queued and in flight now, per model (RemoteRepository.gauges):
        #: asked for by the model process at each scrape of /metrics.
        self.gauges: Callable[[], list[list[Any]]] = list
        self.arena: Arena | None = None  # ours, once the model process mapped it
        self.peer: Arena | None = None  # the model process's, for our outputs
        self.regions: RegionMirror | None = None  # client shared memory, as the model process has it
        self.tracer: Tracer | None = None  # this frontend's, loaded with the model process's settings
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
        while not self._closing:
            try:
                _, channel = await loop.create_unix_connection(
                    lambda: Channel(self._received, self._lost), str(self.socket_path)
                )
            except OSError:
                await asyncio.sleep(RECONNECT_INTERVAL)
                continue
            self._channel = channel
            self.connection += 1
            self.connected.set()
            log.info("connected to the model process at %s", self.socket_path)
            offer = Arena.create(self.arena_size) if self.handoff == "shm" else None
            hello: Header = {"k": "hello", "handoff": self.handoff, "pid": os.getpid()}
            if offer is not None:
                hello["arena"] = offer.describe()
            try:
                header, _ = await self.request(hello)  # its table of models is applied on receipt
                self._handshake(channel, header.get("arena") or {}, offer)
            except HubError:
                pass
            finally:
                if offer is not None:
                    offer.unlink()  # the model process mapped it (and unlinked it), or never will
            await channel.closed

    def _handshake(self, channel: Channel, answer: Header, offer: Arena | None) -> None:
        """Use our arena if the model process mapped it; map the one it offers for our outputs."""
        if self._channel is not channel:
            return
        if offer is not None and answer.get("mapped"):
            self.arena = offer
        offered = answer.get("offer")
        if offered:
            try:
                self.peer = Arena.attach(offered.get("name"), offered.get("size"))
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("cannot map the model process's hand-off arena (%s); outputs come over the socket", exc)
            channel.send({"k": "mapped", "ok": self.peer is not None})

    def _lost(self, exc: BaseException | None) -> None:
        self.connected.clear()
        self._channel = None
        # Both arenas go with the connection: nobody reads our blocks any more, and the model
        # process's mapping lasts as long as a view of an output we are still encoding.
        self.arena = self.peer = None
        self._frees.clear()
        self._drops.clear()  # the model process's tickets went with it
        failure = ModelUnavailable(self._gone("the model process exited; it is being restarted, try again shortly"))
        for call in self._pending.values():
            if not call.future.done():
                call.future.set_exception(failure)
        self._pending.clear()
        self._commits.clear()
        if self.regions is not None:
            self.regions.sync([])  # the registry was the model process's: a new one starts empty
        if self._closing:
            return
        if supervisor_gone(self.supervisor):
            log.warning("the model process stopped after the supervisor exited: the server is stopping")
        else:
            log.error("lost the model process (%s); reconnecting", exc or "closed")
        self._on_state({"k": "state", "lost": True, "models": []})

    def _gone(self, restarting: str) -> str:
        """Why a request that needs the model process, which is away, fails: `restarting`, unless
        the supervisor that would restart it has exited (then every process is stopping)."""
        if supervisor_gone(self.supervisor):
            return "the server is stopping (its supervisor exited), and its model process with it"
        return restarting

    def _received(self, header: Header, frames: list[memoryview]) -> None:
        kind = header.get("k")
        if kind == "prepare":  # a reload's new build, before it serves: read its spec (acknowledged)
            self._on_state(header)
            return
        if kind == "state":
            # A change, or the hello's answer: applied on receipt, in the order they were sent.
            # (The hello's caller resumes only after later changes may have been received.)
            self._on_state(header)
            if not header.get("t"):
                return
        if kind == "regions":  # a registration changed: apply it before the RPC returns
            self.acknowledge(header["a"], self.regions.sync(header["regions"]) if self.regions is not None else None)
            return
        if kind == "logging":  # the log settings changed: this process's too, before the RPC returns
            self.acknowledge(header["a"], _apply_log_settings(header["settings"]))
            return
        if kind == "gauges":  # /metrics is being scraped: what is queued and in flight here now
            self.acknowledge(header["a"], gauges=self.gauges())
            return
        if kind == "trace":  # the trace settings changed: this frontend samples by them from now
            if self.tracer is not None:
                self.tracer.load(header["state"])
            self.acknowledge(header["a"], None)
            return
        if "regions" in header and self.regions is not None:
            # The hello's answer: the region table now, applied in order with later changes.
            self.regions.sync(header["regions"])
        if "logging" in header:  # the hello's answer: the log settings the model process has
            _apply_log_settings(header["logging"])
        if "trace" in header and self.tracer is not None:  # and its trace settings
            self.tracer.load(header["trace"])
        call = self._pending.pop(header.get("t", 0), None)
        if call is None:
            return
        if call.block is not None:  # the model process is done with the inputs: its batch ran
            call.block[0].free(call.block[1])
        future = call.future
        if future.done():  # the caller went away: nobody will read the outputs
            if kind != "error":
                self.discard(header)
            return
        if kind == "error":
            future.set_exception(error_for_code(header["code"], header["message"]))
        else:
            future.set_result((header, frames))

    async def request(
        self, header: Header, frames: Sequence[Any] = (), block: Lease | None = None
    ) -> tuple[Header, list[memoryview]]:
        """Send a message and wait for its answer. `block`: where in our arena its tensors lie
        (freed when the answer comes)."""
        channel = self._channel
        if channel is None:
            if block is not None:
                block[0].free(block[1])
            raise ModelUnavailable(
                self._gone("the model process is not available; it is being restarted, try again shortly")
            )
        ticket = next(self._ids)
        header["t"] = ticket
        future: asyncio.Future[tuple[Header, list[memoryview]]] = asyncio.get_running_loop().create_future()
        self._pending[ticket] = _Call(future, block)
        try:
            channel.send(header, frames)
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                if self._channel is channel:  # answered just as the caller went away
                    self.discard(future.result()[0])
            elif ticket in self._pending and self._channel is channel:
                # The entry stays: the answer still comes, and frees the input block.
                try:
                    channel.send({"k": "cancel", "c": ticket})
                except ConnectionError:
                    pass
            raise
        except ConnectionError:
            if self._pending.pop(ticket, None) is not None and block is not None:
                block[0].free(block[1])
            raise ModelUnavailable("the model process is not available; try again shortly") from None
        except MessageTooLarge as exc:  # nothing was sent: this call fails, the connection is untouched
            if self._pending.pop(ticket, None) is not None and block is not None:
                block[0].free(block[1])
            log.error("a %r message to the model process was refused: %s", shorten(str(header.get("k")), 32), exc)
            raise

    async def submit(
        self, header: Header, inputs: Mapping[str, np.ndarray], *, postprocessed: bool = False
    ) -> tuple[Header, dict[str, np.ndarray]]:
        """Hand a request's inputs over (large ones through our arena) and wait for its outputs,
        which may view the model process's arena until `give_back(lease(answer))`.
        `postprocessed`: the model's spec has a postprocess, which this frontend runs on the
        answer, so the model process's outputs are not the ones the client's shared memory is
        for: this frontend writes the served ones there itself (system shared memory only)."""
        arena, regions = self.arena, self.regions
        holds = current_holds() if regions is not None else None
        if postprocessed and holds is not None:
            if any(t.region.kind == CUDA for t in holds.targets.values()):
                raise InvalidInput(
                    f"model '{shorten(str(header.get('m')))}' postprocesses its outputs in each frontend process, "
                    "which cannot write CUDA shared memory with --workers N > 1; ask for its outputs in the response "
                    "or in system shared memory, or serve with --workers 1"
                )
            holds = None
        if regions is not None and not all_numpy(inputs):
            header["device"] = True  # the model process reads these from CUDA shared memory
        elif regions is not None and not regions.regions():
            regions = None  # no input can lie in a region
        described, frames, offset = pack_arrays(list(inputs.items()), arena, locate=regions.locate if regions else None)
        header["inputs"] = described
        targets: dict[int, Region] = {}
        if holds is not None and holds.targets:  # the model process writes these outputs into the regions
            header["targets"] = []
            for name, target in holds.targets.items():
                if target.region.id:
                    targets[target.region.id] = target.region
                    header["targets"].append(
                        [name, target.region.id, target.region.name, target.offset, target.byte_size]
                    )
        channel = self._channel
        reply, out = await self.request(header, frames, (arena, offset) if arena is not None and offset >= 0 else None)
        try:
            return reply, unpack_arrays(reply["outputs"], out, self.peer, _written(targets))
        except BaseException:
            if self._channel is channel:  # the request fails with no delivery: its commit has no ticket
                self.discard(reply)
            raise

    def lease(self, answer: Header) -> Lease | None:
        """The block of the model process's arena that an answer's outputs lie in."""
        offset = answer.get("o", -1)
        return (self.peer, offset) if offset >= 0 and self.peer is not None else None

    def give_back(self, lease: Lease | None) -> None:
        """Free a block of the model process's arena (sent with the next commit), unless it
        belongs to a connection that is gone."""
        if lease is None or lease[0] is not self.peer:
            return
        self._frees.append(lease[1])
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def discard(self, answer: Header) -> None:
        """An answer that no request will be committed with (its caller went away, or its
        outputs could not be read): give back its outputs' block, and release its batch's
        ticket in the model process, which would otherwise keep the batch until this connection
        closes. Both go with the next commit; the answer came on the connection we have now."""
        self.give_back(self.lease(answer))
        ticket = answer.get("b", 0)
        if ticket:
            self._drops.append(ticket)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def commit(self, item: list[Any]) -> None:
        """Queue one answered request's accounting; sent once per event-loop turn."""
        self._commits.append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def acknowledge(self, number: int, error: str | None = None, **answer: Any) -> None:
        """Tell the model process that what it sent as `number` (an `ask`) is applied here
        (or, for a question, its `answer`)."""
        if self._channel is not None:
            try:
                self._channel.send({"k": "ack", "a": number, "error": error, **answer})
            except ConnectionError:
                pass  # it went away; it asks again of its next connection

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not (self._commits or self._frees or self._drops) or self._channel is None:
            return
        items, self._commits = self._commits, []
        message: Header = {"k": "commit", "items": items}
        if self._frees:
            message["free"], self._frees = self._frees, []
        if self._drops:
            message["drop"], self._drops = self._drops, []
        self._send_commit(self._channel, message)

    def _send_commit(self, channel: Channel, message: Header) -> None:
        """Send a commit; one too large for the wire (tens of thousands of requests answered
        in one turn) goes as two halves, and so on: its blocks and tickets must reach the
        model process, or its arena and its table of batches would keep them."""
        try:
            channel.send(message)
        except ConnectionError:
            pass
        except MessageTooLarge as exc:
            parts = {key: value for key, value in message.items() if isinstance(value, list)}
            if all(len(value) < 2 for value in parts.values()):
                log.error("could not report answered requests to the model process: %s", exc)
                return
            first: Header = {"k": "commit"}
            second: Header = {"k": "commit"}
            for key, value in parts.items():
                first[key], second[key] = value[: len(value) // 2], value[len(value) // 2 :]
            self._send_commit(channel, first)
            self._send_commit(channel, second)


def _written(regions: dict[int, Region]) -> RegionView:
    """Outputs the model process wrote into the request's regions: views of them (no copy), or
    where they lie in CUDA shared memory."""

    def view(name: str, datatype: str, shape: list[int], offset: int, nbytes: int, number: int, _: str) -> Any:
        region = regions.get(number)
        if region is None:
            raise ConnectionError(f"the model process wrote output {name!r} into a region this request did not give")
        if isinstance(region, MirroredCudaRegion):
            return DeviceTensor(region, offset, tuple(shape), datatype, nbytes)
        assert isinstance(region, SystemRegion)
        data = region.view(offset, nbytes, f"output '{shorten(name)}'", writable=True)
        return np.frombuffer(data, dtype=NUMPY_DTYPES[datatype]).reshape(shape)

    return view


class DeviceTensor:
    """A tensor in a client's CUDA shared memory, as a frontend of --workers N knows it: where
    it lies, not its data. Frontends open no CUDA context; the model process reads inputs there
    on its device and writes outputs there (hub/workers/engine.py)."""

    __slots__ = ("datatype", "nbytes", "offset", "region", "shape")

    def __init__(self, region: MirroredCudaRegion, offset: int, shape: tuple[int, ...], datatype: str, nbytes: int):
        self.region = region
        self.offset = offset
        self.shape = shape
        self.datatype = datatype
        self.nbytes = nbytes

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def reshape(self, *shape: int) -> DeviceTensor:
        """The same bytes as another shape (at most one -1, as numpy's)."""
        known = math.prod(d for d in shape if d != -1)
        size = math.prod(self.shape)
        new = tuple(size // known if d == -1 else d for d in shape) if known else shape
        return DeviceTensor(self.region, self.offset, new, self.datatype, self.nbytes)


class MirroredCudaRegion(Region):
    """A CUDA region the model process opened, as a frontend mirrors it: its name, device and
    size, for status and for the checks of a request's offsets and sizes."""

    kind = CUDA

    def __init__(self, name: str, device_id: int, byte_size: int) -> None:
        super().__init__(name, byte_size)
        self.device_id = device_id

    def read(
        self, name: str, datatype: str, shape: tuple[int, ...], offset: int, byte_size: int, limits: Limits
    ) -> DeviceTensor:
        check_cuda_input(name, datatype, shape, byte_size, limits)
        return DeviceTensor(self, offset, shape, datatype, byte_size)

    def write(self, name: str, array: Any, offset: int, byte_size: int) -> None:
        if isinstance(array, DeviceTensor) and array.region is self and array.offset == offset:
            return  # the model process wrote it there
        raise ModelExecutionError(f"output '{shorten(name)}' did not reach its CUDA shared memory")

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}


class RegionMirror(SharedMemoryRegistry):
    """A frontend's copy of the model process's registry of client regions (with --workers N).
    Register and unregister go to the model process, which checks them and sends every
    frontend the new table; each maps the system regions itself (`sync`) and knows the CUDA
    ones by name, device and size, so status and inference here agree with every other
    frontend once the RPC returns.

    A tensor of a request that lies in a mirrored region (`locate`) is handed over as (region
    id, name, offset) and read by the model process from its own mapping, with no copy here.
    Only the model process opens a CUDA region (in the CUDA context its models use)."""

    def __init__(self, kinds: frozenset[str], device: str, client: EngineClient) -> None:
        super().__init__(kinds, device=device)
        self._client = client
        client.regions = self

    async def register(self, kind: str, name: str, arguments: dict[str, Any]) -> None:
        self.require(kind)
        check_registration(kind, name, arguments)  # what is forwarded is bounded (the model process checks all)
        await self._client.request({"k": "shm_register", "kind": kind, "name": name, "arguments": arguments})

    async def remove(self, kind: str, name: str = "") -> None:
        if not name and self.kinds and kind not in self.extension_kinds():
            return self.unregister(kind, name)  # (nothing to do, as in one process)
        self.require(kind)
        check_region_name(name)
        await self._client.request({"k": "shm_unregister", "kind": kind, "name": name})

    def sync(self, table: list[list[Any]]) -> str | None:
        """Mirror what the model process has registered ([id, kind, status] each), drop the
        rest (requests holding a dropped region keep it until answered): the first region
        that would not map, or None."""
        wanted = {status["name"]: (number, kind, status) for number, kind, status in table}
        for name, mirrored in list(self._regions.items()):
            if wanted.get(name, (0,))[0] != mirrored.id:
                del self._regions[name]
                mirrored.retire()
        failure = None
        for name, (number, kind, status) in wanted.items():
            if name in self._regions:
                continue
            region: Region
            if kind == CUDA:
                region = MirroredCudaRegion(name, status["device_id"], status["byte_size"])
            else:
                try:
                    region = SystemRegion.open(name, status["key"], status["offset"], status["byte_size"])
                except HubError as exc:
                    failure = failure or client_message(exc)
                    continue
            region.id = number
            self._regions[name] = region
        return failure

    def locate(self, array: Any) -> tuple[int, str, int] | None:
        """(region id, name, offset) of a tensor in CUDA shared memory, which the model process
        reads on the device. An input from system shared memory was read (by pread, see
        hub/shm/regions.py) into the frontend's own memory, and is handed over as any other."""
        if isinstance(array, DeviceTensor):
            return array.region.id, array.region.name, array.offset
        return None


class RemoteBatcher:
    """The model process's batcher for one model version, as the frontend's ServedModel sees it."""

    def __init__(self, client: EngineClient, name: str, version: int, *, postprocessed: bool = False) -> None:
        self._client = client
        self._name = name
        self._version = version
        # Its outputs are the model's, not yet the served ones, when it postprocesses (bound
        # once, so a model without a postprocess submits as before).
        self._submit = functools.partial(client.submit, postprocessed=True) if postprocessed else client.submit

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        rows: int = 1,
        signature: tuple[object, ...] = (),
        timeout: float | None = None,
        request_id: str = "",
    ) -> Delivery:
        header: Header = {"k": "submit", "m": self._name, "v": self._version, "rows": rows}
        if timeout is not None:
            header["timeout"] = timeout
        if request_id:
            header["id"] = request_id
        connection = self._client.connection  # the one the request goes on, and its answer comes on
        reply, outputs = await self._submit(header, inputs)
        batch = RemoteBatch(0, 0, 0, 0, ticket=reply["b"], connection=connection, lease=self._client.lease(reply))
        return Delivery(outputs, reply["inferences"], reply["queue_ns"], batch)

    async def close(self, drain: bool = True) -> None:
        return None


def _cuda_targets() -> bool:
    """Whether the request being answered asked for an output in CUDA shared memory."""
    holds = current_holds()
    return holds is not None and any(t.region.kind == CUDA for t in holds.targets.values())


class RemoteModel(ServedModel):
    """A mirror of a model served by the model process. Requests are checked and
    preprocessed here, and computed either by the model process (`remote`, a RemoteBatcher)
    or, once this frontend has loaded its own copy of the model (`--model-copies cpu`), by a
    batcher of its own. Either way their accounting is sent to the model process, which keeps
    the statistics and metrics of the whole server."""

    client: EngineClient | None = None
    remote: RemoteBatcher | None = None
    copy_key: str = ""  # the build this frontend's copy is (being) loaded from; "" for none
    sources: str | None = None  # the plugin files its spec was read from (`_fingerprint`)
    #: Why this frontend cannot answer for it: the model process serves a build of plugin
    #: files this frontend has not read its spec from. "" when it can.
    out_of_step: str = ""
    #: Requests in this frontend's batcher queue (its copy), and those it is handling, from
    #: receipt to answer: read when /metrics is scraped (RemoteRepository.gauges), so keeping
    #: them costs a request an increment and a decrement.
    queued = 0
    handling = 0

    @property
    def local(self) -> bool:
        """Whether requests run in this frontend's own copy."""
        return self.batcher is not None and self.batcher is not self.remote

    def placement(self, inputs: Mapping[str, np.ndarray]) -> tuple[Mapping[str, np.ndarray], Any]:
        """A request with a tensor in CUDA shared memory runs in the model process, which
        alone opens the client's regions; anything else as its model is placed."""
        on_device = not all_numpy(inputs)
        if not on_device and not (self.local and _cuda_targets()):
            return super().placement(inputs)
        if on_device and self.spec.preprocess is not None:
            raise InvalidInput(
                f"model '{self.name}' preprocesses its inputs in each frontend process, which cannot read CUDA "
                "shared memory with --workers N > 1; send its inputs in the request or in system shared memory, "
                "or serve with --workers 1"
            )
        return inputs, self.remote

    def begin_request(self) -> None:
        self.handling += 1

    def abandon_request(self) -> None:
        self.handling -= 1

    def end_request(self, code: str, seconds: float, delivery: Delivery | None) -> None:
        assert self.client is not None
        self.handling -= 1
        batch = delivery.batch if delivery is not None else None
        ticket = 0
        if isinstance(batch, RemoteBatch):
            if batch.connection != self.client.connection:
                # Computed by a model process that has since restarted: its statistics went
                # with it (the new one's start from zero), and its ticket would name another
                # batch of the new one. (Its outputs' block went with that connection too.)
                return
            ticket = batch.ticket
        inferences = delivery.inferences if delivery is not None else 0
        queue_ns = delivery.queue_ns if delivery is not None else 0
        here = None
        if batch is not None and not isinstance(batch, RemoteBatch):  # computed by this frontend's copy
            here = [batch.rows, batch.input_ns, batch.infer_ns, batch.output_ns, not batch.counted]
            batch.counted = True
        self.client.commit([self.name, self.version, code, int(seconds * 1e9), inferences, queue_ns, ticket, here])
        if isinstance(batch, RemoteBatch):
            # The response is encoded (or the request failed): its outputs' block can go.
            self.client.give_back(batch.lease)


class _CopyObserver:
    """A frontend's copy's batcher keeps its queue depth (read at a scrape of /metrics); its
    batches are counted in the model process with their requests (RemoteModel.end_request)."""

    def __init__(self, model: RemoteModel) -> None:
        self._model = model

    def queued(self, depth: int) -> None:
        self._model.queued = depth

    def batch_done(self, rows: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        return None


class RemoteRepository(ModelRepository):
    """The frontend's view of the model process's repository."""

    def __init__(
        self,
        socket_path: Path,
        specs: Callable[[], tuple[dict[str, Target], list[ModelSpec]]],
        *,
        handoff: str = "shm",
        arena_size: int = DEFAULT_SIZE,
        copies: Builder | None = None,
        inline_compute: float = 0.0,
        adaptive_delay: float = 0.0,
    ) -> None:
        # The model process keeps the metrics; `copies` loads its artifacts (never builds).
        super().__init__(cast(Any, copies), NullMetrics(), inline_compute=inline_compute, adaptive_delay=adaptive_delay)
        self._copies = copies
        self._copy_lock = asyncio.Lock()
        self._copy_tasks: set[asyncio.Task[None]] = set()  # copies loading or draining
        self._closing = False
        self._collect = specs
        self._targets, self._specs, self._sources = self._read()
        #: Specs read for a `prepare` (a reload's new build, not announced yet), by model and
        #: version: (their plugin files, the spec, its target).
        self._prepared: dict[tuple[str, int], tuple[str, ModelSpec, Target | None]] = {}
        self.client = EngineClient(socket_path, self._state, handoff=handoff, arena_size=arena_size)
        self.client.gauges = self.gauges
        #: Set while the model process has loaded its models (its first load done): the server
        #: is not ready while it is away, restarting. `on_loaded` listeners hear each change.
        self.loaded = asyncio.Event()
        self._loaded_listeners: list[Callable[[], None]] = []
        self._backlog: collections.deque[Header] = collections.deque()  # views waiting for the plugins
        self._applying: asyncio.Task[None] | None = None
        #: The last table of models applied, read again (with the plugins) while a model is out
        #: of step; None while the model process is away.
        self._last: Header | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = RETRY_INTERVAL
        #: Set once the model process's first table of models has arrived: before it, this
        #: frontend would answer NOT_FOUND for every model, so it does not listen until then.
        self.synced = asyncio.Event()

    def start(self) -> None:
        self.client.start()

    def gauges(self) -> list[list[Any]]:
        """[name, version, queued, in flight] of each model with requests queued or in flight in
        this frontend now (modelhub_queue_depth, modelhub_inflight_requests)."""
        return [
            [m.name, m.version, m.queued, m.handling]
            for m in cast("list[RemoteModel]", self.models())
            if m.queued or m.handling
        ]

    def on_loaded(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever `loaded` is set or cleared."""
        self._loaded_listeners.append(listener)

    def _set_loaded(self, loaded: bool) -> None:
        if loaded == self.loaded.is_set():
            return
        if loaded:
            self.loaded.set()
        else:
            self.loaded.clear()
        for listener in self._loaded_listeners:
            listener()

    def _read(self) -> tuple[dict[str, Target], list[ModelSpec], dict[tuple[str, int], str | None]]:
        """Import the plugins as they are now: the targets, the specs, and the plugin files
        each spec was read from (`_fingerprint`). Blocks: in a thread, but at the start."""
        targets, specs = self._collect()
        seen: dict[tuple[Path, ...], str | None] = {}
        sources = {}
        for spec in specs:
            if spec.sources not in seen:
                try:
                    seen[spec.sources] = _fingerprint(sources_fingerprint(spec))
                except OSError:  # a file went away since the import: no build is of these
                    seen[spec.sources] = None
            sources[(spec.name, spec.version)] = seen[spec.sources]
        return targets, specs, sources

    def _spec(self, name: str, version: int) -> ModelSpec | None:
        for spec in self._specs:
            if spec.name == name and spec.version == version:
                return spec
        return None

    def describe(self, name: str, version: str = "") -> ServedModel:
        model = self.resolve(name, version)
        if isinstance(model, RemoteModel) and model.out_of_step:
            # Its spec here is not the build's: metadata and config from it would be another's.
            raise ModelUnavailable(f"model '{model.name}' version {model.version}: {model.out_of_step}")
        return model

    def _state(self, header: Header) -> None:
        """Take the model process's view (or answer its `prepare`): at once, unless this
        frontend lacks the spec of a build it names (a reload, a model new to us, a file that
        changed again). Then the plugins are read again in a thread, as a single process's
        reload does, so that importing them does not stall this frontend's requests; views are
        applied in the order they came."""
        if self._applying is None and not self._needs_plugins(header):
            self._take(header)
            return
        self._backlog.append(header)
        if self._applying is None:
            applying = asyncio.get_running_loop().create_task(self._apply_backlog())
            # On Python 3.12 `modelhub serve` starts tasks eagerly: one that finished already
            # has cleared `_applying` itself, and must not be kept as if still applying.
            if not applying.done():
                self._applying = applying

    def _rebuilt(self, view: dict[str, Any]) -> bool:
        current = self._models.get(view["name"], {}).get(int(view["version"]))
        served_key = current.manifest.get("cache_key") if current is not None else None
        return bool(served_key and view["cache_key"] and served_key != view["cache_key"])

    def _holding(self, name: str, version: int, sources: str) -> tuple[ModelSpec, Target | None] | None:
        """The spec (and target) of `name`/`version` this frontend read from exactly these
        plugin files, if it holds one: its model's, the one read for a `prepare`, or the
        plugins' as last read."""
        current = self._models.get(name, {}).get(version)
        if isinstance(current, RemoteModel) and not current.out_of_step and current.sources == sources:
            return current.spec, current.target
        prepared = self._prepared.get((name, version))
        if prepared is not None and prepared[0] == sources:
            return prepared[1], prepared[2]
        spec = self._spec(name, version)
        if spec is not None and self._sources.get((name, version)) == sources:
            return spec, self._targets.get(spec.target)
        return None

    def _lookup(self, view: dict[str, Any]) -> tuple[ModelSpec, Target | None, str | None] | None:
        """The spec to mirror a view with: for a version the model process serves, the one read
        from the plugin files its build came from, else None; for any other (loading, failed,
        unloaded: no build serves), the plugins' as last read, or the model's own."""
        name, version = view["name"], int(view["version"])
        current = self._models.get(name, {}).get(version)
        built = _fingerprint(view.get("sources")) if view["state"] == ModelState.READY.value else None
        if built is not None:
            held = self._holding(name, version, built)
            return None if held is None else (*held, built)
        mirrored = current if isinstance(current, RemoteModel) and not current.out_of_step else None
        spec = self._spec(name, version)
        if spec is not None and (mirrored is None or self._rebuilt(view)):
            return spec, self._targets.get(spec.target), self._sources.get((name, version))
        if mirrored is not None:
            return mirrored.spec, mirrored.target, mirrored.sources
        return None

    def _needs_plugins(self, header: Header) -> bool:
        if header.get("lost"):
            return False
        if header.get("k") == "prepare":
            built = _fingerprint(header.get("sources"))
            return built is not None and self._holding(header["name"], int(header["version"]), built) is None
        for view in header["models"]:
            name, version = view["name"], int(view["version"])
            if view["state"] == ModelState.READY.value and view.get("sources") is not None:
                needed = self._lookup(view) is None  # a build served: its very spec, or read again
            else:
                known = version in self._models.get(name, {}) or self._spec(name, version) is not None
                needed = self._rebuilt(view) or not known
            if needed:
                return True
        return False

    async def _apply_backlog(self) -> None:
        try:
            while self._backlog:
                header = self._backlog.popleft()
                if self._needs_plugins(header):
                    try:
                        self._targets, self._specs, self._sources = await asyncio.to_thread(self._read)
                    except Exception:  # a plugin that no longer imports: keep what we had
                        log.exception("reading the plugins again failed; keeping the specs read before")
                self._take(header)
        finally:
            self._applying = None

    def _take(self, header: Header) -> None:
        if header.get("k") == "prepare":
            self._prepare(header)
        else:
            self._apply(header)

    def _prepare(self, header: Header) -> None:
        """Say whether this frontend now holds the spec of a reload's new build (the model
        process swaps it in only if every frontend does), and keep that spec for its view."""
        name, version = header["name"], int(header["version"])
        built = _fingerprint(header.get("sources"))
        held = self._holding(name, version, built) if built is not None else None
        if built is not None and held is not None:
            self._prepared[(name, version)] = (built, *held)
        error = None
        if built is not None and held is None:
            error = (
                f"the plugin files of model '{name}/{version}' this frontend process read are not those "
                "of the new build (they changed again, or no longer import)"
            )
        self.client.acknowledge(header["a"], error)

    def _apply(self, header: Header) -> None:
        """Apply the model process's view: new models, changed states, removed ones."""
        if header.get("lost"):
            self._last = None
            self._retry_later(False)
            for model in self.models():
                if model.state is not ModelState.UNLOADED:
                    self._set_state(model, ModelState.LOADING, "the model process is restarting")
            self._set_loaded(False)
            return
        seen = set()
        stray = False
        for view in header["models"]:
            name, version = view["name"], int(view["version"])
            seen.add((name, version))
            current = cast("RemoteModel | None", self._models.get(name, {}).get(version))
            found = self._lookup(view)
            if found is None:
                model = self._out_of_step(view, current)
                stray = stray or view["state"] == ModelState.READY.value
            else:
                spec, target, sources = found
                if current is None or current.out_of_step or spec is not current.spec or self._rebuilt(view):
                    model = self._mirror(spec, target, sources, current)
                    if current is not None:  # rebuilt, or back in step: the old copy drains and goes
                        self._drop_copy(current)
                else:
                    model = current
                state = ModelState(view["state"])
                if state is not model.state or view["reason"] != model.reason:
                    self._set_state(model, state, view["reason"])
                prepared = self._prepared.get((name, version))
                if prepared is not None and prepared[0] == model.sources:
                    del self._prepared[(name, version)]
            model.manifest = view["manifest"]
            model.device = view["device"]
            self._place(model, view["cache_key"])
        for model in self.models():
            if (model.name, model.version) not in seen:
                del self._models[model.name][model.version]
                if not self._models[model.name]:
                    del self._models[model.name]
                self._set_state(model, ModelState.UNLOADED, "unloaded")
                self._drop_copy(cast(RemoteModel, model))
        self._last = {"k": "state", "models": header["models"], "loaded": header.get("loaded", False)}
        self._retry_later(stray)
        self.synced.set()
        if header.get("loaded"):
            self._set_loaded(True)
        if "a" in header:  # a load or unload waits until every frontend has applied it
            self.client.acknowledge(header["a"])

    def _mirror(
        self, spec: ModelSpec, target: Target | None, sources: str | None, current: RemoteModel | None
    ) -> RemoteModel:
        model = RemoteModel(spec=spec, stats=current.stats if current is not None else ModelStats())
        model.client = self.client
        model.remote = RemoteBatcher(self.client, spec.name, spec.version, postprocessed=spec.postprocess is not None)
        model.batcher = cast(Any, model.remote)
        model.target = target
        model.sources = sources
        self._models.setdefault(spec.name, {})[spec.version] = model
        return model

    def _out_of_step(self, view: dict[str, Any], current: RemoteModel | None) -> RemoteModel:
        """A version whose build's spec this frontend has not read (its plugin files changed
        since the build, or no longer import; or, loading, failed or unloaded, its plugin
        registers it no more). It is listed as the model process lists it, but no request
        is answered from another build's spec or copy: while the model process serves it, it
        is not ready here (UNAVAILABLE, saying why), and its metadata and config are refused,
        until a reading of the plugins matches (at the next change announced, or on a timer)."""
        name, version = view["name"], int(view["version"])
        serving = view["state"] == ModelState.READY.value
        why = (
            "this frontend process has not read the plugin files its build came from (they changed since, "
            "or no longer import); it reads them again at each change"
        )
        model = current
        if model is None:
            spec = self._spec(name, version) or ModelSpec(
                name=name, version=version, build=_no_build, inputs=(), outputs=(), example_inputs={}
            )
            model = self._mirror(spec, self._targets.get(spec.target), None, None)
        if not model.out_of_step and serving:
            log.warning("model '%s/%d': %s", name, version, why)
        model.out_of_step = why
        self._drop_copy(model)
        state, reason = (ModelState.LOADING, why) if serving else (ModelState(view["state"]), view["reason"])
        if state is not model.state or reason != model.reason:
            self._set_state(model, state, reason)
        return model

    def _retry_later(self, stray: bool) -> None:
        """While the model process serves a build this frontend lacks the spec of, read the
        plugins again on a timer too: a file put back as it was between two polls of --watch,
        or changed without --watch, is announced by no one."""
        if not stray:
            self._retry_delay = RETRY_INTERVAL
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            return
        if self._retry is None and not self._closing:
            self._retry = asyncio.get_running_loop().call_later(self._retry_delay, self._read_again)
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _read_again(self) -> None:
        self._retry = None
        # A table waiting to be applied reads the plugins anyway, and is newer than `_last`.
        if self._last is not None and self._applying is None and not self._backlog:
            self._state(dict(self._last))

    # --- this frontend's copies of the models (--model-copies cpu) -----------------------------

    def _place(self, model: RemoteModel, key: str) -> None:
        """Load this frontend's own copy of a model the model process serves from the CPU, once
        it is ready there; free it when the model is unloaded or failed there."""
        if model.state in (ModelState.UNLOADED, ModelState.FAILED):
            self._drop_copy(model)
        elif (
            self._copies is not None
            and model.state is ModelState.READY
            and model.device == "cpu"
            and key
            and not model.copy_key
        ):
            model.copy_key = key
            self._spawn(self._load_copy(model, key))

    def _spawn(self, job: Any) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._copy_tasks.add(task)
        task.add_done_callback(self._copy_tasks.discard)

    async def _load_copy(self, model: RemoteModel, key: str) -> None:
        """Load the model process's artifact of `model` (in a thread, one model at a time) and
        serve its requests here from then on. Until it is loaded, or if it cannot be, they go to
        the model process, so a copy never costs a failed request."""
        assert self._copies is not None
        async with self._copy_lock:
            if not self._current(model, key):
                self._unplace(model, key)
                return
            started = time.perf_counter()
            self._copies.targets = self._targets
            try:
                artifact = await asyncio.to_thread(self._copies.load_built, model.spec, key)
            except Exception as exc:
                log.warning(
                    "model '%s': no copy in this frontend, its requests go to the model process: %s",
                    model.spec.key,
                    exc if isinstance(exc, HubError) else f"{type(exc).__name__}: {exc}",
                )
                return
            if not self._current(model, key) or artifact.runtime.device != "cpu":
                if artifact.runtime.device == "cpu":
                    self._unplace(model, key)
                await asyncio.to_thread(artifact.runtime.close)
                return
            model.runtime = artifact.runtime
            model.batcher = self.batcher_for(model.spec, artifact.runtime, _CopyObserver(model))
            log.info(
                "model '%s': serving from this frontend's copy (loaded in %.2fs)",
                model.spec.key,
                time.perf_counter() - started,
            )

    @staticmethod
    def _unplace(model: RemoteModel, key: str) -> None:
        """A copy of `key` that was not loaded after all: the next view that finds the model
        ready places it again."""
        if model.copy_key == key and not model.local:
            model.copy_key = ""

    def _current(self, model: RemoteModel, key: str) -> bool:
        """Whether `model` is still the version served, ready, from the build `key`."""
        return (
            not self._closing
            and self._models.get(model.name, {}).get(model.version) is model
            and model.ready
            and model.copy_key == key
            and model.manifest.get("cache_key") == key
        )

    def _drop_copy(self, model: RemoteModel) -> None:
        """Send the model's requests to the model process again, then drain and free the copy."""
        model.copy_key = ""
        if not model.local:
            return
        local, runtime = model.batcher, model.runtime
        model.batcher, model.runtime = cast(Any, model.remote), None
        self._spawn(self._free_copy(model, local, runtime))

    async def _free_copy(self, model: RemoteModel, batcher: Any, runtime: Any) -> None:
        if batcher is not None:
            await batcher.close(drain=True)
        if runtime is not None:
            await asyncio.to_thread(runtime.close)
        model.queued = 0
        log.info("model '%s': this frontend's copy drained and freed", model.spec.key)

    async def refresh_statistics(self, models: list[ServedModel]) -> None:
        if not models:
            return
        reply, _ = await self.client.request({"k": "stats", "models": [[m.name, m.version] for m in models]})
        fresh = {(name, int(version)): stats for name, version, stats in reply["stats"]}
        for model in models:
            data = fresh.get((model.name, model.version))
            if data is not None:
                model.stats = _stats(data)

    def mirror_regions(self, kinds: frozenset[str], device: str) -> RegionMirror:
        """This frontend's registry of client shared memory: the model process's, mirrored."""
        return RegionMirror(kinds, device, self.client)

    async def close(self, drain: bool = True) -> None:
        if self._applying is not None:
            self._applying.cancel()
        if self._retry is not None:
            self._retry.cancel()
        self._closing = True  # a copy still loading is freed once loaded
        for model in self.models():
            self._drop_copy(cast(RemoteModel, model))
        if self._copy_tasks:
            await asyncio.gather(*self._copy_tasks, return_exceptions=True)
        await self.client.close()


def _fingerprint(sources: object) -> str | None:
    """A comparable form of a build's plugin file hashes (`sources_fingerprint`), or None."""
    return json.dumps(sources, sort_keys=True) if isinstance(sources, dict) else None


def _no_build() -> Any:
    raise ModelUnavailable("this frontend process holds no spec of this model")


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


def _apply_log_settings(settings: dict[str, Any]) -> str | None:
    """Take the model process's log settings in this process: None, or what went wrong."""
    try:
        LogSettings().apply(settings, announce=False)  # the model process logged the change
    except HubError as exc:
        return str(exc)
    return None


class RemoteLogs:
    """The log settings of every process: read here (each frontend holds what the model
    process sent it), changed by the model process, which changes them in every frontend
    before it answers. The supervisor's own few lines keep the command line's settings."""

    def __init__(self, client: EngineClient) -> None:
        self._client = client
        self._local = LogSettings()

    def available(self) -> bool:
        return self._local.available()

    def current(self) -> dict[str, bool | int | str]:
        return self._local.current()

    async def update(self, changes: Mapping[str, object]) -> dict[str, bool | int | str]:
        self._local.current()  # UNIMPLEMENTED here, as in one process, where the log is not ours
        check_log_settings(changes)  # as in one process, and only bounded settings are forwarded
        header, _ = await self._client.request({"k": "logging", "settings": dict(changes)})
        settings: dict[str, bool | int | str] = header["settings"]
        return settings


class RemoteTraces:
    """The model process's trace settings: it makes a change and sends the new settings to
    every frontend (each counts its own requests for the rate) before it answers, and keeps the
    count of traces left for the whole server, which a frontend claims one at a time."""

    def __init__(self, client: EngineClient) -> None:
        self._client = client

    async def settings(self, model: str) -> dict[str, list[str]]:
        header, _ = await self._client.request({"k": "trace_get", "model": model})
        settings: dict[str, list[str]] = header["settings"]
        return settings

    async def update(self, model: str, changes: Mapping[str, object]) -> dict[str, list[str]]:
        check_trace_settings(changes)  # as in one process, and only bounded settings are forwarded
        header, _ = await self._client.request({"k": "trace", "model": model, "settings": dict(changes)})
        settings: dict[str, list[str]] = header["settings"]
        return settings

    async def claim(self, model: str) -> bool:
        header, _ = await self._client.request({"k": "trace_claim", "model": model})
        return bool(header["ok"])


class RemoteControl:
    """Model control, done by the model process (which tells every frontend what changed)."""

    def __init__(self, client: EngineClient) -> None:
        self._client = client

    async def load_model(self, name: str) -> None:
        await self._client.request({"k": "load", "name": name})

    async def unload_model(self, name: str) -> None:
        await self._client.request({"k": "unload", "name": name})
