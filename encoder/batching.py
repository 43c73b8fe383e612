"""A per-process batcher for model work: the jobs ready within one event-loop turn run as one executor call.

Ingest (VAE encode) and the decoder (VAE decode) submit one job per chunk; the batcher hands every job submitted
before its flush to ``run`` at once (``StreamVAE.encode_batch``/``decode_batch`` underneath), so N streams with
a chunk ready cost one model call instead of N. It adds no waiting: with ``window_s = 0`` (``encoder.
batch_window_ms``) it flushes on the next loop turn, and while a batch runs the next jobs queue up for the one
after it (the model thread is busy then anyway). Each job gets its own result or its own exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, Literal, TypeVar

from prometheus_client import Histogram

J = TypeVar("J")
R = TypeVar("R")


BATCH_JOBS = Histogram("rheo_vae_batch_chunks", "chunks (one per stream) in one batched VAE call", ["op"],
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))


class ChunkBatcher(Generic[J, R]):
    """``await submit(job)`` → that job's result from one ``run(jobs)`` call on ``executor`` shared with the jobs
    submitted alongside it. ``run`` returns one result or exception per job, in order."""

    def __init__(self, run: Callable[[list[J]], Sequence[R | BaseException]], executor: Executor | None,
                 window_s: float = 0.0, op: Literal["encode", "decode", "other"] = "other") -> None:
        if window_s < 0:
            raise ValueError("window_s must be >= 0")
        self._run = run
        self._observe = BATCH_JOBS.labels(op=op).observe
        self._executor = executor
        self.window_s = window_s
        self._pending: list[tuple[J, asyncio.Future[R]]] = []
        self._scheduled: asyncio.Handle | None = None
        self._running = False
        self.batches = 0
        """Model calls made (a test and bench figure: jobs per call = submitted / batches)."""
        self.largest = 0

    async def submit(self, job: J) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._pending.append((job, fut))
        if not self._running and self._scheduled is None:
            self._schedule(loop, self.window_s)
        return await fut

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._scheduled = loop.call_later(delay, self._flush) if delay > 0 else loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        if not self._pending or self._running:
            return
        batch, self._pending = self._pending, []
        self._running = True
        asyncio.get_running_loop().create_task(self._execute(batch), name="model-batch")

    async def _execute(self, batch: list[tuple[J, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        self._observe(len(batch))
        try:
            results: Sequence[R | BaseException] = await loop.run_in_executor(
                self._executor, self._run, [job for job, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch run returned {len(results)} results for {len(batch)} jobs")
        except asyncio.CancelledError:  # shutting down: nobody waits for these any longer
            for _, fut in batch:
                fut.cancel()
            raise
        except Exception as e:  # the whole call failed: every job of it gets the error
            results = [e] * len(batch)
        finally:
            self._running = False
            if self._pending:
                self._schedule(loop, 0.0)  # the jobs that came meanwhile have waited enough
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():  # its submitter was cancelled: the work ran (states stay consistent), nobody waits
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
