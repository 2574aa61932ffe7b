"""Logging setup: one line per event, readable text by default or JSON (`--log-format json`),
and the libraries' chatter moved to our own loggers at DEBUG."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from hub.errors import InvalidInput, Unsupported

#: Where the libraries' chatter goes, at DEBUG.
LIBRARIES = "modelhub.build.libraries"
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

#: torch.onnx's exporter warns once per torchvision op it cannot register (nms, roi_align,
#: roi_pool, ps_roi_align...) on every export; modelhub never needs torchvision.
TORCH_ONNX_REGISTRATION = "torch.onnx._internal.exporter._registration"
#: ONNX Runtime's quantizer logs through the root logger (`logging.info(...)`), so its lines
#: would appear as "root" and pass any level set on its own loggers.
ORT_QUANTIZATION_PATH = f"{os.sep}onnxruntime{os.sep}quantization{os.sep}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line; `process` (a process of --workers N: "supervisor", "frontend 0",
    "model process") goes in a field of that name."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
        }
        if self.process:
            entry["process"] = self.process
        entry["logger"] = record.name
        entry["msg"] = record.getMessage()
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class Demote(logging.Filter):
    """A logger filter that re-emits the records it matches on `target` at DEBUG, and drops
    them where they were logged.

    A logger's filters see only the records logged on that very logger (not its children's),
    which is what is wanted: on the root logger it catches `logging.info(...)` calls.
    """

    def __init__(self, target: str, matches: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.target = target
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.matches(record):
            return True
        target = logging.getLogger(self.target)
        if target.isEnabledFor(logging.DEBUG):
            moved = logging.makeLogRecord(vars(record))
            moved.name, moved.levelno, moved.levelname = self.target, logging.DEBUG, "DEBUG"
            target.handle(moved)
        return False


class Summarise(logging.Filter):
    """A logger filter that drops the records it matches and logs, for each, one line of its
    own on `target` at `level`, at most 5 in 10 s (Throttle): for a library's line that a
    client can cause at will. `matches` gives the line's arguments, or None for a record it
    leaves alone."""

    def __init__(
        self,
        target: str,
        level: int,
        message: str,
        matches: Callable[[logging.LogRecord], tuple[object, ...] | None],
    ) -> None:
        super().__init__()
        self.target = target
        self.level = level
        self.message = message
        self.matches = matches
        self.throttle = Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        args = self.matches(record)
        if args is None:
            return True
        self.throttle(logging.getLogger(self.target), self.level, self.message, *args)
        return False


def _from_ort_quantization(record: logging.LogRecord) -> bool:
    return ORT_QUANTIZATION_PATH in record.pathname


def _torchvision_missing(record: logging.LogRecord) -> bool:
    return isinstance(record.msg, str) and record.msg.startswith("torchvision is not installed")


def tame_libraries() -> None:
    """Move the export and quantisation chatter of torch.onnx and ONNX Runtime to
    `modelhub.build.libraries` at DEBUG. Idempotent; process-wide, as logging is."""
    for logger_name, matches in (("", _from_ort_quantization), (TORCH_ONNX_REGISTRATION, _torchvision_missing)):
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, Demote) and f.matches is matches for f in logger.filters):
            logger.addFilter(Demote(LIBRARIES, matches))


class ThreadStderr(io.TextIOBase):
    """sys.stderr once a build has captured library output: what a capturing thread writes
    (torch.export's graph dumps are `print(..., file=sys.stderr)`; a torch handler created
    while it captured holds this stream) is kept for the log at DEBUG, and every other thread's
    goes to the stream it replaced. Per thread, so that a server's other threads, or another
    build, are never captured."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream
        self.buffers: dict[int, list[str]] = {}

    def write(self, text: str) -> int:
        buffer = self.buffers.get(threading.get_ident())
        if buffer is None:
            return int(self.stream.write(text))
        buffer.append(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return int(self.stream.fileno())

    def isatty(self) -> bool:
        return bool(self.stream.isatty())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.stream, "encoding", "utf-8"))

    def __getattr__(self, name: str) -> Any:  # `buffer`, `errors`, ...: the real stream's
        return getattr(self.stream, name)


class TorchToDebug(logging.Filter):
    """On torch's own stderr handlers (its loggers do not propagate to ours, and print in
    glog's layout): a record logged by a thread that captures library output moves to
    LIBRARIES at DEBUG; every other thread's passes as torch prints it."""

    def filter(self, record: logging.LogRecord) -> bool:
        stderr = sys.stderr
        if not isinstance(stderr, ThreadStderr) or record.thread not in stderr.buffers:
            return True
        target = logging.getLogger(LIBRARIES)
        if target.isEnabledFor(logging.DEBUG):
            moved = logging.makeLogRecord(vars(record))
            moved.msg, moved.args = f"{record.name}: {record.getMessage()}", None
            moved.name, moved.levelno, moved.levelname = LIBRARIES, logging.DEBUG, "DEBUG"
            target.handle(moved)
        return False


def _torch_stderr_handlers() -> list[logging.Handler]:
    """The stderr handlers torch's logging puts on its `torch.*` loggers."""
    found: list[logging.Handler] = []
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (name == "torch" or name.startswith("torch.")) and isinstance(logger, logging.Logger):
            # Exactly StreamHandler: not a FileHandler, nor torch's structured-trace handler
            # (which writes only under TORCH_TRACE, and sees every trace event at DEBUG).
            found += [h for h in logger.handlers if type(h) is logging.StreamHandler]
    return found


@contextlib.contextmanager
def library_output_at_debug() -> Iterator[None]:
    """While a build runs in this thread: torch's log records (fake_tensor's errors, dynamo's
    graph-break warnings) and what libraries print to sys.stderr (torch.export's graph dumps)
    go to LIBRARIES at DEBUG, so that a failed build shows its one line, and `--log-level debug`
    shows the rest. Not captured: C++ code writing to file descriptor 2 itself (c10's glog-style
    lines, ONNX Runtime's own log), which only redirecting the descriptor would catch, for
    every thread of the process at once, our log's included."""
    stderr = sys.stderr
    if not isinstance(stderr, ThreadStderr):
        stderr = ThreadStderr(stderr)
        sys.stderr = stderr
    for handler in _torch_stderr_handlers():
        if not any(isinstance(f, TorchToDebug) for f in handler.filters):
            handler.addFilter(TorchToDebug())
    ident = threading.get_ident()
    outer = stderr.buffers.get(ident)
    buffer: list[str] = []
    stderr.buffers[ident] = buffer
    try:
        yield
    finally:
        if outer is None:
            del stderr.buffers[ident]
        else:
            stderr.buffers[ident] = outer
        text = "".join(buffer).strip("\n")
        if text:
            logging.getLogger(LIBRARIES).debug("stderr:\n%s", text)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def text_format(process: str = "") -> str:
    """TEXT_FORMAT, with the process in brackets before the logger's name when it has one
    (`[frontend 0] modelhub.frontend: ...`): the processes of --workers N share one stderr."""
    if not process:
        return TEXT_FORMAT
    return TEXT_FORMAT.replace("%(name)s", f"[{process.replace('%', '%%')}] %(name)s")


#: The ONNX exporter's passes log every step at INFO; one line per event means ours.
NOISY = ("onnx_ir", "onnxscript", "torch.onnx")


class LevelSwitch(logging.Filter):
    """Triton's severity switches on the server's log: info, warning and error lines each on
    or off, and DEBUG lines on while the verbose level is above 0."""

    def __init__(self, level: str = "info") -> None:
        super().__init__()
        number = logging.getLevelName(level.upper())
        self.info = number <= logging.INFO
        self.warning = number <= logging.WARNING
        self.error = True
        self.verbose = 1 if number <= logging.DEBUG else 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return self.error
        if record.levelno >= logging.WARNING:
            return self.warning
        if record.levelno >= logging.INFO:
            return self.info
        return self.verbose > 0

    def floor(self) -> int:
        """The lowest level a line may have and pass (the root logger's level, so that what
        would be dropped is not formatted first)."""
        for on, level in (
            (self.verbose > 0, logging.DEBUG),
            (self.info, logging.INFO),
            (self.warning, logging.WARNING),
        ):
            if on:
                return level
        return logging.ERROR if self.error else logging.CRITICAL + 1


class ServerLogHandler(logging.StreamHandler):
    """The server's one log handler (stderr), with its LevelSwitch, and the name of the
    process in every line once `name_process` has given it one."""

    def __init__(self, level: str, fmt: str) -> None:
        # Our lines go out from any thread, a building one too (not into its capture).
        stderr = sys.stderr
        super().__init__(stderr.stream if isinstance(stderr, ThreadStderr) else stderr)
        self.switch = LevelSwitch(level)
        self.addFilter(self.switch)
        self.process = ""
        self.set_format(fmt)

    def set_format(self, fmt: str) -> None:
        self.setFormatter(
            JsonFormatter(self.process) if fmt == "json" else logging.Formatter(text_format(self.process))
        )

    @property
    def format_name(self) -> str:
        return "json" if isinstance(self.formatter, JsonFormatter) else "text"


def _apply_floor(switch: LevelSwitch) -> None:
    root = logging.getLogger()
    root.setLevel(switch.floor())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = ServerLogHandler(level, fmt)
    logging.getLogger().handlers[:] = [handler]
    _apply_floor(handler.switch)
    tame_libraries()


def name_process(process: str) -> None:
    """Name this process in every line `configure`'s handler writes from now on, whichever
    format a client switches it to: the processes of `serve --workers N` (the supervisor, each
    frontend, the model process) write to one stderr, where identical lines were otherwise
    told apart by nothing."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ServerLogHandler):
            handler.process = process
            handler.set_format(handler.format_name)


#: Triton's logging extension's settings (`/v2/logging`, the LogSettings RPC), in its order.
LOG_SETTINGS = ("log_file", "log_info", "log_warning", "log_error", "log_verbose_level", "log_format")
LOG_FORMATS = ("text", "json")
_SWITCHES = {"log_info": "info", "log_warning": "warning", "log_error": "error"}


def check_log_settings(changes: Mapping[str, object]) -> dict[str, bool | int | str]:
    """The changes a client asks for, checked: InvalidInput naming the setting otherwise."""
    checked: dict[str, bool | int | str] = {}
    for name, value in changes.items():
        shown = str(name)[:64]
        if name not in LOG_SETTINGS:
            raise InvalidInput(f"unknown log setting '{shown}'; the settings are {', '.join(LOG_SETTINGS)}")
        if name == "log_file":
            if value != "":
                raise InvalidInput(
                    "log_file cannot be set by a client: the server logs to its standard error, for the "
                    "container runtime to collect (a client-chosen file the server appends to was Triton's "
                    "CVE-2024-0087)"
                )
        elif name in _SWITCHES:
            if not isinstance(value, bool):
                raise InvalidInput(f"{name} must be true or false")
        elif name == "log_verbose_level":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
                raise InvalidInput("log_verbose_level must be an integer from 0 (off) to 2^32-1 (above 0: debug lines)")
        elif value not in LOG_FORMATS:  # log_format
            raise InvalidInput(
                f"log_format must be one of {', '.join(LOG_FORMATS)} (Triton's 'default' and 'ISO8601' are its "
                "own text layouts; ours is 'text')"
            )
        checked[name] = value
    return checked


NOT_CONFIGURED = (
    "this server's process logs through its embedder's handlers, not modelhub's: its log settings are theirs"
)


class LogSettings:
    """Triton's logging extension over this process's log (process-wide, as logging is): the
    handler `configure` installed. A process that never called it (a library embedding the
    Server) has no such handler, and its log is its own: `available()` is False there."""

    @staticmethod
    def _handler() -> ServerLogHandler | None:
        return next((h for h in logging.getLogger().handlers if isinstance(h, ServerLogHandler)), None)

    def available(self) -> bool:
        return self._handler() is not None

    def current(self) -> dict[str, bool | int | str]:
        handler = self._handler()
        if handler is None:
            raise Unsupported(NOT_CONFIGURED)
        switch = handler.switch
        return {
            "log_file": "",
            "log_info": switch.info,
            "log_warning": switch.warning,
            "log_error": switch.error,
            "log_verbose_level": switch.verbose,
            "log_format": handler.format_name,
        }

    def apply(self, changes: Mapping[str, object], *, announce: bool = True) -> dict[str, bool | int | str]:
        """Check every change, then make them all (none when one is refused); the settings now.
        `announce`: log what changed (once per server: not again in each frontend process)."""
        handler = self._handler()
        if handler is None:
            raise Unsupported(NOT_CONFIGURED)
        checked = check_log_settings(changes)
        before = self.current()
        for name, value in checked.items():
            if name in _SWITCHES:
                setattr(handler.switch, _SWITCHES[name], value)
            elif name == "log_verbose_level":
                handler.switch.verbose = int(value)
            elif name == "log_format":
                handler.set_format(str(value))
        _apply_floor(handler.switch)
        after = self.current()
        if announce and after != before:
            changed = {k: v for k, v in after.items() if before[k] != v}
            logging.getLogger("modelhub.logging").warning("log settings changed: %s", changed)
        return after

    async def update(self, changes: Mapping[str, object]) -> dict[str, bool | int | str]:
        return self.apply(changes)


class Throttle:
    """At most `burst` lines per `interval` seconds from one call site, for what a client can
    make us log at will (undecodable requests): a flood of bad requests must not flood the
    log. The next line let through says how many were held back."""

    def __init__(self, burst: int = 5, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._window = -float("inf")
        self._lines = 0
        self._held = 0

    def __call__(self, logger: logging.Logger, level: int, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._window >= self.interval:
            self._window, self._lines = now, 0
        if self._lines >= self.burst:
            self._held += 1
            return
        self._lines += 1
        if self._held:
            message += " (%d more like it in the last %.0fs not logged)"
            args = (*args, self._held, self.interval)
            self._held = 0
        logger.log(level, message, *args)
