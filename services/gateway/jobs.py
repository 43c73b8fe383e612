"""Offline jobs over HTTP (``/v1/jobs``; docs/jobs.md): queue a video (or a prompt) for the ``jobs`` workers,
follow it, fetch the MP4, cancel it.

``POST /v1/jobs`` is ``multipart/form-data``: the parameters as fields and, for video to video, the video as
``file`` (no file: text to video for ``seconds``). The upload is checked with the offline engine's own input
check (``pipeline.offline.VideoInput``: not a video, audio-only, corrupt → 400) before anything is queued, so a
bad file never reaches a model; a body over ``jobs.max_upload_bytes`` is refused with 413 before it is read
(``services.httpguard.BodyLimit``). ``GET /v1/jobs/{id}/events`` streams the record as server-sent events until
the job ends. Operator tokens only: a job is not a stream's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Response, UploadFile, status
from fastapi.responses import StreamingResponse
from prometheus_client import Counter
from pydantic import BaseModel, Field, ValidationError

from jobs.table import JobNotFound, JobTable, chunks_of, input_name, new_job_id, queue_positions, result_name
from proto import JobParams, JobRecord
from services.bus import Bus
from services.config import Settings
from services.gateway.auth import Principal

log = logging.getLogger("rheo.gateway")

JOBS_PATH = "/v1/jobs"
"""Where uploads arrive: the body limit there is ``jobs.max_upload_bytes`` (``services.httpguard.guard``)."""
UPLOAD_CHUNK = 1 << 20

SUBMITTED = Counter("rheo_jobs_submitted_total", "POST /v1/jobs answers: queued, or refused by reason (over the size "
                    "limit: rheo_http_refusals_total{reason=body_too_large})", ["outcome"])
OUTCOMES = ("queued", "bad_input", "bad_params")
for _o in OUTCOMES:
    SUBMITTED.labels(_o)


def _refuse(outcome: str, detail: str) -> HTTPException:
    SUBMITTED.labels(outcome).inc()
    return HTTPException(status.HTTP_400_BAD_REQUEST, detail)


class JobInfo(BaseModel):
    id: str
    state: str = Field(description="queued | running | done | failed | cancelled")
    reason: str = Field("", description="why it failed or was cancelled")
    progress: float = Field(description="0..1: output frames written of those expected")
    frames_done: int
    frames_total: int = Field(description="output frames expected (0: unknown until done)")
    chunks_done: int
    chunks_total: int
    queue_position: int | None = Field(None, description="queued: jobs ahead of it (0: next)")
    params: dict
    input_name: str = Field("", description="the uploaded file's name (empty: text to video)")
    input_bytes: int
    result_bytes: int
    result_url: str | None = Field(None, description="the MP4 (done)")
    created_at: float
    started_at: float
    finished_at: float


def job_info(record: JobRecord, position: int | None = None) -> JobInfo:
    return JobInfo(id=record.job_id, state=record.state, reason=record.reason, progress=round(record.progress, 4),
                   frames_done=record.frames_done, frames_total=record.frames_total,
                   chunks_done=record.chunks_done, chunks_total=record.chunks_total, queue_position=position,
                   params=record.params.model_dump(), input_name=record.input_name, input_bytes=record.input_bytes,
                   result_bytes=record.result_bytes,
                   result_url=f"{JOBS_PATH}/{record.job_id}/result" if record.state == "done" else None,
                   created_at=record.created_at, started_at=record.started_at, finished_at=record.finished_at)


def _chunks(frames: int, settings: Settings) -> int:
    clock = settings.dit_stage.ring().clock(None)
    return chunks_of(frames, clock.first_input_frames, clock.input_frames_per_chunk)


def make_jobs_router(settings: Settings, bus: Bus, operator: Callable[..., Awaitable[Principal]],
                     limited: Callable[[Principal], None]) -> APIRouter:
    """Mounted under ``/v1`` by ``services.gateway.api``; auth and rate limits are the API's own."""
    router = APIRouter()
    cfg = settings.jobs
    opened: list[JobTable] = []
    lock = asyncio.Lock()

    async def table() -> JobTable:
        async with lock:
            if not opened:
                opened.append(await JobTable.open(bus, replicas=settings.nats.kv_replicas))
        return opened[0]

    async def record_or_404(job_id: str) -> JobRecord:
        try:
            return (await (await table()).get(job_id))[0]
        except (JobNotFound, ValueError):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}") from None

    async def position(record: JobRecord) -> int | None:
        if record.state != "queued":
            return None
        return queue_positions(await (await table()).list()).get(record.job_id)

    @router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=JobInfo)
    async def create_job(
        prompt: Annotated[str, Form()] = "",
        file: Annotated[UploadFile | None, File(description="the video to restyle (none: text to video)")] = None,
        width: Annotated[int, Form()] = 128,
        height: Annotated[int, Form()] = 128,
        steps: Annotated[int, Form()] = 2,
        noise_scale: Annotated[float, Form()] = 0.8,
        seed: Annotated[int, Form()] = 0,
        seconds: Annotated[float, Form(description="text to video: seconds to generate")] = 2.0,
        who: Principal = Depends(operator),
    ) -> JobInfo:
        """Queue a job; every parameter is checked by ``JobParams`` (400 with the field), the file as ``rheo run``
        checks its input (400 with the reason)."""
        limited(who)
        t2v = file is None or not file.filename
        if t2v and not 0 < seconds <= cfg.max_seconds:
            raise _refuse("bad_params", f"seconds must be in (0, {cfg.max_seconds:g}] (jobs.max_seconds)")
        try:
            params = JobParams(prompt=prompt, width=width, height=height, steps=steps, noise_scale=noise_scale,
                               seed=seed, t2v=t2v, seconds=seconds if t2v else 0.0)
        except ValidationError as e:
            err = e.errors(include_url=False, include_input=False)[0]
            raise _refuse("bad_params", f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
        job_id, now = new_job_id(), time.time()
        jobs = await table()
        frames, size, name = 0, 0, ""
        if not t2v:
            assert file is not None
            with tempfile.TemporaryDirectory(prefix="rheo-upload-") as tmp:
                path = Path(tmp) / "input"
                size = await _save(file, path)
                frames = await asyncio.to_thread(_check_video, path, file.filename or "upload")
                await jobs.put_file(input_name(job_id), path)
            name = (file.filename or "upload")[:200]
        else:
            frames = max(1, round(seconds * settings.stream.fps))
        record = JobRecord(job_id=job_id, params=params, input_name=name, input_bytes=size, frames_total=frames,
                           chunks_total=_chunks(frames, settings) if not t2v else 0, created_at=now, updated_at=now)
        await jobs.create(record)
        SUBMITTED.labels("queued").inc()
        log.info("job %s queued (%s)", job_id, "T2V" if t2v else f"{size} bytes")
        return job_info(record, await position(record))

    @router.get("/jobs", response_model=list[JobInfo], dependencies=[Depends(operator)])
    async def list_jobs() -> list[JobInfo]:
        records = await (await table()).list()
        places = queue_positions(records)
        return [job_info(r, places.get(r.job_id)) for r in reversed(records)]  # newest first

    @router.get("/jobs/{job_id}", response_model=JobInfo, dependencies=[Depends(operator)])
    async def get_job(job_id: str) -> JobInfo:
        record = await record_or_404(job_id)
        return job_info(record, await position(record))

    @router.get("/jobs/{job_id}/events", dependencies=[Depends(operator)],
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "`event: job` with a JobInfo as data on every change, until it ends"}})
    async def job_events(job_id: str) -> StreamingResponse:
        await record_or_404(job_id)
        jobs = await table()

        async def events() -> AsyncIterator[bytes]:
            async for record in jobs.watch(job_id):
                if record is None:
                    yield b"event: deleted\ndata: {}\n\n"
                    return
                info = job_info(record, await position(record))
                yield f"event: job\ndata: {json.dumps(info.model_dump())}\n\n".encode()
                if record.finished:
                    return

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @router.get("/jobs/{job_id}/result", dependencies=[Depends(operator)],
                responses={200: {"content": {"video/mp4": {}}, "description": "the MP4"}})
    async def job_result(job_id: str) -> Response:
        record = await record_or_404(job_id)
        if record.state != "done":
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is {record.state}: no result"
                                + (f" ({record.reason})" if record.reason else ""))
        data = await (await table()).read_file(result_name(job_id))
        return Response(data, media_type="video/mp4",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.mp4"'})

    @router.delete("/jobs/{job_id}", dependencies=[Depends(operator)],
                   responses={200: {"model": JobInfo, "description": "cancelled (a running job stops at its next "
                                    "frame)"}, 204: {"description": "a finished job deleted, with its files"}})
    async def delete_job(job_id: str) -> Response:
        """Cancel a job that has not finished; delete a finished one (record and files)."""
        record = await record_or_404(job_id)
        jobs = await table()
        if record.finished:
            await jobs.delete(job_id)
            return Response(status_code=status.HTTP_204_NO_CONTENT)

        def cancel(r: JobRecord) -> JobRecord | None:
            if r.state == "queued":
                return r.model_copy(update={"state": "cancelled", "reason": "cancelled through the API",
                                            "finished_at": time.time()})
            if r.state == "running" and not r.cancel_requested:
                return r.model_copy(update={"cancel_requested": True})
            return None

        record = await jobs.update(job_id, cancel)
        log.info("job %s: cancel asked (%s)", job_id, record.state)
        return Response(job_info(record).model_dump_json(), media_type="application/json")

    return router


async def _save(file: UploadFile, path: Path) -> int:
    size = 0
    with path.open("wb") as out:
        while chunk := await file.read(UPLOAD_CHUNK):
            out.write(chunk)
            size += len(chunk)
    if size == 0:
        raise _refuse("bad_input", "the uploaded file is empty")
    return size


def _check_video(path: Path, name: str) -> int:
    """The engine's own input check (400 with its reason); the output frames to expect (0: unknown)."""
    from media.video_file import InputError, VideoInput

    try:
        video = VideoInput(path)
    except InputError as e:
        raise _refuse("bad_input", str(e).replace(str(path), repr(name)).splitlines()[0]) from None
    try:
        return video.frames_hint or 0
    finally:
        video.close()
