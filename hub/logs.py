"""Logging setup: one line per event, readable text by default or JSON (`--log-format json`),
and the libraries' chatter moved to our own loggers at DEBUG."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

#: torch.onnx's exporter warns once per torchvision op it cannot register (nms, roi_align,
#: roi_pool, ps_roi_align...) on every export; modelhub never needs torchvision.
TORCH_ONNX_REGISTRATION = "torch.onnx._internal.exporter._registration"
#: ONNX Runtime's quantizer logs through the root logger (`logging.info(...)`), so its lines
#: would appear as "root" and pass any level set on its own loggers.
ORT_QUANTIZATION_PATH = f"{os.sep}onnxruntime{os.sep}quantization{os.sep}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
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
            logger.addFilter(Demote("modelhub.build.libraries", matches))


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The ONNX exporter's passes log every step at INFO; one line per event means ours.
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    tame_libraries()


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
