"""The `modelhub` command line: serve, plugins, models, infer, health, build, top.

This package is the CLI; `hub.cli.build` renders `modelhub build`. `python -m hub.cli` runs it
(`__main__.py`), as the `modelhub` entry point (`hub.cli:main`) does.

Every server flag also reads an environment variable (MODELHUB_<FLAG>), so containers are
configured without rewriting the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hub import __version__
from hub.cli.connect import Connection, FlagError, add_client_args

log = logging.getLogger("modelhub.cli")


#: The gRPC servers `serve --grpc-server` offers (also the values MODELHUB_GRPC_SERVER may take).
GRPC_SERVERS = ("aio", "threads")
HANDOFFS = ("shm", "socket")
MODEL_COPIES = ("cpu", "none")


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"MODELHUB_{name}", default)


def _positive(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {text!r}")
    return value


def _microseconds(text: str) -> float:
    """A non-negative number of microseconds (0 turns the feature off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of microseconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected 0 (off) or a positive number of microseconds, got {text!r}")
    return value


def _size(text: str) -> int:
    """A byte count: a number with an optional K, M or G (binary units)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(value[-1:], 1)
    try:
        count = int(float(value[:-1] if scale > 1 else value) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 32M, 512K)") from None
    if count < 4096:
        raise argparse.ArgumentTypeError(f"{text!r} is smaller than a page (4K)")
    return count


def _env_flag(name: str) -> bool:
    """A boolean MODELHUB_<name>: set and not 0/false/no/off."""
    return str(_env(name, "")).strip().lower() not in ("", "0", "false", "no", "off")


def port(value: str) -> int | None:
    """A --*-port value: a port number, 0 for any free port, or off/none to turn it off."""
    if value.strip().lower() in ("off", "none", "disabled"):
        return None
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, 0 (any free port) or off, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is outside 0-65535")
    return number


def _add_port_arg(parser: argparse.ArgumentParser, name: str, default: int, what: str) -> None:
    env = f"{name.upper()}_PORT"
    parser.add_argument(
        f"--{name}-port",
        type=port,
        default=port(str(_env(env, default))),
        metavar="PORT|0|off",
        help=f"{what} port; 0 picks a free port, off turns it off (env MODELHUB_{env}; default: {default})",
    )


def _add_plugin_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugins-dir",
        type=Path,
        default=Path(_env("PLUGINS_DIR", "plugins")),
        help="folder of loose plugin .py files and plugin packages (env MODELHUB_PLUGINS_DIR; default: plugins)",
    )
    parser.add_argument(
        "--no-entry-points",
        action="store_true",
        help="ignore plugins installed as packages (entry-point group 'modelhub')",
    )


def _add_repository_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path(_env("MODEL_REPOSITORY", "models")),
        help="where built artifacts live, as <name>/<version>/ (env MODELHUB_MODEL_REPOSITORY; default: models)",
    )


def _add_url_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=_env("URL", "localhost:8001"),
        help="server address (env MODELHUB_URL; default: localhost:8001)",
    )


def _add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=_env("CONFIG", None),
        help="deployment overrides per model (batching policy, target), TOML or YAML (env MODELHUB_CONFIG)",
    )


def _add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Where and how models run, and the deployment overrides: shared by serve and build."""
    parser.add_argument(
        "--device",
        default=_env("DEVICE", "auto"),
        choices=["auto", "cpu", "cuda"],
        help="where models run: auto picks CUDA when torch sees a GPU (default: auto)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=int(_env("THREADS", 0)),
        help="compute threads per model runtime; 0 picks one per four cores (default: 0)",
    )
    _add_config_arg(parser)


def _deployment(args: argparse.Namespace) -> Any:
    from hub.config import DeploymentConfig

    return DeploymentConfig.load(Path(args.config)) if args.config else DeploymentConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelhub",
        description="A plugin-based model hub and Triton-compatible (KServe V2) gRPC and REST inference server.",
    )
    parser.add_argument("--version", action="version", version=f"modelhub {__version__}")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format",
        default=_env("LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="one line per event, as readable text or as JSON (env MODELHUB_LOG_FORMAT)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="build, load and serve every plugin's models over gRPC and HTTP/REST")
    _add_plugin_args(serve)
    _add_repository_arg(serve)
    serve.add_argument(
        "--host",
        default=_env("HOST", "127.0.0.1"),
        help="address to bind; 0.0.0.0 for every interface, as containers need (env MODELHUB_HOST; "
        "default: 127.0.0.1, loopback only)",
    )
    _add_port_arg(serve, "grpc", 8001, "gRPC (KServe V2 / Triton)")
    _add_port_arg(serve, "http", 8000, "HTTP/REST (KServe V2 / Triton)")
    _add_port_arg(serve, "metrics", 8002, "Prometheus /metrics (off records no metrics at all)")
    _add_runtime_args(serve)
    serve.add_argument(
        "--require-all-models",
        action="store_true",
        default=bool(_env("REQUIRE_ALL_MODELS", "")),
        help="report the server not ready while any model has failed",
    )
    serve.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=float(_env("WATCH", 0)) or None,
        metavar="SECONDS",
        help="poll the plugins directory (every 2 s, or SECONDS) and load, reload or unload what changed; "
        "off by default, when only RepositoryModelLoad/Unload change what is served",
    )
    security = serve.add_argument_group("security (see docs/deploy.md)")
    security.add_argument(
        "--model-control",
        action="store_true",
        default=_env_flag("MODEL_CONTROL"),
        help="allow RepositoryModelLoad/Unload, REST load/unload and changes to the log and trace settings; "
        "off by default (--watch implies it) (env MODELHUB_MODEL_CONTROL)",
    )
    security.add_argument(
        "--model-control-token",
        default=_env("MODEL_CONTROL_TOKEN", None),
        metavar="TOKEN",
        help="bearer token that load/unload, shared-memory registration and the log and trace settings "
        "require, separate from --auth-token (env MODELHUB_MODEL_CONTROL_TOKEN)",
    )
    security.add_argument(
        "--shared-memory",
        default=_env("SHARED_MEMORY", "off"),
        metavar="off|system|cuda|system,cuda",
        help="Triton's shared-memory extension: let clients register system (/dev/shm) and/or CUDA IPC "
        "regions for inputs and outputs; off by default (env MODELHUB_SHARED_MEMORY; see docs/shared-memory.md)",
    )
    security.add_argument(
        "--auth-token",
        default=_env("AUTH_TOKEN", None),
        metavar="TOKEN",
        help="bearer token ('authorization: Bearer TOKEN') that everything but health requires "
        "(env MODELHUB_AUTH_TOKEN; default: none)",
    )
    security.add_argument(
        "--tls-cert", type=Path, default=_env("TLS_CERT", None), help="PEM certificate chain (env MODELHUB_TLS_CERT)"
    )
    security.add_argument(
        "--tls-key", type=Path, default=_env("TLS_KEY", None), help="PEM private key (env MODELHUB_TLS_KEY)"
    )
    security.add_argument(
        "--tls-client-ca",
        type=Path,
        default=_env("TLS_CLIENT_CA", None),
        help="PEM CA bundle; clients must present a certificate it signed (mutual TLS) (env MODELHUB_TLS_CLIENT_CA)",
    )
    security.add_argument(
        "--metrics-auth",
        action="store_true",
        default=_env_flag("METRICS_AUTH"),
        help="/metrics requires --auth-token too (env MODELHUB_METRICS_AUTH)",
    )
    security.add_argument(
        "--metrics-host",
        default=_env("METRICS_HOST", None),
        help="bind the metrics port here instead of --host, e.g. 127.0.0.1 (env MODELHUB_METRICS_HOST)",
    )
    serve.add_argument(
        "--log-requests",
        type=float,
        default=float(_env("LOG_REQUESTS", 0.0)),
        metavar="FRACTION",
        help="write this fraction of inference requests to the access log, e.g. 0.01 (default: 0, off)",
    )
    serve.add_argument(
        "--inline-compute-us",
        type=_microseconds,
        default=str(_env("INLINE_COMPUTE_US", 1000)),  # a string: argparse checks it with `type` too
        metavar="MICROSECONDS",
        help="for a model on the CPU, a batch of a size measured to take under this much CPU time runs on the "
        "event loop, without a worker thread's hand-off (a lone request to an idle model then never "
        "suspends; a size whose run there waited on something for over 10x this keeps off the loop until "
        "its runs in a worker are fast); 0 turns it off "
        "(env MODELHUB_INLINE_COMPUTE_US; default: 1000; README)",
    )
    serve.add_argument(
        "--adaptive-delay-us",
        type=_microseconds,
        default=_env("ADAPTIVE_DELAY_US", None),  # a string when set: argparse checks it with `type` too
        metavar="MICROSECONDS",
        help="for a model on the CPU whose policy sets no max_queue_delay, the most a request waits for others "
        "to join its batch, and only while such waits gather 4 requests or more (a probe now and then "
        "finds out); 0 turns it off (env MODELHUB_ADAPTIVE_DELAY_US; default: 2000 with --grpc-server aio, "
        "0 with threads; README)",
    )
    serve.add_argument(
        "--grpc-server",
        choices=GRPC_SERVERS,
        default=_env("GRPC_SERVER", "aio"),
        help="which grpcio server takes gRPC calls: aio (grpc.aio on the event loop) or threads (grpcio's "
        "thread-pool server, its handler threads taking turns at the event loop's data plane; an experiment): "
        "on the 2-core box from 0.62x to 1.2x aio's throughput by the hour, and slower wherever requests wait "
        "(a GPU, --workers N) (docs/benchmarks.md) "
        "(env MODELHUB_GRPC_SERVER; default: aio)",
    )
    serve.add_argument(
        "--grpc-threads",
        type=_positive,
        default=str(_env("GRPC_THREADS", 2)),
        metavar="N",
        help="with --grpc-server threads: how many handler threads run at once; a call that waits (in a "
        "batcher's queue, a stream between messages) lends its place to another "
        "(env MODELHUB_GRPC_THREADS; default: 2)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=int(_env("WORKERS", 0)),
        help="frontend processes sharing the ports (SO_REUSEPORT) in front of one model process; "
        "0 picks 1 on 2 cores or fewer, else one per two cores, at most 8 (env MODELHUB_WORKERS)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        default=_env_flag("REUSE_PORT"),
        help="with --workers 1: bind gRPC and REST with SO_REUSEPORT, so that several independent servers "
        "(each with its own copy of the models, batcher, statistics and model control) share the ports and "
        "the kernel spreads connections over them, as pods behind a Service do; --workers N with model copies "
        "runs the same compute with one server's statistics, metrics and model control: prefer it "
        "(docs/workers.md) (env MODELHUB_REUSE_PORT)",
    )
    serve.add_argument(
        "--port-file",
        type=Path,
        default=_env("PORT_FILE", None),
        help="write the ports listened on as JSON to this file once listening (useful with port 0)",
    )
    serve.add_argument(
        "--handoff",
        choices=HANDOFFS,
        default=_env("HANDOFF", "shm"),
        help="with --workers N > 1, how tensors cross between a frontend and the model process: shm (large "
        "tensors through shared memory, only a header on the socket; falls back to the socket when /dev/shm "
        "cannot hold the arenas) or socket (env MODELHUB_HANDOFF; default shm; docs/workers.md)",
    )
    serve.add_argument(
        "--handoff-arena",
        type=_size,
        default=_env("HANDOFF_ARENA", "32M"),
        metavar="BYTES",
        help="size of each shared-memory hand-off arena, e.g. 32M: two per frontend, one each way "
        "(env MODELHUB_HANDOFF_ARENA; default 32M)",
    )
    serve.add_argument(
        "--model-copies",
        choices=MODEL_COPIES,
        default=_env("MODEL_COPIES", "cpu"),
        help="with --workers N > 1: cpu (the default) has every frontend load its own copy of each model that "
        "computes on the CPU, from the model process's artifact, and run that model's requests itself, while the "
        "model process keeps the statistics, metrics and model control of the whole server; none hands every "
        "request to the model process. Models on a GPU are never copied: one copy per device, one batcher "
        "(env MODELHUB_MODEL_COPIES; docs/workers.md)",
    )
    # Set by the supervisor of --workers N for the processes it starts.
    serve.add_argument("--role", choices=["all", "engine", "frontend"], default="all", help=argparse.SUPPRESS)
    serve.add_argument("--engine-socket", type=Path, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--process-name", default="", help=argparse.SUPPRESS)  # in each log line
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=float(_env("SHUTDOWN_GRACE", 10.0)),
        help="seconds in-flight requests get to finish after SIGTERM (default: 10)",
    )
    from hub.limits import DEFAULT_LIMITS

    limits = serve.add_argument_group("limits on one request (see docs/deploy.md)")
    for flag, field, what, kind in (
        ("--max-request-bytes", "request_bytes", "largest request message in bytes", int),
        ("--max-json-bytes", "json_bytes", "largest JSON part of a REST request in bytes", int),
        ("--max-bytes-element", "bytes_element", "largest BYTES element in bytes", int),
        ("--max-elements", "elements", "most tensor elements in one request", int),
        ("--max-bytes-elements", "bytes_elements", "most BYTES elements in one request", int),
        ("--max-typed-values", "typed_values", "most typed integer contents of one input converted one by one", int),
        (
            "--max-request-entries",
            "request_entries",
            "most entries (inputs, outputs, parameters...) in one request",
            int,
        ),
        ("--max-stream-in-flight", "stream_in_flight", "most unanswered requests per ModelStreamInfer stream", int),
        (
            "--max-stream-bytes",
            "stream_bytes",
            "most bytes of unread answers per ModelStreamInfer stream (at its largest answer's size)",
            int,
        ),
        (
            "--max-unsent-bytes",
            "unsent_bytes",
            "most bytes of answers held for clients that have not read them (a quarter of it per connection)",
            int,
        ),
        (
            "--grpc-max-streams",
            "grpc_streams",
            "most gRPC calls open at once on one connection (0, the default: no bound, as Triton)",
            int,
        ),
        (
            "--http-header-timeout",
            "header_timeout",
            "seconds a REST connection may take to send a request's headers, from its accept or its previous "
            "response (also the keep-alive idle timeout)",
            float,
        ),
        ("--http-body-timeout", "body_timeout", "seconds a REST request body may take, plus --http-body-rate's", float),
        ("--http-body-rate", "body_rate", "bytes/s a REST request body must average past --http-body-timeout", int),
    ):
        default = getattr(DEFAULT_LIMITS, field)
        env = flag[2:].upper().replace("-", "_")
        limits.add_argument(
            flag,
            dest=f"limit_{field}",
            type=kind,
            default=kind(_env(env, default)),
            metavar="S" if kind is float else "N",
            help=f"{what} (env MODELHUB_{env}; default: {default if kind is int else format(default, 'g')})",
        )

    plugins = commands.add_parser("plugins", help="list plugins: where they come from, their hooks, models and errors")
    _add_plugin_args(plugins)
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")

    models = commands.add_parser("models", help="list registered models with their targets and build reports")
    _add_plugin_args(models)
    _add_repository_arg(models)
    _add_config_arg(models)  # the targets (and options) a `serve --config` builds, to compare with
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.add_argument(
        "--url", help="read a running server's models and build reports (gRPC, e.g. localhost:8001) instead"
    )
    add_client_args(models, "models")  # with --url

    build = commands.add_parser("build", help="build, check and measure artifacts ahead of serving")
    build.add_argument("models", nargs="*", metavar="MODEL", help="models to build (default: all)")
    _add_plugin_args(build)
    _add_repository_arg(build)
    build.add_argument(
        "--target", help="build this target instead of each spec's own, in its place under --model-repository"
    )
    build.add_argument("--compare", metavar="MODEL", help="build every registered target for MODEL and compare them")
    _add_runtime_args(build)
    build.add_argument("--force", action="store_true", help="rebuild even when the cached artifact is current")
    build.add_argument("--no-measure", action="store_true", help="skip the in-process throughput figures")
    build.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")

    infer = commands.add_parser("infer", help="send one inference request to a running server and print the outputs")
    infer.add_argument("model", help="model name")
    infer.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        required=True,
        help="an input tensor from a .npy file (repeat for several inputs)",
    )
    infer.add_argument("--output", "-o", action="append", default=[], metavar="NAME", help="only these outputs")
    infer.add_argument("--model-version", default="", help="version to call (default: the newest ready one)")
    infer.add_argument("--save", type=Path, help="also write each output to DIR/<name>.npy")
    infer.add_argument("--timeout", type=float, default=30.0, help="request deadline in seconds (default: 30)")
    _add_url_arg(infer)
    add_client_args(infer, "infer")

    health = commands.add_parser("health", help="gRPC health check; exit 0 when SERVING (for container probes)")
    health.add_argument("--service", default="", help="a model name, or empty for the whole server")
    health.add_argument("--timeout", type=float, default=3.0)
    _add_url_arg(health)
    add_client_args(health, "health")  # the token only for --service's model states: health itself is open
    top = commands.add_parser("top", help="a live terminal view of a running server's models")
    top.add_argument(
        "--metrics-url",
        default=_env("METRICS_URL", "http://localhost:8002/metrics"),
        help="the server's metrics endpoint (default: http://localhost:8002/metrics)",
    )
    top.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default: 2)")
    top.add_argument("--once", action="store_true", help="print one table over one interval, then exit")
    add_client_args(top, "top")  # the TLS flags for an https:// --metrics-url
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    from hub import logs

    logs.configure(args.log_level, args.log_format)
    handler = {
        "serve": cmd_serve,
        "plugins": cmd_plugins,
        "models": cmd_models,
        "infer": cmd_infer,
        "health": cmd_health,
        "top": cmd_top,
        "build": cmd_build,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `modelhub health | head -1`: the reader left, which is no error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not raise again
        return 0


# --- serve ------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from hub.errors import SpecError
    from hub.limits import Limits
    from hub.server import Server, ServerConfig, default_threads

    try:
        deployment = _deployment(args)
    except (OSError, SpecError) as exc:
        log.error("modelhub: bad --config: %s", exc)
        return 2
    try:
        limits = Limits(**{k[len("limit_") :]: v for k, v in vars(args).items() if k.startswith("limit_")})
    except ValueError as exc:
        log.error("modelhub: bad limit: %s", exc)
        return 2
    from hub.security import TlsConfig

    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_client_ca and args.tls_cert is None):
        log.error("modelhub: TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)")
        return 2
    tls = None if args.tls_cert is None else TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca)
    from hub.shm import parse_kinds

    try:
        shared_memory = parse_kinds(args.shared_memory)
    except ValueError as exc:
        log.error("modelhub: %s", exc)
        return 2
    for dest, choices in (("grpc_server", GRPC_SERVERS), ("handoff", HANDOFFS), ("model_copies", MODEL_COPIES)):
        value = getattr(args, dest)
        if value not in choices:  # from MODELHUB_<DEST>: argparse checks a typed choice, not a default
            log.error("modelhub: MODELHUB_%s must be %s, got %r", dest.upper(), " or ".join(choices), value)
            return 2
    from hub.workers.supervisor import Supervisor, default_workers

    workers = args.workers or default_workers()
    from hub import logs

    if args.role == "all" and workers > 1:
        logs.name_process("supervisor")
        argv = list(sys.argv[1:] if args.argv is None else args.argv)
        # Each frontend holds its share of the answers clients have not read (the last flag wins).
        argv += ["--max-unsent-bytes", str(max(1, limits.unsent_bytes // workers))]
        return Supervisor(
            argv,
            workers,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=getattr(args, "http_port", False),
            port_file=args.port_file,
            shutdown_grace=args.shutdown_grace,
            shared_ports=args.reuse_port,
        ).run()
    if args.process_name:
        logs.name_process(args.process_name)
    config = ServerConfig(
        deployment=deployment,
        plugins_dir=args.plugins_dir,
        model_repository=args.model_repository,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        device=args.device,
        threads=args.threads or default_threads(),
        entry_points=not args.no_entry_points,
        require_all_models=args.require_all_models,
        shutdown_grace=args.shutdown_grace,
        log_requests=args.log_requests,
        inline_compute=args.inline_compute_us / 1e6,
        adaptive_delay=None if args.adaptive_delay_us is None else args.adaptive_delay_us / 1e6,
        watch=args.watch if args.role != "frontend" else None,
        serve_engine=args.engine_socket if args.role == "engine" else None,
        engine_socket=args.engine_socket if args.role == "frontend" else None,
        supervisor=args.supervisor_pid if args.role != "all" else None,
        handoff=args.handoff,
        handoff_arena=args.handoff_arena,
        model_copies=args.model_copies,
        reuse_port=args.role == "frontend" or args.reuse_port,
        grpc_server=args.grpc_server,
        grpc_threads=args.grpc_threads,
        limits=limits,
        # the frontends of --workers N get no `watch`, so --watch's implied control is explicit
        model_control=args.model_control or bool(args.watch),
        auth_token=args.auth_token,
        model_control_token=args.model_control_token,
        tls=tls,
        metrics_auth=args.metrics_auth,
        metrics_host=args.metrics_host,
        shared_memory=shared_memory,
    )
    if config.grpc_server == "threads":  # the loop whose lock its handler threads share (threaded.py)
        from hub.protocol.threaded import new_loop

        loop = new_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(_serve(Server(config), args.port_file))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()
    return _run(_serve(Server(config), args.port_file))


def _run(main: Any) -> int:
    """asyncio.run, with each task started at once on Python 3.12 and later
    (`asyncio.eager_task_factory`): grpc.aio makes a task for every RPC, and an eager one runs
    its handler in the same loop turn, a turn per request sooner. On the 2-core box, Python 3.12,
    digits at c=64: about 1.05x the throughput and 6% less event-loop CPU per request; level at
    c=1 (docs/benchmarks.md, "eager tasks on Python 3.12"). Only `modelhub serve` sets it: an
    embedder's loop is its own."""
    if sys.version_info >= (3, 12):

        def eager_loop() -> asyncio.AbstractEventLoop:
            loop = asyncio.new_event_loop()
            loop.set_task_factory(asyncio.eager_task_factory)
            return loop

        return asyncio.run(main, loop_factory=eager_loop)
    return asyncio.run(main)


async def _serve(server: Any, port_file: Path | None = None) -> int:
    from hub.signals import AGAIN, AGAIN_FRONTEND, ENGINE_STOP, STOP_SIGNALS, StopSignals, stop_reason

    stop = asyncio.Event()

    def stopping(signum: signal.Signals) -> None:
        # Logged as the signal is taken, so before the line of any signal after it.
        if not server.fatal.is_set():  # (a failed device's drain has said so already)
            log.info("%s (grace %.1fs)", stop_reason(signum, server.config.supervisor), server.config.shutdown_grace)
        stop.set()

    if server.config.serve_engine is not None:
        # The model process of --workers N: the frontends drain into it, so a signal to the
        # whole group must not stop it; its supervisor does, with ENGINE_STOP, after them.
        signals = StopSignals((ENGINE_STOP,), stopping, ignored=STOP_SIGNALS)
    else:
        again = AGAIN_FRONTEND if server.config.engine_socket is not None else AGAIN
        signals = StopSignals(STOP_SIGNALS, stopping, again=again)
    try:
        return await _serve_until_stopped(server, port_file, stop)
    finally:
        signals.ignore()  # the server has stopped: nothing but the exit is left


async def _serve_until_stopped(server: Any, port_file: Path | None, stop: asyncio.Event) -> int:
    from hub.errors import HubError

    try:
        await server.start()
    except HubError as exc:
        log.error("modelhub could not start: %s", exc)
        await server.stop(0)
        return 2
    except Exception as exc:
        log.error("modelhub could not start: %s", exc)
        await server.stop(0)
        return 1
    if port_file is not None:
        from hub.workers.supervisor import write_port_file

        ports: dict[str, Any] = {"grpc": server.grpc_port, "http": server.http_port, "metrics": server.metrics_port}
        if server.config.supervisor is not None:  # its supervisor says where the whole server listens
            ports.update(listening=server.listening, security=server.security)
        write_port_file(port_file, ports)
    signalled, fatal = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.fatal.wait())
    await asyncio.wait((signalled, fatal), return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    fatal.cancel()
    try:
        await server.stop()
    except Exception:
        log.exception("modelhub did not stop cleanly")
        return int(server.exit_code) or 1
    return int(server.exit_code)


# --- plugins and models -------------------------------------------------------------------------


def _host(args: argparse.Namespace) -> Any:
    from hub.plugins.manager import PluginHost

    return PluginHost(args.plugins_dir, entry_points=not args.no_entry_points)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    host = _host(args)
    host.collect_targets()
    host.collect_models()
    described = [record.describe() for record in host.records.values()]
    # A failed plugin, or a refused spec, exits 1 as `modelhub build` does: a CI step that lists
    # the plugins is a check that they load.
    status = 1 if any(record.broken for record in host.records.values()) else 0
    if args.json:
        print(json.dumps(described, indent=2))
        return status
    # The table prints every field of the JSON: one row per plugin, then its location, errors
    # and warnings beneath, so neither view knows something the other does not.
    columns = ["name", "source", "status", "hooks", "models", "targets"]

    def cell(value: str | list[str]) -> str:
        return (", ".join(value) or "-") if isinstance(value, list) else value

    rows = [[cell(d[c]) for c in columns] for d in described]
    print(_table(rows, ["plugin", *columns[1:]]))
    print("\nlocations:")
    for d in described:
        print(f"  {d['name']}: {d['location']}")
    for kind in ("errors", "warnings"):
        notes = [(d["name"], note) for d in described for note in d[kind]]
        if notes:
            print(f"\n{kind}:")
            for name, note in notes:
                print(f"  {name}: {note}")
    return status


def cmd_models_url(args: argparse.Namespace) -> int:
    """`modelhub models --url`: the report as a running server's ModelConfig parameters give it."""
    from hub.pipeline.report import server_reports

    connection = _connect(args)
    if connection is None:
        return 2
    try:
        entries = server_reports(args.url, credentials=connection.grpc_credentials(), metadata=connection.metadata)
    except OSError as exc:
        print(f"modelhub models: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    rows = [
        [
            e["model"],
            e["version"] or "-",
            e["state"],
            e.get("parameters", {}).get("target", e.get("runtime", "")) or "-",
            "-" if e.get("max_batch_size") is None else str(e["max_batch_size"]),
            _remote_report(e),
        ]
        for e in entries
    ]
    print(_table(rows, ["model", "ver", "state", "target", "max_batch", "report"]))
    return 0


def _remote_report(entry: dict[str, Any]) -> str:
    """The report column of `modelhub models --url`: a model that is not READY shows why (its
    config carries no build report, so the summary would only say "not reported")."""
    if entry["state"] != "READY" and entry["reason"]:
        return str(entry["reason"])
    return entry["report"] or entry.get("problem") or entry["reason"] or "-"


def cmd_models(args: argparse.Namespace) -> int:
    from hub.errors import HubError
    from hub.pipeline.builder import Builder
    from hub.pipeline.report import report_parameters, summary

    if args.url:
        return cmd_models_url(args)
    given = [f"--tls-{flag}" for flag in ("ca", "cert", "key") if getattr(args, f"tls_{flag}") is not None]
    if given:  # MODELHUB_MODELS_TLS_* are the client's own: set, they mean a server was meant
        print(
            f"modelhub models: {given[0]} is for --url (a running server); the local listing reads none",
            file=sys.stderr,
        )
        return 2
    host = _host(args)
    targets = host.collect_targets()
    registered = host.collect_models()
    try:
        specs = _deployment(args).override(registered)
    except (HubError, OSError) as exc:
        print(f"modelhub models: {exc}", file=sys.stderr)
        return 2
    builder = Builder(args.model_repository, targets, host, device="cpu")
    entries = []
    other_target = False
    for plugin_spec, spec in zip(registered, specs, strict=True):
        manifest = builder.read_manifest(spec) or {}
        failure = builder.read_failure(spec)
        key = builder.cache_key(spec, targets[spec.target])[0] if spec.target in targets else None
        state = "not built"
        problems = list(manifest.get("validation", {}).get("problems", []))
        built_as = manifest.get("target", spec.target)
        if failure is not None and failure.get("cache_key") == key:  # the last build of these sources raised
            state, problems = "failed (build raised)", [str(failure.get("error", "?"))]
        elif manifest and built_as != spec.target:
            # The one artifact per version was built for another target (a `serve --config`, a
            # `build --target`): its report is that target's, so say whose it is.
            whose = "the plugin's" if spec.target == plugin_spec.target else "--config's"
            state = f"{manifest.get('status', '?')} ({built_as} built; {whose} target is {spec.target})"
            other_target = True
        elif manifest:
            state = f"{manifest.get('status', '?')}{'' if manifest.get('cache_key') == key else ' (stale)'}"
        entries.append(
            {
                "model": spec.name,
                "version": spec.version,
                "plugin": spec.plugin,
                "target": spec.target,
                "max_batch_size": spec.batching.max_batch_size,
                "artifact": state,
                # One account of the build: the figures (report_parameters, as a server's
                # ModelConfig parameters carry them) and their one-line summary.
                "report": summary(report_parameters(manifest)) if manifest else "",
                "report_parameters": report_parameters(manifest),
                "problems": problems,
                "inputs": [f"{t.name} {t.datatype} {list(t.shape)}" for t in spec.inputs],
                "outputs": [f"{t.name} {t.datatype} {list(t.shape)}" for t in spec.outputs],
            }
        )
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0

    rows = [
        [
            e["model"],
            str(e["version"]),
            e["plugin"],
            e["target"],
            str(e["max_batch_size"]),
            e["artifact"],
            ("refused: " + "; ".join(e["problems"]) + " | " if e["problems"] else "") + (e["report"] or "-"),
            "; ".join(e["inputs"]),
            "; ".join(e["outputs"]),
        ]
        for e in entries
    ]
    print(
        _table(
            rows,
            [
                "model",
                "ver",
                "plugin",
                "target",
                "max_batch",
                "artifact",
                "report",
                "inputs",
                "outputs",
            ],
        )
    )
    if other_target and not args.config:
        print(
            "\nan artifact was built for another target than its plugin's: if `serve --config F` (or"
            " `build --config F`) built it, `modelhub models --config F` compares with that config's targets",
            file=sys.stderr,
        )
    failed = [r for r in host.records.values() if r.errors]
    if failed:
        print(f"\n{len(failed)} plugin(s) reported errors; see `modelhub plugins`", file=sys.stderr)
    return 0


# --- clients ------------------------------------------------------------------------------------


def _connect(args: argparse.Namespace) -> Connection | None:
    """The client command's TLS and token flags, checked; None, after one line on stderr
    naming the flag, when they cannot work."""
    try:
        return Connection.from_args(args)
    except FlagError as exc:
        print(f"modelhub {args.command}: {exc}", file=sys.stderr)
        return None


def cmd_infer(args: argparse.Namespace) -> int:
    import grpc

    from hub.datatypes import datatype_of, encode_bytes
    from hub.protocol.generated import grpc_service_pb2 as pb
    from hub.protocol.generated import grpc_service_pb2_grpc as pb_grpc

    connection = _connect(args)
    if connection is None:
        return 2
    request = pb.ModelInferRequest(model_name=args.model, model_version=args.model_version)
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep:
            print(f"--input expects NAME=FILE.npy, got {item!r}", file=sys.stderr)
            return 2
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:  # missing, unreadable, not a .npy, or an object array
            hint = ""
            if "allow_pickle" in str(exc):  # np.save of the README's BYTES array (dtype=object) pickles it
                hint = (
                    "; for a BYTES input save the text as str or bytes, which .npy holds without pickle: "
                    "np.save(FILE, np.array([b'one', b'two'])) (an object array is never unpickled)"
                )
            print(f"--input {name}: cannot read {path!r} as a .npy file: {exc}{hint}", file=sys.stderr)
            return 2
        datatype = datatype_of(array)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(encode_bytes(array) if datatype == "BYTES" else array.tobytes())
    for name in args.output:
        request.outputs.add(name=name)
    with connection.channel(args.url) as channel:
        try:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            response = stub.ModelInfer(request, timeout=args.timeout, metadata=connection.metadata)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    from hub.protocol.client import decode_outputs

    np.set_printoptions(precision=5, suppress=True, threshold=200)
    for name, array in decode_outputs(response).items():
        print(f"{name} {datatype_of(array)} {list(array.shape)}")
        print(array)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            np.save(args.save / f"{name}.npy", array)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    connection = _connect(args)
    if connection is None:
        return 2
    with connection.channel(args.url) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            if not (args.service and exc.code() == grpc.StatusCode.NOT_FOUND):
                print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            status = "NOT_FOUND"
        print(status)
        if args.service:
            for line in _model_states(channel, args.service, args.timeout, connection.metadata):
                print(f"  {line}")
    return 0 if status == "SERVING" else 1


def _model_states(
    channel: Any, name: str, timeout: float, metadata: tuple[tuple[str, str], ...] | None = None
) -> list[str]:
    """Each version of model `name` with its state and reason, from the server's RepositoryIndex
    (which, unlike health, needs the token of a server with --auth-token)."""
    import grpc

    from hub.protocol.generated import grpc_service_pb2 as pb
    from hub.protocol.generated import grpc_service_pb2_grpc as pb_grpc

    try:
        index = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            pb.RepositoryIndexRequest(), timeout=timeout, metadata=metadata
        )
    except grpc.RpcError as exc:
        return [f"model states unavailable: RepositoryIndex: {exc.code().name}: {exc.details()}"]
    versions = [m for m in index.models if m.name == name]
    if not versions:
        known = ", ".join(sorted({m.name for m in index.models})) or "none"
        return [f"no model named '{name}' on this server (models: {known})"]
    return [
        f"model '{m.name}' version {m.version}: {m.state}" + (f" ({m.reason})" if m.reason else "") for m in versions
    ]


def cmd_build(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.console import Console

    from hub import process
    from hub.cli.build import build_all, compare_specs, render
    from hub.errors import HubError
    from hub.server import default_threads, resolve_device

    threads = args.threads or default_threads()
    process.configure(threads, args.model_repository)
    host = _host(args)
    try:
        specs = _deployment(args).apply(host.collect_models())
        device = resolve_device(args.device)
    except (HubError, OSError, ValueError) as exc:
        print(f"modelhub build: {exc}", file=sys.stderr)
        return 2
    repository = args.model_repository
    if args.compare:
        chosen = [s for s in specs if s.name == args.compare]
        if not chosen:
            print(f"modelhub build: no model named '{args.compare}'", file=sys.stderr)
            return 2
        specs = compare_specs(host, chosen[-1])
        repository = repository / ".compare"
    else:
        if args.models:
            unknown = set(args.models) - {s.name for s in specs}
            if unknown:
                print(f"modelhub build: unknown model(s) {sorted(unknown)}", file=sys.stderr)
                return 2
            specs = [s for s in specs if s.name in args.models]
        if args.target:
            specs = [dataclasses.replace(s, target=args.target) for s in specs]
    results = build_all(
        host,
        specs,
        repository,
        device,
        threads,
        force=args.force,
        measure=not args.no_measure,
        skip_unavailable=bool(args.compare),
    )
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        Console(width=200).print(render(results))
    failed = [r for r in results if r["status"] == "failed"]
    for r in failed:
        print(f"\n{r['model']} [{r['target']}]: {r['problem']}", file=sys.stderr)
    for r in results:
        if r["status"] == "skipped":
            print(f"\n{r['model']} [{r['target']}] skipped: {r['reason']}", file=sys.stderr)
    # A plugin that failed to import, or whose specs were refused, has models that are in no row
    # above: said again after the table (the log's line is pages up), and a failed build gate.
    broken = [error for record in host.records.values() if record.broken for error in record.errors]
    for error in broken:
        print(f"\n{error}", file=sys.stderr)
    if args.compare:
        return 0  # a comparison reports failures in the table; it is not a build gate
    return 1 if failed or broken else 0


def cmd_top(args: argparse.Namespace) -> int:
    import http.client
    import ssl
    import urllib.parse

    from hub.top import run

    connection = _connect(args)
    if connection is None:
        return 2
    if connection.tls and urllib.parse.urlsplit(args.metrics_url).scheme != "https":
        print(f"modelhub top: --tls-ca is for an https:// --metrics-url, not {args.metrics_url}", file=sys.stderr)
        return 2
    try:
        return run(args.metrics_url, args.interval, args.once, connection.token, connection.ssl_context)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # unreachable, not speaking HTTP (the gRPC port, say), or a malformed URL or page
        hint = ""
        if isinstance(getattr(exc, "reason", exc), ssl.SSLCertVerificationError) and not connection.tls:
            hint = " (pass the CA that signed the server's certificate with --tls-ca)"
        print(f"modelhub top: cannot read {args.metrics_url}: {exc!r}{hint}", file=sys.stderr)
        return 1
