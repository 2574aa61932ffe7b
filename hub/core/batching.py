"""The per-model dynamic batcher: a queue, a scheduler task on the event loop, and worker
threads that run one batch each."""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import resource
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from hub.core.stats import BatchRecord
from hub.errors import DeadlineExceeded, HubError, ModelExecutionError, ModelUnavailable, QueueFull, device_lost
from hub.spec import BatchPolicy

log = logging.getLogger("modelhub.batching")

Arrays = dict[str, np.ndarray]
#: What a worker returns for one batch: each request's outputs, then the input, infer and
#: output stage times in nanoseconds (wall), then the CPU time of the thread that ran it.
BatchResult = tuple[list[Arrays], int, int, int, int]


@dataclass(frozen=True)
class Delivery:
    """One request's answer from the batcher: its own rows of the outputs, and what its
    statistics need (counted by whoever answers the client: ModelStats.request_succeeded)."""

    outputs: Arrays
    inferences: int  # rows (1 per request for a model that does not batch)
    queue_ns: int
    batch: BatchRecord


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Time as the batcher sees it; tests inject a fake one."""

    def now(self) -> float:
        """Monotonic seconds."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` on the event loop after `delay` seconds."""


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)


_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)  # Linux only


class BatchObserver(Protocol):
    """Receives what the batcher measures (the server's Prometheus metrics implement it)."""

    def queued(self, depth: int) -> None: ...

    def batch_done(self, rows: int, queue_seconds: Sequence[float], compute_seconds: float) -> None: ...


class _NoObserver:
    def queued(self, depth: int) -> None:
        pass

    def batch_done(self, rows: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        pass


class _Workers:
    """Compute threads of one model. Lighter than run_in_executor: one queue put to start a
    batch and one call_soon_threadsafe to finish it, with no futures chained in between."""

    def __init__(self, count: int, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], object], Callable[[object, BaseException | None], None]] | None
        ]
        self._jobs = queue.SimpleQueue()
        self._loop = loop
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run `job()` in a worker; then `done(result, error)` on the event loop."""
        self._jobs.put((job, done))

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, done = item
            try:
                result, error = job(), None
            except BaseException as exc:  # delivered to the requests, never lost
                result, error = None, exc
            try:
                self._loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:  # the loop closed under us: nobody is waiting any more
                return
            # This frame lives as long as the thread: holding the last batch (its inputs, or an
            # error whose traceback reaches them) until the next one arrives would pin it.
            item = job = done = result = error = None  # type: ignore[assignment]

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


@dataclass(eq=False)
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    signature: tuple[object, ...]
    deadline: float | None
    enqueued: float
    request_id: str
    future: asyncio.Future[Delivery] = field(repr=False)


class Batcher:
    """Turns concurrent requests for one model version into batched forwards.

    - Requests that carry their own batch (leading dim n) are concatenated along dim 0 up to
      `max_batch_size`, never split, and only with requests whose other dims match, except
      the dims of inputs named in `padding`: shorter ones are padded with that value to the
      batch's longest (token ids with an attention mask, say).
    - A batch is dispatched when an instance is free and: it reached the largest preferred
      size (or `max_batch_size`); or it sits at a preferred size with nothing else queued; or
      the next request cannot join it; or its oldest request has waited `max_queue_delay`.
      Requests that arrive while every instance is busy gather into the next batch.
    - Deadlines are absolute monotonic times; a request past its deadline is answered with
      DeadlineExceeded and never computed. Cancelled requests leave the queue.
    - A failing forward fails every request of its batch; the next batch runs normally.
    - Up to `instances` batches run at once, each in a worker thread, while the event loop
      keeps accepting and queueing.

    Scheduling is a callback (`_pump`) run on the event loop whenever something changes: a
    request arrives (coalesced to once per loop iteration, so that requests received together
    batch together), a batch finishes, or the queue delay runs out. No scheduler task, no
    polling.

    The adaptive queue delay (`adaptive_delay`, for a policy without a `max_queue_delay`):
    under load, requests to a cheap model reach the batcher one at a time (the next ones are
    still in grpc's buffers while this one computes), so without a delay nearly every batch is
    of one request and pays a whole runtime call and hand-off. A fixed delay fixes that and
    costs every request at low load the whole delay. Here the batcher waits only while waiting
    pays: now and then (`_FIRST_PROBE` requests at first, doubling after each miss up to
    `_LAST_PROBE`) a request that finds it idle waits up to `adaptive_delay` for others; a
    wait that gathered at least `_GATHER_REQUESTS` requests (or the batch target, if smaller)
    turns waiting on, and `_GATHER_MISSES` waits in a row that gathered fewer turn it off again. Counting the
    requests accepted cannot tell: the ones a wait gathers are not read yet when it starts.
    A waiting batch goes as soon as it is as big as the biggest of the last `_GATHERS_KEPT`:
    with a few clients each waiting for its answer (concurrency 4, say), no more come, and
    waiting out the whole delay would cap them at a batch per delay.
    """

    def __init__(
        self,
        name: str,
        policy: BatchPolicy,
        compute: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
        *,
        clock: Clock | None = None,
        observer: BatchObserver | None = None,
        padding: Mapping[str, float] | None = None,
        inline_below: float = 0.0,
        adaptive_delay: float = 0.0,
        on_device_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        #: Told (on the loop) when a batch fails with a sticky CUDA error (hub.errors.device_lost).
        self._on_device_lost = on_device_lost
        self.policy = policy
        self._compute = compute
        self._clock = clock or MonotonicClock()
        self._observer = observer or _NoObserver()
        self._padding = dict(padding or {})
        self._queue: collections.deque[_Pending] = collections.deque()
        self._free = policy.instances
        self._workers: _Workers | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_pending = False
        self._timer: Timer | None = None
        self._idle = asyncio.Event()
        self._closing = False
        self._target = max(policy.preferred_batch_sizes, default=policy.max_batch_size)
        self._preferred = frozenset(policy.preferred_batch_sizes)
        self._batching = policy.batching  # read per request: a property call each time otherwise
        # The inline path (see `submit`): the measured compute seconds of a batch by its rows,
        # and the bound below which a batch runs on the loop.
        self._inline_below = inline_below if policy.max_queue_delay == 0 else 0.0
        self._cost: dict[int, float] = {}
        #: Sizes kept off the loop because a run there waited (`_on_loop`): their runs in a worker
        #: since, and the shortest of them (`_come_back`).
        self._waits: dict[int, tuple[int, float]] = {}
        self._waited: dict[int, int] = {}  # sizes whose last runs on the loop waited, and how many in a row
        # The adaptive queue delay (see the class): its bound, whether batches wait now (and
        # whether only as a probe, not yet paid for), requests to the next probe, the interval.
        self._adaptive = adaptive_delay if policy.max_queue_delay == 0 and policy.batching else 0.0
        self._delay = policy.max_queue_delay  # the queue delay in force
        self._gathering = self._probing = False
        self._probe_in = self._probe_every = _FIRST_PROBE
        self._misses = 0
        self._enough = min(_GATHER_REQUESTS, self._target)
        self._gathers: collections.deque[int] = collections.deque(maxlen=_GATHERS_KEPT)  # rows, newest last
        self._expect = self._target  # a waiting batch this big is as big as recent ones got: it goes

    # --- public ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._workers = _Workers(self.policy.instances, f"model-{self.name}", self._loop)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Batches computing right now."""
        return self.policy.instances - self._free

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        rows: int = 1,
        signature: tuple[object, ...] = (),
        timeout: float | None = None,
        request_id: str = "",
    ) -> Delivery:
        """Queue one request and wait for its outputs (exactly its own rows).

        `timeout` (seconds) bounds the wait in the queue; None takes the policy's default.

        The inline path: a batch of a size measured to compute in under `inline_below`
        seconds runs on the event loop instead of a worker thread. A worker's hand-off (a
        queue put, a wake-up, `call_soon_threadsafe`, and the handler suspending and resuming
        inside grpc.aio) costs more CPU than such a batch. When nothing is queued or
        computing, such a request runs right here and `submit` returns without suspending; a
        queue delay in the policy turns the inline path off, and so does the adaptive delay
        while it waits (batches it gathers still run on the loop when their size is cheap).
        """
        if self._admit(rows):
            return self._run_alone(inputs, rows, request_id)
        pending = self._enqueue(inputs, rows, signature, timeout, request_id)
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The client went away: leave the queue if the request is still in it.
            try:
                self._queue.remove(pending)
            except ValueError:
                pass
            raise

    def enqueue(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        rows: int = 1,
        signature: tuple[object, ...] = (),
        timeout: float | None = None,
        request_id: str = "",
    ) -> asyncio.Future[Delivery]:
        """`submit` for a caller that answers from a callback instead of awaiting: the model
        process of `--workers N` (hub/workers/engine.py), which then needs no task per request.
        The future is done at once when the request ran inline. `withdraw` cancels it."""
        if self._admit(rows):
            assert self._loop is not None
            future: asyncio.Future[Delivery] = self._loop.create_future()
            try:
                future.set_result(self._run_alone(inputs, rows, request_id))
            except HubError as exc:
                future.set_exception(exc)
            return future
        return self._enqueue(inputs, rows, signature, timeout, request_id).future

    def withdraw(self, *futures: asyncio.Future[Delivery]) -> None:
        """Cancel requests `enqueue` queued: they leave the queue, in one pass over it however
        many there are (a frontend that went away takes all of its own), or, when a batch is
        already computing them, their rows are dropped. Done ones are left alone."""
        cancelled = [future.cancel() for future in futures]  # False for a done one
        if not any(cancelled):
            return
        kept = [pending for pending in self._queue if not pending.future.done()]  # queued: only cancelled are done
        if len(kept) != len(self._queue):
            self._queue = collections.deque(kept)
            self._observer.queued(len(self._queue))

    def _admit(self, rows: int) -> bool:
        """Refuse a request the batcher cannot take; whether it runs inline, alone (see `submit`)."""
        if self._closing or self._loop is None:
            raise ModelUnavailable(f"model '{self.name}' is {'unloading' if self._closing else 'not started'}")
        if self.policy.max_queue_size and len(self._queue) >= self.policy.max_queue_size:
            raise QueueFull(f"model '{self.name}': queue is full ({self.policy.max_queue_size} requests waiting)")
        if self._adaptive and not self._gathering:
            self._probe_in -= 1
            if self._probe_in <= 0:
                self._gathering = self._probing = True
                self._delay = self._adaptive
        return (
            not self._gathering
            and not self._queue
            and self._free == self.policy.instances
            and self._cheap(rows if self._batching else 1)
        )

    def _enqueue(
        self,
        inputs: Mapping[str, np.ndarray],
        rows: int,
        signature: tuple[object, ...],
        timeout: float | None,
        request_id: str,
    ) -> _Pending:
        assert self._loop is not None
        now = self._clock.now()
        if timeout is None:
            timeout = self.policy.timeout
        future: asyncio.Future[Delivery] = self._loop.create_future()
        pending = _Pending(inputs, rows, signature, None if timeout is None else now + timeout, now, request_id, future)
        self._queue.append(pending)
        self._observer.queued(len(self._queue))
        if not self._pump_pending:
            self._pump_pending = True
            self._loop.call_soon(self._pump)
        return pending

    async def close(self, drain: bool = True) -> None:
        """Stop taking requests; finish what is queued and running (or fail it), then stop."""
        self._closing = True
        if not drain:
            while self._queue:
                self._fail(self._queue.popleft(), ModelUnavailable(f"model '{self.name}' is unloading"))
        while self._queue or self.in_flight:
            self._idle.clear()
            self._pump()
            await self._idle.wait()
        if self._timer is not None:
            self._timer.cancel()
        if self._workers is not None:
            self._workers.stop()

    # --- scheduling -----------------------------------------------------------------------

    def _pump(self) -> None:
        """Dispatch every batch that is due while an instance is free; else arm the delay timer."""
        self._pump_pending = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._free > 0:
            batch = self._next_batch()
            if batch is None:
                break
            if self._cheap(self._rows(batch)):
                self._run_inline(batch)
            else:
                self._dispatch(batch)
        self._observer.queued(len(self._queue))
        if not self._queue and not self.in_flight:
            self._idle.set()

    def _head(self) -> _Pending | None:
        """The oldest request still wanted; requests past their deadline are answered on the way."""
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # cancelled
                self._queue.popleft()
            elif pending.deadline is not None and self._clock.now() >= pending.deadline:
                self._queue.popleft()
                self._fail(
                    pending,
                    DeadlineExceeded(
                        f"model '{self.name}': request deadline passed after "
                        f"{self._clock.now() - pending.enqueued:.3f}s in the queue"
                    ),
                )
            else:
                return pending
        return None

    def _next_batch(self) -> list[_Pending] | None:
        """Pop the next batch if it is due; None when the queue is empty or the batch should wait."""
        first = self._head()
        if first is None:
            return None
        if not self._batching:
            return [self._queue.popleft()]
        rows = 0
        count = 0
        blocked = False  # the next request cannot join: waiting cannot grow this batch
        for pending in self._queue:
            if pending.future.done():
                count += 1
                continue
            if rows and (pending.signature != first.signature or rows + pending.rows > self._target):
                blocked = True  # (the first request always goes, even if it exceeds the target)
                break
            rows += pending.rows
            count += 1
            if rows >= self._target:
                break
        due = (
            rows >= self._target
            or blocked
            or (rows in self._preferred and count == len(self._queue))
            or self._closing
            or (self._gathering and rows >= self._expect)
            or self._clock.now() >= first.enqueued + self._delay
        )
        if not due:
            if self._timer is None:
                wait = first.enqueued + self._delay - self._clock.now()
                self._timer = self._clock.call_later(max(wait, 0.0), self._pump)
            return None
        batch = []
        for _ in range(count):
            pending = self._queue.popleft()
            if not pending.future.done():
                batch.append(pending)
        if self._gathering:
            self._gathered(rows, len(batch))
        return batch

    def _gathered(self, rows: int, requests: int) -> None:
        """The adaptive queue delay (see the class): judge a batch formed while waiting is on.
        A wait pays by the requests it gathers, not the rows: a lone client that sends batches
        of 8 must not wait for company that never comes."""
        self._gathers.append(rows)
        self._expect = max(self._gathers)
        if requests >= self._enough:
            self._misses = 0
            self._probing = False
            return
        self._misses += 1
        if self._probing or self._misses >= _GATHER_MISSES:
            # A probe that missed waits twice as long for the next; a run of waits that paid
            # ended by load going away starts over from the shortest interval.
            self._probe_every = min(2 * self._probe_every, _LAST_PROBE) if self._probing else _FIRST_PROBE
            self._probe_in = self._probe_every
            self._gathering = self._probing = False
            self._misses = 0
            self._delay = self.policy.max_queue_delay
            self._gathers.clear()
            self._expect = self._target

    def _dispatch(self, batch: list[_Pending]) -> None:
        started = self._clock.now()
        self._free -= 1
        assert self._workers is not None
        self._workers.submit(
            lambda: self._run_batch([p.inputs for p in batch], [p.rows for p in batch]),
            lambda result, error: self._finish(batch, started, result, error),
        )

    def _rows(self, batch: list[_Pending]) -> int:
        if not self._batching:
            return 1
        return batch[0].rows if len(batch) == 1 else sum(p.rows for p in batch)

    def _cheap(self, rows: int) -> bool:
        """Whether a batch of `rows` was measured to compute in under `inline_below` (a size
        not measured yet runs in a worker first)."""
        return rows not in self._waits and self._cost.get(rows, self._inline_below) < self._inline_below

    def _run_alone(self, inputs: Mapping[str, np.ndarray], rows: int, request_id: str) -> Delivery:
        """The inline path for a request that finds the batcher idle: its own batch, computed
        here without a queue entry or a future (it never waited, so its queue time is 0)."""
        rows = rows if self._batching else 1
        self._free -= 1
        try:
            result = self._on_loop([inputs], [rows], rows)
        except Exception as exc:
            raise self._failure(exc, rows, request_id or "-") from None
        finally:
            self._free += 1
        outputs, input_ns, infer_ns, output_ns, cpu_ns = result
        if self._inline_below:
            self._price(rows, cpu_ns)
        record = BatchRecord(rows, input_ns, infer_ns, output_ns)
        self._observer.batch_done(rows, (0.0,), (input_ns + infer_ns + output_ns) / 1e9)
        return Delivery(outputs[0], rows, 0, record)

    def _run_inline(self, batch: list[_Pending]) -> None:
        """Compute a batch on the event loop (see `submit`); its futures are done after."""
        started = self._clock.now()
        self._free -= 1
        try:
            parts, part_rows = [p.inputs for p in batch], [p.rows for p in batch]
            result: BatchResult | None = self._on_loop(parts, part_rows, self._rows(batch))
            error = None
        except Exception as exc:  # delivered to the requests, as from a worker
            result, error = None, exc
        finally:
            self._free += 1
        self._deliver(batch, started, result, error)

    def _finish(
        self, batch: list[_Pending], started: float, result: BatchResult | None, error: BaseException | None
    ) -> None:
        """On the event loop: hand each request its rows (or the batch's error), then schedule more."""
        self._free += 1
        try:
            self._deliver(batch, started, result, error)
        finally:
            self._pump()

    def _deliver(
        self, batch: list[_Pending], started: float, result: BatchResult | None, error: BaseException | None
    ) -> None:
        rows = self._rows(batch)
        if error is not None:
            failure = self._failure(error, rows, ", ".join(p.request_id or "-" for p in batch))
            for pending in batch:
                self._fail(pending, failure)
            return
        assert result is not None
        results, input_ns, infer_ns, output_ns, cpu_ns = result
        if self._inline_below:
            self._price(rows, cpu_ns)
            if rows in self._waits:
                self._come_back(rows, (input_ns + infer_ns + output_ns) / 1e9)
        queue_seconds = [started - p.enqueued for p in batch]
        record = BatchRecord(rows, input_ns, infer_ns, output_ns)
        self._observer.batch_done(rows, queue_seconds, (input_ns + infer_ns + output_ns) / 1e9)
        for pending, outputs, waited in zip(batch, results, queue_seconds, strict=True):
            if not pending.future.done():
                inferences = pending.rows if self._batching else 1
                pending.future.set_result(Delivery(outputs, inferences, int(waited * 1e9), record))

    def _failure(self, error: BaseException, rows: int, ids: str) -> BaseException:
        """A failed batch's error as its requests get it, logged with the batch's request ids."""
        log.error("model '%s': batch of %d rows failed (request ids: %s)", self.name, rows, ids, exc_info=error)
        if self._on_device_lost is not None and not isinstance(error, HubError):
            try:  # (this batch's requests are answered whatever happens here)
                lost = device_lost(error)
                if lost is not None:
                    self._on_device_lost(f"model '{self.name}': {lost}")
            except Exception:
                log.exception("model '%s': checking a failed batch's error for a lost device failed", self.name)
        # The client reads the model and the error type only (no runtime internals: source
        # paths, graph node names); the log above has the rest. The traceback goes: it
        # reaches the worker's frames, and through them this batch's inputs.
        error.__traceback__ = None
        if isinstance(error, HubError):
            return error
        return ModelExecutionError(f"model '{self.name}' failed: {type(error).__name__}")

    def _price(self, rows: int, cpu_ns: int) -> None:
        """Record what a batch of `rows` cost: the CPU time of the thread that computed, not
        its wall time. In a worker, wall time includes waiting for the GIL (up to the 5 ms
        switch interval while the loop is busy) and, on the loop or off it, for a core; neither
        is the batch's cost. Down at once, up slowly, so that one slow batch does not send a
        size to the workers."""
        cost = cpu_ns / 1e9
        seen = self._cost.get(rows, cost)
        self._cost[rows] = min(cost, seen + 0.05 * (cost - seen))

    def _come_back(self, rows: int, held: float) -> None:
        """A size kept off the loop returns once its runs in a worker show that the wait was not
        its own: once it has run `_RUNS_TO_COME_BACK` times there, the shortest of those runs
        took under ten times the bound. A forward that waits every time (a sleep, I/O) never does; a size sent off by
        a wait for the GIL or a core (one of 94 ms on mlp_wide under `--grpc-server threads` on
        a loaded box) comes back within a few dozen requests."""
        runs, shortest = self._waits[rows]
        runs, shortest = runs + 1, min(shortest, held)
        if runs >= _RUNS_TO_COME_BACK and shortest < 10 * self._inline_below:
            del self._waits[rows]
            self._waited.pop(rows, None)
            log.info(
                "model '%s': a batch of %d rows took %.2f ms in a worker thread; that size runs on the loop again",
                self.name,
                rows,
                shortest * 1e3,
            )
        else:
            self._waits[rows] = (runs, shortest)

    def _on_loop(self, parts: list[Mapping[str, np.ndarray]], part_rows: list[int], rows: int) -> BatchResult:
        """`_run_batch` on the event loop, watching for a forward that waits.

        CPU time prices a size (`_price`), but it misses what a forward waits for: a sleep,
        I/O, a device, work in a runtime's own threads. If a run here gave up the core of its
        own accord (a voluntary context switch; being preempted is involuntary and does not
        count) and held the loop for over ten times the bound, and either held it for longer
        than two GIL switch intervals (10 ms) or did so three runs in a row, its size keeps
        off the loop, whatever its CPU time says, until its runs in a worker show that the wait
        was not its own (`_come_back`). A forward that waits blocks the loop once, not once per
        request. A wait for the GIL or a core looks the same: handler threads of
        `--grpc-server threads` meet one now and then, and a ban for good kept such a size in
        the worker thread (docs/benchmarks.md)."""
        before = _voluntary_switches()
        result = self._run_batch(parts, part_rows)
        _, input_ns, infer_ns, output_ns, _ = result
        held = (input_ns + infer_ns + output_ns) / 1e9  # its stage times cover the whole run
        if not (held > 10 * self._inline_below and _voluntary_switches() != before):
            if self._waited:  # (empty but for a wait in the last runs: no dict work per request)
                self._waited.pop(rows, None)
            return result
        # A wait for the GIL looks the same, but it is mostly short (the 5 ms switch interval)
        # and comes now and then; a forward that waits does so every time. A long one that was
        # not the forward's is undone by `_come_back`.
        waited = self._waited[rows] = self._waited.get(rows, 0) + 1
        if held > 2 * sys.getswitchinterval() or waited >= _WAITS_TO_LEAVE:
            self._waits[rows] = (0, float("inf"))
            log.warning(
                "model '%s': a batch of %d rows waited on something for %.1f ms on the event loop; "
                "that size runs in a worker thread until its runs there show the wait was not its own",
                self.name,
                rows,
                held * 1e3,
            )
        return result

    def _run_batch(self, parts: list[Mapping[str, np.ndarray]], part_rows: list[int]) -> BatchResult:
        """Worker thread: concatenate, compute, split. Returns per-request outputs and stage times."""
        clock = time.perf_counter_ns
        priced = bool(self._inline_below)  # the thread's CPU clock is a system call: only when it is used
        cpu = time.thread_time_ns() if priced else 0
        t0 = clock()
        if len(parts) == 1:
            inputs = parts[0]
        else:
            inputs = {name: self._concatenate(name, [p[name] for p in parts]) for name in parts[0]}
        t1 = clock()
        outputs = self._compute(inputs)
        t2 = clock()
        if len(parts) == 1:
            results = [dict(outputs)]
        else:
            total = sum(part_rows)
            for name, value in outputs.items():
                if value.shape[:1] != (total,):
                    raise ModelExecutionError(
                        f"model '{self.name}': output '{name}' has {value.shape[:1] or 'no'} rows "
                        f"for a batch of {total}"
                    )
            results = []
            start = 0
            for count in part_rows:
                results.append({name: value[start : start + count] for name, value in outputs.items()})
                start += count
        t3 = clock()
        return results, t1 - t0, t2 - t1, t3 - t2, time.thread_time_ns() - cpu if priced else 0

    def _concatenate(self, name: str, arrays: list[np.ndarray]) -> np.ndarray:
        """Stack requests along the batch dim, padding `padding` inputs to the longest first.
        Inputs on the device (CUDA shared memory) are stacked there, with the others copied up."""
        if not all(isinstance(a, np.ndarray) for a in arrays):
            return _concatenate_on_device(arrays, self._padding.get(name))
        if name in self._padding:
            longest = np.max([a.shape[1:] for a in arrays], axis=0)
            arrays = [
                a
                if a.shape[1:] == tuple(longest)
                else np.pad(
                    a,
                    [(0, 0), *((0, int(m) - d) for m, d in zip(longest, a.shape[1:], strict=True))],
                    constant_values=self._padding[name],
                )
                for a in arrays
            ]
        return np.concatenate(arrays)

    def _fail(self, pending: _Pending, error: BaseException) -> None:
        if not pending.future.done():
            pending.future.set_exception(error)


#: Runs in a row of one size that waited (briefly) on the loop before that size leaves it.
_WAITS_TO_LEAVE = 3
#: The adaptive queue delay (`Batcher`): requests a wait must gather to pay; waits in a row that
#: gather fewer before waiting stops; recent batches whose biggest a waiting batch may go at;
#: requests between probes, at first and at most.
_GATHER_REQUESTS = 4
_GATHER_MISSES = 2
_GATHERS_KEPT = 8
_FIRST_PROBE = 16
_LAST_PROBE = 1024
#: Runs in a worker of a size kept off the loop before it may come back (`_come_back`).
_RUNS_TO_COME_BACK = 16


def _voluntary_switches() -> int:
    """This thread's voluntary context switches so far (Linux); elsewhere a count that always
    differs, so that `Batcher._on_loop` goes by the time held alone."""
    if _RUSAGE_THREAD is None:
        return time.perf_counter_ns()
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


def _concatenate_on_device(arrays: list[Any], padding: float | None) -> Any:
    """torch.cat on the device of the first tensor among `arrays` (numpy ones copied there),
    each padded with `padding` to the longest first when it is set."""
    import torch

    from hub.runtimes.tensors import to_tensor

    device = next(a.device for a in arrays if not isinstance(a, np.ndarray))
    tensors = [to_tensor(a, str(device)) if isinstance(a, np.ndarray) else a for a in arrays]
    if padding is not None:
        longest = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors), strict=True)]
        tensors = [
            torch.nn.functional.pad(
                t,
                [n for m, d in zip(reversed(longest), reversed(t.shape[1:]), strict=True) for n in (0, m - d)],
                value=padding,
            )
            if list(t.shape[1:]) != longest
            else t
            for t in tensors
        ]
    return torch.cat(tensors)
