"""Offline jobs in process: the gateway's /v1/jobs and a jobs worker (tiny model) on a real nats-server, over
real HTTP. Bad uploads are refused before anything is queued; a good one runs to done (progress over SSE, the MP4
decodes); a job the engine cannot finish fails with the engine's reason; a running and a queued job are cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from fractions import Fraction
from pathlib import Path

import av
import httpx
import pytest

from jobs.service import JobsService
from jobs.table import JobTable, new_job_id
from proto import JobParams, JobRecord
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.gateway.jobs import SUBMITTED
from services.gateway.service import GatewayService
from support.pipekit import write_audio_only, write_clip

TOKEN = "jobs-test-token"
SIZE = 64
MAX_UPLOAD = 300_000


def _settings(nats_settings: NatsSettings) -> Settings:
    return Settings(nats=nats_settings, telemetry={"metrics_port": 0},
                    lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.5},
                    gateway={"host": "127.0.0.1", "port": 0, "api_tokens": [TOKEN], "write_burst": 100,
                             "write_rate_per_s": 100},
                    playback={"signing_keys": ["k" * 32]},
                    jobs={"max_upload_bytes": MAX_UPLOAD, "progress_interval_s": 0.1})


@contextlib.asynccontextmanager
async def _jobs_api(nats_settings: NatsSettings, eventually):
    """The gateway and one jobs worker, in this process (both stopped, as by SIGTERM, on leaving)."""
    gateway, worker = GatewayService(_settings(nats_settings)), JobsService(_settings(nats_settings))
    tasks = [asyncio.create_task(gateway.run()), asyncio.create_task(worker.run())]
    await eventually(lambda: gateway.api_port != 0 and gateway.ready and worker.ready)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.api_port}", timeout=30,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield http
    gateway.stop()
    worker.stop()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 20) == [0, 0]


def _form(**fields: object) -> dict[str, str]:
    return {"prompt": "a watercolour", "width": str(SIZE), "height": str(SIZE), **{k: str(v) for k, v in
                                                                                    fields.items()}}


async def _events(http: httpx.AsyncClient, job_id: str) -> list[dict]:
    """Every ``job`` event of the job's SSE stream, until the server ends it (the job finished)."""
    seen = []
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    return seen


async def _declare_upload(http: httpx.AsyncClient, size: int) -> tuple[bytes, bytes]:
    """Send only the head of an upload of ``size`` bytes; the answer's status line and body."""
    url = httpx.URL(str(http.base_url))
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: "
                 f"multipart/form-data; boundary=b\r\nContent-Length: {size}\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


async def _until_running(http: httpx.AsyncClient, job_id: str, into: dict) -> None:
    """Poll until the job runs and has written frames (``into``: its state then)."""
    for _ in range(600):
        into.update(await _state(http, job_id))
        if into["state"] == "running" and into["frames_done"] > 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not start: {into}")


async def _state(http: httpx.AsyncClient, job_id: str) -> dict:
    r = await http.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def test_bad_uploads_are_refused_before_queueing(nats_settings: NatsSettings, tmp_path: Path,
                                                       eventually) -> None:
    audio = write_audio_only(tmp_path / "tone.m4a")
    async with _jobs_api(nats_settings, eventually) as http:
        before = len((await http.get("/v1/jobs")).json())
        refused = SUBMITTED.labels("bad_input")._value.get()
        cases = {"notes.txt": (b"not a video\n" * 40, "not a video"),
                 "tone.m4a": (audio.read_bytes(), "audio-only"),
                 "empty.mp4": (b"", "empty")}
        for name, (data, why) in cases.items():
            r = await http.post("/v1/jobs", data=_form(), files={"file": (name, data)})
            assert r.status_code == 400 and why in r.json()["detail"], (name, r.text)
            assert str(tmp_path) not in r.text and "/tmp" not in r.text  # the server's temp path is not shown
        assert SUBMITTED.labels("bad_input")._value.get() == refused + len(cases)  # each refusal counted
        head, answer = await _declare_upload(http, MAX_UPLOAD + 1)  # refused on the headers: no byte is read
        assert head.startswith(b"HTTP/1.1 413") and b"jobs.max_upload_bytes" in answer, head + answer
        for bad, what in (({"width": 65}, "width"), ({"steps": 9}, "steps"), ({"prompt": ""}, "prompt"),
                          ({"seconds": 0}, "seconds")):
            r = await http.post("/v1/jobs", data=_form(**bad))
            assert r.status_code == 400 and what in r.json()["detail"], (bad, r.text)
        assert (await http.post("/v1/jobs", data=_form(), headers={"Authorization": ""})).status_code == 401
        assert len((await http.get("/v1/jobs")).json()) == before  # nothing was queued


async def test_job_runs_to_done_with_progress_and_a_playable_result(nats_settings: NatsSettings, tmp_path: Path,
                                                                     eventually) -> None:
    clip = write_clip(tmp_path / "in.mp4", frames=21, fps=12)
    async with _jobs_api(nats_settings, eventually) as http:
        r = await http.post("/v1/jobs", data=_form(steps=1), files={"file": ("in.mp4", clip.read_bytes(),
                                                                              "video/mp4")})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["state"] in ("queued", "running") and job["frames_total"] == 21 and job["chunks_total"] == 5
        events = await _events(http, job["id"])
        assert events[-1]["state"] == "done" and events[-1]["progress"] == 1.0, events[-1]
        progress = [e["progress"] for e in events]
        assert progress == sorted(progress)
        done = await _state(http, job["id"])
        assert done["chunks_done"] == done["chunks_total"] == 5 and done["result_url"] == f"/v1/jobs/{job['id']}/result"
        result = await http.get(done["result_url"])
        assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(result.content)) as c:
            stream = c.streams.video[0]
            frames = list(c.decode(stream))
            assert Fraction(stream.average_rate) == 12
        assert len(frames) == done["frames_done"] == 21 and (frames[0].width, frames[0].height) == (SIZE, SIZE)
        assert len(result.content) == done["result_bytes"]
        assert (await http.delete(f"/v1/jobs/{job['id']}")).status_code == 204  # finished: deleted with its files
        assert (await http.get(f"/v1/jobs/{job['id']}")).status_code == 404


async def test_a_job_the_engine_cannot_finish_fails_with_its_reason(nats_settings: NatsSettings, tmp_path: Path,
                                                                    eventually) -> None:
    """H.264 packets of junk in a good MP4 pass the upload check (the header is fine); the engine cannot decode."""
    junk = tmp_path / "junk.mp4"
    with av.open(str(junk), "w") as c:
        s = c.add_stream("libx264", rate=12)
        s.width, s.height, s.pix_fmt = SIZE, SIZE, "yuv420p"
        s.codec_context.open()
        for i in range(5):
            p = av.Packet(bytes([0, 0, 0, 1, 0x65]) + bytes(range(200)))
            p.stream, p.pts, p.dts, p.time_base = s, i, i, Fraction(1, 12)
            c.mux(p)
    async with _jobs_api(nats_settings, eventually) as http:
        r = await http.post("/v1/jobs", data=_form(), files={"file": ("junk.mp4", junk.read_bytes())})
        assert r.status_code == 201, r.text
        events = await _events(http, r.json()["id"])
        assert events[-1]["state"] == "failed" and "corrupt video data" in events[-1]["reason"], events[-1]
        assert "'junk.mp4'" in events[-1]["reason"] and "/tmp" not in events[-1]["reason"]  # no worker paths
        assert (await http.get(f"/v1/jobs/{r.json()['id']}/result")).status_code == 409


@pytest.mark.timeout(120)
async def test_cancel_a_running_and_a_queued_job(nats_settings: NatsSettings, eventually) -> None:
    async with _jobs_api(nats_settings, eventually) as http:
        long = (await http.post("/v1/jobs", data=_form(seconds=60))).json()  # T2V: ~1000 frames, many seconds
        queued = (await http.post("/v1/jobs", data=_form(seconds=1))).json()
        assert long["params"]["t2v"] and queued["state"] == "queued"
        running: dict = {}
        await _until_running(http, long["id"], running)
        assert (await _state(http, queued["id"]))["queue_position"] == 0  # next in line, behind the running one
        r = await http.delete(f"/v1/jobs/{queued['id']}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        r = await http.delete(f"/v1/jobs/{long['id']}")
        assert r.status_code == 200 and r.json()["state"] == "running"  # asked: it stops at its next frame
        events = await _events(http, long["id"])
        assert events[-1]["state"] == "cancelled" and events[-1]["frames_done"] < events[-1]["frames_total"]
        assert (await _state(http, queued["id"]))["state"] == "cancelled"  # never ran
        assert (await _state(http, queued["id"]))["started_at"] == 0



async def test_a_job_whose_worker_died_fails_with_that_reason(nats_settings: NatsSettings, bus: Bus,
                                                              eventually) -> None:
    """A record left ``running`` by a killed worker (no report for ``stale_after_s``) does not stay running."""
    table = await JobTable.open(bus)
    job_id, old = new_job_id(), time.time() - 3600
    await table.create(JobRecord(job_id=job_id, state="running", worker="jobs-gone-1", created_at=old, updated_at=old,
                                 params=JobParams(prompt="x", width=SIZE, height=SIZE, steps=1, noise_scale=0.8,
                                                  seed=0, t2v=True, seconds=1.0)))
    async with _jobs_api(nats_settings, eventually) as http:
        events = await _events(http, job_id)
        assert events[-1]["state"] == "failed" and "jobs-gone-1" in events[-1]["reason"], events[-1]


async def test_a_stopping_worker_puts_its_job_back_in_the_queue(nats_settings: NatsSettings, bus: Bus,
                                                                eventually) -> None:
    """SIGTERM (``stop``) mid-job: the job is queued again for another worker, not lost and not left running."""
    async with _jobs_api(nats_settings, eventually) as http:
        job = (await http.post("/v1/jobs", data=_form(seconds=60))).json()
        await _until_running(http, job["id"], {})
    record, _ = await (await JobTable.open(bus)).get(job["id"])  # the worker has drained (and exited 0)
    assert record.state == "queued" and record.reason.startswith("requeued") and record.frames_done == 0, record
    await (await JobTable.open(bus)).delete(job["id"])  # the next test's worker must not run it
