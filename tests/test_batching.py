"""The dynamic batcher, with a fake runtime and a fake clock; and a property test of batching."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.core.batching import Batcher, Delivery
from hub.core.stats import ModelStats
from hub.errors import DeadlineExceeded, ModelExecutionError, QueueFull
from hub.spec import BatchPolicy

from .fakes import FakeClock, FakeRuntime, settle


def make(policy: BatchPolicy, clock: FakeClock | None = None) -> tuple[Batcher, FakeRuntime, FakeClock]:
    runtime = FakeRuntime()
    clock = clock or FakeClock()
    batcher = Batcher("fake", policy, runtime, clock=clock)
    batcher.start()
    return batcher, runtime, clock


def rows(values: list[float]) -> np.ndarray:
    return np.array(values, np.float32).reshape(-1, 1)


def counted(deliveries: list[Delivery]) -> ModelStats:
    """The statistics of these answered requests, counted as the data plane counts them."""
    stats = ModelStats()
    for delivery in deliveries:
        stats.request_succeeded(0, delivery.inferences, delivery.queue_ns, delivery.batch)
    return stats


def submit(batcher: Batcher, values: list[float], **kwargs: Any) -> asyncio.Task[Any]:
    x = rows(values)
    return asyncio.ensure_future(batcher.submit({"INPUT0": x}, rows=len(x), **kwargs))


async def test_size_trigger_dispatches_without_waiting() -> None:
    batcher, runtime, _ = make(BatchPolicy(max_batch_size=4, max_queue_delay=10.0))
    tasks = [submit(batcher, [float(i)]) for i in range(4)]
    await settle()
    assert runtime.batches == [4]
    for i, task in enumerate(tasks):
        np.testing.assert_array_equal(task.result().outputs["OUTPUT0"], [[3.0 * i + 1]])
    await batcher.close()


async def test_delay_trigger_waits_for_company() -> None:
    batcher, runtime, clock = make(BatchPolicy(max_batch_size=8, max_queue_delay=1.0))
    tasks = [submit(batcher, [1.0]), submit(batcher, [2.0])]
    await settle()
    assert runtime.batches == []
    await clock.advance(0.5)
    assert runtime.batches == []
    tasks.append(submit(batcher, [3.0]))
    await settle()
    await clock.advance(0.5)  # the oldest request has now waited the full delay
    await asyncio.gather(*tasks)
    assert runtime.batches == [3]
    await batcher.close()


async def test_preferred_size_dispatches_early() -> None:
    batcher, runtime, _clock = make(BatchPolicy(max_batch_size=8, max_queue_delay=10.0, preferred_batch_sizes=(2, 4)))
    first = [submit(batcher, [1.0]), submit(batcher, [2.0])]
    await settle()
    assert runtime.batches == [2]  # at a preferred size with an empty queue: no reason to wait
    three = submit(batcher, [1.0, 2.0, 3.0])
    await settle()
    assert runtime.batches == [2]  # 3 is not preferred: wait for company
    one = submit(batcher, [4.0])
    await settle()
    assert runtime.batches == [2, 4]
    await asyncio.gather(*first, three, one)
    await batcher.close()


async def test_requests_are_never_split() -> None:
    batcher, runtime, clock = make(BatchPolicy(max_batch_size=4, max_queue_delay=10.0))
    a, b = submit(batcher, [1.0, 2.0, 3.0]), submit(batcher, [4.0, 5.0, 6.0])
    await settle()
    assert runtime.batches == [3]  # b does not fit beside a, and a is not cut to make room
    await clock.advance(10.0)
    np.testing.assert_array_equal((await b).outputs["OUTPUT0"][:, 0], [13.0, 16.0, 19.0])
    np.testing.assert_array_equal((await a).outputs["OUTPUT0"][:, 0], [4.0, 7.0, 10.0])
    assert runtime.batches == [3, 3]
    await batcher.close()


async def test_request_larger_than_the_preferred_sizes_runs_alone() -> None:
    batcher, runtime, clock = make(BatchPolicy(max_batch_size=8, max_queue_delay=10.0, preferred_batch_sizes=(2,)))
    big, small = submit(batcher, [1.0, 2.0, 3.0, 4.0, 5.0]), submit(batcher, [6.0])
    await settle()
    assert runtime.batches == [5]
    await clock.advance(10.0)
    await asyncio.gather(big, small)
    assert runtime.batches == [5, 1]
    await batcher.close()


async def test_deadline_expires_in_the_queue_and_is_not_computed() -> None:
    batcher, runtime, clock = make(BatchPolicy(max_batch_size=1))
    runtime.gate.clear()
    running = submit(batcher, [1.0])
    await settle()
    late = submit(batcher, [2.0], timeout=0.5)
    default = submit(batcher, [3.0])
    await settle()
    await clock.advance(1.0)
    runtime.gate.set()
    await settle()
    with pytest.raises(DeadlineExceeded, match="deadline"):
        await late
    await asyncio.gather(running, default)
    assert runtime.seen == [1.0, 3.0]
    await batcher.close()


async def test_policy_timeout_applies_when_the_client_sets_none() -> None:
    batcher, runtime, clock = make(BatchPolicy(max_batch_size=1, timeout=0.2))
    runtime.gate.clear()
    running = submit(batcher, [1.0])
    await settle()
    queued = submit(batcher, [2.0])
    await settle()
    await clock.advance(0.3)
    runtime.gate.set()
    with pytest.raises(DeadlineExceeded):
        await queued
    await running
    await batcher.close()


async def test_full_queue_rejects_at_once() -> None:
    batcher, runtime, _ = make(BatchPolicy(max_batch_size=1, max_queue_size=2))
    runtime.gate.clear()
    running = submit(batcher, [1.0])
    await settle()
    queued = [submit(batcher, [2.0]), submit(batcher, [3.0])]
    await settle()
    with pytest.raises(QueueFull, match="queue is full"):
        await batcher.submit({"INPUT0": rows([4.0])})
    runtime.gate.set()
    await asyncio.gather(running, *queued)
    await batcher.close()


async def test_cancelled_request_leaves_the_queue() -> None:
    batcher, runtime, _ = make(BatchPolicy(max_batch_size=1))
    runtime.gate.clear()
    running = submit(batcher, [1.0])
    await settle()
    doomed = submit(batcher, [2.0])
    await settle()
    assert batcher.queue_depth == 1
    doomed.cancel()
    await settle()
    assert batcher.queue_depth == 0
    runtime.gate.set()
    await running
    await settle()
    assert runtime.seen == [1.0]
    await batcher.close()


async def test_enqueue_answers_through_a_future_and_withdraw_takes_it_out_of_the_queue() -> None:
    """The model process's path (no coroutine per request): `enqueue` gives a future, done at
    once when the request ran inline; `withdraw` cancels a queued one, which is not computed,
    and leaves a done one alone."""
    runtime = FakeRuntime()
    batcher = Batcher("fake", BatchPolicy(max_batch_size=1), runtime, clock=FakeClock(), inline_below=1.0)
    batcher.start()
    await batcher.submit({"INPUT0": rows([0.0])})  # measured in a worker: now cheap enough to run inline
    alone = batcher.enqueue({"INPUT0": rows([1.0])})
    assert alone.done() and alone.result().outputs["OUTPUT0"].tolist() == [[4.0]]
    await batcher.close()

    batcher, runtime, _ = make(BatchPolicy(max_batch_size=1))  # every batch in a worker
    runtime.gate.clear()
    running = batcher.enqueue({"INPUT0": rows([2.0])})
    await settle()
    doomed = batcher.enqueue({"INPUT0": rows([3.0])})
    assert batcher.queue_depth == 1
    batcher.withdraw(doomed)
    assert doomed.cancelled() and batcher.queue_depth == 0
    runtime.gate.set()
    assert (await running).outputs["OUTPUT0"].tolist() == [[7.0]]
    batcher.withdraw(running)  # done: nothing to take back
    await settle()
    assert runtime.seen == [2.0]
    runtime.gate.clear()
    running = batcher.enqueue({"INPUT0": rows([4.0])})
    await settle()
    queued = [batcher.enqueue({"INPUT0": rows([float(v)])}) for v in (5, 6, 7)]
    batcher.withdraw(queued[0], queued[2])  # several at once: one pass over the queue
    assert [f.cancelled() for f in queued] == [True, False, True] and batcher.queue_depth == 1
    runtime.gate.set()
    await asyncio.gather(running, queued[1])
    await settle()
    assert runtime.seen == [2.0, 4.0, 6.0]
    await batcher.close()


async def test_failing_forward_fails_its_batch_only(caplog: pytest.LogCaptureFixture) -> None:
    batcher, _runtime, clock = make(BatchPolicy(max_batch_size=4, max_queue_delay=1.0))
    good, bad = submit(batcher, [1.0]), submit(batcher, [FakeRuntime.POISON])
    await settle()
    await clock.advance(1.0)
    for task in (good, bad):
        # The client reads the model and the error type; the exception's text is for the log.
        with pytest.raises(ModelExecutionError, match=r"^model 'fake' failed: ValueError$"):
            await task
    assert "poisoned batch" in caplog.text
    after = submit(batcher, [5.0])
    await settle()
    await clock.advance(1.0)
    answer = await after
    np.testing.assert_array_equal(answer.outputs["OUTPUT0"], [[16.0]])
    assert counted([answer]).execution_count == 1
    await batcher.close()


async def test_a_lost_device_is_reported_once_its_batch_is_answered() -> None:
    """A batch failing with a sticky CUDA error is answered as any failed batch, and the
    batcher tells its owner the device is lost (the server then exits to be restarted). An
    error that cannot even be read (its text raises) is still answered, not left hanging."""
    from .plugins.device_fault import illegal_address

    lost: list[str] = []

    def faulting(inputs: Any) -> dict[str, np.ndarray]:
        raise illegal_address()

    class Unprintable(RuntimeError):
        def __str__(self) -> str:
            raise ValueError("no text")

    def unprintable(inputs: Any) -> dict[str, np.ndarray]:
        raise Unprintable()

    for compute, told in ((faulting, ["model 'gpu': CUDA error: an illegal memory access was encountered"]),
                          (unprintable, [])):  # fmt: skip
        lost.clear()
        batcher = Batcher("gpu", BatchPolicy(max_batch_size=4), compute, on_device_lost=lost.append)
        batcher.start()
        with pytest.raises(ModelExecutionError, match=r"^model 'gpu' failed: "):
            await asyncio.wait_for(batcher.submit({"INPUT0": rows([1.0])}), 10)
        assert lost == told
        await batcher.close()


async def test_instances_let_batches_overlap() -> None:
    batcher, runtime, _ = make(BatchPolicy(max_batch_size=1, instances=2))
    runtime.gate.clear()
    tasks = [submit(batcher, [float(i)]) for i in range(4)]
    await settle()
    assert runtime.running == 2
    runtime.gate.set()
    await asyncio.gather(*tasks)
    assert runtime.max_running == 2
    await batcher.close()


async def test_without_batching_each_request_runs_alone() -> None:
    batcher, runtime, _ = make(BatchPolicy(max_batch_size=0))
    runtime.gate.clear()
    tasks = [submit(batcher, [1.0, 2.0]) for _ in range(3)]
    await settle()
    runtime.gate.set()
    answers = await asyncio.gather(*tasks)
    assert runtime.batches == [2, 2, 2]
    assert counted(answers).inference_count == 3  # a non-batching model counts one inference per request
    await batcher.close()


async def test_statistics_add_up() -> None:
    batcher, _runtime, clock = make(BatchPolicy(max_batch_size=8, max_queue_delay=1.0))
    tasks = [submit(batcher, [1.0, 2.0]), submit(batcher, [3.0]), submit(batcher, [4.0])]
    await settle()
    await clock.advance(1.0)
    stats = counted(await asyncio.gather(*tasks))
    assert (stats.inference_count, stats.execution_count) == (4, 1)
    assert stats.queue.count == 3 and stats.queue.ns == 3 * 10**9
    assert stats.compute_infer.count == 3
    assert list(stats.batches) == [4] and stats.batches[4].compute_infer.count == 1
    await batcher.close()


# --- the property: whatever the arrival pattern, each request gets exactly its own rows -------

requests = st.lists(
    st.tuples(st.integers(1, 5), st.integers(0, 3)),  # (rows, event-loop turns before the next arrival)
    min_size=1,
    max_size=40,
)
policies = st.builds(
    lambda max_batch, delay, preferred, instances: BatchPolicy(
        max_batch_size=max_batch,
        max_queue_delay=delay,
        preferred_batch_sizes=tuple(p for p in preferred if p <= max_batch),
        instances=instances,
    ),
    st.integers(5, 16),
    st.sampled_from([0.0, 0.0005, 0.002]),
    st.lists(st.integers(1, 16), max_size=3),
    st.integers(1, 3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, policies, st.integers(0, 2**31), st.sampled_from([0.0, 1.0]), st.sampled_from([0.0, 0.001]))
def test_every_request_gets_exactly_its_own_rows(
    plan: list[tuple[int, int]], policy: BatchPolicy, seed: int, inline_below: float, adaptive_delay: float
) -> None:
    """Also with the inline path and the adaptive queue delay (its first probe comes at the
    16th request), which change when and where batches run, never what they hold."""

    async def scenario() -> None:
        runtime = FakeRuntime()
        # the real monotonic clock
        batcher = Batcher("prop", policy, runtime, inline_below=inline_below, adaptive_delay=adaptive_delay)
        batcher.start()
        rng = np.random.default_rng(seed)
        tasks, inputs = [], []
        for count, turns in plan:
            x = rng.standard_normal((count, 1)).astype(np.float32)
            inputs.append(x)
            tasks.append(asyncio.ensure_future(batcher.submit({"INPUT0": x}, rows=count)))
            for _ in range(turns):
                await asyncio.sleep(0)
        results = await asyncio.gather(*tasks)
        for x, result in zip(inputs, results, strict=True):
            np.testing.assert_array_equal(result.outputs["OUTPUT0"], x * 3 + 1)  # exact: no mixing, no padding
        assert sum(runtime.batches) == sum(c for c, _ in plan)
        assert max(runtime.batches) <= policy.max_batch_size
        assert counted(results).inference_count == sum(c for c, _ in plan)
        await batcher.close()

    asyncio.run(scenario())


async def test_padding_batches_requests_of_different_lengths() -> None:
    """Inputs named in `padding` are padded to the batch's longest; the outputs keep each
    request's rows. The signature says which requests may share a batch."""
    seen: list[dict[str, np.ndarray]] = []

    def masked_sum(inputs: Any) -> dict[str, np.ndarray]:
        seen.append(dict(inputs))
        return {"total": (inputs["ids"] * inputs["mask"]).sum(1, keepdims=True).astype(np.float32)}

    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay=1.0)
    batcher = Batcher("pad", policy, masked_sum, clock=clock, padding={"ids": 0, "mask": 0})
    batcher.start()
    requests = [np.array([[1, 2, 3]]), np.array([[4], [5]]), np.array([[6, 7, 8, 9, 10]])]
    tasks = [
        asyncio.ensure_future(
            batcher.submit({"ids": ids, "mask": np.ones_like(ids)}, rows=len(ids), signature=((None,), (None,)))
        )
        for ids in requests
    ]
    await settle()
    await clock.advance(1.0)
    results = await asyncio.gather(*tasks)
    assert len(seen) == 1 and seen[0]["ids"].shape == (4, 5)  # one batch, padded to the longest
    np.testing.assert_array_equal(seen[0]["mask"][1], [1, 0, 0, 0, 0])
    assert [r.outputs["total"].ravel().tolist() for r in results] == [[6.0], [4.0, 5.0], [40.0]]
    await batcher.close()


async def test_device_inputs_are_padded_and_stacked_with_host_ones() -> None:
    """Inputs from CUDA shared memory reach the batcher as torch tensors (on the device; on the
    CPU here) and are stacked there with the batch's numpy inputs: padded as numpy ones are, and
    bfloat16 arrays (ml_dtypes, which torch.as_tensor refuses) converted through their bits."""
    import ml_dtypes
    import torch

    seen: list[dict[str, Any]] = []

    def masked_sum(inputs: Any) -> dict[str, np.ndarray]:
        seen.append(dict(inputs))
        total = (inputs["ids"] * inputs["mask"]).sum(1, keepdim=True).float()
        return {"total": total.numpy(), "w": inputs["w"].float().numpy()}

    clock = FakeClock()
    batcher = Batcher(
        "pad", BatchPolicy(max_batch_size=8, max_queue_delay=1.0), masked_sum, clock=clock,
        padding={"ids": 0, "mask": 0},
    )  # fmt: skip
    batcher.start()
    bf16 = ml_dtypes.bfloat16
    requests = [
        (torch.tensor([[1, 2, 3]]), np.array([[1.5, -2.0]], bf16)),
        (np.array([[4], [5]]), torch.tensor([[0.25, 3.0], [4.0, 8.0]], dtype=torch.bfloat16)),
        (np.array([[6, 7, 8, 9, 10]]), np.array([[-1.0, 0.5]], bf16)),
    ]
    tasks = [  # (a mask of ones of the same kind as its ids)
        asyncio.ensure_future(batcher.submit({"ids": ids, "mask": ids * 0 + 1, "w": w}, rows=len(ids), signature="s"))
        for ids, w in requests
    ]
    await settle()
    await clock.advance(1.0)
    results = await asyncio.gather(*tasks)
    assert len(seen) == 1 and tuple(seen[0]["ids"].shape) == (4, 5)  # one batch, padded to the longest
    assert seen[0]["w"].dtype == torch.bfloat16
    assert [r.outputs["total"].ravel().tolist() for r in results] == [[6.0], [4.0, 5.0], [40.0]]
    assert [r.outputs["w"].tolist() for r in results] == [[[1.5, -2.0]], [[0.25, 3.0], [4.0, 8.0]], [[-1.0, 0.5]]]
    await batcher.close()


async def test_cheap_lone_requests_run_inline_without_suspending() -> None:
    """Once a lone request's compute is measured under `inline_below`, the next lone request to
    an idle batcher is computed inside `submit`, which returns without suspending; a request
    that finds the model busy is queued for the worker threads as before."""
    runtime = FakeRuntime()
    batcher = Batcher("fake", BatchPolicy(max_batch_size=8), runtime, clock=FakeClock(), inline_below=1.0)
    batcher.start()
    measured = await batcher.submit({"INPUT0": rows([1.0])}, rows=1)  # through a worker: measures
    assert measured.outputs["OUTPUT0"].tolist() == [[4.0]]
    runtime_threads: list[str] = []
    original = runtime.__call__

    def recording(inputs: Any) -> dict[str, np.ndarray]:
        import threading

        runtime_threads.append(threading.current_thread().name)
        return original(inputs)

    batcher._compute = recording  # type: ignore[method-assign]
    coroutine = batcher.submit({"INPUT0": rows([2.0])}, rows=1)
    with pytest.raises(StopIteration) as finished:  # done at the first step: it never suspended
        coroutine.send(None)
    delivery = finished.value.value
    assert delivery.outputs["OUTPUT0"].tolist() == [[7.0]]
    assert delivery.batch.rows == 1 and delivery.queue_ns == 0
    assert runtime_threads == ["MainThread"]

    # Not measured for 3 rows: the worker thread, as before (and that measures it).
    await batcher.submit({"INPUT0": rows([1.0, 2.0, 3.0])}, rows=3)
    assert runtime_threads[-1].startswith("model-fake")

    # A busy model (5 rows, never measured, go to a worker): lone requests queue meanwhile, and
    # then batch together; 3 rows were measured cheap, so that batch runs on the loop.
    runtime.gate.clear()
    first = submit(batcher, [1.0] * 5)
    await settle()
    rest = [submit(batcher, [float(i)]) for i in range(3)]
    await settle()
    runtime.gate.set()
    await asyncio.gather(first, *rest)
    assert runtime.batches[-2:] == [5, 3]
    assert runtime_threads[-2].startswith("model-fake") and runtime_threads[-1] == "MainThread"
    await batcher.close()


async def test_inline_is_off_with_a_queue_delay_or_a_failing_model() -> None:
    runtime = FakeRuntime()
    delayed = Batcher("fake", BatchPolicy(max_batch_size=8, max_queue_delay=0.001), runtime, inline_below=1.0)
    delayed.start()
    for _ in range(3):
        await delayed.submit({"INPUT0": rows([1.0])}, rows=1)
    coroutine = delayed.submit({"INPUT0": rows([1.0])}, rows=1)
    assert coroutine.send(None) is not None  # it suspends: the policy asks to wait for company
    coroutine.close()
    await delayed.close()

    batcher = Batcher("fake", BatchPolicy(max_batch_size=8), runtime, clock=FakeClock(), inline_below=1.0)
    batcher.start()
    await batcher.submit({"INPUT0": rows([1.0])}, rows=1)
    with pytest.raises(ModelExecutionError, match="ValueError"):  # inline, the error is the worker's
        await batcher.submit({"INPUT0": rows([FakeRuntime.POISON])}, rows=1)
    assert (await batcher.submit({"INPUT0": rows([2.0])}, rows=1)).outputs["OUTPUT0"].tolist() == [[7.0]]
    await batcher.close()


async def test_a_size_is_priced_by_its_cpu_time_not_by_its_wait_for_the_gil() -> None:
    """A worker's wall time counts the wait for the GIL and for a core, which a run on the loop
    would not pay: a batch is priced by the CPU time of the thread that computed it, so a size
    that waited 2 ms in a worker but computed in microseconds runs on the loop from then on."""
    import threading

    where: list[str] = []

    def compute(inputs: Any) -> dict[str, np.ndarray]:
        name = threading.current_thread().name
        where.append(name)
        if name != "MainThread":
            threading.Event().wait(0.002)  # what a thread waiting for the GIL and a core looks like
        return {"OUTPUT0": inputs["INPUT0"] * 3 + 1}

    batcher = Batcher("fake", BatchPolicy(max_batch_size=8), compute, clock=FakeClock(), inline_below=0.001)
    batcher.start()
    for value in range(5):
        delivery = await batcher.submit({"INPUT0": rows([float(value)])}, rows=1)
        assert delivery.outputs["OUTPUT0"].tolist() == [[3.0 * value + 1]]
    assert where[0].startswith("model-fake") and where[1:] == ["MainThread"] * 4, where
    await batcher.close()


async def test_a_size_that_waits_leaves_the_loop_after_one_run() -> None:
    """A forward that waits (a sleep, a device, a runtime's own threads) costs its thread little
    CPU, so it is tried on the loop once; that run gave up the core and held the loop for 20 ms
    against a 1 ms bound, so its size never blocks the loop again: in a worker it still takes
    20 ms every time, so it does not come back."""
    import threading

    where: list[str] = []

    def compute(inputs: Any) -> dict[str, np.ndarray]:
        where.append(threading.current_thread().name)
        time.sleep(0.02)
        return {"OUTPUT0": inputs["INPUT0"] * 3 + 1}

    batcher = Batcher("fake", BatchPolicy(max_batch_size=8), compute, clock=FakeClock(), inline_below=0.001)
    batcher.start()
    for value in range(20):
        delivery = await batcher.submit({"INPUT0": rows([float(value)])}, rows=1)
        assert delivery.outputs["OUTPUT0"].tolist() == [[3.0 * value + 1]]
    assert where.count("MainThread") == 1 and where[1] == "MainThread", where
    await batcher.close()


async def test_a_size_sent_off_by_a_wait_not_its_own_comes_back() -> None:
    """One run on the loop waited 20 ms (as a starved thread would), but in a worker the size
    computes fast: after 16 such runs it is back on the loop."""
    import threading

    where: list[str] = []
    waits = iter([False, True] + [False] * 30)

    def compute(inputs: Any) -> dict[str, np.ndarray]:
        where.append(threading.current_thread().name)
        if next(waits):
            time.sleep(0.02)
        return {"OUTPUT0": inputs["INPUT0"] * 3 + 1}

    batcher = Batcher("fake", BatchPolicy(max_batch_size=8), compute, clock=FakeClock(), inline_below=0.001)
    batcher.start()
    for value in range(20):
        await batcher.submit({"INPUT0": rows([float(value)])}, rows=1)
    # run 1 prices it in a worker, run 2 waits on the loop, runs 3-18 go to a worker, then back
    assert where[1] == "MainThread" and all(n.startswith("model-fake") for n in where[2:18]), where
    assert where[18:] == ["MainThread"] * 2, where
    await batcher.close()


async def test_a_short_wait_leaves_the_loop_only_if_it_comes_every_time() -> None:
    """A run that waits 3 ms (over ten times the bound, under two GIL switch intervals) is what
    a wait for the GIL looks like: once is not enough to leave the loop; three in a row is."""
    import threading

    where: list[str] = []
    waits = iter([False, True, False, True, True, True, False, False])

    def compute(inputs: Any) -> dict[str, np.ndarray]:
        where.append(threading.current_thread().name)
        if next(waits):
            time.sleep(0.003)
        return {"OUTPUT0": inputs["INPUT0"] * 3 + 1}

    batcher = Batcher("fake", BatchPolicy(max_batch_size=8), compute, clock=FakeClock(), inline_below=0.0002)
    batcher.start()
    for value in range(8):
        await batcher.submit({"INPUT0": rows([float(value)])}, rows=1)
    # the first run prices the size in a worker; runs 2-6 are on the loop (run 2 waited alone,
    # and the size stayed), and after three waits in a row (runs 4-6) the rest go to a worker.
    assert where[1:6] == ["MainThread"] * 5 and all(n.startswith("model-fake") for n in where[6:]), where
    await batcher.close()


async def test_a_size_that_burns_cpu_stays_in_the_workers() -> None:
    """The converse: a batch whose compute burns more CPU than the bound keeps going to a worker."""
    import threading

    where: list[str] = []

    def compute(inputs: Any) -> dict[str, np.ndarray]:
        where.append(threading.current_thread().name)
        end = time.thread_time() + 0.003
        while time.thread_time() < end:  # 3 ms of CPU, over the 1 ms bound
            pass
        return {"OUTPUT0": inputs["INPUT0"] * 3 + 1}

    batcher = Batcher("fake", BatchPolicy(max_batch_size=8), compute, clock=FakeClock(), inline_below=0.001)
    batcher.start()
    for value in range(3):
        await batcher.submit({"INPUT0": rows([float(value)])}, rows=1)
    assert all(name.startswith("model-fake") for name in where), where
    await batcher.close()


async def _lone(batcher: Batcher, count: int) -> int:
    """Send `count` requests one after another; how many were answered without the clock moving
    (the rest waited out the queue delay)."""
    at_once = 0
    for _ in range(count):
        task = submit(batcher, [1.0])
        await settle(2)
        if task.done():
            at_once += 1
        else:
            await batcher._clock.advance(1.0)  # type: ignore[attr-defined]
            await task
    return at_once


async def test_adaptive_delay_probes_rarely_when_waiting_gathers_nobody() -> None:
    """One request at a time (concurrency 1): a probe now and then waits out the delay, gathers
    nobody, and the next probe comes twice as many requests later."""
    runtime = FakeRuntime()
    batcher = Batcher("fake", BatchPolicy(max_batch_size=8), runtime, clock=FakeClock(), adaptive_delay=1.0)
    batcher.start()
    assert await _lone(batcher, 15) == 15
    assert await _lone(batcher, 1) == 0  # the 16th: a probe
    assert await _lone(batcher, 31) == 31
    assert await _lone(batcher, 1) == 0  # 32 requests later
    assert runtime.batches == [1] * 48
    await batcher.close()


async def test_adaptive_delay_waits_while_waiting_fills_batches() -> None:
    """Under load a probe gathers company and waiting stays on while each wait gathers at least
    four rows, a batch going as soon as it is as big as recent ones; two waits in a row that
    gather fewer turn it off, and requests run at once again."""
    runtime = FakeRuntime()
    clock = FakeClock()
    batcher = Batcher("fake", BatchPolicy(max_batch_size=8), runtime, clock=clock, adaptive_delay=1.0)
    batcher.start()
    await _lone(batcher, 15)
    probe = [submit(batcher, [float(i)]) for i in range(5)]  # the probe and four that join it
    await settle()
    assert runtime.batches == [1] * 15
    await clock.advance(1.0)
    assert [t.result().outputs["OUTPUT0"].tolist() for t in probe] == [[[3.0 * i + 1]] for i in range(5)]
    assert runtime.batches[-1] == 5

    four = [submit(batcher, [1.0]) for _ in range(4)]  # waiting is on: these wait for company
    await settle()
    assert not any(t.done() for t in four)
    await clock.advance(0.5)
    four.append(submit(batcher, [1.0]))
    await settle()
    # As big as the biggest recent batch: it goes without waiting out the delay (a few clients
    # that each wait for their answer send no more).
    assert all(t.done() for t in four) and runtime.batches[-1] == 5
    assert await _lone(batcher, 1) == 0  # a wait that gathered one row: a miss
    assert await _lone(batcher, 1) == 0  # the second miss in a row: waiting stops
    assert await _lone(batcher, 15) == 15
    assert runtime.batches[-16:] == [1] * 16
    await batcher.close()


async def test_adaptive_delay_is_off_with_a_fixed_delay_and_never_delays_a_full_batch() -> None:
    runtime = FakeRuntime()
    fixed = Batcher("fake", BatchPolicy(max_batch_size=8, max_queue_delay=0.5), runtime, adaptive_delay=1.0)
    assert fixed._adaptive == 0.0
    clock = FakeClock()
    batcher = Batcher("fake", BatchPolicy(max_batch_size=4), runtime, clock=clock, adaptive_delay=1.0)
    batcher.start()
    await _lone(batcher, 15)
    full = [submit(batcher, [1.0]) for _ in range(4)]  # a probe that fills the batch at once
    await settle()
    assert all(t.done() for t in full) and runtime.batches[-1] == 4
    await batcher.close()


async def test_adaptive_delay_judges_a_wait_by_the_requests_it_gathers_not_the_rows() -> None:
    """A lone client that sends 6 rows at a time: the probe's batch has 6 rows but no company,
    so waiting does not turn on, and the next requests run at once."""
    runtime = FakeRuntime()
    clock = FakeClock()
    batcher = Batcher("fake", BatchPolicy(max_batch_size=8), runtime, clock=clock, adaptive_delay=1.0)
    batcher.start()
    for expected_at_once in (15, 0, 31, 0):  # as for one row at a time: probes at 16, then 32 later
        at_once = 0
        for _ in range(expected_at_once or 1):
            task = submit(batcher, [1.0] * 6)
            await settle(2)
            if task.done():
                at_once += 1
            else:
                await clock.advance(1.0)
                await task
        assert at_once == expected_at_once
    assert runtime.batches == [6] * 48
    await batcher.close()


async def test_close_drains_without_waiting_out_the_queue_delay() -> None:
    """A draining close dispatches what is queued at once: the policy's delay (here 10 s on a
    clock that never moves) no longer holds requests back once the batcher is closing."""
    batcher, runtime, _clock = make(BatchPolicy(max_batch_size=8, max_queue_delay=10.0))
    tasks = [submit(batcher, [float(i)]) for i in range(3)]
    await settle()
    assert runtime.batches == []
    await asyncio.wait_for(batcher.close(), 5)
    assert runtime.batches == [3] and all(t.done() for t in tasks)
