"""Restream a stream's encoded output to an RTMP URL, with reconnect and backoff.

PyAV's flv muxer (into memory) makes the FLV tags — AVC and AAC sequence headers, video, and AAC silence when
the source has no audio (YouTube and Twitch want an audio track) — and a small asyncio RTMP client of ours
sends them. A stream with audio gets the publisher's AAC instead (``push_audio``: FLV AAC tags are written
here, the PyAV muxer stays video-only so its interleaver never holds video back waiting for audio). PyAV's own
RTMP output holds the GIL while it blocks on the network, which would stall the event
loop of every other stream; our client never blocks. While disconnected the newest tags are kept (bounded);
after a reconnect the sequence headers are resent and video resumes at the next keyframe. An ``rtmps://`` URL
runs the same client over TLS; the server certificate is always verified (against ``egress.rtmp_push_ca_file``, or
the system's trusted CAs).
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import os
import ssl
import urllib.parse
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from prometheus_client import Counter

from media import amf0
from media.aac import SAMPLES_PER_FRAME, AacConfig
from media.chunkstream import (
    AUDIO,
    COMMAND_AMF0,
    DATA_AMF0,
    HANDSHAKE_SIZE,
    SET_CHUNK_SIZE,
    USER_CONTROL,
    VIDEO,
    ChunkStreamParser,
    control_message,
    encode_message,
)
from media.h264 import VideoConfig
from media.rtmp_url import redact_rtmp_url, split_rtmp_url
from proto import VideoUnit
from services.config import EgressSettings

log = logging.getLogger(__name__)

PUSH_FAILURES = Counter("rheo_egress_rtmp_push_failures_total", "RTMP push connections failed or lost (each retried "
                        "with backoff)")

_CHUNK_SIZE = 4096
_AUDIO_RATE = 44100
_AAC_FRAME = 1024


@dataclass(frozen=True)
class FlvTag:
    type_id: int  # 8 audio, 9 video, 18 script data
    timestamp: int  # ms
    data: bytes

    @property
    def is_sequence_header(self) -> bool:
        if self.type_id == VIDEO:
            return len(self.data) > 1 and self.data[1] == 0
        if self.type_id == AUDIO:
            return len(self.data) > 1 and self.data[0] >> 4 == 10 and self.data[1] == 0
        return self.type_id == DATA_AMF0

    @property
    def is_keyframe(self) -> bool:
        return self.type_id == VIDEO and self.data[:1] != b"" and self.data[0] >> 4 == 1


class _FlvSink(io.RawIOBase):
    def __init__(self) -> None:
        self._buf = bytearray()
        self._header_done = False
        self.tags: list[FlvTag] = []

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self._buf += b
        if not self._header_done:
            if len(self._buf) < 13:
                return len(b)
            del self._buf[:13]  # "FLV" header (9) + PreviousTagSize0 (4)
            self._header_done = True
        while len(self._buf) >= 11:
            size = int.from_bytes(self._buf[1:4], "big")
            if len(self._buf) < 11 + size + 4:
                break
            ts = int.from_bytes(self._buf[4:7], "big") | (self._buf[7] << 24)
            self.tags.append(FlvTag(self._buf[0] & 0x1F, ts, bytes(self._buf[11 : 11 + size])))
            del self._buf[: 11 + size + 4]
        return len(b)


class FlvTagMuxer:
    """Encoded H.264 access units in, FLV tags out (PyAV flv muxer), with AAC silence when asked."""

    def __init__(self, config: VideoConfig, silent_audio: bool = True) -> None:
        self.config = config
        self.silent_audio = silent_audio
        self._sink = _FlvSink()
        self._out: av.container.OutputContainer | None = None
        self._video: av.video.stream.VideoStream | None = None
        self._audio: av.audio.stream.AudioStream | None = None
        self._audio_samples = 0
        self._last_pts = -1
        self._real_audio: AacConfig | None = None  # the source's AAC config, once announced by push_audio
        self.audio_ignored = 0  # source AAC frames not sent: the push had started with silence

    def push_audio(self, time_s: float, config: AacConfig, frames: list[bytes]) -> list[FlvTag]:
        """The source's AAC frames starting at output time ``time_s``: FLV AAC tags (with the sequence header when
        the config is new). A push that started with silence keeps it (one audio track; counted)."""
        if self._audio is not None:
            self.audio_ignored += len(frames)
            return []
        tags = []
        if config != self._real_audio:
            self._real_audio = config
            tags.append(FlvTag(AUDIO, max(0, round(time_s * 1000)), b"\xaf\x00" + config.asc))
        for i, frame in enumerate(frames):
            ms = round((time_s + i * SAMPLES_PER_FRAME / config.sample_rate) * 1000)
            tags.append(FlvTag(AUDIO, max(0, ms), b"\xaf\x01" + frame))
        return tags

    def _open(self, first: VideoUnit) -> None:
        self._out = av.open(self._sink, "w", format="flv", options={"flvflags": "no_duration_filesize"})
        with av.open(io.BytesIO(self.config.extradata + first.data), format="h264") as template:
            self._video = self._out.add_stream_from_template(template.streams.video[0])
        self._video.time_base = Fraction(1, 1000)
        if self.silent_audio and self._real_audio is None:
            self._audio = self._out.add_stream("aac", rate=_AUDIO_RATE, layout="stereo")
            self._audio.codec_context.bit_rate = 64000

    def push(self, unit: VideoUnit) -> list[FlvTag]:
        if unit.pts <= self._last_pts:
            return []
        if self._out is None:
            if not unit.keyframe:
                return []
            self._open(unit)
        assert self._out is not None and self._video is not None
        self._last_pts = unit.pts
        t = float(unit.pts * self.config.time_base)
        if self._audio is not None:
            while self._audio_samples / _AUDIO_RATE <= t:
                frame = av.AudioFrame.from_ndarray(
                    np.zeros((2, _AAC_FRAME), np.float32), format="fltp", layout="stereo"
                )
                frame.sample_rate = _AUDIO_RATE
                frame.pts = self._audio_samples
                self._audio_samples += _AAC_FRAME
                for packet in self._audio.encode(frame):
                    self._out.mux(packet)
        packet = av.Packet(unit.data)
        packet.pts = packet.dts = round(t * 1000)
        packet.time_base = Fraction(1, 1000)
        packet.is_keyframe = unit.keyframe
        packet.stream = self._video
        self._out.mux(packet)
        return self._take()

    def close(self) -> list[FlvTag]:
        if self._out is not None:
            self._out.close()
            self._out = None
        return self._take()

    def _take(self) -> list[FlvTag]:
        tags, self._sink.tags = self._sink.tags, []
        return tags


class PushError(Exception):
    """The RTMP server refused us or broke the protocol."""


def client_tls_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """Verifying client context: hostname and chain checked, against ``ca_file`` or the system's CAs."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class RtmpClient:
    """A minimal publishing RTMP client (simple handshake, AMF0 commands, fmt-0 chunks), over TLS for rtmps://."""

    def __init__(self, url: str, timeout_s: float = 5.0, ca_file: Path | None = None) -> None:
        self.url = url
        self.host, self.port, self.app, self.key = split_rtmp_url(url)
        self.scheme = urllib.parse.urlsplit(url).scheme
        self.tls = client_tls_context(ca_file) if self.scheme == "rtmps" else None
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = ChunkStreamParser()
        self._stream_id = 1
        self._inbox: collections.deque = collections.deque()
        self._reader_task: asyncio.Task | None = None

    async def connect(self) -> None:
        async with asyncio.timeout(self.timeout_s):
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None
            )
            self._writer.write(b"\x03" + b"\x00" * 8 + os.urandom(HANDSHAKE_SIZE - 8))
            s0s1s2 = await self._reader.readexactly(1 + 2 * HANDSHAKE_SIZE)
            self._writer.write(s0s1s2[1 : 1 + HANDSHAKE_SIZE])
            self._writer.write(control_message(SET_CHUNK_SIZE, _CHUNK_SIZE))
            tc_url = f"{self.scheme}://{self.host}:{self.port}/{self.app}"
            info = {"app": self.app, "type": "nonprivate", "flashVer": "FMLE/3.0 (compatible; rheo)", "tcUrl": tc_url}
            self._command(0, "connect", 1, info)
            await self._expect_result(1)
            self._command(0, "releaseStream", 2, None, self.key)
            self._command(0, "FCPublish", 3, None, self.key)
            self._command(0, "createStream", 4, None)
            result = await self._expect_result(4)
            self._stream_id = int(result[3]) if len(result) > 3 and isinstance(result[3], float) else 1
            self._command(self._stream_id, "publish", 5, None, self.key, "live")
            await self._expect_status("NetStream.Publish.Start")

    def _command(self, stream_id: int, *values: object) -> None:
        assert self._writer is not None
        csid = 8 if stream_id else 3
        self._writer.write(encode_message(csid, COMMAND_AMF0, stream_id, 0, amf0.encode(*values), _CHUNK_SIZE))

    async def _next_command(self) -> list:
        assert self._reader is not None
        while not self._inbox:
            data = await self._reader.read(1 << 16)
            if not data:
                raise PushError("server closed the connection")
            for msg in self._parser.feed(data):
                if msg.type_id == COMMAND_AMF0:
                    self._inbox.append(amf0.decode_all(msg.payload))
        return self._inbox.popleft()

    async def _expect_result(self, txn: int) -> list:
        while True:
            cmd = await self._next_command()
            if cmd[0] == "_result" and cmd[1] == txn:
                return cmd
            if cmd[0] == "_error" and cmd[1] == txn:
                raise PushError(f"server error: {cmd[3:] if len(cmd) > 3 else cmd}")
            if cmd[0] == "onStatus":
                self._check_status(cmd)

    async def _expect_status(self, code: str) -> None:
        while True:
            cmd = await self._next_command()
            if cmd[0] == "onStatus" and self._check_status(cmd) == code:
                return

    @staticmethod
    def _check_status(cmd: list) -> str:
        info = cmd[3] if len(cmd) > 3 and isinstance(cmd[3], dict) else {}
        if info.get("level") == "error":
            raise PushError(f"{info.get('code')}: {info.get('description')}")
        return str(info.get("code", ""))

    def start_reading(self) -> None:
        """Drain what the server sends while we publish (acks, pings); a close surfaces on the next send."""
        self._reader_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self._reader is not None and self._writer is not None
        while True:
            data = await self._reader.read(1 << 16)
            if not data:
                self._writer.close()
                return
            for msg in self._parser.feed(data):
                if msg.type_id == USER_CONTROL and msg.payload[:2] == b"\x00\x06":  # ping request → response
                    self._writer.write(encode_message(2, USER_CONTROL, 0, 0, b"\x00\x07" + msg.payload[2:6], 128))
                elif msg.type_id == COMMAND_AMF0:
                    self._check_status(amf0.decode_all(msg.payload))

    async def send(self, tag: FlvTag) -> None:
        assert self._writer is not None
        if self._writer.is_closing() or (self._reader_task is not None and self._reader_task.done()):
            if self._reader_task is not None and self._reader_task.done() and self._reader_task.exception():
                raise PushError(str(self._reader_task.exception()))
            raise PushError("connection closed")
        payload = tag.data
        if tag.type_id == DATA_AMF0:
            values = amf0.decode_all(payload)
            if values and values[0] == "onMetaData":
                payload = amf0.encode("@setDataFrame", *values)
        csid = {VIDEO: 6, AUDIO: 4}.get(tag.type_id, 5)
        self._writer.write(encode_message(csid, tag.type_id, self._stream_id, tag.timestamp, payload, _CHUNK_SIZE))
        await asyncio.wait_for(self._writer.drain(), self.timeout_s)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            try:
                self._command(self._stream_id, "FCUnpublish", 6, None, self.key)
                self._command(self._stream_id, "deleteStream", 7, None, float(self._stream_id))
                await asyncio.wait_for(self._writer.drain(), 1.0)
            except (ConnectionError, TimeoutError, OSError):
                pass
            self._writer.close()


@dataclass
class PushStats:
    connects: int = 0
    failures: int = 0
    tags_sent: int = 0
    tags_dropped: int = 0
    last_error: str = ""


class RtmpPush:
    """Keeps one output stream pushed to ``url``; call ``push`` per access unit and run ``run()`` as a task."""

    def __init__(
        self,
        url: str,
        config: VideoConfig,
        silent_audio: bool = True,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
        max_queued_tags: int = 600,
        ca_file: Path | None = None,
    ) -> None:
        self.url = url
        self.ca_file = ca_file
        split_rtmp_url(url)  # a bad URL fails here, not on every reconnect
        self.muxer = FlvTagMuxer(config, silent_audio)
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.stats = PushStats()
        self._headers: dict[int, FlvTag] = {}  # latest metadata / AVC / AAC sequence header, resent on reconnect
        self._queue: collections.deque[FlvTag] = collections.deque(maxlen=max_queued_tags)
        self._wake = asyncio.Event()
        self._closing = False

    @classmethod
    def from_settings(cls, config: VideoConfig, settings: EgressSettings, url: str | None = None) -> RtmpPush:
        target = url or settings.rtmp_push_url
        if not target:
            raise ValueError("no RTMP push URL configured (egress.rtmp_push_url)")
        return cls(
            target,
            config,
            settings.rtmp_push_silent_audio,
            settings.rtmp_push_backoff_s,
            settings.rtmp_push_backoff_max_s,
            ca_file=settings.rtmp_push_ca_file,
        )

    def push(self, unit: VideoUnit) -> None:
        for tag in self.muxer.push(unit):
            self._enqueue(tag)

    def push_audio(self, time_s: float, config: AacConfig, frames: list[bytes]) -> None:
        """The source's AAC (``LlHlsStream.on_audio``): sent instead of silence when it comes before the first
        keyframe is muxed."""
        for tag in self.muxer.push_audio(time_s, config, frames):
            self._enqueue(tag)

    def _enqueue(self, tag: FlvTag) -> None:
        if tag.is_sequence_header:
            self._headers[tag.type_id] = tag
        if len(self._queue) == self._queue.maxlen:
            self.stats.tags_dropped += 1
        self._queue.append(tag)
        self._wake.set()

    async def finish(self) -> None:
        """Send what is queued, then unpublish (``run`` returns)."""
        for tag in self.muxer.close():
            self._enqueue(tag)
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        delay = self.backoff_s
        while True:
            client = RtmpClient(self.url, ca_file=self.ca_file)
            try:
                await client.connect()
                client.start_reading()
                self.stats.connects += 1
                delay = self.backoff_s
                log.info("rtmp push connected to %s", redact_rtmp_url(self.url))
                sent: set[FlvTag] = set()
                for tag in list(self._headers.values()):
                    await client.send(tag)
                    sent.add(tag)
                await self._pump(client, sent)
                await client.close()
                return
            except (OSError, PushError, TimeoutError, asyncio.IncompleteReadError, amf0.AmfError) as exc:
                self.stats.failures += 1
                PUSH_FAILURES.inc()
                self.stats.last_error = f"{exc.__class__.__name__}: {exc}"
                log.warning("rtmp push to %s failed (%s); retrying in %.1fs", redact_rtmp_url(self.url), exc, delay)
                await client.close()
            if self._closing and not self._queue:
                return
            await asyncio.sleep(delay)
            delay = min(self.backoff_max_s, delay * 2)

    async def _pump(self, client: RtmpClient, sent_headers: set[FlvTag]) -> None:
        need_key = True
        while True:
            while self._queue:
                tag = self._queue[0]
                if tag.is_sequence_header and tag in sent_headers:
                    self._queue.popleft()
                    continue
                if need_key and tag.type_id == VIDEO and not tag.is_keyframe:
                    self._queue.popleft()
                    self.stats.tags_dropped += 1
                    continue
                await client.send(tag)
                self._queue.popleft()
                need_key = need_key and not tag.is_keyframe
                self.stats.tags_sent += 1
            if self._closing:
                return
            self._wake.clear()
            await self._wake.wait()

