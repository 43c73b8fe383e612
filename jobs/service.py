"""The jobs worker service (``rheo jobs``): runs offline jobs one at a time (``jobs.worker``; docs/jobs.md).

Subscribes to nothing: it watches the ``rheo-jobs`` KV bucket and claims queued jobs by compare-and-set; reads
inputs from and writes results to the ``rheo-job-files`` object store. A SIGTERM puts the running job back in
the queue (another worker, or this one restarted, runs it from the start).
"""

from __future__ import annotations

import asyncio
import sys

from jobs.engine import OfflineEngine
from jobs.table import JobTable
from jobs.worker import JobWorker
from services.runtime import Service, main


class JobsService(Service):
    role = "jobs"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.worker: JobWorker | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        assert self.bus is not None
        table = await JobTable.open(self.bus, replicas=self.settings.nats.kv_replicas)
        engine = OfflineEngine(self.settings)
        self.worker = JobWorker(table, self.settings, self.member_id, engine, engine.chunk_frames())
        self._task = asyncio.create_task(self.worker.serve(), name="jobs-worker")

    async def drain(self) -> None:
        if self.worker is not None and self._task is not None:
            self.worker.stop()
            await self._task


if __name__ == "__main__":
    sys.exit(main(JobsService))
