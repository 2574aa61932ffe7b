"""`--grpc-server threads`: gRPC on grpcio's thread-pool server, in front of the same data plane.

grpc.aio pays for each RPC in Python on the event loop's thread (a task, its callbacks, the
completion-queue poller's hand-offs); grpcio's synchronous server reads the completion queue
in C and calls a plain function on a pool thread. On the 2-core box a do-nothing V2 server did
1.3-1.5x grpc.aio's throughput that way at concurrency 64 (docs/benchmarks.md). This module
serves the existing async servicers (inference, health, reflection) unchanged on that server:

- The loop's lock (`new_loop`): the loop thread holds it except while it waits in `select`.
  A pool thread that holds it is the loop as far as loop-owned state is concerned (batchers,
  statistics, the repository), so nothing needs a second kind of safety.
- `LoopBridge` steps a handler's coroutine on the pool thread, holding that lock. The inline
  inference path never suspends, so a request costs no hand-off: no loop wake-up, no task,
  no future. A coroutine that waits (a batch in a worker thread, a stream between messages)
  lets the lock go and sleeps until its future is done.
- `ElasticPool` runs two handler threads at once (`--grpc-threads`). More running threads
  lose to the convoy of the GIL and the loop lock (32 threads did 0.6x grpc.aio); a thread
  whose call waits lends its place to a spare, so waiting calls (requests in a batcher's
  queue, open streams) never exhaust the pool.

Measured against grpc.aio in the same alternating runs, the gain and its limits are in
docs/benchmarks.md ("a frontend that is not grpc.aio").
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import selectors
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

_END = object()


class _LockingSelector(selectors.BaseSelector):
    """The loop's selector, releasing the loop lock while it waits: the loop thread holds the
    lock whenever it runs anything, and a pool thread that takes it may run loop-owned code
    (hub.protocol.threaded's handlers) as if it were the loop."""

    def __init__(self, lock: threading.Lock) -> None:
        self.inner = selectors.DefaultSelector()
        self.lock = lock

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.lock.release()
        try:
            return self.inner.select(timeout)
        finally:
            self.lock.acquire()

    def close(self) -> None:
        self.inner.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self.inner.get_map()


def new_loop() -> asyncio.AbstractEventLoop:
    """An event loop that `--grpc-server threads` can serve from: a selector loop whose lock the
    calling thread (the one that will run it) holds except while the loop waits for events."""
    lock = threading.Lock()
    lock.acquire()
    return asyncio.SelectorEventLoop(_LockingSelector(lock))


def loop_lock(loop: asyncio.AbstractEventLoop) -> threading.Lock | None:
    """The lock of a loop made by `new_loop`, or None for any other loop."""
    selector = getattr(loop, "_selector", None)
    return selector.lock if isinstance(selector, _LockingSelector) else None


class LoopBridge:
    """Run the loop's coroutines on the calling pool thread, holding the loop lock.

    The handler's coroutine is stepped here, as a task would step it, but on this thread:
    the inline inference path never suspends, so a request costs no hand-off at all (no
    loop wake-up, no task). When the coroutine waits on a future (a batch computing in a
    worker, a stream's queue), this thread lets the lock go, sleeps until the future is done
    (its done-callback runs on the loop), and takes the lock again for the next step.
    Whoever holds the lock is the loop as far as the data plane can tell
    (`get_running_loop()` answers the loop); callbacks it schedules wake the loop when the
    lock is let go.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, lock: threading.Lock, pool: ElasticPool) -> None:
        self.loop = loop
        self.lock = lock
        self.pool = pool

    def call(self, coro: Any, rpc: _Rpc | None = None) -> Any:
        """`coro`'s result (or its exception). If `rpc` ends first (the client cancelled,
        its deadline passed), the future it waits on is cancelled, as a task's would be."""
        loop, lock = self.loop, self.lock
        ready: Any = getattr(loop, "_ready", None)  # asyncio's queue of callbacks due now
        while True:
            with lock:
                asyncio.events._set_running_loop(loop)
                try:
                    try:
                        waiting = coro.send(None)
                    except StopIteration as stop:
                        return stop.value
                    if waiting is None:  # a bare yield (asyncio.sleep(0)): step again
                        continue
                    waiting._asyncio_future_blocking = False
                    wake = threading.Lock()
                    wake.acquire()
                    waiting.add_done_callback(lambda _, wake=wake: wake.release())
                    if rpc is not None:
                        rpc.waiting_on(waiting)
                finally:
                    asyncio.events._set_running_loop(None)
                    if ready:  # scheduled here with call_soon: the loop may be asleep in select
                        loop.call_soon_threadsafe(_nothing)
            self.pool.park()  # another thread may take the next call while this one waits
            wake.acquire()
            self.pool.unpark()


def _nothing() -> None:
    pass


class _Rpc:
    """The future an RPC's thread waits on, cancelled when the RPC ends (one callback per RPC,
    however many messages a stream carries)."""

    __slots__ = ("ended", "future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, context: grpc.ServicerContext) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] | None = None
        self.ended = not context.add_callback(self._end)  # False: it has ended already

    def waiting_on(self, future: asyncio.Future[Any]) -> None:  # holding the loop lock
        self.future = future
        if self.ended:
            future.cancel()

    def _end(self) -> None:  # on one of grpc's threads, for every RPC: wake the loop only if need be
        self.ended = True
        future = self.future
        if future is not None and not future.done():
            self.loop.call_soon_threadsafe(future.cancel)


class _AioContext:
    """A thread-pool server's context with grpc.aio's signatures where they differ (`abort` and
    `send_initial_metadata` are awaited there; `abort` need not name details), for the
    handlers written for grpc.aio (grpc_health's aio servicer aborts with a code alone)."""

    __slots__ = ("_context", "_loop", "_written")

    #: grpcio's synchronous server does not cancel a handler when its call's deadline passes
    #: (grpc.aio does; hub.protocol.servicer waits for that).
    cancelled_at_deadline = False

    def __init__(
        self,
        context: grpc.ServicerContext,
        loop: asyncio.AbstractEventLoop,
        written: queue.SimpleQueue[Any] | None = None,
    ) -> None:
        self._context = context
        self._loop = loop
        self._written = written  # where a streaming coroutine's `write`s go

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def peer(self) -> str:
        return self._context.peer()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """grpc.aio's: `callback(context)` on the loop once the call has ended. grpcio's
        `add_callback` runs its callback on one of grpc's threads, and not at all when the call
        has ended already."""

        def on_loop() -> None:
            try:
                self._loop.call_soon_threadsafe(callback, self)
            except RuntimeError:  # the loop closed: nobody counts any more
                pass

        if not self._context.add_callback(on_loop):
            on_loop()

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def cancelled(self) -> bool:
        return not self._context.is_active()

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        if trailing_metadata:
            self._context.set_trailing_metadata(trailing_metadata)
        self._context.abort(code, details)  # raises; the pool thread re-raises it to grpc

    async def write(self, message: Any) -> None:
        if self._written is None:
            raise RuntimeError("write() is for response-streaming calls")
        self._written.put(message)

    async def send_initial_metadata(self, metadata: Any) -> None:
        self._context.send_initial_metadata(metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _AsyncRequests:
    """A sync stream's request iterator as the async one an aio handler expects. Each message
    is read on a thread when the handler asks for it, so a handler that stops reading (a full
    stream, see ModelStreamInfer) holds the client back by flow control, as on grpc.aio."""

    def __init__(self, requests: Iterator[Any], pool: ThreadPoolExecutor) -> None:
        self._requests = requests
        self._pool = pool

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        loop = asyncio.get_running_loop()
        item = await loop.run_in_executor(self._pool, next, self._requests, _END)
        if item is _END:
            raise StopAsyncIteration
        return item


class ThreadedServer:
    """What the generated `add_*_to_server` functions and `enable_server_reflection` see in
    place of a server: they register their aio handlers here, and each is wrapped to run
    under the loop's lock (`LoopBridge`) before it reaches the grpcio server."""

    def __init__(self, server: grpc.Server, bridge: LoopBridge, readers: ThreadPoolExecutor) -> None:
        self.server = server
        self.bridge = bridge
        self.readers = readers

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.server.add_generic_rpc_handlers(tuple(_Wrapped(generic, self.wrap) for generic in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(service, {m: self.wrap(h) for m, h in handlers.items()})

    def wrap(self, handler: Any) -> Any:
        """`handler` (an RpcMethodHandler of async behaviours) with sync behaviours that step
        them under the loop's lock. A handler that is already sync is left as it is."""
        bridge = self.bridge
        if handler.unary_unary is not None:
            behaviour = handler.unary_unary
            if not inspect.iscoroutinefunction(behaviour):
                return handler

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                return bridge.call(behaviour(request, _AioContext(context, bridge.loop)), _Rpc(bridge.loop, context))

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream is not None:
            behaviour = handler.unary_stream
            if not _asynchronous(behaviour):
                return handler

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                return self._stream(lambda aio: behaviour(request, aio), context)

            return handler._replace(unary_stream=unary_stream)
        if handler.stream_stream is not None:
            behaviour = handler.stream_stream
            if not _asynchronous(behaviour):
                return handler

            def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                return self._stream(lambda aio: behaviour(_AsyncRequests(requests, self.readers), aio), context)

            return handler._replace(stream_stream=stream_stream)
        behaviour = handler.stream_unary
        if not inspect.iscoroutinefunction(behaviour):
            return handler

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            rpc = _Rpc(bridge.loop, context)
            return bridge.call(
                behaviour(_AsyncRequests(requests, self.readers), _AioContext(context, bridge.loop)), rpc
            )

        return handler._replace(stream_unary=stream_unary)

    def _stream(self, start: Callable[[_AioContext], Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """A streaming behaviour's responses: an async generator's items, or what a coroutine
        writes with `context.write` (grpc.aio's other way, grpc_health's Watch)."""
        written: queue.SimpleQueue[Any] = queue.SimpleQueue()
        behaviour = start(_AioContext(context, self.bridge.loop, written))
        if inspect.isasyncgen(behaviour):
            return self._iterate(behaviour, context)
        return self._written(behaviour, written, context)

    def _written(self, coro: Any, written: queue.SimpleQueue[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """Run a coroutine that writes its responses as a task on the loop, and yield them."""
        loop = self.bridge.loop
        task: list[asyncio.Task[Any]] = []

        def begin() -> None:
            task.append(loop.create_task(coro))
            task[0].add_done_callback(lambda _: written.put(_END))

        def end() -> None:
            if task and not task[0].done():
                task[0].cancel()

        loop.call_soon_threadsafe(begin)
        context.add_callback(lambda: loop.call_soon_threadsafe(end))
        while True:
            self.bridge.pool.park()
            item = written.get()
            self.bridge.pool.unpark()
            if item is _END:
                break
            yield from self._sent(item)
        if not task[0].cancelled() and (exc := task[0].exception()) is not None:
            raise exc

    def _sent(self, response: Any) -> Iterator[Any]:
        """Hand `response` to grpc, which sends it on this thread before it asks for the next:
        it waits there for the client's flow-control window, so the thread gives its running
        place up meanwhile. A client that reads none of a stream's answers held a place for
        as long as it stayed; two such streams held both (`--grpc-threads 2`), and every other
        call of the server waited for them to go (a unary call took 7.9 s)."""
        pool = self.bridge.pool
        pool.park()
        try:
            yield response
        finally:
            pool.unpark()

    def _iterate(self, responses: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """An async generator's items, each stepped under the loop's lock."""
        rpc = _Rpc(self.bridge.loop, context)
        finished = False
        try:
            while True:
                try:
                    response = self.bridge.call(responses.__anext__(), rpc)
                except StopAsyncIteration:
                    finished = True
                    return
                yield from self._sent(response)
        finally:
            if not finished:  # closed early (the RPC ended, or this iterator was dropped)
                loop = self.bridge.loop
                if not loop.is_closed():
                    loop.call_soon_threadsafe(loop.create_task, _close(responses))


async def _close(responses: Any) -> None:
    try:
        await responses.aclose()
    except RuntimeError:  # a step of it is still being cancelled; it finishes with that step
        pass


def _asynchronous(behaviour: Any) -> bool:
    return inspect.isasyncgenfunction(behaviour) or inspect.iscoroutinefunction(behaviour)


class _Wrapped(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped (once per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrap: Callable[[Any], Any]) -> None:
        self.inner = inner
        self.wrap = wrap
        self.cache: dict[str, Any] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if method in self.cache:
            return self.cache[method]
        handler = self.inner.service(handler_call_details)
        if handler is None:  # not this service's (a client may name any method: not cached)
            return None
        wrapped = self.cache[method] = self.wrap(handler)
        return wrapped


class ElasticPool(futures.Executor):
    """grpcio's handler pool: `running` threads take calls, and a thread whose call waits on
    the loop (a batch computing, a stream between messages) hands its place to another.

    A fixed pool is either too small (every waiting call holds a thread: a pool of 2 batches at
    most 2 requests, and two open streams stall everything) or too large: with 32 threads at
    concurrency 64 on the 2-core box each call put a thread to sleep and woke it again, and
    throughput fell to 0.6x of grpc.aio's (docs/benchmarks.md). Here the `running` threads
    take the next call from the queue without sleeping while there is one, and only a call
    that waits (`park`) lets a spare thread (started on demand, at most `limit` in all) run.
    A parked thread that wakes finishes its call, then waits for a place again.
    """

    def __init__(self, running: int, limit: int, name: str = "grpc") -> None:
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._places = threading.Semaphore(running)
        self._handoff = threading.Semaphore(0)  # places handed to threads back from a wait (`unpark`)
        self._running = running
        self._limit = max(limit, running)
        self._name = name
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._spare = 0  # threads waiting for a place
        self._local = threading.local()
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        if self._closed:
            raise RuntimeError("the gRPC handler pool is shut down")
        future: futures.Future[Any] = futures.Future()
        self._work.put((future, fn, args, kwargs))
        if len(self._threads) < self._running:
            self._start()
        return future

    def park(self) -> None:
        """The calling pool thread is about to wait: give its place to another."""
        local = self._local
        if getattr(local, "placed", False):
            local.placed = False
            local.parked = True
            self._places.release()
            if self._spare == 0:  # nobody waits to take the place: one more thread, if allowed
                self._start()

    def unpark(self) -> None:
        """The calling thread's wait is over: take a place back before going on, from the next
        placed thread to finish a call (`_YIELD` in the queue), so that no more than `running`
        threads ever compete for the interpreter."""
        local = self._local
        if getattr(local, "parked", False):
            local.parked = False
            self._work.put(_YIELD)
            self._handoff.acquire()
            local.placed = True

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        while cancel_futures:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._work.put(None)
            self._places.release()
        if wait:
            for thread in threads:
                thread.join()

    def _start(self) -> None:
        with self._lock:
            if len(self._threads) >= self._limit or self._closed:
                return
            thread = threading.Thread(target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        local = self._local
        while True:
            with self._lock:
                self._spare += 1
            self._places.acquire()
            with self._lock:
                self._spare -= 1
            local.placed = True
            while local.placed:
                item = self._work.get()
                if item is None:
                    return
                if item is _YIELD:  # a thread back from a wait takes this one's place
                    local.placed = False
                    self._handoff.release()
                    break
                future, fn, args, kwargs = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # the future carries it, as a ThreadPoolExecutor's does
                    future.set_exception(exc)
                    del exc
                else:
                    future.set_result(result)
                del item, future, fn, args, kwargs


_YIELD = object()

#: The most handler threads one server holds: calls waiting on the loop (requests in a
#: batcher's queue, open streams) beyond this wait for a thread.
MAX_THREADS = 1024


def threaded_server(
    loop: asyncio.AbstractEventLoop,
    lock: threading.Lock,
    threads: int,
    options: list[tuple[str, Any]],
    interceptors: list[grpc.ServerInterceptor] | None = None,
) -> tuple[grpc.Server, ThreadedServer, Callable[[], None]]:
    """A grpcio server whose pool runs `threads` calls at once, the registration facade for
    it, and a function that frees its threads once the server has stopped."""
    handlers = ElasticPool(threads, MAX_THREADS)
    readers = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="grpc-read")
    server = grpc.server(handlers, interceptors=interceptors, options=options)

    def close() -> None:
        handlers.shutdown(wait=False, cancel_futures=True)
        readers.shutdown(wait=False, cancel_futures=True)

    return server, ThreadedServer(server, LoopBridge(loop, lock, handlers), readers), close
