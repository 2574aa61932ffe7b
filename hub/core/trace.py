"""Triton's trace extension, in Triton's own mode: one request in every `trace_rate` sampled,
at most `trace_count` of them, each written as one JSON line to the server's log (logger
`modelhub.trace`, at info) with the timestamps of its way through the server.

The settings are Triton's (`TraceSetting`, `/v2[/models/M]/trace/setting`), as lists of strings:
global ones, and a model's own, which override them for that model until cleared (a setting
sent as null). `trace_file` is never set by a client: the lines go to the log, for the
container runtime to collect, as the log settings' `log_file` (hub.logs). `trace_level`
`TIMESTAMPS` turns tracing on; `TENSORS` and the `opentelemetry` mode are not offered.

The timestamps (steady-clock nanoseconds, as Triton's): REQUEST_START and REQUEST_END where the
data plane takes and answers the request, COMPUTE_END when the batch's answer reaches it, and
QUEUE_START, COMPUTE_START, COMPUTE_INPUT_END and COMPUTE_OUTPUT_START counted back from there
with the durations the batcher measured for the request's statistics (its queue time and its
batch's input, infer and output stages), which are the figures ModelStatistics adds up.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from hub.errors import InvalidInput

trace_log = logging.getLogger("modelhub.trace")

SETTINGS = ("trace_file", "trace_level", "trace_rate", "trace_count", "log_frequency", "trace_mode")
DEFAULTS: dict[str, list[str]] = {
    "trace_file": [""],
    "trace_level": ["OFF"],
    "trace_rate": ["1000"],
    "trace_count": ["-1"],
    "log_frequency": ["0"],
    "trace_mode": ["triton"],
}
Settings = dict[str, list[str]]


def _integer(name: str, values: list[str], lowest: int) -> None:
    if len(values) != 1 or not re.fullmatch(r"-?[0-9]{1,18}", values[0]) or int(values[0]) < lowest:
        shown = [v[:32] for v in values[:4]]
        raise InvalidInput(f"{name} must be one integer of at least {lowest}, as a string; got {shown!r}")


def check(changes: Mapping[str, object]) -> dict[str, list[str] | None]:
    """The changes a client asks for, each a list of strings or None (clear it), checked:
    InvalidInput naming the setting otherwise. A lone string counts as a list of one."""
    checked: dict[str, list[str] | None] = {}
    for name, value in changes.items():
        shown = str(name)[:64]
        if name not in SETTINGS:
            raise InvalidInput(f"unknown trace setting '{shown}'; the settings are {', '.join(SETTINGS)}")
        if value is None:
            checked[name] = None
            continue
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise InvalidInput(f"{name} must be a string or a list of strings")
        if len(values) > 8:  # every setting takes one value; Triton's a handful at most
            raise InvalidInput(f"{name} has {len(values)} values; a trace setting takes at most 8")
        if name == "trace_file" and values not in ([], [""]):
            raise InvalidInput(
                "trace_file cannot be set by a client: traces are lines of the server's log (logger "
                "modelhub.trace), for the container runtime to collect"
            )
        if name == "trace_level" and (not set(values) <= {"OFF", "TIMESTAMPS"} or len(values) != 1):
            given = [v[:32] for v in values[:4]]
            raise InvalidInput(f"trace_level must be ['OFF'] or ['TIMESTAMPS'] (TENSORS is not offered); got {given!r}")
        if name == "trace_mode" and values != ["triton"]:
            raise InvalidInput("trace_mode must be 'triton' (the opentelemetry mode is not offered)")
        if name in ("trace_rate", "trace_count", "log_frequency"):
            _integer(name, values, {"trace_rate": 1, "trace_count": -1, "log_frequency": 0}[name])
        checked[name] = values or [""]
    return checked


class Tracer:
    """This process's trace settings and sampling. With `--workers N` the model process holds
    the settings and sends them to every frontend (`state`, `load`); each frontend counts its
    own requests for `trace_rate`, and asks the model process for each trace `trace_count`
    allows (`claim`), so the count is the whole server's. `ids` numbers the traces (Triton's
    ids are unique per server): this process's own count by default; every frontend draws from
    one shared counter (hub/workers/counter.py)."""

    def __init__(self, ids: Callable[[], int] | None = None) -> None:
        self._global: Settings = {k: list(v) for k, v in DEFAULTS.items()}
        self._models: dict[str, Settings] = {}
        self._seen: dict[str, int] = {}  # requests per model since its rate last changed
        self._left: dict[str, int] = {}  # traces left per model (trace_count; -1: no limit)
        self._ids = ids or itertools.count(1).__next__
        #: Whether any setting traces at all: the one check a request pays while none does.
        self.active = False

    def settings(self, model: str = "") -> Settings:
        """The settings that apply to `model` ("" for the global ones), with `trace_count` as
        what is left of it, as Triton reports it."""
        merged = {**self._global, **self._models.get(model, {})}
        count = self._left.get(model if model in self._models else "")
        if count is not None:
            merged["trace_count"] = [str(count)]
        return {k: list(v) for k, v in merged.items()}

    def update(self, model: str, changes: Mapping[str, object]) -> Settings:
        """Apply checked changes to the global settings (model "") or a model's own; the
        settings that now apply there."""
        checked = check(changes)
        target = self._global if not model else self._models.setdefault(model, {})
        for name, values in checked.items():
            if values is not None:
                target[name] = values
            elif model:
                target.pop(name, None)
            else:
                target[name] = list(DEFAULTS[name])
        if model and not target:
            del self._models[model]
        self._recount()
        return self.settings(model)

    def _recount(self) -> None:
        self._seen.clear()
        self._left.clear()
        self.active = self._global["trace_level"] == ["TIMESTAMPS"] or any(
            s.get("trace_level") == ["TIMESTAMPS"] for s in self._models.values()
        )

    def state(self) -> dict[str, Any]:
        """What a frontend needs to trace as the model process does (sent over the wire)."""
        return {"global": self._global, "models": self._models}

    def load(self, state: Mapping[str, Any]) -> None:
        self._global = {k: list(v) for k, v in state["global"].items()}
        self._models = {m: {k: list(v) for k, v in s.items()} for m, s in state["models"].items()}
        self._recount()

    def _scope(self, model: str) -> tuple[str, Settings]:
        """Whose counts a request to `model` uses: its own when it has settings of its own, else
        the global ones (shared by the other models); and the settings that apply."""
        own = self._models.get(model)
        return (model if own else ""), {**self._global, **(own or {})}

    def sample(self, model: str) -> bool:
        """Whether this request to `model` falls on the rate. Whether a trace is left to write
        is `claim`'s (in the model process, with `--workers N`); its id, `new_id`'s."""
        scope, settings = self._scope(model)
        if settings["trace_level"] != ["TIMESTAMPS"]:
            return False
        seen = self._seen.get(scope, 0) + 1
        self._seen[scope] = seen
        return not seen % int(settings["trace_rate"][0])

    def new_id(self) -> int:
        """The next trace id (drawn once a trace is sure to be written: ids have no gaps)."""
        return self._ids()

    def limited(self, model: str) -> bool:
        """Whether traces of `model` are counted (trace_count is not -1)."""
        return self._scope(model)[1]["trace_count"] != ["-1"]

    def claim(self, model: str) -> bool:
        """Take one of the traces left for `model`'s scope: False when none is."""
        scope, settings = self._scope(model)
        left = self._left.get(scope, int(settings["trace_count"][0]))
        if left == 0:
            return False
        self._left[scope] = left - 1 if left > 0 else left
        return True


def write(
    trace_id: int,
    model: str,
    version: int,
    request_id: str,
    started_ns: int,
    computed_ns: int | None,
    durations: tuple[int, int, int, int] | None,
) -> None:
    """One traced request's line: `durations` are its queue time and its batch's input, infer
    and output stages (None when it failed before computing)."""
    stamps = [("REQUEST_START", started_ns)]
    if computed_ns is not None and durations is not None:
        queue, compute_input, infer, output = durations
        compute_start = computed_ns - compute_input - infer - output
        stamps += [
            ("QUEUE_START", compute_start - queue),
            ("COMPUTE_START", compute_start),
            ("COMPUTE_INPUT_END", compute_start + compute_input),
            ("COMPUTE_OUTPUT_START", computed_ns - output),
            ("COMPUTE_END", computed_ns),
        ]
    stamps.append(("REQUEST_END", time.monotonic_ns()))
    line = {
        "id": trace_id,
        "model_name": model,
        "model_version": version,
        "request_id": request_id,
        "timestamps": [{"name": name, "ns": ns} for name, ns in stamps],
    }
    trace_log.info("%s", json.dumps(line, separators=(",", ":")))
