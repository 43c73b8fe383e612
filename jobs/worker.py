"""One job at a time: claim the oldest queued job, run it through the offline engine, report, store the result.

The worker claims by compare-and-set on the job's record (``JobTable.update``), so of several workers exactly one
runs a job; the rest stay queued (their position is their place by age). The engine (``pipeline.offline``: the
code ``rheo run`` runs) works in a thread; the event loop records progress every ``jobs.progress_interval_s`` and
passes a cancel (``cancel_requested`` set by the API) to the engine's frame callback, which stops the run. A
running job whose worker stopped reporting for ``jobs.stale_after_s`` (its process was killed) is failed by the
next worker that looks, with that reason: no job stays "running" forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import nats.js.errors
from prometheus_client import Counter, Gauge

from jobs.table import JobNotFound, JobTable, chunks_of, input_name, result_name
from media.video_file import InputError
from proto import JobRecord
from proto.jobs import JobParams
from services.bus import KV
from services.config import Settings
from services.runtime import in_daemon_thread, watch_keys

log = logging.getLogger("rheo.jobs")

OUTCOMES = ("done", "failed", "cancelled", "requeued", "worker_lost")
JOBS_FINISHED = Counter("rheo_jobs_finished_total", "jobs this worker ended, by outcome", ["outcome"])
for _o in OUTCOMES:
    JOBS_FINISHED.labels(_o)
JOB_RUNNING = Gauge("rheo_jobs_running", "1 while this worker runs a job")


class JobCancelled(Exception):
    """The API cancelled the running job (raised inside the engine's frame callback)."""


class WorkerStopping(Exception):
    """This worker is draining: the job goes back to the queue."""


@dataclass
class Progress:
    """What the engine thread reports and the loop reads (one writer, one reader: plain fields suffice)."""

    frames: int = 0
    cancel: str = ""
    """Set by the loop: ``cancelled`` or ``stopping`` makes the engine's next frame callback raise."""


Engine = Callable[[JobParams, Path | None, Path, Callable[[int], None]], int]
"""(params, input file or None for T2V, output MP4, frame callback) → output frames written (in a thread)."""


class JobWorker:
    def __init__(self, table: JobTable, settings: Settings, member_id: str, engine: Engine,
                 clock: tuple[int, int] = (5, 4)) -> None:
        self.table = table
        self.cfg = settings.jobs
        self.member_id = member_id
        self.engine = engine
        self.clock = clock
        """(frames of the first chunk, frames of every later one): progress is also told in chunks."""
        self.current: str | None = None
        self._progress = Progress()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._progress.cancel = "stopping"

    async def serve(self) -> None:
        """Until ``stop``: run the next job, or wait for a change of the table (or a poll)."""
        watcher = asyncio.create_task(self._watch(), name="jobs-watch")
        try:
            while not self._stop.is_set():
                try:
                    record = await self._claim_next()
                    if record is not None:
                        await self._run(record)
                        continue
                except (nats.errors.Error, TimeoutError) as e:  # the bus is back within a poll; so is the worker
                    log.warning("jobs: the table did not answer (%s); retrying", type(e).__name__)
                except Exception:  # never a silently dead loop behind a healthy-looking service
                    log.exception("jobs: unexpected error; retrying")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.cfg.stale_after_s / 4):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self) -> None:
        """Wake the claim loop when a job is queued (its poll runs anyway: a lost watch only delays a claim)."""

        async def table() -> KV:
            return self.table.kv

        async def on_entry(_key: str, value: bytes | None, _revision: int) -> None:
            record = self.table.record(value) if value is not None else None
            if record is not None and record.state == "queued":  # not on every progress report
                self._wake.set()

        await watch_keys(table, ">", on_entry, what="jobs: the job table", retry_s=1.0)

    async def _claim_next(self) -> JobRecord | None:
        records = await self.table.list()
        for record in records:
            if record.state == "running" and self._stale(record):
                await self._finish(record.job_id, "failed", "worker_lost",
                                   f"its worker ({record.worker}) stopped reporting for {self.cfg.stale_after_s:g}s",
                                   only_if=self._stale)
        for record in records:
            if record.state != "queued":
                continue

            def claim(r: JobRecord) -> JobRecord | None:
                if r.state != "queued":
                    return None
                return r.model_copy(update={"state": "running", "worker": self.member_id, "started_at": time.time(),
                                            "frames_done": 0, "chunks_done": 0})
            try:
                claimed = await self.table.update(record.job_id, claim)
            except JobNotFound:
                continue
            if claimed.state == "running" and claimed.worker == self.member_id:
                return claimed
        return None

    async def _run(self, record: JobRecord) -> None:
        job_id = record.job_id
        self.current, self._progress = job_id, Progress()
        if self._stop.is_set():
            self._progress.cancel = "stopping"
        JOB_RUNNING.set(1)
        log.info("job %s: running (%s)", job_id, "T2V" if record.params.t2v else record.input_name)
        with tempfile.TemporaryDirectory(prefix=f"rheo-job-{job_id}-") as tmp:
            source = None if record.params.t2v else Path(tmp) / "input"
            output = Path(tmp) / "result.mp4"
            try:
                if source is not None:
                    await self.table.fetch_file(input_name(job_id), source)
                work = asyncio.create_task(in_daemon_thread(self.engine, record.params, source, output,
                                                            self._on_frames))
                await self._report_until(work, record)
                frames = await work
                size = await self.table.put_file(result_name(job_id), output)
                await self._finish(job_id, "done", "done", "", frames_done=frames, result_bytes=size)
            except JobCancelled:
                await self._finish(job_id, "cancelled", "cancelled", "cancelled through the API")
            except WorkerStopping:
                await self._requeue(job_id)
            except Exception as e:  # the job fails with the reason; the worker goes on with the next

                reason = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
                if source is not None:  # the worker's temp path means nothing to the caller: their file's name
                    reason = reason.replace(str(source), repr(record.input_name))
                log.warning("job %s failed: %s", job_id, reason)
                await self._finish(job_id, "failed", "failed", reason.splitlines()[0] if reason else "failed")
            finally:
                self.current = None
                JOB_RUNNING.set(0)

    def _on_frames(self, frames: int) -> None:
        """The engine thread's frame callback: record the count, stop the run when asked to."""
        self._progress.frames = frames
        if self._progress.cancel == "cancelled":
            raise JobCancelled
        if self._progress.cancel == "stopping":
            raise WorkerStopping

    async def _report_until(self, work: asyncio.Task[int], record: JobRecord) -> None:
        """Every ``progress_interval_s`` while the engine runs: write its progress, read a cancel."""
        first, per = self.clock
        while not work.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.progress_interval_s):
                    await asyncio.shield(work)
            frames = self._progress.frames

            def report(r: JobRecord, frames: int = frames) -> JobRecord | None:
                if r.state != "running" or r.worker != self.member_id:
                    return None
                return r.model_copy(update={"frames_done": frames, "chunks_done": min(
                    r.chunks_total or frames, chunks_of(frames, first, per))})
            try:  # also when nothing moved: the write is the worker's sign of life (``stale_after_s``)
                now = await self.table.update(record.job_id, report)
            except (nats.errors.Error, TimeoutError, JobNotFound) as e:
                log.warning("job %s: progress not recorded: %s", record.job_id, type(e).__name__)
                continue
            if now.cancel_requested and not self._progress.cancel:
                self._progress.cancel = "cancelled"

    def _stale(self, record: JobRecord) -> bool:
        return record.state == "running" and time.time() - record.updated_at > self.cfg.stale_after_s

    async def _finish(self, job_id: str, state: str, outcome: str, reason: str,
                      only_if: Callable[[JobRecord], bool] | None = None, **fields: object) -> None:
        def end(r: JobRecord) -> JobRecord | None:
            if r.finished or (only_if is not None and not only_if(r)):  # checked on the record as it is now
                return None
            extra = dict(fields)
            if state == "done":  # the counts as they came out
                chunks = r.chunks_total or chunks_of(int(extra["frames_done"]), *self.clock)  # type: ignore[call-overload]
                extra.update(frames_total=extra["frames_done"], chunks_done=chunks, chunks_total=chunks)
            return r.model_copy(update={"state": state, "reason": reason, "finished_at": time.time(), **extra})
        with contextlib.suppress(JobNotFound):  # deleted meanwhile: nothing to record
            await self.table.update(job_id, end)
        JOBS_FINISHED.labels(outcome).inc()
        log.info("job %s: %s%s", job_id, state, f" ({reason})" if reason else "")

    async def _requeue(self, job_id: str) -> None:
        def back(r: JobRecord) -> JobRecord | None:
            if r.finished:
                return None
            return r.model_copy(update={"state": "queued", "worker": "", "frames_done": 0, "chunks_done": 0,
                                        "reason": "requeued: its worker stopped"})
        with contextlib.suppress(JobNotFound):
            await self.table.update(job_id, back)
        JOBS_FINISHED.labels("requeued").inc()
        log.info("job %s: back in the queue (worker stopping)", job_id)

