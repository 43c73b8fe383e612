"""Offline jobs on the wire: ``JobRecord``, a job's row in ``Buckets.JOBS`` (docs/jobs.md).

The gateway writes a record ``queued`` (its input file already in ``Buckets.JOB_FILES``); a jobs worker claims it
by compare-and-set (``running``), updates its progress and ends it ``done`` (result file stored), ``failed`` (with
the reason) or ``cancelled``. A record is the whole state of a job: gateway and workers keep none of their own.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from proto.messages import MESSAGE_TYPES, Message
from proto.spec import MAX_MODEL_HEIGHT, MAX_MODEL_WIDTH, MAX_STEPS, SIZE_MULTIPLE

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED: tuple[JobState, ...] = ("done", "failed", "cancelled")
JobId = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="job id (a KV key and object name token)")


class JobParams(BaseModel):
    """What a job makes: the offline pipeline's inputs (``rheo run``'s options)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    prompt: str = Field(min_length=1, max_length=2000)
    width: int = Field(gt=0, le=MAX_MODEL_WIDTH, multiple_of=SIZE_MULTIPLE)
    height: int = Field(gt=0, le=MAX_MODEL_HEIGHT, multiple_of=SIZE_MULTIPLE)
    steps: int = Field(ge=1, le=MAX_STEPS)
    noise_scale: float = Field(gt=0, le=1)
    seed: int = Field(ge=0, lt=2**63)
    t2v: bool = False
    seconds: float = Field(0.0, ge=0, description="T2V: seconds of video to generate (V2V: the input's length)")


class JobRecord(Message):
    """One offline job (``Buckets.JOBS``, key = job id)."""

    SCHEMA_VERSION: ClassVar[int] = 1

    job_id: str = JobId
    params: JobParams
    state: JobState = "queued"
    reason: str = Field("", max_length=1024, description="why it failed or was cancelled")
    input_name: str = Field("", max_length=200, description="the uploaded video's name (empty: T2V)")
    input_bytes: int = Field(0, ge=0)
    frames_total: int = Field(0, ge=0, description="output frames expected (0: unknown until done)")
    frames_done: int = Field(0, ge=0)
    chunks_total: int = Field(0, ge=0)
    chunks_done: int = Field(0, ge=0)
    result_bytes: int = Field(0, ge=0, description="size of the MP4 (done)")
    worker: str = Field("", max_length=200, description="member id of the worker running (or that ran) it")
    cancel_requested: bool = Field(False, description="the API asked the running worker to stop")
    created_at: float
    started_at: float = 0.0
    finished_at: float = 0.0
    updated_at: float

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def progress(self) -> float:
        """0..1: output frames written of those expected (1 once done)."""
        if self.state == "done":
            return 1.0
        return min(1.0, self.frames_done / self.frames_total) if self.frames_total else 0.0


MESSAGE_TYPES[JobRecord.__name__] = JobRecord  # here, not in proto.messages: the job contract is this module's

__all__ = ["FINISHED", "JobParams", "JobRecord", "JobState"]
