"""Dynamic batching of inference calls across concurrent requests.

The same idea as Triton's `dynamic_batching { max_queue_delay_microseconds }` and BentoML's adaptive
batching: requests wait in a queue for at most `max_delay_ms`, are concatenated up to
`max_batch_size` images, run through the model once in a worker thread (never on the event loop),
and each caller gets back its own rows.

A batch waits for the requests the server is already reading (they reach the queue within a few
turns of the event loop), not for a fixed window: closed-loop clients (each waits for its answer
before it sends again) were held `max_delay_ms` on every request, and an idle model waited for
nobody. While the model runs, new requests queue and form the next batch, so batches still grow
with the load.

`instances` batches may run at once, each in its own thread (Triton's `instance_group { count }`):
on a CPU, two instances of one torch thread each keep both cores on the model with no barrier
between them, where one instance of two threads stalls a whole layer whenever the event loop takes
one of its cores. A batch is formed only when an instance is free, so it takes everything queued;
requests that arrive together while several instances are idle are shared among them.

    batcher = DynamicBatcher(predictor.predict, max_batch_size=64, max_delay_ms=5)
    probs = await batcher.submit(images)      # images: (n, C, H, W) uint8 -> (n, K)
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

BatchFn = Callable[[np.ndarray], np.ndarray]

# Turns of the event loop without a new request after which a batch stops waiting: a request whose
# bytes have arrived is read, checked and queued within two turns (read, then run the route).
_QUIET_TURNS = 3


@dataclass
class _Request:
    inputs: np.ndarray
    future: asyncio.Future = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.inputs)


class DynamicBatcher:
    """Collects concurrent `submit` calls into batches of at most `max_batch_size` rows.

    A request larger than `max_batch_size` is cut into chunks, so a batch never exceeds the limit
    (the limit usually reflects accelerator memory). One batch runs at a time per instance (one by
    default): while they run, new requests pile up in the queue and form the next batch, which is
    what makes batches grow under load; a batch waits for the requests being read, at most
    `max_delay_ms`. With `instances` > 1, `fn` must be safe to call from several threads at once, as
    a torch model in inference mode is.
    """

    def __init__(
        self,
        fn: BatchFn,
        *,
        max_batch_size: int = 64,
        max_delay_ms: float = 5.0,
        instances: int = 1,
        executor: Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_delay_ms < 0:
            raise ValueError("max_delay_ms must be >= 0")
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.instances = instances
        # One thread per instance: a batch never waits for a thread, and no more run at once.
        self._executor = executor or ThreadPoolExecutor(max_workers=instances, thread_name_prefix="batcher")
        self._on_batch = on_batch
        # A batcher may be used from several event loops (each test client runs its own loop); each
        # loop gets its own queue and worker task, created on first use.
        self._lock = threading.Lock()
        self._queues: dict[asyncio.AbstractEventLoop, asyncio.Queue[_Request]] = {}
        self._workers: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
        self._running: set[asyncio.Task] = set()  # batches in the model (a reference keeps each task alive)

    async def submit(self, inputs: np.ndarray) -> np.ndarray:
        """Queue `inputs` (n, ...) and wait for the model's (n, ...) output for exactly these rows."""
        if len(inputs) == 0:
            raise ValueError("submit() needs at least one row")
        queue = self._queue_for_current_loop()
        loop = asyncio.get_running_loop()
        if len(inputs) <= self.max_batch_size:  # one chunk: no gather (a task per chunk) needed
            req = _Request(inputs, loop.create_future())
            queue.put_nowait(req)
            return await req.future
        requests = []
        for start in range(0, len(inputs), self.max_batch_size):
            req = _Request(inputs[start : start + self.max_batch_size], loop.create_future())
            requests.append(req)
            queue.put_nowait(req)
        outputs = await asyncio.gather(*(r.future for r in requests))
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def queue_depth(self) -> int:
        """Rows waiting (not yet in a running batch), over all loops."""
        with self._lock:
            queues = list(self._queues.values())
        return sum(q.qsize() for q in queues)

    def close(self) -> None:
        with self._lock:
            workers = list(self._workers.items())
            self._workers.clear()
            self._queues.clear()
        with self._lock:
            running = list(self._running)
            self._running.clear()
        for task in [t for _, t in workers] + running:
            loop = task.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(task.cancel)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- internals ---------------------------------------------------------------------------

    def _queue_for_current_loop(self) -> asyncio.Queue[_Request]:
        loop = asyncio.get_running_loop()
        with self._lock:
            # Forget loops that have been closed (finished test clients) so they do not leak.
            for dead in [lp for lp in self._queues if lp.is_closed()]:
                del self._queues[dead]
                self._workers.pop(dead, None)
            queue = self._queues.get(loop)
            task = self._workers.get(loop)
            if queue is None or task is None or task.done():
                queue = asyncio.Queue()
                self._queues[loop] = queue
                self._workers[loop] = loop.create_task(self._work(queue), name="dynamic-batcher")
            return queue

    async def _work(self, queue: asyncio.Queue[_Request]) -> None:
        loop = asyncio.get_running_loop()
        free = asyncio.Semaphore(self.instances)
        busy = [0]  # instances with a batch in the model
        # Requests taken from the queue but not yet in a batch: they go first, in their order.
        pending: deque[_Request] = deque()
        while True:
            # An instance first, then the batch: requests that came while all instances were busy are
            # all in the queue by then, and this batch takes them (continuous batching).
            await free.acquire()
            first = pending.popleft() if pending else await queue.get()
            batch, rows = [first], first.size
            deadline = loop.time() + self.max_delay
            quiet = 0
            while rows < self.max_batch_size:
                if pending:
                    nxt = pending.popleft()
                elif queue.empty():
                    # Wait for the requests this process is reading already: they reach the queue within
                    # a few turns of the event loop. Never for requests not sent yet (no timer): the
                    # model starts as soon as the loop turns bring nothing new, or at the deadline.
                    if quiet >= _QUIET_TURNS or loop.time() >= deadline:
                        break
                    quiet += 1
                    await asyncio.sleep(0)
                    continue
                else:
                    quiet = 0
                    nxt = queue.get_nowait()
                if rows + nxt.size > self.max_batch_size:
                    pending.appendleft(nxt)  # starts the next batch; never split a caller's chunk
                    break
                batch.append(nxt)
                rows += nxt.size
            # Instances left idle share the rows with this one: with fast clients a whole round of
            # requests arrives at once, and one instance taking all of it left the others' cores idle.
            idle = self.instances - busy[0] - 1
            if idle > 0 and len(batch) > 1:
                share, kept = -(-rows // (idle + 1)), 0
                for i, r in enumerate(batch):
                    kept += r.size
                    if kept >= share:
                        batch, rest = batch[: i + 1], batch[i + 1 :]
                        pending.extendleft(reversed(rest))
                        break
            busy[0] += 1
            task = loop.create_task(self._run(batch))
            with self._lock:
                self._running.add(task)
            task.add_done_callback(lambda t: self._finished(t, free, busy))

    def _finished(self, task: asyncio.Task, free: asyncio.Semaphore, busy: list[int]) -> None:
        with self._lock:
            self._running.discard(task)
        busy[0] -= 1
        free.release()

    async def _run(self, batch: list[_Request]) -> None:
        live = [r for r in batch if not r.future.cancelled()]  # callers that went away
        if not live:
            return
        inputs = live[0].inputs if len(live) == 1 else np.concatenate([r.inputs for r in live])
        if self._on_batch is not None:
            self._on_batch(len(inputs))
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, self.fn, inputs)
        except Exception as exc:  # noqa: BLE001 - any model error goes to every caller in the batch
            for r in live:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        start = 0
        for r in live:
            if not r.future.done():
                r.future.set_result(outputs[start : start + r.size])
            start += r.size
