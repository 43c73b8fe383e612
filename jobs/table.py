"""The job table: ``JobRecord``s in the ``rheo-jobs`` KV bucket and their files in the ``rheo-job-files`` object
store. The gateway and the workers both go through it; every state change is a compare-and-set, so a claim, a
cancel and a progress report never overwrite each other."""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats.js.errors
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from proto import Buckets, JobRecord, ProtocolError, decode
from services.bus import KV, Bus

__all__ = ["JobNotFound", "JobTable", "chunks_of", "input_name", "new_job_id", "queue_positions", "result_name"]


class JobNotFound(LookupError):
    """No job with that id."""


def new_job_id() -> str:
    return "j" + secrets.token_hex(8)


def input_name(job_id: str) -> str:
    return f"{job_id}.input"


def result_name(job_id: str) -> str:
    return f"{job_id}.mp4"


def chunks_of(frames: int, first: int, per_chunk: int) -> int:
    """Chunks that carry ``frames`` input frames (the first chunk takes ``first``, each later one ``per_chunk``)."""
    if frames <= 0:
        return 0
    return 1 + max(0, math.ceil((frames - first) / max(1, per_chunk)))


def queue_positions(records: list[JobRecord]) -> dict[str, int]:
    """Each queued job's place in the queue (0: the next one a free worker takes): oldest first."""
    queued = sorted((r for r in records if r.state == "queued"), key=lambda r: (r.created_at, r.job_id))
    return {r.job_id: i for i, r in enumerate(queued)}


class JobTable:
    CAS_TRIES = 20

    def __init__(self, kv: KV, files: ObjectStore) -> None:
        self.kv = kv
        self.files = files

    @classmethod
    async def open(cls, bus: Bus, replicas: int = 1) -> JobTable:
        kv = await bus.kv(Buckets.JOBS, replicas=replicas)
        js = bus.nc.jetstream()
        try:
            files = await js.object_store(Buckets.JOB_FILES)
        except nats.js.errors.BucketNotFoundError:
            files = await js.create_object_store(Buckets.JOB_FILES, ObjectStoreConfig(
                storage=StorageType.FILE, replicas=replicas, description="rheo job inputs and results"))
        return cls(kv, files)

    async def get(self, job_id: str) -> tuple[JobRecord, int]:
        entry = await self.kv.get(job_id)
        if entry is None or entry.value is None:
            raise JobNotFound(job_id)
        return decode(entry.value, JobRecord, self.kv.limits), entry.revision

    async def create(self, record: JobRecord) -> None:
        await self.kv.create(record.job_id, record)

    async def update(self, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord:
        """Apply ``change`` to the current record by compare-and-set, retried on a concurrent write; ``change``
        returns None to leave the record as it is. Returns the record as stored."""
        for _ in range(self.CAS_TRIES):
            record, revision = await self.get(job_id)
            new = change(record)
            if new is None:
                return record
            new = new.model_copy(update={"updated_at": time.time()})
            try:
                await self.kv.update(job_id, new, revision)
                return new
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise RuntimeError(f"job {job_id}: {self.CAS_TRIES} concurrent changes in a row")

    async def list(self) -> list[JobRecord]:
        """Every job, oldest first (an unreadable record is skipped: it cannot be shown or run)."""
        out = []
        for key in await self.kv.keys():
            with contextlib.suppress(JobNotFound, ProtocolError):
                out.append((await self.get(key))[0])
        return sorted(out, key=lambda r: (r.created_at, r.job_id))

    async def watch(self, job_id: str | None = None) -> AsyncIterator[JobRecord | None]:
        """The record(s) now, then each change (None: a job was deleted)."""
        async for entry in self.kv.watch(job_id or ">"):
            if entry.value is None:
                yield None
                continue
            record = self.record(entry.value)
            if record is not None:
                yield record

    def record(self, value: bytes) -> JobRecord | None:
        """A stored value as its record (None: unreadable, skipped as ``list`` skips it)."""
        try:
            return decode(value, JobRecord, self.kv.limits)
        except ProtocolError:
            return None

    async def delete(self, job_id: str) -> None:
        """The record and its files."""
        for name in (input_name(job_id), result_name(job_id)):
            with contextlib.suppress(nats.js.errors.NotFoundError, nats.js.errors.ObjectNotFoundError,
                                     nats.js.errors.ObjectDeletedError):
                await self.files.delete(name)
        await self.kv.delete(job_id)

    async def put_file(self, name: str, path: Path) -> int:
        with path.open("rb") as f:
            info = await self.files.put(name, f)
        return int(info.size or 0)

    async def fetch_file(self, name: str, path: Path) -> None:
        with path.open("wb") as f:
            await self.files.get(name, writeinto=f)

    async def read_file(self, name: str) -> bytes:
        result = await self.files.get(name)
        return bytes(result.data or b"")

