"""The output side of a stream before packaging: a constant-frame-rate pacer and the H.264 encoder.

The decoder process runs both (design §1): decoded chunks arrive late, early or not at all, the ``CfrPacer``
turns them into exactly ``fps`` frames per second of wall time (repeating the last frame when nothing new has
arrived, never stalling or jumping), and ``H264Encoder`` turns each paced frame into one access unit whose pts
is the frame's index. GOPs are fixed and aligned to HLS segments (``PartLayout``), so the packager can close a
segment by counting parts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np

from proto import EncodedVideo, VideoUnit
from services.config import EgressSettings

__all__ = [
    "CfrPacer",
    "H264Encoder",
    "PacedFrame",
    "PartLayout",
    "VideoConfig",
    "codec_string",
    "run_cfr",
]


@dataclass(frozen=True)
class PartLayout:
    """Frames per LL-HLS part and parts per segment; the GOP is one segment."""

    fps: float
    frames_per_part: int
    parts_per_segment: int

    @classmethod
    def for_rate(cls, fps: float, segment_seconds: float, part_seconds: float) -> PartLayout:
        frames_per_part = max(1, round(part_seconds * fps))
        parts = max(1, round(segment_seconds * fps / frames_per_part))
        return cls(fps, frames_per_part, parts)

    @classmethod
    def from_settings(cls, fps: float, settings: EgressSettings) -> PartLayout:
        return cls.for_rate(fps, settings.segment_seconds, settings.part_seconds)

    @property
    def gop_frames(self) -> int:
        return self.frames_per_part * self.parts_per_segment

    @property
    def part_seconds(self) -> float:
        return self.frames_per_part / self.fps

    @property
    def segment_seconds(self) -> float:
        return self.gop_frames / self.fps


@dataclass(frozen=True)
class VideoConfig:
    """What a packager needs to know about an encoded stream: the stream-level fields of ``proto.EncodedVideo``
    (every such message repeats them, so an egress joining mid-stream can start at the next IDR)."""

    width: int
    height: int
    fps: float
    extradata: bytes  # H.264 SPS + PPS, Annex B

    @classmethod
    def from_message(cls, msg: EncodedVideo) -> VideoConfig:
        return cls(msg.width, msg.height, msg.fps, msg.extradata)

    @property
    def time_base(self) -> Fraction:
        return 1 / Fraction(self.fps).limit_denominator(1001)

    @property
    def codecs(self) -> str:
        return codec_string(self.extradata)


def nal_units(annexb: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte string (start codes and trailing zero bytes removed)."""
    out = []
    for part in annexb.split(b"\x00\x00\x01"):
        part = part.rstrip(b"\x00")
        if part:
            out.append(part)
    return out


def codec_string(extradata: bytes) -> str:
    """RFC 6381 ``avc1.PPCCLL`` from the SPS, for playlists and MSE."""
    for nal in nal_units(extradata):
        if nal[0] & 0x1F == 7 and len(nal) >= 4:
            return f"avc1.{nal[1]:02x}{nal[2]:02x}{nal[3]:02x}"
    return "avc1.42e01e"


@dataclass(frozen=True)
class PacedFrame:
    index: int  # output frame number = pts at the constant rate
    frame: np.ndarray
    repeated: bool
    due: float  # wall time this frame is due
    capture_time: float  # when its source frame was captured (``due`` where the pusher did not say): the PDT base


@dataclass
class CfrStats:
    emitted: int = 0
    repeated: int = 0
    dropped: int = 0
    catchups: int = 0
    pulled_s: float = 0.0  # seconds the anchor moved earlier to empty a standing buffer


class CfrPacer:
    """Irregular frame arrivals in, one frame per 1/fps of wall time out, with monotonic indices.

    Output starts ``start_delay_s`` after the first frame (a small jitter buffer), less what a longer first chunk
    already covers: given ``chunk_frames`` (a steady chunk's frames), a first push of more (the prepare chunk, 1 +
    4) starts the output the surplus earlier, never before the arrival, and the next chunk still waits as long.

    Each arriving chunk's first frame waits until its slot. When the shortest of those waits over
    ``standing_pushes`` pushes in a row is longer than ``start_delay_s`` (queueing left by a slow start, not
    jitter), the anchor moves earlier by the difference, in seconds (a whole-frame rule left up to a frame more
    standing); frames keep their indices (docs/latency.md).

    A missing frame repeats the previous one; a buffer above ``max_buffer_frames`` drops its oldest frames (latency
    stays bounded); if the caller falls more than ``max_catchup_s`` behind, the wall anchor moves instead of
    bursting. Each frame keeps the capture time it was pushed with (a repeat: the repeated frame's), so the
    playlist's ``EXT-X-PROGRAM-DATE-TIME`` is when the picture was captured, not when it left the decoder.
    """

    def __init__(
        self, fps: float, start_delay_s: float = 0.0, max_buffer_frames: int = 16, max_catchup_s: float = 1.0,
        standing_pushes: int = 4, chunk_frames: int | None = None,
    ) -> None:
        self.fps = fps
        self.start_delay_s = start_delay_s
        self.chunk_frames = chunk_frames
        self.max_buffer_frames = max_buffer_frames
        self.max_catchup_s = max_catchup_s
        self.stats = CfrStats()
        self.next_index = 0
        self._waits: collections.deque[float] = collections.deque(maxlen=max(1, standing_pushes))
        self._buffer: collections.deque[tuple[np.ndarray, float | None]] = collections.deque()
        self._last: tuple[np.ndarray, float | None] | None = None
        self._anchor: float | None = None

    @classmethod
    def from_settings(cls, fps: float, settings: EgressSettings, chunk_frames: int | None = None) -> CfrPacer:
        return cls(fps, start_delay_s=settings.cfr_start_delay_s, chunk_frames=chunk_frames)

    def push(self, frames: Iterable[np.ndarray], now: float, capture_times: Iterable[float] | None = None) -> None:
        """Buffer ``frames`` (arrived at ``now``), each with its capture time where known."""
        times = itertools.repeat(None) if capture_times is None else capture_times
        first = self.next_index + len(self._buffer)  # the slot of the first frame pushed now
        for frame, captured in zip(frames, times, strict=capture_times is not None):
            self._buffer.append((frame, captured))
        if self._anchor is not None:
            self._waits.append(self._anchor + first / self.fps - now)
            excess = min(self._waits) - self.start_delay_s
            if len(self._waits) == self._waits.maxlen and excess > 1e-6:
                self._anchor -= excess
                self.stats.pulled_s += excess
                self._waits = collections.deque((w - excess for w in self._waits), maxlen=self._waits.maxlen)
        while len(self._buffer) > self.max_buffer_frames:
            self._buffer.popleft()
            self.stats.dropped += 1
        if self._anchor is None and self._buffer:
            surplus = 0 if self.chunk_frames is None else max(0, len(self._buffer) - self.chunk_frames)
            self._anchor = now + max(0.0, self.start_delay_s - surplus / self.fps)

    def due_time(self, index: int) -> float | None:
        return None if self._anchor is None else self._anchor + index / self.fps

    def next_due(self) -> float | None:
        """Wall time of the next output frame (None before the first frame arrived)."""
        return self.due_time(self.next_index)

    @property
    def buffered(self) -> int:
        """Frames pushed but not yet output."""
        return len(self._buffer)

    def flush(self) -> list[PacedFrame]:
        """Every buffered frame at once, at the next indices (the stream is ending: nothing waits for its slot)."""
        out: list[PacedFrame] = []
        while self._buffer:
            self._last = self._buffer.popleft()
            due = self.due_time(self.next_index)
            out.append(self._paced(False, time.time() if due is None else due))
            self.stats.emitted += 1
            self.next_index += 1
        return out

    def pop_due(self, now: float) -> list[PacedFrame]:
        """Every output frame due by ``now``, in order."""
        out: list[PacedFrame] = []
        if self._anchor is None:
            return out
        behind = now - (self._anchor + self.next_index / self.fps)
        if behind > self.max_catchup_s:
            self._anchor += behind
            self.stats.catchups += 1
        while self._anchor + self.next_index / self.fps <= now:
            repeated = not self._buffer
            if not repeated:
                self._last = self._buffer.popleft()
            out.append(self._paced(repeated, self._anchor + self.next_index / self.fps))
            self.stats.emitted += 1
            self.stats.repeated += repeated
            self.next_index += 1
        return out

    def _paced(self, repeated: bool, due: float) -> PacedFrame:
        assert self._last is not None
        frame, captured = self._last
        return PacedFrame(self.next_index, frame, repeated, due, due if captured is None else captured)


@dataclass
class EncoderStats:
    frames: int = 0
    bytes: int = 0
    keyframes: int = 0
    keyframe_pts: list[int] = field(default_factory=list)


class H264Encoder:
    """libx264, zerolatency, no B-frames, an IDR exactly every ``gop_frames`` frames, Annex B output."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        gop_frames: int,
        preset: str = "veryfast",
        bitrate_kbps: int = 2500,
        threads: int = 1,
    ) -> None:
        self.gop_frames = gop_frames
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        rate = Fraction(fps).limit_denominator(1001)
        ctx.time_base = 1 / rate
        ctx.framerate = rate
        ctx.bit_rate = bitrate_kbps * 1000
        ctx.thread_count = threads
        ctx.flags |= av.codec.context.Flags.global_header
        vbv = f"vbv-maxrate={bitrate_kbps}:vbv-bufsize={bitrate_kbps}"
        params = f"keyint={gop_frames}:min-keyint={gop_frames}:scenecut=0:bframes=0:open-gop=0:{vbv}"
        ctx.options = {"preset": preset, "tune": "zerolatency", "forced-idr": "1", "x264-params": params}
        ctx.open()
        self._ctx = ctx
        self.config = VideoConfig(width, height, fps, bytes(ctx.extradata or b""))
        self.stats = EncoderStats()

    @classmethod
    def from_settings(cls, width: int, height: int, fps: float, settings: EgressSettings) -> H264Encoder:
        layout = PartLayout.from_settings(fps, settings)
        return cls(
            width, height, fps, layout.gop_frames, settings.x264_preset, settings.bitrate_kbps, settings.encoder_threads
        )

    def encode(
        self, frame: np.ndarray | av.VideoFrame, pts: int, capture_time: float | None = None
    ) -> list[VideoUnit]:
        vf = frame if isinstance(frame, av.VideoFrame) else av.VideoFrame.from_ndarray(frame, format="rgb24")
        if vf.format.name != "yuv420p" or (vf.width, vf.height) != (self.config.width, self.config.height):
            vf = vf.reformat(width=self.config.width, height=self.config.height, format="yuv420p")
        vf.pts = pts
        vf.time_base = self._ctx.time_base
        vf.pict_type = av.video.frame.PictureType.I if pts % self.gop_frames == 0 else av.video.frame.PictureType.NONE
        return self._wrap(self._ctx.encode(vf), capture_time)

    def flush(self) -> list[VideoUnit]:
        return self._wrap(self._ctx.encode(None), None)

    def _wrap(self, packets: list[av.Packet], capture_time: float | None) -> list[VideoUnit]:
        out = []
        for p in packets:
            unit = VideoUnit(pts=int(p.pts), keyframe=bool(p.is_keyframe), data=bytes(p), capture_time=capture_time)
            self.stats.frames += 1
            self.stats.bytes += len(unit.data)
            if unit.keyframe:
                self.stats.keyframes += 1
            out.append(unit)
        return out


async def run_cfr(
    pacer: CfrPacer, encoder: H264Encoder, sink: Callable[[VideoUnit], None], stop: asyncio.Event
) -> None:
    """Encode one frame per 1/fps of wall time until ``stop`` is set, then flush; ``sink`` gets every unit.

    The decoder process runs this next to whatever pushes decoded frames into ``pacer``; encoding runs in a
    worker thread so the event loop stays responsive.
    """
    while not stop.is_set():
        due = pacer.next_due()
        delay = 0.005 if due is None else due - time.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            continue
        for paced in pacer.pop_due(time.time()):
            units = await asyncio.to_thread(encoder.encode, paced.frame, paced.index, paced.capture_time)
            for unit in units:
                sink(unit)
    for unit in await asyncio.to_thread(encoder.flush):
        sink(unit)
