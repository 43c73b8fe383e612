"""The egress service: encoded video in, HLS / LL-HLS over HTTP and RTMP push out (design §1; docs/media.md).

Subscribes to ``rheo.stream.*.video`` (``EncodedVideo`` from the decoder, credit window),
``rheo.stream.*.audio`` (the publisher's AAC from ingest, held in an ``AudioSync`` until its video is muxed) and
``rheo.stream.*.event``, and watches the stream table for restream destinations; publishes heartbeats and, about
once a second, each served stream's ``StreamStatus`` (``rheo.stream.<id>.status``: output FPS, latency, viewers;
``egress/observe.py``). Per stream an ``LlHlsStream`` (``HlsRegistry``) fed with the access units and the audio, and a
``Restream`` (an ``RtmpPush`` per destination: the record's own list, else ``egress.rtmp_push_url``). Serves
``make_hls_router`` on ``egress.http_port`` and records its base URL in the stream's ``StreamRecord``
(``egress_url``) when the stream's first video arrives, so the gateway's ``/hls/<id>/...`` proxy finds it.

A playlist ends (``EXT-X-ENDLIST``) on the decoder's ``end_of_stream``, or, after the stream's ``ended`` event,
once no video came for ``egress.ended_grace_s``; ended streams stay served for ``egress.ended_retention_s``.

A playlist never goes back (docs/media.md "Continuity across restarts"): a new decoder session (its message seq
starts over), new parameter sets or size restart the media as a discontinuity of the same playlist, and each
stream's ``HlsState`` in JetStream KV (``ContinuityStore``) lets a restarted egress continue the numbering.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from nats.aio.msg import Msg
from prometheus_client import Counter
from starlette.types import ASGIApp

from egress.audio import AudioSync
from egress.continuity import ContinuityStore
from egress.http import make_hls_router
from egress.observe import EgressObserver
from egress.restream import Restream, destinations
from media.h264 import PartLayout, VideoConfig
from media.llhls import HlsRegistry, LlHlsStream
from proto import CHANNELS, EncodedAudio, EncodedVideo, HlsState, StreamEvent, StreamRecord, Subjects
from services.assignments import Assignments
from services.httpguard import guard
from services.playback_tokens import PlaybackKeys
from services.runtime import Service, ServiceStartError, listen_socket, main
from services.streams import StreamNotFound, StreamTable

log = logging.getLogger("rheo.egress")

MESSAGES = Counter("rheo_egress_video_messages_total", "EncodedVideo messages by outcome", ["result"])
UNITS = Counter("rheo_egress_units_total", "access units by outcome", ["result"])
RESTARTS = Counter("rheo_egress_media_restarts_total", "playlist discontinuities opened, by cause", ["cause"])

_CONTROL_MESSAGE_BYTES = 1024 * 1024  # heartbeats: ≈100 B + 66 B per stream id; egress publishes nothing else


@dataclass
class EgressStats:
    streams_opened: int = 0
    streams_ended: int = 0
    messages: int = 0
    messages_lost: int = 0  # gaps in EncodedVideo.seq
    messages_dropped: int = 0  # subject mismatch, config mismatch, after the end
    messages_unassigned: int = 0  # video of streams placed on another egress (services/assignments.py)
    media_restarts: int = 0  # new decoder sessions on a live playlist (each a discontinuity)
    streams_resumed: int = 0  # playlists continued from a previous life's HlsState
    units: int = 0
    units_failed: int = 0
    units_skipped: int = 0  # not packaged: before a keyframe, pts out of order (LlHlsStream.stats says which)
    record_updates: int = 0
    record_failures: int = 0


@dataclass
class EgressStream:
    """Everything egress keeps for one stream: the packager, the RTMP pushes, the message counter."""

    stream_id: str
    config: VideoConfig
    hls: LlHlsStream
    restream: Restream | None = None
    next_seq: int = 0
    end_timer: asyncio.TimerHandle | None = None  # armed by the 'ended' event, re-armed by every later message
    forget_timer: asyncio.TimerHandle | None = None  # removes the ended stream after its retention


class EgressService(Service):
    role = "egress"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.registry = HlsRegistry(self.settings.egress.hls_dir)
        self.outputs: dict[str, EgressStream] = {}
        self.audio: dict[str, AudioSync] = {}  # from the first audio message (before the video) until forgotten
        self.restream_lists: dict[str, list[str]] = {}  # stream id → its own destinations (the stream table's)
        self.stats = EgressStats()
        self.observer = EgressObserver(self.settings.egress.viewer_window_s)  # TTFF, latency, FPS, viewers, spans
        self.hls_port = 0
        self.base_url = ""
        self._table: StreamTable | None = None
        self._continuity: ContinuityStore | None = None
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.assignments = Assignments("egress", self.member_id, on_record=self._record_changed)
        self.checks["http"] = False
        try:
            self.playback_keys = PlaybackKeys.of(self.settings.playback.signing_keys)
        except ValueError as e:
            raise ServiceStartError(f"egress: {e} (the gateway's key list: egress serves signed playback only)") from e

    def max_send_bytes(self) -> int:
        return _CONTROL_MESSAGE_BYTES

    # -- lifecycle ----------------------------------------------------------------------------------------

    def hls_app(self) -> ASGIApp:
        """The HLS router behind the shared HTTP guard (raw-path checks, no bodies, errors without details)."""
        app = FastAPI(title="rheo egress", docs_url=None, redoc_url=None, openapi_url=None)
        app.include_router(make_hls_router(self.registry, self.playback_keys, on_view=self.observer.viewers.seen))
        return guard(app, max_body_bytes=1024)

    async def start(self) -> None:
        assert self.bus is not None
        eg = self.settings.egress
        self._table = await StreamTable.open(self.bus)
        self._continuity = await ContinuityStore.open(self.bus, self.settings.nats.kv_replicas)
        sock = listen_socket(eg.http_host, eg.http_port, "egress HLS/LL-HLS (egress.http_port)")
        self.hls_port = sock.getsockname()[1]
        host = "127.0.0.1" if eg.http_host in ("", "0.0.0.0", "::") else eg.http_host
        self.base_url = (eg.public_url or f"http://{host}:{self.hls_port}").rstrip("/")
        self.address = self.base_url  # heartbeats carry it: placement tells the gateway where a stream plays
        self._http = uvicorn.Server(uvicorn.Config(self.hls_app(), log_level="warning", lifespan="off"))
        self._http.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # signals are ours
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]), name="egress-hls")
        self.checks["http"] = True
        await self.assignments.start(self.bus)
        known = self.assignments.known(self.serves)
        await self.bus.subscribe(CHANNELS["stream_video"].wildcard(), self._on_video, expected=EncodedVideo,
                                 credit=True, known=known)
        await self.bus.subscribe(CHANNELS["stream_event"].wildcard(), self._on_event, expected=StreamEvent,
                                 known=known)
        await self.bus.subscribe(CHANNELS["stream_audio"].wildcard(), self._on_audio, expected=EncodedAudio,
                                 known=known)
        self._spawn(self.observer.report(self.bus, lambda: ((o.stream_id, o.hls.ended) for o in self.outputs.values())),
                    "egress-status")
        log.info("egress serving HLS at %s/hls/<stream id>/index.m3u8", self.base_url)

    async def drain(self) -> None:
        """End every playlist (EXT-X-ENDLIST), let RTMP pushes send what they hold, stop serving."""
        for out in list(self.outputs.values()):
            self._end(out)
            if out.forget_timer is not None:  # files stay on disk for whoever serves them next
                out.forget_timer.cancel()
        pushes = [t for o in self.outputs.values() if o.restream is not None for t in o.restream.tasks.values()]
        if pushes:
            _, pending = await asyncio.wait(pushes, timeout=2.0)
            for task in pending:
                task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.assignments.stop()
        if self._continuity is not None:  # the state stays: a successor continues these playlists
            await self._continuity.flush()
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task

    # -- input --------------------------------------------------------------------------------------------

    def _dropped(self, msg: EncodedVideo, reason: str, why: str) -> None:
        self.stats.messages_dropped += 1
        MESSAGES.labels(result=reason).inc()
        log.warning("stream %s video message %d dropped (%s): %s", msg.stream_id, msg.seq, reason, why)

    async def _on_video(self, msg: EncodedVideo, raw: Msg) -> None:
        if raw.subject != Subjects.stream_video(msg.stream_id):
            self._dropped(msg, "mismatched", f"stream id does not match the subject {raw.subject}")
            return
        if not self.assignments.mine(msg.stream_id):  # another egress's (counted, not logged: the normal case)
            self.stats.messages_unassigned += 1
            MESSAGES.labels(result="unassigned").inc()
            return
        config = VideoConfig.from_message(msg)
        out = self.outputs.get(msg.stream_id)
        if out is not None and out.hls.ended and msg.seq != 0:
            self._dropped(msg, "after_end", "the stream's playlist has ended")
            return
        if out is None or out.hls.ended:
            # the stream's first video here (or a new session after its end): continue what a previous life of
            # the playlist published, if any
            assert self._continuity is not None
            resume = out.hls.state() if out is not None else await self._continuity.load(msg.stream_id)
            out = self.outputs.get(msg.stream_id)  # (another message may have opened it meanwhile)
            if out is None or out.hls.ended:
                out = self._open(msg.stream_id, config, resume)
                if resume is not None:  # joined a decoder session mid-way: earlier messages were not ours
                    out.next_seq = msg.seq
        if msg.seq < out.next_seq:
            # a new decoder session (the decoder restarted: its message seq starts over), maybe with new parameter
            # sets or size: the same playlist goes on after an EXT-X-DISCONTINUITY
            self._restart(out, config)
            out.next_seq = msg.seq
        elif config != out.config:  # one decoder session never changes its output: not this stream's video
            self._dropped(msg, "config_mismatch", f"{config.width}x{config.height}@{config.fps} differs from the "
                          f"stream's {out.config.width}x{out.config.height}@{out.config.fps}")
            return
        if msg.seq > out.next_seq:
            self.stats.messages_lost += msg.seq - out.next_seq
            MESSAGES.labels(result="lost").inc(msg.seq - out.next_seq)
        out.next_seq = max(out.next_seq, msg.seq + 1)
        self.stats.messages += 1
        MESSAGES.labels(result="ok").inc()
        span = self.observer.package_span(msg, raw, out.hls)
        for unit in msg.units:
            try:
                packaged = out.hls.push(unit)
            except Exception as e:  # a unit the muxer cannot take loses only itself
                self.stats.units_failed += 1
                UNITS.labels(result="failed").inc()
                log.warning("stream %s: access unit pts %d not packaged: %s", msg.stream_id, unit.pts, e)
                continue
            if packaged is None:  # before the first keyframe, or out of order (counted by the packager)
                self.stats.units_skipped += 1
                UNITS.labels(result="skipped").inc()
                continue
            self.stats.units += 1
            UNITS.labels(result="packaged").inc()
            if out.restream is not None:
                out.restream.push(packaged)  # the output timeline: monotonic across decoder restarts
        span.end()
        if msg.end_of_stream:
            self._end(out)
        elif out.end_timer is not None:
            self._arm_end(out)

    async def _on_event(self, event: StreamEvent, raw: Msg) -> None:
        if raw.subject != Subjects.stream_event(event.stream_id):
            return
        self.observer.event(event)
        if event.kind != "ended":
            return
        out = self.outputs.get(event.stream_id)
        if out is not None and not out.hls.ended:
            self._arm_end(out)
        elif out is None and event.stream_id in self.audio:  # its video may still be a latency away
            asyncio.get_running_loop().call_later(self.settings.egress.ended_retention_s, self._forget_audio,
                                                  event.stream_id)

    def _forget_audio(self, stream_id: str) -> None:
        """Audio of a stream whose video never came (counted ``unplayed``)."""
        if stream_id not in self.outputs and stream_id in self.audio:
            self.audio.pop(stream_id).close()

    async def _on_audio(self, msg: EncodedAudio, raw: Msg) -> None:
        """The publisher's AAC: held until the video of the same capture time is muxed (egress/audio.py)."""
        if raw.subject != Subjects.stream_audio(msg.stream_id):
            MESSAGES.labels(result="mismatched").inc()
            log.warning("audio message for stream %s on %s dropped: mismatched subject", msg.stream_id, raw.subject)
            return
        self._audio_sync(msg.stream_id).add(msg)

    def _audio_sync(self, stream_id: str) -> AudioSync:
        sync = self.audio.get(stream_id)
        if sync is None:
            sync = self.audio[stream_id] = AudioSync(stream_id)
        return sync

    def _record_changed(self, sid: str, record: StreamRecord | None) -> None:
        """A stream record changed (the assignments' watch): its own restream destinations take effect at once
        (docs/restream.md)."""
        own = record.restream if record is not None else []
        if own == self.restream_lists.get(sid, []):
            return
        if own:
            self.restream_lists[sid] = own
        else:
            self.restream_lists.pop(sid, None)
        out = self.outputs.get(sid)
        if out is not None and out.restream is not None and not out.hls.ended:
            out.restream.sync(destinations(own, self.settings.egress, sid))

    def _arm_end(self, out: EgressStream) -> None:
        """End the playlist ``ended_grace_s`` after the last message, unless ``end_of_stream`` comes first (the
        decoder keeps sending while it flushes, so a slow decoder loses nothing)."""
        if out.end_timer is not None:
            out.end_timer.cancel()
        loop = asyncio.get_running_loop()
        out.end_timer = loop.call_later(self.settings.egress.ended_grace_s, self._end, out)

    # -- per-stream lifecycle -----------------------------------------------------------------------------

    def _open(self, stream_id: str, config: VideoConfig, resume: HlsState | None) -> EgressStream:
        eg = self.settings.egress
        old = self.outputs.get(stream_id)
        if old is not None:
            self._end(old)
            if old.forget_timer is not None:
                old.forget_timer.cancel()
        layout = PartLayout.from_settings(config.fps, eg)
        hls = self.registry.open(stream_id, config, layout, eg.playlist_segments, resume)
        hls.on_segment = self._save_state
        self.observer.opened(stream_id, hls)
        if resume is not None:
            self.stats.streams_resumed += 1
            RESTARTS.labels(cause="resumed").inc()
            log.info("stream %s: playlist continues at media sequence %d, discontinuity %d (%d segments listed "
                     "again)", stream_id, resume.next_msn, hls.discontinuity, hls.stats.segments_restored)
        hls.audio = audio = self._audio_sync(stream_id)
        out = EgressStream(stream_id, config, hls)
        # a stream whose audio came before its first video is restreamed with it, any other with AAC silence
        out.restream = Restream(stream_id, config, eg, self._spawn, eg.rtmp_push_silent_audio and audio.config is None)
        out.restream.sync(destinations(self.restream_lists.get(stream_id, []), eg, stream_id))
        hls.on_audio = out.restream.push_audio
        self.outputs[stream_id] = out
        self.streams.add(stream_id)
        self.stats.streams_opened += 1
        self._spawn(self._record_live(stream_id), f"record-{stream_id}")
        log.info("stream %s: packaging %dx%d at %g fps", stream_id, config.width, config.height, config.fps)
        return out

    def _restart(self, out: EgressStream, config: VideoConfig) -> None:
        layout = PartLayout.from_settings(config.fps, self.settings.egress) if config.fps != out.config.fps else None
        out.hls.restart(config, layout)
        out.config = config
        self.stats.media_restarts += 1
        RESTARTS.labels(cause="decoder_session").inc()
        log.info("stream %s: new decoder session: media restarts as discontinuity %d", out.stream_id,
                 out.hls.discontinuity)

    def _save_state(self, hls: LlHlsStream) -> None:
        if self._continuity is not None:
            self._continuity.save(hls.state())

    def _end(self, out: EgressStream) -> None:
        if out.end_timer is not None:
            out.end_timer.cancel()
            out.end_timer = None
        if out.hls.ended:
            return
        out.hls.end()
        self.stats.streams_ended += 1
        self.streams.discard(out.stream_id)
        if out.restream is not None:
            out.restream.finish()
        loop = asyncio.get_running_loop()
        out.forget_timer = loop.call_later(self.settings.egress.ended_retention_s, self._forget, out)
        log.info("stream %s: playlist ended", out.stream_id)

    def _forget(self, out: EgressStream) -> None:
        """Drop an ended stream after its retention (playlist, segments and files)."""
        if self.outputs.get(out.stream_id) is out:
            del self.outputs[out.stream_id]
            self.observer.ended(out.stream_id)
            if self.registry.get(out.stream_id) is out.hls:
                self.registry.remove(out.stream_id)
            if self._continuity is not None:  # ended for good: a later stream under this id starts afresh
                self._continuity.delete(out.stream_id)
            if out.hls.audio is not None and self.audio.get(out.stream_id) is out.hls.audio:
                self.audio.pop(out.stream_id).close()

    async def _record_live(self, stream_id: str) -> None:
        """Tell the stream table where this stream plays (the gateway proxies ``/hls/<id>/`` there)."""
        assert self._table is not None

        def change(record: StreamRecord) -> StreamRecord:
            state = "live" if record.state == "created" else record.state  # ingest owns the session's health
            return record.model_copy(update={"egress_url": self.base_url, "state": state})

        try:
            await self._table.update(stream_id, change)
            self.stats.record_updates += 1
        except StreamNotFound:
            self.stats.record_failures += 1
            log.warning("stream %s is not in the stream table; its HLS is served here but not routed", stream_id)
        except Exception as e:
            self.stats.record_failures += 1
            log.warning("stream %s: stream table update failed: %s", stream_id, e)

    def _spawn(self, coro, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


if __name__ == "__main__":
    sys.exit(main(EgressService))
