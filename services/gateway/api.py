"""The control API (``/v1``) and HLS routing of the gateway.

``POST /v1/streams`` creates a stream and returns, once, its stream key with the RTMP URL to publish to and
the playback URLs; ``GET/PATCH/DELETE /v1/streams/{id}`` read, change live and end it. A PATCH of the prompt or
of the parameters (steps, noise) is sent to ingest as a request; ingest answers with the chunk seq the change
takes effect at (a steps change starts a new warm-up segment there), which the response reports (``null`` while
the stream is not live: the change then applies from its first chunk), or refuses it (409, nothing applied).
``/hls/{id}/...`` forwards playback requests, query included (LL-HLS blocking reloads), to the egress instance
the stream table names for the stream.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Literal

import httpx
import nats.errors
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from media.player import make_player_router
from proto import (
    SLO,
    Ack,
    Buckets,
    Error,
    Message,
    NoiseParams,
    PromptUpdate,
    ProtocolError,
    StreamRecord,
    StreamSpec,
    Subjects,
)
from proto import decode as decode_message
from proto.spec import MAX_FPS, MAX_MODEL_HEIGHT, MAX_MODEL_WIDTH, MAX_STEPS, MAX_T2V_FRAMES, SIZE_MULTIPLE
from services.bus import KV, Bus
from services.config import Settings
from services.controller.policy import admission_key
from services.streams import StreamNotFound, StreamTable, new_stream_id, session_state

log = logging.getLogger("rheo.gateway")


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateStream(Body):
    prompt: str = Field(min_length=1, max_length=2000)
    width: int = Field(512, gt=0, le=MAX_MODEL_WIDTH, multiple_of=SIZE_MULTIPLE)
    height: int = Field(512, gt=0, le=MAX_MODEL_HEIGHT, multiple_of=SIZE_MULTIPLE)
    fps: float = Field(16.0, gt=0, le=MAX_FPS)
    steps: int = Field(2, ge=1, le=MAX_STEPS)
    seed: int = Field(0, ge=0, lt=2**63)
    noise_scale: float = Field(0.8, gt=0, le=1)
    motion_aware: bool = True
    t2v: bool = False
    t2v_frames: int = Field(1, ge=1, le=MAX_T2V_FRAMES, description="text-to-video: latent frames per chunk")
    slo_latency_ms: float = Field(1000.0, gt=0)


class PatchStream(Body):
    prompt: str | None = Field(None, min_length=1, max_length=2000)
    mode: Literal["cut", "blend"] = "cut"
    blend_chunks: int = Field(4, ge=0, le=64)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    noise_scale: float | None = Field(None, gt=0, le=1)
    motion_aware: bool | None = None


class StreamInfo(BaseModel):
    id: str
    state: str = Field(description="created | live | recovering | degraded | failed | ended (docs/recovery.md)")
    state_reason: str = Field("", description="why: what stalled, what was repaired, what failed")
    spec: dict
    prompt_version: int
    rtmp_url: str
    hls_url: str
    llhls_url: str
    admission: str | None = Field(
        None, description="the controller's last admission answer: 'admitted: …' or 'refused: <reason>'")
    ingest: dict | None = Field(
        None, description="ingest's checkpoint of the live (or last) session: chunks published, dropped by reason, "
                          "last seq, segment (updated every ingest.status_interval_s)")


class CreatedStream(StreamInfo):
    stream_key: str = Field(description="shown once; publish to rtmp_url with it as the stream name")
    publish_url: str = Field(description="rtmp_url/stream_key, for OBS 'Server' + 'Stream Key' or ffmpeg")


class PatchResult(StreamInfo):
    effective_seq: int | None = Field(description="chunk seq the change took effect at; null: applies at start")


def make_api(settings: Settings, bus: Bus, table: StreamTable, proxy: httpx.AsyncClient) -> FastAPI:
    gw = settings.gateway
    app = FastAPI(title="rheo gateway", version="1", description="Create streams, change them live, watch them.")
    bearer = HTTPBearer(auto_error=False)
    tokens = [t.get_secret_value() for t in gw.api_tokens]

    async def authorised(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if gw.allow_anonymous:
            return
        presented = creds.credentials if creds else ""
        if not presented or not any(hmac.compare_digest(presented, t) for t in tokens):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid API token is required (Authorization: "
                                "Bearer <token>)", headers={"WWW-Authenticate": "Bearer"})

    def info(record: StreamRecord, cls: type[StreamInfo] = StreamInfo, **extra: object) -> StreamInfo:
        sid = record.spec.stream_id
        base = gw.public_url.rstrip("/")
        state, reason = session_state(record, settings.ingest.status_interval_s, time.time())
        return cls(id=sid, state=state, state_reason=reason, spec=record.spec.model_dump(),
                   prompt_version=record.prompt_version,
                   ingest=record.ingest.model_dump() if record.ingest is not None else None,
                   rtmp_url=f"{gw.public_rtmp_url.rstrip('/')}/{settings.ingest.rtmp_app}",
                   hls_url=f"{base}/hls/{sid}/playlist.m3u8", llhls_url=f"{base}/hls/{sid}/index.m3u8", **extra)

    controller_kv: list[KV] = []

    async def admission_of(stream_id: str) -> str | None:
        """What the controller answered when the stream last asked to start (None: it never asked)."""
        try:
            if not controller_kv:
                controller_kv.append(await bus.kv(Buckets.CONTROLLER, replicas=settings.nats.kv_replicas))
            entry = await controller_kv[0].get(admission_key(stream_id))
            answer = decode_message(entry.value) if entry is not None and entry.value else None
        except (ProtocolError, nats.errors.Error, TimeoutError) as e:
            log.warning("admission record of %s unreadable: %s", stream_id, e)
            return None
        if isinstance(answer, Error):
            return f"refused: {answer.message}"
        return f"admitted: {answer.detail}" if isinstance(answer, Ack) else None

    async def record_or_404(stream_id: str) -> StreamRecord:
        try:
            return await table.get(stream_id)
        except (StreamNotFound, ValueError):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no stream {stream_id!r}") from None

    async def ask_ingest(subject: str, message: PromptUpdate | StreamSpec) -> Message | None:
        """The live stream's ingest's answer; None when the stream is not live (the table holds the change, which
        ingest reads when the stream starts)."""
        try:
            return await bus.request(subject, message, timeout=gw.prompt_ack_timeout_s)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return None

    def acked_seq(reply: Message | None) -> int | None:
        return int(reply.ref) if isinstance(reply, Ack) and reply.ref.isdigit() else None

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorised)])

    @v1.post("/streams", status_code=status.HTTP_201_CREATED, response_model=CreatedStream)
    async def create_stream(body: CreateStream) -> StreamInfo:
        spec = StreamSpec(stream_id=new_stream_id(), width=body.width, height=body.height, fps=body.fps,
                          steps=body.steps, prompt=body.prompt, seed=body.seed,
                          noise=NoiseParams(noise_scale=body.noise_scale, motion_aware=body.motion_aware),
                          slo=SLO(target_fps=body.fps, max_latency_ms=body.slo_latency_ms), t2v=body.t2v,
                          t2v_frames=body.t2v_frames)
        record, key = await table.create(spec)
        await bus.publish(Subjects.stream_spec(spec.stream_id), spec)
        created = info(record, CreatedStream, stream_key=key,
                       publish_url=f"{gw.public_rtmp_url.rstrip('/')}/{settings.ingest.rtmp_app}/{key}")
        log.info("stream %s created", spec.stream_id)
        return created

    @v1.get("/streams", response_model=list[StreamInfo])
    async def list_streams() -> list[StreamInfo]:
        return [info(r) for r in await table.list()]

    @v1.get("/streams/{stream_id}", response_model=StreamInfo)
    async def get_stream(stream_id: str) -> StreamInfo:
        return info(await record_or_404(stream_id), admission=await admission_of(stream_id))

    @v1.patch("/streams/{stream_id}", response_model=PatchResult)
    async def patch_stream(stream_id: str, body: PatchStream) -> StreamInfo:
        record = await record_or_404(stream_id)
        spec = record.spec
        noise = spec.noise.model_copy(update={k: v for k, v in
                                              {"noise_scale": body.noise_scale,
                                               "motion_aware": body.motion_aware}.items() if v is not None})
        new_spec = spec.model_copy(update={"prompt": body.prompt or spec.prompt, "noise": noise,
                                           "steps": body.steps or spec.steps})
        params_changed = (new_spec.steps, new_spec.noise) != (spec.steps, spec.noise)
        version = record.prompt_version + (1 if body.prompt is not None else 0)
        record = await table.update(stream_id, lambda r: r.model_copy(
            update={"spec": new_spec, "prompt_version": version}))

        async def put_back(fields: dict[str, object], reason: str) -> None:
            """A refused change: the stream keeps what it runs (a spent prompt version stays spent)."""
            await table.update(stream_id, lambda r: r.model_copy(
                update={"spec": r.spec.model_copy(update=fields)}) if r.prompt_version == version else r)
            raise HTTPException(status.HTTP_409_CONFLICT, reason)

        effective: int | None = None
        if params_changed:  # before the prompt: a refusal applies nothing
            reply = await ask_ingest(Subjects.stream_spec(stream_id), new_spec)
            if isinstance(reply, Error):
                await put_back({"steps": spec.steps, "noise": spec.noise, "prompt": spec.prompt},
                               f"ingest refused the change: {reply.message}")
            effective = acked_seq(reply)
        if body.prompt is not None:
            update = PromptUpdate(stream_id=stream_id, version=version, prompt=body.prompt, mode=body.mode,
                                  blend_chunks=body.blend_chunks if body.mode == "blend" else 0)
            reply = await ask_ingest(Subjects.stream_prompt(stream_id), update)
            if isinstance(reply, Error):
                await put_back({"prompt": spec.prompt}, f"ingest refused the prompt: {reply.message}")
            seq = acked_seq(reply)
            effective = seq if effective is None or seq is None else max(effective, seq)
        return info(record, PatchResult, effective_seq=effective)

    @v1.delete("/streams/{stream_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_stream(stream_id: str) -> Response:
        await record_or_404(stream_id)
        record = await table.delete(stream_id)
        ended = record.spec
        await bus.publish(Subjects.stream_error(stream_id),
                          Error(code="stream_deleted", message="the stream was deleted", stream_id=ended.stream_id))
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    app.include_router(v1)
    app.include_router(make_player_router())  # /player/index.html?src=<playlist>: a minimal hls.js page

    @app.get("/hls/{stream_id}/{path:path}", include_in_schema=False)
    async def hls(stream_id: str, path: str, request: Request) -> Response:
        record = await record_or_404(stream_id)
        if not record.egress_url:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"stream {stream_id} is not playing yet")
        url = f"{record.egress_url.rstrip('/')}/hls/{stream_id}/{path}"
        try:
            upstream = await proxy.get(url, params=request.query_params)
        except httpx.HTTPError as e:
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"egress unreachable: {type(e).__name__}") from e
        keep = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "cache-control")}
        return Response(upstream.content, status_code=upstream.status_code, headers=keep)

    return app
