"""Audio passthrough: the publisher's AAC, stamped on the video's capture clock, batched onto the bus.

Audio is not styled, so it is not decoded: each FLV AAC frame keeps its bytes and gets the wall-clock capture time
its RTMP timestamp maps to on the stream's pacer anchor (the clock of the video chunks' ``capture_time``). Egress
places the samples against the styled video by that time (docs/media.md "Audio"). Frames are batched per
``batch_s`` of audio into one ``EncodedAudio`` (not one NATS message per 21 ms frame). Every frame not published
is counted with its reason (``rheo_ingest_audio_units_total{result}``). A WHIP publisher's Opus arrives here as AAC
(``ingest.opus_to_aac``; an Opus frame that fails to transcode is counted ``transcode_failed``, one repeating
audio already encoded ``duplicate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from media.aac import AacConfig
from proto import AudioUnit, EncodedAudio

log = logging.getLogger(__name__)

AUDIO_RESULTS = ("published", "before_video", "not_aac", "no_config", "oversized", "queue_full", "publish_failed",
                 "not_live", "transcode_failed", "duplicate")
UNITS = Counter("rheo_ingest_audio_units_total", "publisher AAC frames by outcome", ["result"])

_SOUND_FORMAT_AAC = 10
_MAX_FRAME_BYTES = 8192  # an AAC access unit is at most 6144 bits per channel (8 channels: 6 KiB)
_MAX_BATCH = 64  # frames per batch whatever their timestamps say (a burst of equal timestamps)
_MAX_QUEUED = 32  # batches (≈5 s) waiting for the bus (or for the stream to go live) before the oldest is dropped


@dataclass
class AudioStats:
    units: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AUDIO_RESULTS, 0))
    batches: int = 0


def count(stats: AudioStats, result: str, n: int = 1) -> None:
    stats.units[result] += n
    UNITS.labels(result=result).inc(n)


class AudioPassthrough:
    """One stream's AAC: ``feed`` FLV audio payloads; batches go to ``sink`` (set while the stream is live; until
    then they wait, bounded: going live takes a moment and the video of that moment waits too)."""

    def __init__(self, stream_id: str, batch_s: float = 0.15) -> None:
        self.stream_id = stream_id
        self.batch_s = batch_s
        self.config: AacConfig | None = None
        self.stats = AudioStats()
        self._sink: Callable[[EncodedAudio], Awaitable[object]] | None = None
        self._batch: list[AudioUnit] = []
        self._seq = 0
        self._queue: asyncio.Queue[EncodedAudio] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._warned = False
        self._shift = 0.0  # the video anchor correction already applied to what is stamped

    @property
    def sink(self) -> Callable[[EncodedAudio], Awaitable[object]] | None:
        return self._sink

    @sink.setter
    def sink(self, sink: Callable[[EncodedAudio], Awaitable[object]] | None) -> None:
        self._sink = sink
        if sink is not None and not self._queue.empty():
            self._start_sender()

    def feed(self, payload: bytes, capture_time: float | None, anchor_shift: float = 0.0) -> None:
        """One FLV audio tag body; ``capture_time`` None: the video clock is not anchored yet (no frame so far).
        ``anchor_shift``: the video pacer's one anchor correction so far (``FramePacer.correction_s``); frames
        stamped before it and not yet published move with it."""
        if anchor_shift != self._shift:
            self._move(anchor_shift - self._shift)
            self._shift = anchor_shift
        if len(payload) < 2:
            return
        if payload[0] >> 4 != _SOUND_FORMAT_AAC:
            count(self.stats, "not_aac")
            if not self._warned:
                self._warned = True
                log.warning("stream %s: audio codec %d is not AAC; audio is not passed through", self.stream_id,
                            payload[0] >> 4)
            return
        if payload[1] == 0:
            try:
                self.config = AacConfig.parse(payload[2:])
            except ValueError as e:
                log.warning("stream %s: AAC sequence header refused: %s", self.stream_id, e)
                self.config = None
            return
        if self.config is None:
            count(self.stats, "no_config")
            return
        if capture_time is None:
            count(self.stats, "before_video")
            return
        if len(payload) - 2 > _MAX_FRAME_BYTES:
            count(self.stats, "oversized")
            return
        self._batch.append(AudioUnit(capture_time=capture_time, data=bytes(payload[2:])))
        if capture_time - self._batch[0].capture_time >= self.batch_s or len(self._batch) >= _MAX_BATCH:
            self.flush()

    def _move(self, seconds: float) -> None:
        self._batch = [u.model_copy(update={"capture_time": u.capture_time + seconds}) for u in self._batch]
        waiting = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        for msg in waiting:
            units = [u.model_copy(update={"capture_time": u.capture_time + seconds}) for u in msg.units]
            self._queue.put_nowait(msg.model_copy(update={"units": units}))

    def flush(self) -> None:
        """Send the partial batch (a batch is complete after ``batch_s``; the stream's end sends the rest)."""
        units, self._batch = self._batch, []
        if not units or self.config is None:
            return
        msg = EncodedAudio(stream_id=self.stream_id, seq=self._seq, config=self.config.asc,
                           sample_rate=self.config.sample_rate, channels=self.config.channels, units=units)
        self._seq += 1
        if self._queue.qsize() >= _MAX_QUEUED:
            count(self.stats, "queue_full", len(self._queue.get_nowait().units))
        self._queue.put_nowait(msg)
        if self._sink is not None:
            self._start_sender()

    def _start_sender(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send(), name=f"audio-{self.stream_id}")

    async def _send(self) -> None:
        while not self._queue.empty() and self._sink is not None:
            msg = self._queue.get_nowait()
            try:
                await self._sink(msg)
                count(self.stats, "published", len(msg.units))
                self.stats.batches += 1
            except Exception as e:
                count(self.stats, "publish_failed", len(msg.units))
                log.warning("stream %s: audio batch %d not published: %s", self.stream_id, msg.seq, e)

    async def close(self) -> None:
        """Send what is batched and stop (the stream ended)."""
        self.flush()
        if self._sender is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._sender), 2.0)
        while not self._queue.empty():  # never live, or the bus did not take them in time
            count(self.stats, "not_live", len(self._queue.get_nowait().units))
        self._sink = None
