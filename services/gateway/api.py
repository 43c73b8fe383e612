"""The control API (``/v1``) and HLS routing of the gateway.

``POST /v1/streams`` creates a stream and returns, once, its stream key with the RTMP URL to publish to and
the playback URLs (``POST /v1/streams/{id}/key`` replaces the key, shown once again); ``GET/PATCH/DELETE
/v1/streams/{id}`` read, change live and end it. A PATCH of the prompt or of the parameters (steps, noise, seed)
is sent to ingest as a request; ingest answers with the chunk seq the change takes effect at (a steps change starts
a new warm-up segment there), which the response reports (``null`` while the stream is not live: the change then
applies from its first chunk), or refuses it (409, nothing applied). Callers are operators (everything) or
per-stream tokens minted by ``POST /v1/streams/{id}/tokens`` (read, PATCH and playback URLs of that one stream;
``services/gateway/auth.py``); creations, key rotations and PATCHes are rate-limited per token.
Playback (``/hls/{id}/{token}/...``) and the player page are ``services/gateway/playback.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Literal

import httpx
import nats.errors
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Response, status
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from proto import (
    ACTIVE_STATES,
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
from services.controller.policy import ADMISSION_QUEUE_KEY, admission_key
from services.gateway.auth import OperatorTokens, Principal, authenticate
from services.gateway.console import make_console_router
from services.gateway.docs import make_docs_router
from services.gateway.jobs import make_jobs_router
from services.gateway.limits import RateLimiter, retry_after
from services.gateway.playback import make_playback_router
from services.gateway.restream import make_restream_router
from services.gateway.stats import StreamStats, StreamWatch, make_stats_router, stream_stats
from services.gateway.whip import make_whip_router
from services.httpguard import refused
from services.playback_tokens import PlaybackKeys
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
    seed: int | None = Field(None, ge=0, lt=2**63, description="a new noise seed from the next chunk (no new warm-up)")


class MintToken(Body):
    label: str = Field("", max_length=200, description="what the token is for (shown when listed)")


class StreamTokenInfo(BaseModel):
    token_id: str
    stream_id: str
    label: str
    created_at: float


class MintedToken(StreamTokenInfo):
    token: str = Field(description="shown once: Authorization: Bearer <token> reads and PATCHes this stream only")


class PlaybackUrls(BaseModel):
    hls_url: str
    llhls_url: str
    player_url: str = Field(description="the gateway's hls.js page playing llhls_url")
    playback_expires_at: int = Field(description="unix time the playback URLs stop working (mint fresh ones with "
                                                   "POST /v1/streams/{id}/playback)")


class StreamInfo(PlaybackUrls):
    id: str
    state: str = Field(description="created | queued | live | recovering | degraded | failed | ended "
                                   "(docs/recovery.md; queued: docs/scheduling.md)")
    state_reason: str = Field("", description="why: what stalled, what was repaired, what failed")
    spec: dict
    prompt_version: int
    rtmp_url: str
    admission: str | None = Field(
        None, description="the controller's last admission answer: 'admitted: …', 'refused: <reason>' or "
                          "'queued: position p of n, …' (state queued: controller.admission_queue)")
    ingest: dict | None = Field(
        None, description="ingest's checkpoint of the live (or last) session: chunks published, dropped by reason, "
                          "last seq, segment (updated every ingest.status_interval_s)")
    stats: StreamStats = Field(description="the stream's live numbers (as GET /v1/streams/{id}/stats)")


class CreatedStream(StreamInfo):
    stream_key: str = Field(description="shown once; publish to rtmp_url with it as the stream name")
    publish_url: str = Field(description="rtmp_url/stream_key, for OBS 'Server' + 'Stream Key' or ffmpeg")


class PatchResult(StreamInfo):
    effective_seq: int | None = Field(description="chunk seq the change took effect at; null: applies at start")


BUS_GRACE_S = 2.0
"""How long an API call waits for a reconnecting bus: a blip (a NATS restart) is ridden out, an outage answers 503
quickly instead of after a request timeout per call."""


async def connected(bus: Bus, grace_s: float = BUS_GRACE_S) -> None:
    deadline = time.monotonic() + grace_s
    while not bus.nc.is_connected:
        if time.monotonic() >= deadline:
            raise nats.errors.ConnectionReconnectingError
        await asyncio.sleep(0.05)


def make_api(settings: Settings, bus: Bus, table: StreamTable, proxy: httpx.AsyncClient,
             watch: StreamWatch | None = None) -> FastAPI:
    """The whole HTTP surface; ``watch`` feeds the streams' numbers (None: they stay unknown)."""
    gw = settings.gateway
    app = FastAPI(title="rheo gateway", version="1", description="Create streams, change them live, watch them.",
                  docs_url=None, redoc_url=None)  # /docs is ours (services/gateway/docs.py): no CDN
    if gw.cors_origins:  # none by default: browsers on other origins cannot call the API
        app.add_middleware(CORSMiddleware, allow_origins=gw.cors_origins, allow_methods=["GET", "POST", "PATCH",
                           "PUT", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    bearer = HTTPBearer(auto_error=False)
    operators = OperatorTokens(gw.api_tokens, gw.api_tokens_file)
    keys = PlaybackKeys.of(settings.playback.signing_keys)
    writes = RateLimiter(gw.write_rate_per_s, gw.write_burst)
    watch = watch or StreamWatch()

    async def caller(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        await connected(bus)
        if gw.allow_anonymous:
            return Principal(key="anonymous")
        found = await authenticate(creds.credentials if creds else "", operators, table)
        if found is None:
            refused("unauthorised")
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid API token is required (Authorization: "
                                "Bearer <token>)", headers={"WWW-Authenticate": "Bearer"})
        return found

    def forbidden(what: str) -> HTTPException:
        refused("forbidden")
        return HTTPException(status.HTTP_403_FORBIDDEN, f"this token may not {what}")

    async def operator(who: Principal = Depends(caller)) -> Principal:
        if not who.operator:
            raise forbidden("do this (operator tokens only)")
        return who

    async def of_stream(stream_id: str, who: Principal = Depends(caller)) -> Principal:
        if not who.may_use(stream_id):
            raise forbidden(f"use stream {stream_id!r}")
        return who

    def limited(who: Principal) -> None:
        wait = writes.take(who.key)
        if wait > 0:
            refused("rate_limited")
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many changes from this token; retry later",
                                headers={"Retry-After": retry_after(wait)})

    def playback(sid: str) -> dict[str, object]:
        base, now, ttl = gw.public_url.rstrip("/"), time.time(), settings.playback.token_ttl_s
        expires, path = int(now + ttl), keys.path(sid, ttl, now)
        return {"hls_url": f"{base}{path}/playlist.m3u8", "llhls_url": f"{base}{path}/index.m3u8",
                "player_url": f"{base}/player/index.html?src={path}/index.m3u8", "playback_expires_at": expires}

    def info(record: StreamRecord, cls: type[StreamInfo] = StreamInfo, **extra: object) -> StreamInfo:
        sid = record.spec.stream_id
        now = time.time()
        state, reason = session_state(record, settings.ingest.status_interval_s, now)
        queued = extra.get("admission")
        if isinstance(queued, str) and queued.startswith("queued:") and state not in ACTIVE_STATES:
            state, reason = "queued", queued  # waiting in the controller's admission queue
        return cls(id=sid, state=state, state_reason=reason, spec=record.spec.model_dump(),
                   stats=stream_stats(record, watch, settings.ingest.status_interval_s, now),
                   prompt_version=record.prompt_version,
                   ingest=record.ingest.model_dump() if record.ingest is not None else None,
                   rtmp_url=f"{gw.public_rtmp_url.rstrip('/')}/{settings.ingest.rtmp_app}", **playback(sid), **extra)

    def with_key(record: StreamRecord, key: str) -> StreamInfo:
        """The stream with its stream key and publish URL: the one answer that ever shows the key."""
        return info(record, CreatedStream, stream_key=key,
                    publish_url=f"{gw.public_rtmp_url.rstrip('/')}/{settings.ingest.rtmp_app}/{key}")

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
            return answer.message if answer.code == "queued" else f"refused: {answer.message}"
        return f"admitted: {answer.detail}" if isinstance(answer, Ack) else None

    async def admission_queue() -> dict[str, str]:
        """Streams waiting in the controller's admission queue → their 'queued: …' line (one read for a list)."""
        try:
            if not controller_kv:
                controller_kv.append(await bus.kv(Buckets.CONTROLLER, replicas=settings.nats.kv_replicas))
            entry = await controller_kv[0].get(ADMISSION_QUEUE_KEY)
            waiting = json.loads(entry.value) if entry is not None and entry.value else {}
            return {sid: f"queued: position {w['position']} of {w['of']}: {w['reason']}" for sid, w in waiting.items()}
        except (ValueError, KeyError, TypeError, AttributeError, nats.errors.Error, TimeoutError) as e:
            log.warning("admission queue unreadable: %s", e)
            return {}

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

    v1 = APIRouter(prefix="/v1")

    @v1.post("/streams", status_code=status.HTTP_201_CREATED, response_model=CreatedStream)
    async def create_stream(body: CreateStream, who: Principal = Depends(operator)) -> StreamInfo:
        limited(who)
        spec = StreamSpec(stream_id=new_stream_id(), width=body.width, height=body.height, fps=body.fps,
                          steps=body.steps, prompt=body.prompt, seed=body.seed,
                          noise=NoiseParams(noise_scale=body.noise_scale, motion_aware=body.motion_aware),
                          slo=SLO(target_fps=body.fps, max_latency_ms=body.slo_latency_ms), t2v=body.t2v,
                          t2v_frames=body.t2v_frames)
        record, key = await table.create(spec)
        await bus.publish(Subjects.stream_spec(spec.stream_id), spec)
        log.info("stream %s created", spec.stream_id)
        return with_key(record, key)

    @v1.get("/streams", response_model=list[StreamInfo], dependencies=[Depends(operator)])
    async def list_streams() -> list[StreamInfo]:
        waiting = await admission_queue()
        return [info(r, admission=waiting.get(r.spec.stream_id)) for r in await table.list()]

    @v1.get("/streams/{stream_id}", response_model=StreamInfo, dependencies=[Depends(of_stream)])
    async def get_stream(stream_id: str) -> StreamInfo:
        return info(await record_or_404(stream_id), admission=await admission_of(stream_id))

    @v1.patch("/streams/{stream_id}", response_model=PatchResult)
    async def patch_stream(stream_id: str, body: PatchStream, who: Principal = Depends(of_stream)) -> StreamInfo:
        limited(who)
        record = await record_or_404(stream_id)
        spec = record.spec
        noise = spec.noise.model_copy(update={k: v for k, v in
                                              {"noise_scale": body.noise_scale,
                                               "motion_aware": body.motion_aware}.items() if v is not None})
        new_spec = spec.model_copy(update={"prompt": body.prompt or spec.prompt, "noise": noise,
                                           "steps": body.steps or spec.steps,
                                           "seed": spec.seed if body.seed is None else body.seed})
        params_changed = (new_spec.steps, new_spec.noise, new_spec.seed) != (spec.steps, spec.noise, spec.seed)
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
                await put_back({"steps": spec.steps, "noise": spec.noise, "seed": spec.seed, "prompt": spec.prompt},
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

    @v1.delete("/streams/{stream_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[Depends(operator)])
    async def delete_stream(stream_id: str) -> Response:
        await record_or_404(stream_id)
        record = await table.delete(stream_id)
        ended = record.spec
        await bus.publish(Subjects.stream_error(stream_id),
                          Error(code="stream_deleted", message="the stream was deleted", stream_id=ended.stream_id))
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @v1.post("/streams/{stream_id}/key", response_model=CreatedStream)
    async def rotate_key(stream_id: str, who: Principal = Depends(operator)) -> StreamInfo:
        """A new stream key, shown once: the old one stops opening the stream at once, and ingest ends a publisher
        still using it (it may come back with the new key). Operators only: whoever holds the key publishes."""
        limited(who)
        try:
            record, key = await table.rotate_key(stream_id)
        except (StreamNotFound, ValueError):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no stream {stream_id!r}") from None
        log.info("stream %s: stream key rotated", stream_id)
        return with_key(record, key)

    @v1.post("/streams/{stream_id}/playback", response_model=PlaybackUrls, dependencies=[Depends(of_stream)])
    async def mint_playback(stream_id: str) -> PlaybackUrls:
        """Fresh signed playback URLs (valid ``playback.token_ttl_s``)."""
        await record_or_404(stream_id)
        return PlaybackUrls(**playback(stream_id))  # type: ignore[arg-type]

    @v1.post("/streams/{stream_id}/tokens", status_code=status.HTTP_201_CREATED, response_model=MintedToken,
             dependencies=[Depends(operator)])
    async def mint_token(stream_id: str, body: MintToken) -> MintedToken:
        await record_or_404(stream_id)
        entry, secret = await table.create_token(stream_id, body.label)
        log.info("stream %s: token %s minted", stream_id, entry.token_id)
        return MintedToken(token=secret, **entry.model_dump(include=set(StreamTokenInfo.model_fields)))

    @v1.get("/streams/{stream_id}/tokens", response_model=list[StreamTokenInfo], dependencies=[Depends(operator)])
    async def list_tokens(stream_id: str) -> list[StreamTokenInfo]:
        await record_or_404(stream_id)
        return [StreamTokenInfo(**t.model_dump(include=set(StreamTokenInfo.model_fields)))
                for t in await table.tokens(stream_id)]

    @v1.delete("/streams/{stream_id}/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT,
               dependencies=[Depends(operator)])
    async def revoke_token(stream_id: str, token_id: str) -> Response:
        if not await table.revoke_token(stream_id, token_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"stream {stream_id!r} has no token {token_id!r}")
        log.info("stream %s: token %s revoked", stream_id, token_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    v1.include_router(make_restream_router(table, of_stream, limited, record_or_404))
    v1.include_router(make_jobs_router(settings, bus, operator, limited))
    app.include_router(v1)
    app.include_router(make_stats_router(watch, table.list, record_or_404, settings.ingest.status_interval_s,
                                         operator, of_stream))
    app.include_router(make_playback_router(settings, table, proxy, keys))
    app.include_router(make_whip_router(settings, proxy))  # browser publishing (docs/whip.md)
    app.include_router(make_docs_router())
    app.include_router(make_console_router())
    return app
