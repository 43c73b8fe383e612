"""encoder/batching.py: the jobs ready within one loop turn run as one call; each job gets its own result or error."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from encoder.batching import ChunkBatcher


def _run(jobs: list[int]) -> list[int | Exception]:
    return [ValueError(f"bad {j}") if j < 0 else j * 10 for j in jobs]


async def test_ready_jobs_share_one_call_and_errors_stay_per_job():
    calls: list[list[int]] = []

    def run(jobs: list[int]) -> list[int | Exception]:
        calls.append(list(jobs))
        return _run(jobs)

    with ThreadPoolExecutor(1) as pool:
        b: ChunkBatcher[int, int] = ChunkBatcher(run, pool)
        results = await asyncio.gather(*(b.submit(j) for j in (1, 2, -3, 4)), return_exceptions=True)
    assert results[:2] == [10, 20] and results[3] == 40
    assert isinstance(results[2], ValueError)
    assert calls == [[1, 2, -3, 4]] and b.batches == 1 and b.largest == 4


async def test_jobs_arriving_during_a_batch_form_the_next_one():
    """No added waiting: the first job runs at once; what comes while it runs is the next call, in order."""
    started, release = threading.Event(), threading.Event()
    calls: list[list[int]] = []

    def run(jobs: list[int]) -> list[int | Exception]:
        calls.append(list(jobs))
        if len(calls) == 1:
            started.set()
            release.wait(5)
        return _run(jobs)

    with ThreadPoolExecutor(1) as pool:
        b: ChunkBatcher[int, int] = ChunkBatcher(run, pool)
        first = asyncio.create_task(b.submit(1))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        later = [asyncio.create_task(b.submit(j)) for j in (2, 3)]
        await asyncio.sleep(0)
        release.set()
        assert await first == 10 and [await t for t in later] == [20, 30]
    assert calls == [[1], [2, 3]]


async def test_a_failed_call_fails_its_jobs_only():
    def run(jobs: list[int]) -> list[int | Exception]:
        if 0 in jobs:
            raise RuntimeError("model call failed")
        return _run(jobs)

    b: ChunkBatcher[int, int] = ChunkBatcher(run, None)
    with pytest.raises(RuntimeError, match="model call failed"):
        await b.submit(0)
    assert await b.submit(5) == 50
    with pytest.raises(ValueError):
        ChunkBatcher(run, None, window_s=-1)


async def test_window_collects_jobs_submitted_within_it():
    calls: list[list[int]] = []

    def run(jobs: list[int]) -> list[int | Exception]:
        calls.append(list(jobs))
        return _run(jobs)

    b: ChunkBatcher[int, int] = ChunkBatcher(run, None, window_s=0.2)
    first = asyncio.create_task(b.submit(1))
    await asyncio.sleep(0.01)  # a later loop turn, still inside the window
    second = asyncio.create_task(b.submit(2))
    assert [await first, await second] == [10, 20]
    assert calls == [[1, 2]]
