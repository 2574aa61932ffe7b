"""`modelhub top`: a terminal view of a running server, for the operator without Grafana.

Polls the server's /metrics and ModelStatistics and shows, per model: request and error rate,
p50/p99 latency (from the histograms, over the last interval), average batch size, queue depth
and in-flight requests, and state.
"""

from __future__ import annotations

import math
import ssl
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, str]  # (model, version)


@dataclass
class Snapshot:
    at: float
    counters: dict[tuple[str, Key], float] = field(default_factory=dict)
    gauges: dict[tuple[str, Key], float] = field(default_factory=dict)
    buckets: dict[Key, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    states: dict[Key, str] = field(default_factory=dict)
    errors: dict[Key, float] = field(default_factory=lambda: defaultdict(float))


def scrape(url: str, timeout: float = 5.0, token: str | None = None, context: ssl.SSLContext | None = None) -> Snapshot:
    """One read of the metrics page; `token` for a server whose /metrics needs --auth-token,
    `context` (its CA, and a client certificate for mutual TLS) for one on https."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    text = urllib.request.urlopen(request, timeout=timeout, context=context).read().decode()
    snap = Snapshot(at=time.monotonic())
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if "model" not in labels:
                continue
            key = (labels["model"], labels.get("version", ""))
            name = sample.name
            if name == "modelhub_requests_total":
                snap.counters[("requests", key)] = snap.counters.get(("requests", key), 0.0) + sample.value
                if labels.get("code") != "OK":
                    snap.errors[key] += sample.value
            elif name in ("modelhub_inferences_total", "modelhub_executions_total"):
                snap.counters[(name, key)] = sample.value
            elif name == "modelhub_request_duration_seconds_bucket":
                snap.buckets[key].append((float(labels["le"]), sample.value))
            elif name in ("modelhub_queue_depth", "modelhub_inflight_requests"):
                snap.gauges[(name, key)] = sample.value
            elif name == "modelhub_model_state" and sample.value == 1:
                snap.states[key] = labels["state"]
    return snap


def quantile(q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float | None:
    """histogram_quantile over the increase between two scrapes (linear within a bucket)."""
    old = dict(before)
    increase = sorted((le, count - old.get(le, 0.0)) for le, count in after)
    if not increase or increase[-1][1] <= 0:
        return None
    rank = q * increase[-1][1]
    lower, seen = 0.0, 0.0
    for le, count in increase:
        if count >= rank:
            if math.isinf(le):
                return lower
            width = count - seen
            return lower + (le - lower) * ((rank - seen) / width if width else 1.0)
        lower, seen = le, count
    return None


def rows(before: Snapshot, after: Snapshot) -> list[dict[str, Any]]:
    dt = max(after.at - before.at, 1e-9)
    out = []
    for key in sorted(after.states):

        def delta(name: str, key: Key = key) -> float:
            return after.counters.get((name, key), 0.0) - before.counters.get((name, key), 0.0)

        executions = delta("modelhub_executions_total")
        p50 = quantile(0.5, before.buckets.get(key, []), after.buckets.get(key, []))
        p99 = quantile(0.99, before.buckets.get(key, []), after.buckets.get(key, []))
        out.append(
            {
                "model": key[0],
                "version": key[1],
                "state": after.states[key],
                "rate": delta("requests") / dt,
                "errors": (after.errors.get(key, 0.0) - before.errors.get(key, 0.0)) / dt,
                "p50_ms": None if p50 is None else p50 * 1e3,
                "p99_ms": None if p99 is None else p99 * 1e3,
                "batch": delta("modelhub_inferences_total") / executions if executions else None,
                "queue": after.gauges.get(("modelhub_queue_depth", key), 0.0),
                "in_flight": after.gauges.get(("modelhub_inflight_requests", key), 0.0),
            }
        )
    return out


def render(table_rows: list[dict[str, Any]], url: str) -> Any:
    from rich.table import Table

    table = Table(title=f"modelhub top: {url}", title_justify="left")
    for column in ("model", "ver", "state", "req/s", "err/s", "p50 ms", "p99 ms", "batch", "queue", "in flight"):
        table.add_column(column, justify="left" if column in ("model", "state") else "right", no_wrap=True)

    def fmt(value: float | None, spec: str = ".1f") -> str:
        return "-" if value is None else format(value, spec)

    for r in table_rows:
        table.add_row(
            r["model"],
            r["version"],
            r["state"],
            fmt(r["rate"]),
            fmt(r["errors"]),
            fmt(r["p50_ms"], ".2f"),
            fmt(r["p99_ms"], ".2f"),
            fmt(r["batch"]),
            fmt(r["queue"], ".0f"),
            fmt(r["in_flight"], ".0f"),
        )
    return table


def run(url: str, interval: float, once: bool, token: str | None = None, context: ssl.SSLContext | None = None) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    piped = not console.is_terminal
    if piped:  # do not squeeze the table into 80 columns
        console = Console(width=160)
    before = scrape(url, token=token, context=context)
    if once or piped:  # piped or captured: a table per interval (a live view would print only at its end)
        while True:
            time.sleep(interval)
            after = scrape(url, token=token, context=context)
            console.print(render(rows(before, after), url))
            if once:
                return 0
            before = after
    with Live(render([], url), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            after = scrape(url, token=token, context=context)
            live.update(render(rows(before, after), url))
            before = after
