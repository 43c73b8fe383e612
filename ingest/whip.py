"""WHIP ingest (RFC 9725): a browser, OBS 30+ or GStreamer's whipsink publishes over WebRTC.

``POST /whip/{stream_id}`` with ``Authorization: Bearer <stream key>`` and an SDP offer (``application/sdp``) →
``201`` + the SDP answer (every ICE candidate in it: no trickle) + ``Location: /whip/{stream_id}/{session}``;
``DELETE`` of the Location (same bearer) ends the session. A ``WhipSession`` is a publisher exactly as an RTMP
connection is (``ingest.rtmp_stream.Publisher``): it enters the same caps, passes the same key check
(``RtmpServer.admit_publisher``), hands its decoded video frames to the same stream (``RtmpStream.hand_off``: pacer,
chunker, queue, encode) and ends with a counted reason (``rheo_ingest_rtmp_refused_total{reason}``). aiortc
decodes VP8/H.264 and Opus; the audio is re-encoded as AAC (``ingest.opus_to_aac``) and enters the same passthrough
as an RTMP publisher's (``RtmpStream.on_audio``), its timestamps moved onto the video's source clock.

A/V alignment. Each track's RTP timestamps count from that track's first packet (aiortc's ``TimestampMapper``), so
the two clocks share no origin; RTCP sender reports would give it, but aiortc does not expose them. Instead each
track's origin is the earliest its timestamp 0 arrives, the least over every frame so far (``_AvAlignment``), after
taking off what the receive path holds a frame for: aiortc hands a video frame on when the next frame's first
packet arrives (so a frame's receipt dates the next frame's timestamp) and an Opus frame when the fourth frame after
it arrives, and that packet left the sender once its own 20 ms were captured (5 frame durations). What remains:
the video's encode and decode times (audio early by them, typically 5-30 ms with a browser) and Opus's 6.5 ms
encoder lookahead (audio late by it). Measured on loopback, aiortc publishing small VP8 frames: +6 ms
(``tests/media_io/test_whip.py``, bound asserted 50 ms: egress keeps a track continuous within 50 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from typing import Any

import av
import uvicorn
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from fastapi import FastAPI, HTTPException, Request, Response

from ingest.audio import count as count_audio
from ingest.opus_to_aac import OpusToAac
from ingest.rtmp_limits import RefusalKind, address_bucket
from ingest.rtmp_stream import RtmpStream
from ingest.server import Refused, RtmpServer
from services.runtime import listen_socket

log = logging.getLogger(__name__)

SDP = "application/sdp"
_AUDIO_HELD_FRAMES = 5  # an Opus frame's packetization (1) + aiortc's audio jitter buffer (prefetch=4)
_HTTP_OF: dict[str, int] = {"bad_key": 401, "key_rate_limited": 429, "connection_cap": 503, "ip_cap": 429,
                            "preauth_ip_cap": 429, "preauth_evicted": 503}
"""HTTP status of a refusal kind (any other: 403)."""


class WhipSession:
    """One WebRTC peer connection publishing one stream (a ``Publisher``); ``run`` pumps its video track."""

    def __init__(self, server: RtmpServer, peer: str, ice_servers: list[str]) -> None:
        self.server, self.peer, self.bucket = server, peer, address_bucket(peer.rsplit(":", 1)[0])
        self.id = secrets.token_urlsafe(16)
        self.key = ""
        self.stream: RtmpStream | None = None
        self.ice_servers = ice_servers
        self.pc: RTCPeerConnection | None = None
        """Made once the key passed: before, a request costs no DTLS certificate and no socket."""
        self.video: MediaStreamTrack | None = None
        self.task: asyncio.Task[None] | None = None
        self._audio: asyncio.Task[None] | None = None
        self._clocks = _AvAlignment()
        self._end: tuple[RefusalKind | None, str] | None = None

    def connect(self) -> RTCPeerConnection:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(u) for u in self.ice_servers]))
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)
        return self.pc

    def abort(self, kind: RefusalKind, reason: str) -> None:
        self._end = self._end or (kind, reason)
        if self.task is not None:
            self.task.cancel()

    evict = abort

    def stop(self, reason: str) -> None:
        """A clean end (the publisher's DELETE)."""
        self._end = self._end or (None, reason)
        if self.task is not None:
            self.task.cancel()

    def buffered_bytes(self) -> int:
        return 0  # the offer is read whole, within the pre-auth budget, before a session exists

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self.video is None:
            self.video = track
        elif track.kind == "audio" and self._audio is None:
            self._audio = asyncio.create_task(self._pass_audio(track), name=f"whip-audio-{self.id}")

    def _on_state(self) -> None:
        if self.pc is not None and self.pc.connectionState == "failed":
            self.abort("connection_error", "WebRTC connection failed (ICE or DTLS)")

    async def _pass_audio(self, track: MediaStreamTrack) -> None:
        """Every Opus frame (aiortc's queue is unbounded) → AAC → the stream's passthrough, on the video's clock."""
        codec = OpusToAac()
        warned = False
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self._clocks.audio(float(frame.pts * frame.time_base), frame.samples / frame.sample_rate)
                if self.stream is None:
                    continue
                self.stream.stats.audio_messages += 1
                duplicates = codec.dropped
                try:
                    payloads = codec.encode(frame)
                except (av.FFmpegError, ValueError) as exc:
                    count_audio(self.stream.audio.stats, "transcode_failed")
                    if not warned:
                        warned = True
                        log.warning("whip %s: Opus frame not transcoded to AAC: %s", self.stream.stream_id, exc)
                else:
                    if codec.dropped > duplicates:
                        count_audio(self.stream.audio.stats, "duplicate")
                    self._stamp(payloads)
        self._stamp(codec.flush())  # the track ended: its last partial AAC frame

    def _stamp(self, payloads: list[tuple[bytes, float]]) -> None:
        if self.stream is None:
            return
        for payload, source_s in payloads:
            video_s = self._clocks.on_video_clock(source_s)
            self.stream.on_audio(payload, None if video_s is None else video_s * 1000.0)

    async def run(self) -> None:
        """Frames until the publisher ends, goes quiet for ``frame_timeout_s``, is replaced or the server shuts."""
        stream = self.stream
        assert stream is not None and self.video is not None
        timeout = self.server.settings.frame_timeout_s
        kind: RefusalKind | None = None
        reason = "publisher closed the connection"
        try:
            if self._end is not None:  # replaced or shut down while its offer was answered
                kind, reason = self._end
                return
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        frame = await self.video.recv()
                except TimeoutError:
                    kind, reason = "no_frames", f"no video frame for {timeout:g} s (ingest.frame_timeout_s)"
                    break
                self._clocks.video(float(frame.pts * frame.time_base))
                stream.stats.video_messages += 1
                s = self.server.settings
                if frame.width > s.max_width or frame.height > s.max_height:
                    kind, reason = "unsupported_media", (f"video {frame.width}x{frame.height} exceeds the "
                                                         f"{s.max_width}x{s.max_height} cap")
                    break
                await stream.hand_off(lambda f=frame: [f], self)
        except MediaStreamError:
            pass  # the track ended: the peer connection closed
        except asyncio.CancelledError:
            kind, reason = self._end or ("shutdown", "cancelled")
        except Exception as exc:  # one session's bug must not take the server down
            log.exception("whip %s: unexpected error", self.peer)
            kind, reason = "internal", f"internal error: {exc}"
        finally:
            await self.close(kind, reason)

    async def close(self, kind: RefusalKind | None, reason: str) -> None:
        """Release everything the session holds; count the reason unless it ended cleanly."""
        if self._audio is not None:
            self._audio.cancel()
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await self.pc.close()
        if self.stream is not None:
            self.server.detach(self, self.stream, reason if kind is not None else "")
        self.server.leave(self)
        if kind is None:
            log.info("whip %s: %s", self.peer, reason)
        else:
            self.server.refuse(kind, self.peer, reason)


class WhipServer:
    """The WHIP HTTP listener (``ingest.whip_port`` on ``host``: the gateway calls it, as it reads /metrics); its
    sessions are publishers of ``rtmp``, beside its RTMP connections."""

    def __init__(self, rtmp: RtmpServer, host: str = "127.0.0.1") -> None:
        self.rtmp, self.host = rtmp, host
        self.settings = rtmp.settings
        self.sessions: dict[str, WhipSession] = {}
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        assert s.whip_port is not None
        sock = listen_socket(self.host, s.whip_port, "the WHIP listener (ingest.whip_port)")
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.app(), log_level="warning", lifespan="off"))
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="whip-http")
        log.info("whip ingest listening on %s:%d", self.host, self.port)

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            session.abort("shutdown", "server shutting down")
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task

    def app(self) -> FastAPI:
        app = FastAPI(title="rheo WHIP ingest", docs_url=None, redoc_url=None, openapi_url=None)
        app.post("/whip/{stream_id}", status_code=201)(self.offer)
        app.delete("/whip/{stream_id}/{session_id}")(self.end)
        app.options("/whip/{stream_id}")(self.options)
        return app

    async def options(self, stream_id: str) -> Response:
        return Response(status_code=204, headers={"Accept-Post": SDP, "Allow": "POST, OPTIONS"})

    async def offer(self, stream_id: str, request: Request) -> Response:
        """An SDP offer: the key checked as RTMP's ``publish`` is, then the answer (ICE gathered)."""
        peer = f"{request.client.host}:{request.client.port}" if request.client else "?:0"
        header = self.settings.whip_client_header
        if header and request.headers.get(header):  # behind the gateway: the publisher, not the gateway
            peer = f"{request.headers[header].split(',')[0].strip()[:64]}:0"
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != SDP:
            raise HTTPException(415, f"the offer must be {SDP}", headers={"Accept-Post": SDP})
        budget = self.settings.preauth_buffer_bytes
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > budget:
                self.rtmp.refuse("protocol", peer, f"WHIP offer over {budget} bytes")
                raise HTTPException(413, f"the offer exceeds {budget} bytes (ingest.preauth_buffer_bytes)")
        sdp = body.decode("utf-8", "replace")
        session = WhipSession(self.rtmp, peer, self.settings.whip_ice_servers)
        if not self.rtmp.enter(session):
            raise HTTPException(429, "too many connections from this address", headers={"Retry-After": "5"})
        answered = False
        kind: RefusalKind = "connection_error"
        reason = "the publisher went away during the offer"
        try:
            response = await self._negotiate(session, stream_id, sdp, _bearer(request))
            answered = True
            return response
        except HTTPException as exc:
            kind, reason = _kind_of(exc), str(exc.detail)
            raise
        except Exception as exc:  # aiortc's own surprises with a hostile offer: this offer fails, nothing else
            log.exception("whip %s: offer failed", peer)
            kind, reason = "internal", f"internal error: {exc}"[:300]
            raise HTTPException(500, "the offer could not be answered") from exc
        finally:
            if not answered:
                await asyncio.shield(session.close(kind, reason))

    async def _negotiate(self, session: WhipSession, stream_id: str, sdp: str, key: str) -> Response:
        if not sdp.startswith("v=0") or "\nm=video" not in sdp:
            raise _Refusal(400, "protocol", "bad offer: an SDP offer with a video m-line (VP8 or H.264) expected")
        if not key:
            raise _Refusal(401, "bad_key", "a WHIP publisher authenticates with Authorization: Bearer <stream key>",
                           {"WWW-Authenticate": "Bearer"})
        metadata: dict[str, Any] = {"peer": session.peer, "protocol": "whip"}
        try:
            session.stream = await self.rtmp.admit_publisher(session, self.settings.rtmp_app, key, metadata,
                                                             stream_id)
        except Refused as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.kind == "bad_key" else {}
            raise _Refusal(_HTTP_OF.get(exc.kind, 403), exc.kind, exc.reason, headers) from None
        session.key = key
        pc = session.connect()
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
            if session.video is None:
                raise ValueError("no video track (VP8 or H.264) in the offer")
            await pc.setLocalDescription(await pc.createAnswer())
        except (ValueError, AttributeError, KeyError, IndexError) as exc:
            raise _Refusal(400, "protocol", f"bad offer: {exc}"[:300]) from None
        if not _has_video_codec(pc.localDescription.sdp):
            raise _Refusal(400, "unsupported_media", "bad offer: no video codec in common (VP8 or H.264)")
        self.sessions[session.id] = session
        session.task = asyncio.create_task(self._run(session), name=f"whip-{session.id}")
        self.rtmp.adopt(session.task)
        log.info("whip %s publishing stream=%s (session %s)", session.peer, stream_id, session.id)
        return Response(pc.localDescription.sdp, status_code=201, media_type=SDP,
                        headers={"Location": f"/whip/{stream_id}/{session.id}", "ETag": f'"{session.id}"'})

    async def _run(self, session: WhipSession) -> None:
        try:
            await session.run()
        finally:
            self.sessions.pop(session.id, None)

    async def end(self, stream_id: str, session_id: str, request: Request) -> Response:
        """The publisher's DELETE: the session ends cleanly (the stream lingers for a reconnect, as after RTMP)."""
        session = self.sessions.get(session_id)
        if session is None or session.stream is None or session.stream.stream_id != stream_id:
            raise HTTPException(404, "no such WHIP session")
        if not hmac.compare_digest(_bearer(request).encode(), session.key.encode()):
            raise HTTPException(401, "the session's stream key is required", headers={"WWW-Authenticate": "Bearer"})
        session.stop("publisher ended the WHIP session")
        started = time.monotonic()
        if session.task is not None:  # answer once the stream no longer counts it as its publisher
            await asyncio.wait({session.task}, timeout=5.0)
        log.debug("whip session %s ended in %.3f s", session_id, time.monotonic() - started)
        return Response(status_code=200)


class _AvAlignment:
    """Puts the audio track's timestamps on the video's (module docstring, "A/V alignment"): each track's origin
    is the least of (receipt − source time of the frame the receipt dates), on the monotonic clock."""

    def __init__(self) -> None:
        self._video: float | None = None
        self._audio: float | None = None
        self._received: float | None = None  # receipt of the last video frame: when the next frame's packet came

    def video(self, ts: float) -> None:
        now = time.monotonic()
        if self._received is not None:
            self._video = _least(self._video, self._received - ts)
        self._received = now

    def audio(self, ts: float, duration: float) -> None:
        self._audio = _least(self._audio, time.monotonic() - ts - _AUDIO_HELD_FRAMES * duration)

    def on_video_clock(self, audio_s: float) -> float | None:
        """The video source time of audio source time ``audio_s`` (None until both origins are known)."""
        if self._video is None or self._audio is None:
            return None
        return audio_s + self._audio - self._video


def _least(old: float | None, new: float) -> float:
    return new if old is None else min(old, new)


class _Refusal(HTTPException):
    """An offer refused with a counted reason (``kind``)."""

    def __init__(self, code: int, kind: RefusalKind, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(code, reason, headers=headers)
        self.kind = kind


def _kind_of(exc: HTTPException) -> RefusalKind:
    return exc.kind if isinstance(exc, _Refusal) else "internal"


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _has_video_codec(answer: str) -> bool:
    """The answer's video m-line carries a codec (a rejected one has port 0)."""
    return any(line.startswith("m=video ") and not line.startswith("m=video 0 ") for line in answer.splitlines())
