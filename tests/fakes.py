"""Fakes for batcher unit tests: a clock that moves only when told, and a runtime that records
its batches and can be held or poisoned."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping

import numpy as np


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self._timers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        timer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._timers.append((self.t + timeout, timer))
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            timer.cancel()
        return event.is_set()

    async def advance(self, seconds: float) -> None:
        self.t += seconds
        for deadline, timer in self._timers:
            if deadline <= self.t and not timer.done():
                timer.set_result(None)
        self._timers = [(d, f) for d, f in self._timers if not f.done()]
        await settle()


async def settle(rounds: int = 5) -> None:
    """Let the scheduler and any worker threads finish what they can."""
    for _ in range(rounds):
        await asyncio.sleep(0.005)


class FakeRuntime:
    """OUTPUT0 = 3 * INPUT0 + 1, row by row. Records each batch's row count."""

    POISON = -1.0

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.seen: list[float] = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["INPUT0"]
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.batches.append(x.shape[0])
            self.seen.extend(x[:, 0].tolist())
        try:
            assert self.gate.wait(10), "gate never opened"
            if (x == self.POISON).any():
                raise ValueError("poisoned batch")
            return {"OUTPUT0": x * 3 + 1}
        finally:
            with self._lock:
                self.running -= 1
