"""The Server: wires one data plane (hub/core) to its frontends, health and metrics. It owns
its plugins, model repository, Prometheus registry and listeners; nothing is global, so
tests run several in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from hub import logs, process
from hub.config import DeploymentConfig
from hub.core.batching import Clock
from hub.core.control import ModelController, plugin_stamps
from hub.core.dataplane import DataPlane, LogControl, ModelControl, TraceControl
from hub.core.models import ServedModel
from hub.core.repository import ModelRepository
from hub.core.trace import Tracer
from hub.limits import Limits
from hub.metrics import Metrics, NullMetrics
from hub.pipeline.builder import Builder
from hub.plugins.manager import PluginHost
from hub.protocol.auth import ThreadedTokenInterceptor, TokenInterceptor
from hub.protocol.generated import grpc_service_pb2 as pb
from hub.protocol.generated._pool import POOL
from hub.protocol.rest.app import RestFrontend
from hub.protocol.rest.listener import HttpListener
from hub.protocol.rest.metrics import metrics_app
from hub.protocol.servicer import InferenceServicer, add_to_server, quiet_refused_answers
from hub.protocol.threaded import loop_lock, threaded_server
from hub.security import TlsConfig, Tokens
from hub.shm import SharedMemoryRegistry
from hub.workers.counter import TRACE_IDS, SharedCounter
from hub.workers.frontend import RemoteControl, RemoteLogs, RemoteRepository, RemoteTraces

if TYPE_CHECKING:
    from hub.workers.engine import EngineService

log = logging.getLogger("modelhub.server")

#: `modelhub serve`'s exit status after a sticky CUDA error (EX_TEMPFAIL: a new process recovers).
EXIT_DEVICE_LOST = 75

#: What the server sends at most (a response); what it receives is `Limits.request_bytes`.
MAX_MESSAGE = 256 << 20

#: Seconds of the shutdown grace (a quarter of it at most) kept from the drain for the
#: listeners' own stop: the refusals then in progress are answered, not cancelled.
STOP_TAIL = 0.5
#: Seconds the refusals wait, once the drain is over, before the listeners stop
#: (DataPlane.hold_refusals): long enough for a client that retries at once to be waiting.
HOLD_REFUSALS = 0.1
#: Seconds `Server.stop` waits for the plugins' `server_stopping` at least, past the grace.
HOOK_FLOOR = 1.0


def default_threads() -> int:
    """Compute threads per runtime: one on small boxes, where the gRPC loop needs the other core."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return "cpu"


@dataclass
class ServerConfig:
    """What `modelhub serve` configures. One rule for the three ports: 0 picks a free port and
    None turns that listener off (metrics off records nothing at all). The defaults are the
    safe ones: loopback only, no model control, and (with no tokens) no auth."""

    plugins_dir: Path | None = Path("plugins")
    model_repository: Path = Path("models")
    host: str = "127.0.0.1"
    grpc_port: int | None = 8001
    http_port: int | None = 8000
    metrics_port: int | None = 8002
    device: str = "auto"
    threads: int = field(default_factory=default_threads)
    entry_points: bool = True
    require_all_models: bool = False
    shutdown_grace: float = 10.0
    extra_plugins: Mapping[str, object] = field(default_factory=dict)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    log_requests: float = 0.0  # fraction of inference requests written to the access log
    #: Seconds: a lone request to an idle model that computes faster than this runs on the
    #: event loop instead of a worker thread (hub/core/batching.py, Batcher.submit); 0: never.
    inline_compute: float = 1e-3
    #: Seconds: the most a request to a model on the CPU with no `max_queue_delay` waits for
    #: others, and only while such waits fill batches (Batcher, "adaptive queue delay"); 0: never.
    #: None: 2 ms under grpc.aio, and 0 under `grpc_server="threads"`, whose handler threads
    #: lose to a thread switch per waiting request what batching saves (docs/benchmarks.md).
    adaptive_delay: float | None = None
    watch: float | None = None  # poll the plugins directory every `watch` seconds (None: off)
    #: Several processes (hub/workers): a frontend hands its requests to the model process
    #: listening on `engine_socket`; the model process listens there itself (`serve_engine`).
    engine_socket: Path | None = None
    serve_engine: Path | None = None
    #: The pid of the supervisor of --workers N that started this process (a frontend or the
    #: model process), None otherwise: once it is not our parent, it has died and nothing will
    #: restart the model process (the server is stopping).
    supervisor: int | None = None
    #: How a frontend and the model process hand tensors over: "shm" (large tensors through a
    #: shared-memory arena per direction and frontend, of `handoff_arena` bytes) or "socket".
    handoff: str = "shm"
    handoff_arena: int = 32 << 20
    #: A frontend's own copies of the models: "cpu" loads every model that computes on the CPU
    #: from the model process's artifact and runs its requests here (docs/workers.md, "On
    #: CPU"); "none" hands every request to the model process.
    model_copies: str = "cpu"
    #: Bind gRPC and REST with SO_REUSEPORT: the frontends of --workers N, or independent
    #: servers sharing the ports (`--reuse-port`; each its own models and statistics).
    reuse_port: bool = False
    #: Which grpcio server takes the gRPC calls: "aio" (grpc.aio, on the event loop) or
    #: "threads" (grpcio's thread-pool server, `grpc_threads` handler threads running at once
    #: under the loop's lock: hub/protocol/threaded.py; the loop must come from its `new_loop`).
    grpc_server: str = "aio"
    grpc_threads: int = 2
    limits: Limits = field(default_factory=Limits)  # what one request may cost (hub/limits.py)
    model_control: bool = False  # RepositoryModelLoad/Unload and REST load/unload; `watch` implies it
    auth_token: str | None = None  # bearer token for everything but health
    model_control_token: str | None = None  # its own token for load/unload (else `auth_token`)
    tls: TlsConfig | None = None  # TLS (mutual with a client CA) on gRPC, REST and metrics
    metrics_auth: bool = False  # /metrics needs `auth_token` too
    metrics_host: str | None = None  # bind metrics here rather than on `host`
    #: Triton's shared-memory extension: the kinds clients may register ("system", "cuda");
    #: none by default (hub/shm, docs/shared-memory.md).
    shared_memory: frozenset[str] = frozenset()

    @property
    def tokens(self) -> Tokens:
        return Tokens(self.auth_token, self.model_control_token)

    @property
    def control_enabled(self) -> bool:
        return self.model_control or bool(self.watch)

    @property
    def adaptive_seconds(self) -> float:
        """`adaptive_delay`, its default resolved for the gRPC server."""
        if self.adaptive_delay is not None:
            return self.adaptive_delay
        return 0.002 if self.grpc_server == "aio" else 0.0


@dataclass
class ServerInfo:
    """The facade plugins receive in `server_started` / `server_stopping`."""

    grpc_port: int | None
    metrics_port: int | None
    device: str
    _repository: ModelRepository
    http_port: int | None = None

    def models(self) -> list[tuple[str, int, str]]:
        return [(m.name, m.version, m.state.value) for m in self._repository.models()]


class Server:
    def __init__(self, config: ServerConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        # With metrics off nothing is recorded at all, so `make bench` can price them.
        self.metrics: Metrics | NullMetrics = Metrics() if config.metrics_port is not None else NullMetrics()
        self.plugins = PluginHost(
            config.plugins_dir,
            entry_points=config.entry_points,
            extra=config.extra_plugins,
            # A frontend of --workers N reads the plugins for their specs; the model process
            # reports their errors, once for the server rather than once per process.
            report=config.engine_socket is None,
        )
        self._clock = clock
        self.repository: ModelRepository | None = None
        self.plane: DataPlane | None = None
        self.control: ModelController | None = None
        self.engine: EngineService | None = None
        self.device = "cpu"
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        #: What the start-up log lines say (`start`): where it listens and what it serves, by
        #: part, and its security settings.
        self.listening: dict[str, str] = {}
        self.security = ""
        self._grpc: grpc.aio.Server | grpc.Server | None = None
        self._grpc_close: Callable[[], None] | None = None  # frees the thread-pool server's threads
        self._servicer: InferenceServicer | None = None
        self._health = health_aio.HealthServicer()
        #: What the health service says of each service ("" and every model name), as last set;
        #: `readiness_changed` asks for it to be brought up to date (`_keep_health`).
        self._health_status: dict[str, int] = {}
        self._readiness = asyncio.Event()
        self._health_keeper: asyncio.Task[None] | None = None
        self._http: HttpListener | None = None
        self._metrics_http: HttpListener | None = None
        self._loading: asyncio.Task[None] | None = None
        self._stopping = False
        self._loaded = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._watch_from: dict[str, tuple[int, int, int]] | None = None
        self.shared_memory: SharedMemoryRegistry | None = None
        self._trace_ids: SharedCounter | None = None  # a frontend's: every frontend numbers traces from it
        #: Set when this process must end and be started afresh (`device_lost`); `modelhub
        #: serve` then drains and exits with `exit_code`.
        self.fatal = asyncio.Event()
        self.exit_code = 0

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen at once; build and load the models in the background (ServerReady tells when)."""
        config = self.config
        logs.tame_libraries()
        self.device = await asyncio.to_thread(resolve_device, config.device)
        await asyncio.to_thread(process.configure, config.threads, config.model_repository)
        if self.device == "cuda":
            self.metrics.watch_cuda()
        tokens = config.tokens  # checks the tokens before anything listens
        if config.metrics_auth and config.auth_token is None:
            raise ValueError("--metrics-auth requires --auth-token: it is the token /metrics then asks for")
        if config.model_control_token is not None and not config.control_enabled and not config.shared_memory:
            raise ValueError(
                "--model-control-token has no effect without --model-control, --watch or --shared-memory: "
                "it guards only load/unload, the log and trace settings and shared-memory registration, all off"
            )
        ssl_context = config.tls.server_context() if config.tls is not None else None
        models: list[ServedModel] = []
        control: ModelControl
        # This process's tracer samples its requests either way; in a frontend the model process
        # holds the settings and the count (the data plane defaults to this process's own), and
        # the ids come from a counter every frontend shares, beside the model process's socket.
        if config.engine_socket is not None:
            self._trace_ids = SharedCounter(config.engine_socket.with_suffix(TRACE_IDS))
        tracer = Tracer(self._trace_ids)
        log_control: LogControl | None = None
        traces: TraceControl | None = None
        if config.engine_socket is not None:
            remote = RemoteRepository(
                config.engine_socket,
                self._collect_specs,
                handoff=config.handoff,
                arena_size=config.handoff_arena,
                # Never builds: loads what the model process built and checked.
                copies=Builder(config.model_repository, {}, self.plugins, self.device, config.threads)
                if config.model_copies == "cpu"
                else None,
                inline_compute=config.inline_compute,
                adaptive_delay=config.adaptive_seconds,
            )
            self.repository = remote
            control = RemoteControl(remote.client)
            log_control = RemoteLogs(remote.client)
            remote.client.tracer = tracer
            remote.client.supervisor = config.supervisor
            traces = RemoteTraces(remote.client)
        else:
            # --watch compares with the files as they were before the plugins were read: a file
            # written while the models load is a change, not the starting point.
            if config.watch and config.plugins_dir is not None:
                self._watch_from = await asyncio.to_thread(plugin_stamps, config.plugins_dir)
            targets = await asyncio.to_thread(self.plugins.collect_targets)
            specs = config.deployment.apply(await asyncio.to_thread(self.plugins.collect_models))
            builder = Builder(config.model_repository, targets, self.plugins, self.device, config.threads)
            self.repository = ModelRepository(
                builder,
                self.metrics,
                clock=self._clock,
                inline_compute=config.inline_compute,
                adaptive_delay=config.adaptive_seconds,
                on_device_lost=self.device_lost,
            )
            models = [self.repository.add(spec) for spec in specs]
            control = self.control = ModelController(
                self.repository, self.plugins, config.deployment, config.plugins_dir
            )
        self.repository.on_change(self.readiness_changed)
        if isinstance(self.repository, RemoteRepository):  # ready only while the model process is loaded
            self.repository.on_loaded(self.readiness_changed)
        if config.shared_memory:
            if isinstance(self.repository, RemoteRepository):  # a frontend: the model process keeps the regions
                self.shared_memory = self.repository.mirror_regions(config.shared_memory, self.device)
            else:
                self.shared_memory = SharedMemoryRegistry(config.shared_memory, device=self.device)
        self.plane = DataPlane(
            self.repository,
            self.is_ready,
            is_live=self.is_live,
            control=control if config.control_enabled else None,
            version_policy=config.deployment.version_policy,
            log_requests=config.log_requests,
            shared_memory=self.shared_memory,
            logs=log_control,
            tracer=tracer,
            traces=traces,
            unsent_bytes=config.limits.unsent_bytes,
        )
        if config.serve_engine is not None:
            from hub.workers.engine import EngineService

            self.engine = EngineService(self, config.serve_engine)
            await self.engine.start()
        if isinstance(self.repository, RemoteRepository):
            self.repository.start()
            # SO_REUSEPORT hands connections to every listening frontend: listen only once this
            # one knows the models (a connection here before that got NOT_FOUND for each).
            await self.repository.synced.wait()
        if config.grpc_port is not None:
            # Health from the state now (a model may be ready already: the model process's, when
            # this frontend started after it loaded), then kept up to date from every change.
            await self._sync_health()
            self._health_keeper = asyncio.get_running_loop().create_task(self._keep_health())
            await self._start_grpc(config.host, config.grpc_port)
        if config.http_port is not None:
            rest = RestFrontend(self.plane, max_body=config.limits.request_bytes, limits=config.limits, tokens=tokens)
            self._http = HttpListener(rest.app())
            self.http_port = await self._http.start(
                config.host,
                config.http_port,
                shutdown_timeout=config.shutdown_grace,
                header_timeout=config.limits.header_timeout,
                reuse_port=config.reuse_port,
                ssl_context=ssl_context,
                purpose="REST (--http-port)",
            )
        if isinstance(self.metrics, Metrics) and config.metrics_port is not None:
            metrics_tokens = Tokens(config.auth_token) if config.metrics_auth else None
            # The model process of --workers N: the frontends' gauges are read at each scrape.
            refresh = self.engine.refresh_gauges if self.engine is not None else None
            self._metrics_http = HttpListener(metrics_app(self.metrics.registry, metrics_tokens, refresh))
            self.metrics_port = await self._metrics_http.start(
                config.metrics_host or config.host,
                config.metrics_port,
                shutdown_timeout=1.0,
                header_timeout=config.limits.header_timeout,
                ssl_context=ssl_context,
                # never shared: servers on one port through --reuse-port each need their own
                purpose="metrics (--metrics-port, one per server)",
            )

        self._announce(models)
        self._loading = asyncio.get_running_loop().create_task(self._load_all(models))
        if config.watch and config.plugins_dir is not None and self.control is not None:  # the model process watches
            watch = self.control.watch(config.watch, self._loaded.wait, self._watch_from)
            self._watcher = asyncio.get_running_loop().create_task(watch)

    def _announce(self, models: list[ServedModel]) -> None:
        """Log where this server listens, what it serves and its security settings; keep them
        in `listening` (by part) and `security` too. With --workers N each process says only
        what it is, and the supervisor writes the server's lines from the first frontend's
        parts (grpc, http) and the model process's (the rest, and security)."""
        config = self.config

        def where(port: int | None) -> str:
            return f"{config.host}:{port}" if port is not None else "off"

        self.listening = {
            "grpc": f"grpc {where(self.grpc_port)} ({self.config.grpc_server})",
            "http": f"http {where(self.http_port)}",
            "metrics": f"metrics {where(self.metrics_port)} ({describe_bind(config.host)})",
            "device": f"device {self.device}",
            "threads": f"{config.threads} threads per model",
            "plugins": "plugins " + ", ".join(f"{r.name}({r.status})" for r in self.plugins.records.values()),
            "models": "models " + (", ".join(m.spec.key for m in models) or "none"),
        }
        tls = "off" if config.tls is None else "mutual" if config.tls.client_ca is not None else "on"
        auth = "required" if config.auth_token is not None else "off (anyone who reaches the port may infer)"
        control = (
            "off"
            if not config.control_enabled
            else "on, its own token"
            if config.model_control_token is not None
            else "on, the auth token"
            if config.auth_token is not None
            else "on, no token"
        )
        metrics = (
            "off"
            if self.metrics_port is None
            else describe_bind(config.metrics_host or config.host)
            + (", auth token required" if config.metrics_auth else "")
        )
        self.security = (
            f"tls {tls}, auth token {auth}, model control {control}, metrics {metrics}, "
            f"shared memory {', '.join(sorted(config.shared_memory)) or 'off'}"
        )
        if config.serve_engine is not None:  # each process of --workers N says what it is
            parts = [part for name, part in self.listening.items() if name not in ("grpc", "http")]
            log.info("model process started: %s", ", ".join(parts))
        elif config.engine_socket is not None:
            log.info("frontend listening: %s, %s", self.listening["grpc"], self.listening["http"])
        else:
            log.info("modelhub listening: %s", ", ".join(self.listening.values()))
            log.info("security: %s", self.security)

    async def _start_grpc(self, host: str, port: int) -> None:
        tokens = self.config.tokens
        limits = self.config.limits
        options = [
            ("grpc.max_receive_message_length", limits.request_bytes),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 1 if self.config.reuse_port else 0),
        ]
        if limits.grpc_streams:  # each call holds its answer here until its client reads it (hub/limits.py)
            options.append(("grpc.max_concurrent_streams", limits.grpc_streams))
        server: grpc.aio.Server | grpc.Server
        registrar: Any  # where the services register: the server, or the thread-pool facade
        if self.config.grpc_server == "threads":
            loop = asyncio.get_running_loop()
            lock = loop_lock(loop)
            if lock is None:
                raise RuntimeError("grpc_server='threads' serves from a loop made by hub.protocol.threaded.new_loop()")
            server, registrar, self._grpc_close = threaded_server(
                loop,
                lock,
                self.config.grpc_threads,
                options,
                interceptors=[ThreadedTokenInterceptor(tokens)] if tokens.required else None,
            )
        else:
            server = registrar = grpc.aio.server(
                interceptors=[TokenInterceptor(tokens)] if tokens.required else None, options=options
            )
            quiet_refused_answers()
        assert self.plane is not None
        self._servicer = InferenceServicer(self.plane, self.config.limits)
        add_to_server(self._servicer, registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, registrar)
        for descriptor in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
            try:
                POOL.AddSerializedFile(descriptor.serialized_pb)
            except TypeError:  # already added by another Server in this process
                pass
        reflection.enable_server_reflection(
            [
                pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            registrar,
            pool=POOL,
        )
        tls = self.config.tls
        credentials = None
        if tls is not None:
            cert, key, client_ca = tls.read()
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
            )
        try:
            if credentials is None:
                self.grpc_port = server.add_insecure_port(f"{host}:{port}")
            else:
                self.grpc_port = server.add_secure_port(f"{host}:{port}", credentials)
        except RuntimeError:  # grpcio's "Failed to bind to address": the cause went to its own log
            self.grpc_port = 0
        if self.grpc_port == 0:  # named as the REST and metrics listeners name theirs (HttpListener.start)
            raise OSError(f"gRPC (--grpc-port) cannot listen on {host}:{port}: in use, or not an address here")
        if isinstance(server, grpc.aio.Server):
            await server.start()
        else:
            server.start()
        self._grpc = server

    async def _stop_grpc(self, grace: float) -> None:
        server = self._grpc
        if isinstance(server, grpc.aio.Server):
            await server.stop(grace)
        elif server is not None:
            stopped = server.stop(grace)  # its threads wait on this loop, which must keep running
            await _in_own_thread(stopped.wait)  # not asyncio's pool: pre/postprocess jobs queue there
            if self._grpc_close is not None:
                self._grpc_close()

    def _collect_specs(self) -> tuple[dict[str, Any], list[Any]]:
        """This process's import of the plugins, as it is now: targets and the specs to serve."""
        self.plugins.refresh()
        return self.plugins.collect_targets(), self.config.deployment.apply(self.plugins.collect_models())

    async def _load_all(self, models: list[ServedModel]) -> None:
        if isinstance(self.repository, RemoteRepository):
            await self.repository.loaded.wait()  # the model process loads; `server_started` runs there
            self._loaded.set()
            self.readiness_changed()
            return
        for model in models:
            await self.repository.load(model)  # type: ignore[union-attr]
        await asyncio.to_thread(self.plugins.server_started, self.info)
        self._loaded.set()
        self.readiness_changed()

    async def wait_until_loaded(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._loaded.wait(), timeout)

    def device_lost(self, reason: str) -> None:
        """A batch failed with a sticky CUDA error: no CUDA call in this process can succeed
        again. Not live from now on; `modelhub serve` drains and exits with EXIT_DEVICE_LOST,
        and whatever runs it (the supervisor of --workers N, Kubernetes, Docker's restart
        policy) starts a fresh process."""
        if self.fatal.is_set():
            return
        self.exit_code = EXIT_DEVICE_LOST
        log.critical(
            "the CUDA device failed (%s); this process cannot use it again: draining and exiting (code %d) "
            "to be started afresh",
            reason,
            EXIT_DEVICE_LOST,
        )
        self.fatal.set()
        self.readiness_changed()

    def is_live(self) -> bool:
        return not self.fatal.is_set()

    def is_ready(self) -> bool:
        if self._stopping or self.fatal.is_set() or self.repository is None or not self._loaded.is_set():
            return False
        if isinstance(self.repository, RemoteRepository) and not self.repository.loaded.is_set():
            return False  # the model process is away (restarting)
        if self.config.require_all_models:
            return all(m.ready for m in self.repository.models())
        return True

    @property
    def info(self) -> ServerInfo:
        assert self.repository is not None
        return ServerInfo(self.grpc_port, self.metrics_port, self.device, self.repository, self.http_port)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new requests at once (UNAVAILABLE, 503), answer the accepted ones, stop the
        listeners and free everything, all within `grace` seconds (a plugin's slow
        `server_stopping` aside: it gets at least `HOOK_FLOOR`)."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.shutdown_grace if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.plane is not None:
            # First of all: every request from now on is refused, whatever the stop waits for
            # below (a request accepted meanwhile was one more to answer, for seconds).
            self.plane.refuse_new()
            if self._servicer is not None:
                self._servicer.refuse_new()  # and streams stop reading
        await self._health.enter_graceful_shutdown()
        for task in (self._loading, self._watcher, self._health_keeper):
            if task is not None and not task.done():
                task.cancel()
        # In a thread of its own: asyncio's default pool also runs the models' preprocess and
        # postprocess, and the hook queued there behind every such job already waiting.
        hook = _in_own_thread(self.plugins.server_stopping, self.info) if self.repository is not None else None
        # What the listeners' own stop gets of the grace: to answer the refusals in progress.
        tail = min(STOP_TAIL, grace / 4)
        if self.plane is not None:
            if not await self.plane.drained(max(0.0, deadline - tail - loop.time())):
                log.warning("shutdown grace of %.1fs ran out with inference requests in flight", grace)
            if tail > 0 and (self._grpc is not None or self._http is not None):
                self.plane.hold_refusals()
                await asyncio.sleep(min(HOLD_REFUSALS, tail / 2))
        try:
            # gRPC and REST stop together, within what is left of the grace.
            left = max(0.0, deadline - loop.time())
            stopping = [
                *([loop.create_task(self._stop_grpc(left))] if self._grpc is not None else []),
                *([loop.create_task(self._http.stop(left))] if self._http is not None else []),
            ]
            # One loop turn: each has begun (grpc's shutdown call runs before its first await).
            await asyncio.sleep(0)
        finally:
            if self.plane is not None:
                self.plane.release_refusals()
        await asyncio.gather(*stopping)
        if self.engine is not None:
            await self.engine.close()
        if self.repository is not None:
            await self.repository.close(drain=False)
        if self.shared_memory is not None:
            self.shared_memory.close()  # every region unmapped (a request still holding one unmaps it last)
        if self._metrics_http is not None:
            await self._metrics_http.stop()
        if hook is not None:
            try:
                await asyncio.wait_for(asyncio.shield(hook), max(HOOK_FLOOR, deadline - loop.time()))
            except TimeoutError:
                log.warning("a plugin's server_stopping has not returned; stopping without it")
        self.plugins.close()
        if self._trace_ids is not None:
            self._trace_ids.close()
        log.info("modelhub stopped")

    # --- health -----------------------------------------------------------------------------

    def readiness_changed(self, *_: object) -> None:
        """Something `is_ready` or a model's readiness depends on may have changed (a model's
        state, the first load done, the model process away or back, a lost device): bring the
        gRPC health service up to date with ServerReady and ModelReady. Every such change comes
        here; the health service is written in `_sync_health` alone, once per burst of changes."""
        self._readiness.set()

    async def _keep_health(self) -> None:
        while True:
            await self._readiness.wait()
            self._readiness.clear()
            await self._sync_health()

    async def _sync_health(self) -> None:
        """Set each service from the state now: "" SERVING while the server is ready, a model's
        while a version of it is ready (docs/metrics.md); a model no longer served NOT_SERVING."""
        if self.repository is None:
            return
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        wanted = {name: not_serving for name in self._health_status}
        wanted[""] = serving if self.is_ready() else not_serving
        for name in self.repository.names():
            wanted[name] = serving if any(m.ready for m in self.repository.versions(name)) else not_serving
        for name, status in wanted.items():
            if self._health_status.get(name) != status:
                self._health_status[name] = status
                await self._health.set(name, status)


def _in_own_thread(function: Callable[..., object], *args: Any) -> asyncio.Future[None]:
    """Run `function(*args)` in a new daemon thread (one that never holds up the exit); the
    future is done when it returns."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            function(*args)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(settle)

    threading.Thread(target=run, name=f"modelhub-{getattr(function, '__name__', 'stop')}", daemon=True).start()
    return done


def describe_bind(host: str) -> str:
    """Which interfaces `host` is, in the words of the start-up log line."""
    if host in ("", "0.0.0.0", "::"):
        return f"all interfaces ({host or '0.0.0.0'})"
    if host in ("localhost", "::1") or host.startswith("127."):
        return f"loopback only ({host})"
    return host
