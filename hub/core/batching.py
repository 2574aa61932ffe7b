"""The per-model dynamic batcher: a queue, a scheduler task on the event loop, and worker
threads that run one batch each."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from hub.core.stats import ModelStats
from hub.errors import DeadlineExceeded, HubError, ModelExecutionError, ModelUnavailable, QueueFull
from hub.spec import BatchPolicy

log = logging.getLogger("modelhub.batching")

Arrays = dict[str, np.ndarray]


class Clock(Protocol):
    """Time as the batcher sees it; tests inject a fake one."""

    def now(self) -> float:
        """Monotonic seconds."""

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait until `event` is set (True) or `timeout` seconds pass (False)."""


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True


class BatchObserver(Protocol):
    """Receives what the batcher measures (the server's Prometheus metrics implement it)."""

    def queued(self, depth: int) -> None: ...

    def batch_done(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None: ...


class _NoObserver:
    def queued(self, depth: int) -> None:
        pass

    def batch_done(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        pass


@dataclass(eq=False)
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    signature: tuple[object, ...]
    deadline: float | None
    enqueued: float
    request_id: str
    future: asyncio.Future[Arrays] = field(repr=False)


class Batcher:
    """Turns concurrent requests for one model version into batched forwards.

    - Requests that carry their own batch (leading dim n) are concatenated along dim 0 up to
      `max_batch_size`, never split, and only with requests whose other dims match.
    - A batch is dispatched when it reaches the largest preferred size (or `max_batch_size`),
      when the queue is empty and the batch is at a preferred size, or when its oldest
      request has waited `max_queue_delay`.
    - Deadlines are absolute monotonic times; a request past its deadline is answered with
      DeadlineExceeded and never computed. Cancelled requests leave the queue.
    - A failing forward fails every request of its batch; the next batch runs normally.
    - Up to `instances` batches run at once, each in a worker thread.
    """

    def __init__(
        self,
        name: str,
        policy: BatchPolicy,
        compute: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
        stats: ModelStats | None = None,
        *,
        clock: Clock | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self._compute = compute
        self.stats = stats if stats is not None else ModelStats()
        self._clock = clock or MonotonicClock()
        self._observer = observer or _NoObserver()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(policy.instances)
        self._running: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(policy.instances, thread_name_prefix=f"model-{name}")
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        self._limit = policy.max_batch_size
        self._target = max(policy.preferred_batch_sizes, default=policy.max_batch_size)
        self._preferred = frozenset(policy.preferred_batch_sizes)

    # --- public ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._scheduler is None:
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name=f"batcher-{self.name}")

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        rows: int = 1,
        signature: tuple[object, ...] = (),
        timeout: float | None = None,
        request_id: str = "",
    ) -> Arrays:
        """Queue one request and wait for its outputs (exactly its own rows).

        `timeout` (seconds) bounds the wait in the queue; None takes the policy's default.
        """
        if self._closing:
            raise ModelUnavailable(f"model '{self.name}' is unloading")
        if self.policy.max_queue_size and len(self._queue) >= self.policy.max_queue_size:
            raise QueueFull(f"model '{self.name}': queue is full ({self.policy.max_queue_size} requests waiting)")
        now = self._clock.now()
        if timeout is None:
            timeout = self.policy.timeout
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        pending = _Pending(inputs, rows, signature, None if timeout is None else now + timeout, now, request_id, future)
        self._queue.append(pending)
        self._arrived.set()
        self._observer.queued(len(self._queue))
        try:
            return await future
        except asyncio.CancelledError:
            # The client went away: leave the queue if the request is still in it.
            try:
                self._queue.remove(pending)
            except ValueError:
                pass
            raise

    async def close(self, drain: bool = True) -> None:
        """Stop taking requests; finish what is queued and running (or fail it), then stop."""
        self._closing = True
        if not drain:
            while self._queue:
                self._fail(self._queue.popleft(), ModelUnavailable(f"model '{self.name}' is unloading"))
        while self._queue or self._running:
            self._arrived.set()
            await asyncio.sleep(0.001)
        if self._scheduler is not None:
            self._scheduler.cancel()
            try:
                await self._scheduler
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False)

    # --- scheduling -----------------------------------------------------------------------

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = loop.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take_live(self) -> _Pending | None:
        """Pop the next request that is still wanted; expire the ones past their deadline."""
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # cancelled
                self._queue.popleft()
                continue
            if pending.deadline is not None and self._clock.now() >= pending.deadline:
                self._queue.popleft()
                self._fail(
                    pending,
                    DeadlineExceeded(
                        f"model '{self.name}': request deadline passed after "
                        f"{self._clock.now() - pending.enqueued:.3f}s in the queue"
                    ),
                )
                continue
            return pending
        return None

    async def _collect(self) -> list[_Pending]:
        first = self._take_live()
        while first is None:
            self._arrived.clear()
            await self._arrived.wait()
            first = self._take_live()
        self._queue.popleft()
        batch = [first]
        if not self.policy.batching:
            return batch
        rows = first.rows
        window_end = first.enqueued + self.policy.max_queue_delay
        while rows < self._target:
            nxt = self._take_live()
            if nxt is not None:
                if nxt.signature != first.signature or rows + nxt.rows > self._target:
                    break
                self._queue.popleft()
                batch.append(nxt)
                rows += nxt.rows
                continue
            if rows in self._preferred:
                break
            remaining = window_end - self._clock.now()
            if remaining <= 0:
                break
            self._arrived.clear()
            await self._clock.wait(self._arrived, remaining)
        self._observer.queued(len(self._queue))
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = self._clock.now()
        queue_seconds = [started - p.enqueued for p in batch]
        for waited in queue_seconds:
            self.stats.queue.add(int(waited * 1e9))
        rows = sum(p.rows for p in batch) if self.policy.batching else 1
        try:
            results, input_ns, infer_ns, output_ns = await loop.run_in_executor(
                self._executor, self._run_batch, [p.inputs for p in batch], [p.rows for p in batch]
            )
        except Exception as exc:
            ids = ", ".join(p.request_id or "-" for p in batch)
            log.error("model '%s': batch of %d rows failed (request ids: %s)", self.name, rows, ids, exc_info=exc)
            error = (
                exc
                if isinstance(exc, HubError)
                else ModelExecutionError(f"model '{self.name}' failed: {type(exc).__name__}: {exc}")
            )
            for pending in batch:
                self._fail(pending, error)
            return
        finally:
            self._slots.release()
        self.stats.record_batch(rows, len(batch), input_ns, infer_ns, output_ns)
        self._observer.batch_done(rows, queue_seconds, (input_ns + infer_ns + output_ns) / 1e9)
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    def _run_batch(
        self, parts: list[Mapping[str, np.ndarray]], part_rows: list[int]
    ) -> tuple[list[Arrays], int, int, int]:
        """Worker thread: concatenate, compute, split. Returns per-request outputs and stage times."""
        clock = time.perf_counter_ns
        t0 = clock()
        if len(parts) == 1:
            inputs = parts[0]
        else:
            inputs = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
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
        return results, t1 - t0, t2 - t1, t3 - t2

    def _fail(self, pending: _Pending, error: BaseException) -> None:
        if not pending.future.done():
            pending.future.set_exception(error)
