"""SharedBatcher: requests that wait while a forward pass runs share the next one, off the event loop.

The forward function here records what it was given and can be held, so the test decides when the worker is
busy: a fault the real model cannot be made to produce on demand.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from glm4.embeddings import SharedBatcher


class HeldForward:
    """Doubles each item; the first call waits until released, so later jobs queue up behind it."""

    def __init__(self, fail_on=None):
        self.calls: list[list] = []
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items):
        self.calls.append(list(items))
        self.started.set()
        self.release.wait(10)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("forward failed")
        return [item * 2 for item in items]


async def wait_started(forward: HeldForward):
    await asyncio.get_running_loop().run_in_executor(None, forward.started.wait, 10)


async def test_jobs_queued_behind_a_busy_worker_share_one_pass_and_keep_their_order():
    forward = HeldForward()
    batcher = SharedBatcher(forward, name="test")
    first = asyncio.create_task(batcher.submit([1], [1]))
    await wait_started(forward)
    others = [asyncio.create_task(batcher.submit([10 * n + 3, 10 * n + 1, 10 * n + 2], [3, 1, 2])) for n in range(5)]
    await asyncio.sleep(0.05)  # the event loop is free while the worker is busy: these got queued
    forward.release.set()
    assert await first == [2]
    results = await asyncio.gather(*others)
    assert results == [[2 * (10 * n + 3), 2 * (10 * n + 1), 2 * (10 * n + 2)] for n in range(5)]
    assert len(forward.calls) == 2  # the first pass, then ONE pass for all five waiting jobs
    assert sorted(forward.calls[1]) == sorted(x for n in range(5) for x in (10 * n + 1, 10 * n + 2, 10 * n + 3))
    batcher.close()


async def test_passes_are_cut_at_the_token_budget_shortest_first():
    forward = HeldForward()
    forward.release.set()
    batcher = SharedBatcher(forward, name="test", batch_tokens=100)
    items = list(range(6))
    lengths = [50, 10, 40, 10, 30, 10]
    assert await batcher.submit(items, lengths) == [2 * i for i in items]
    # shortest first; a pass holds what fits padded to its longest: 3×10, then 2×40, then 1×50
    assert forward.calls == [[1, 3, 5], [4, 2], [0]]
    batcher.close()


async def test_a_cancelled_job_is_skipped_and_a_failing_pass_fails_only_its_jobs():
    forward = HeldForward(fail_on=666)
    batcher = SharedBatcher(forward, name="test", batch_items=1)  # one item a pass: each job its own pass
    first = asyncio.create_task(batcher.submit([1], [1]))
    await wait_started(forward)
    gone = asyncio.create_task(batcher.submit([5], [1]))
    failing = asyncio.create_task(batcher.submit([666], [1]))
    fine = asyncio.create_task(batcher.submit([7], [1]))
    await asyncio.sleep(0.05)
    gone.cancel()  # its client went away
    forward.release.set()
    assert await first == [2]
    with pytest.raises(RuntimeError, match="forward failed"):
        await failing
    assert await fine == [14]
    assert [5] not in forward.calls
    batcher.close()
