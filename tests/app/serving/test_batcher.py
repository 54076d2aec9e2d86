"""The dynamic batcher on its own: merging callers, the batch-size cap, errors, the delay bound."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from app.serving.batcher import DynamicBatcher


def _recording_model(calls: list[int], delay_s: float = 0.0):
    def fn(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        time.sleep(delay_s)
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True).astype(np.float64) * 2

    return fn


def test_batcher_merges_concurrent_callers_and_returns_each_its_rows():
    calls: list[int] = []
    seen: list[int] = []
    batcher = DynamicBatcher(_recording_model(calls, 0.02), max_batch_size=8, max_delay_ms=50, on_batch=seen.append)

    async def main():
        inputs = [np.full((n, 1, 2, 2), i, dtype=np.uint8) for i, n in enumerate([1, 2, 3, 1, 1])]
        outs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        return inputs, outs

    inputs, outs = asyncio.run(main())
    batcher.close()
    for x, out in zip(inputs, outs):
        assert out.shape == (len(x), 1)
        np.testing.assert_array_equal(out[:, 0], x.reshape(len(x), -1).sum(axis=1) * 2)
    # 8 rows submitted at once within the delay: one model call, not five.
    assert calls == [8] and seen == [8]


def test_batcher_never_exceeds_max_batch_size_and_splits_large_requests():
    calls: list[int] = []
    batcher = DynamicBatcher(_recording_model(calls), max_batch_size=4, max_delay_ms=20)

    async def main():
        big = np.arange(10 * 4, dtype=np.uint8).reshape(10, 1, 2, 2)
        small = np.ones((3, 1, 2, 2), dtype=np.uint8)
        return big, await asyncio.gather(batcher.submit(big), batcher.submit(small))

    big, (out_big, out_small) = asyncio.run(main())
    batcher.close()
    assert max(calls) <= 4 and sum(calls) == 13
    np.testing.assert_array_equal(out_big[:, 0], big.reshape(10, -1).sum(axis=1) * 2)
    np.testing.assert_array_equal(out_small[:, 0], np.full(3, 8))


def test_batcher_runs_the_model_off_the_event_loop_and_propagates_errors():
    loop_threads: list[int] = []

    def failing(x):
        loop_threads.append(threading.get_ident())
        raise RuntimeError("model exploded")

    batcher = DynamicBatcher(failing, max_batch_size=4, max_delay_ms=1)

    async def main():
        with pytest.raises(RuntimeError, match="model exploded"):
            await batcher.submit(np.zeros((2, 1, 2, 2), np.uint8))
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    batcher.close()
    assert loop_threads and loop_threads[0] != loop_thread


def test_batcher_alone_does_not_wait_longer_than_its_delay():
    batcher = DynamicBatcher(_recording_model([]), max_batch_size=64, max_delay_ms=10)
    assert _seconds_for_one_submit(batcher) < 0.5


def test_a_lone_request_runs_at_once_not_after_the_delay():
    """Nobody else is being read: the batch does not wait for requests that may never come."""
    calls: list[int] = []
    batcher = DynamicBatcher(_recording_model(calls), max_batch_size=64, max_delay_ms=60_000)
    elapsed = _seconds_for_one_submit(batcher)
    assert calls == [1] and elapsed < 30


def _seconds_for_one_submit(batcher: DynamicBatcher) -> float:
    """Wall time of one lone one-image request; the batcher is closed afterwards."""

    async def main():
        t0 = time.perf_counter()
        await batcher.submit(np.zeros((1, 1, 2, 2), np.uint8))
        return time.perf_counter() - t0

    try:
        return asyncio.run(main())
    finally:
        batcher.close()


def test_requests_queued_within_a_few_loop_turns_share_the_batch():
    """A request whose route runs a turn or two after the first one's is still in its batch."""
    calls: list[int] = []
    batcher = DynamicBatcher(_recording_model(calls), max_batch_size=64, max_delay_ms=60_000)

    async def after(turns: int, x: np.ndarray) -> np.ndarray:
        for _ in range(turns):
            await asyncio.sleep(0)
        return await batcher.submit(x)

    async def main():
        xs = [np.full((1, 1, 2, 2), i, np.uint8) for i in range(3)]
        return xs, await asyncio.gather(after(0, xs[0]), after(1, xs[1]), after(2, xs[2]))

    xs, outs = asyncio.run(main())
    batcher.close()
    assert calls == [3]
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out[:, 0], x.reshape(1, -1).sum(axis=1) * 2)


def test_a_caller_that_went_away_is_left_out_of_the_next_batch():
    calls: list[int] = []
    started, release = threading.Event(), threading.Event()

    def model(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        started.set()
        release.wait(30)
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True).astype(np.float64)

    batcher = DynamicBatcher(model, max_batch_size=64, max_delay_ms=60_000)

    async def main():
        first = asyncio.ensure_future(batcher.submit(np.ones((1, 1, 2, 2), np.uint8)))
        while not started.is_set():  # the first batch is in the model: the next ones queue
            await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit(np.ones((2, 1, 2, 2), np.uint8)))
        await asyncio.sleep(0)
        gone.cancel()
        kept = asyncio.ensure_future(batcher.submit(np.full((3, 1, 2, 2), 2, np.uint8)))
        await asyncio.sleep(0)
        release.set()
        return await first, await kept, gone.cancelled()

    first, kept, cancelled = asyncio.run(main())
    batcher.close()
    assert cancelled and calls == [1, 3]
    np.testing.assert_array_equal(first[:, 0], [4])
    np.testing.assert_array_equal(kept[:, 0], [8, 8, 8])


def _blocking_model(calls: list[int], started: threading.Semaphore, release: threading.Event):
    """A model that records each batch's size, says it has started, and holds until `release`."""
    running, most = [0], [0]
    lock = threading.Lock()

    def fn(x: np.ndarray) -> np.ndarray:
        with lock:
            calls.append(len(x))
            running[0] += 1
            most[0] = max(most[0], running[0])
        started.release()
        release.wait(30)
        with lock:
            running[0] -= 1
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True).astype(np.float64)

    return fn, most


async def _until(started: threading.Semaphore, batches: int) -> None:
    """Wait (off the loop's back) until `batches` more batches are inside the model; fail after 30 s."""
    give_up = time.monotonic() + 30
    for _ in range(batches):
        while not started.acquire(blocking=False):
            assert time.monotonic() < give_up, "the batch never reached the model"
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("instances", [1, 2, 3])
def test_as_many_batches_run_at_once_as_there_are_instances_and_no_more(instances):
    """Each instance holds a batch in the model; the next request waits for a free instance and then
    goes in a batch with everything that queued meanwhile."""
    calls: list[int] = []
    started, release = threading.Semaphore(0), threading.Event()
    fn, most = _blocking_model(calls, started, release)
    batcher = DynamicBatcher(fn, max_batch_size=64, max_delay_ms=60_000, instances=instances)

    async def main():
        held = []
        for i in range(instances):  # one lone request per instance, each its own batch
            held.append(asyncio.ensure_future(batcher.submit(np.full((1, 1, 2, 2), i, np.uint8))))
            await _until(started, 1)
        waiting = [asyncio.ensure_future(batcher.submit(np.full((2, 1, 2, 2), 10 + i, np.uint8))) for i in range(5)]
        for _ in range(20):  # every instance is busy: none of these reaches the model
            await asyncio.sleep(0.005)
        in_model_before_release = len(calls)
        release.set()
        return in_model_before_release, await asyncio.gather(*held), await asyncio.gather(*waiting)

    before, held, waiting = asyncio.run(main())
    batcher.close()
    assert before == instances and most[0] == instances
    # The five queued requests go in only once instances free: with one, all in one batch; with more,
    # the instances freed at once may share them.
    assert calls[:instances] == [1] * instances and sum(calls[instances:]) == 10
    if instances == 1:
        assert calls == [1, 10]
    for i, out in enumerate(held):
        np.testing.assert_array_equal(out[:, 0], [4 * i])
    for i, out in enumerate(waiting):
        np.testing.assert_array_equal(out[:, 0], [4 * (10 + i)] * 2)


def test_instances_must_be_positive():
    with pytest.raises(ValueError, match="instances"):
        DynamicBatcher(_recording_model([]), instances=0)


def test_idle_instances_share_requests_that_arrive_together():
    """A round of requests reaching an idle batcher at once is split among its idle instances (each
    keeps whole requests), not taken by one while the others' cores wait."""
    calls: list[int] = []
    started, release = threading.Semaphore(0), threading.Event()
    fn, most = _blocking_model(calls, started, release)
    batcher = DynamicBatcher(fn, max_batch_size=64, max_delay_ms=60_000, instances=2)

    async def main():
        sizes = [1, 1, 2, 1, 1]
        xs = [np.full((n, 1, 2, 2), i, np.uint8) for i, n in enumerate(sizes)]
        outs = asyncio.gather(*(batcher.submit(x) for x in xs))
        await _until(started, 2)  # both batches in the model at once
        release.set()
        return xs, await outs

    xs, outs = asyncio.run(main())
    batcher.close()
    assert most[0] == 2 and calls == [4, 2]  # 6 rows: the first keeps whole requests up to half or more
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out[:, 0], x.reshape(len(x), -1).sum(axis=1))
