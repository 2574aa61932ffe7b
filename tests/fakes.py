"""Fakes for batcher unit tests: a clock that moves only when told, and a runtime that records
its batches and can be held or poisoned; and a plugin whose load runs a callback (LoadHook)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping

import numpy as np

from hub import ModelSpec, Target, TensorSpec, hookimpl


class FakeTimer:
    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Monotonic time that moves only on `advance`, which fires the timers that fall due."""

    def __init__(self) -> None:
        self.t = 0.0
        self._timers: list[FakeTimer] = []

    def now(self) -> float:
        return self.t

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.t + delay, callback)
        self._timers.append(timer)
        return timer

    async def advance(self, seconds: float) -> None:
        self.t += seconds
        due = [t for t in self._timers if t.deadline <= self.t and not t.cancelled]
        self._timers = [t for t in self._timers if t not in due and not t.cancelled]
        for timer in sorted(due, key=lambda t: t.deadline):
            if not timer.cancelled:
                timer.callback()
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


class LoadHook:
    """A plugin of one identity model (FP32 of `shape`, model `model`, target `target`) whose
    target calls `on_load()` before it returns the runtime: a load held at a gate, or one that
    does something while the server loads."""

    def __init__(self, model: str, target: str, on_load: Callable[[], object], shape: tuple[int, ...] = (2,)) -> None:
        self.model, self.target, self.on_load, self.shape = model, target, on_load, shape

    @hookimpl
    def register_targets(self, register: Callable[[Target], None]) -> None:
        from .plugins.identity import NumpyRuntime

        def load(ctx: object) -> NumpyRuntime:
            self.on_load()
            return NumpyRuntime(lambda inputs: {"OUTPUT0": inputs["INPUT0"]})

        register(Target(name=self.target, build=lambda ctx: None, load=load, check_parity=False))

    @hookimpl
    def register_models(self, register: Callable[[ModelSpec], None]) -> None:
        register(
            ModelSpec(
                name=self.model,
                build=lambda: None,
                inputs=[TensorSpec("INPUT0", "FP32", self.shape)],
                outputs=[TensorSpec("OUTPUT0", "FP32", self.shape)],
                example_inputs={"INPUT0": np.zeros(self.shape, np.float32)},
                target=self.target,
            )
        )
