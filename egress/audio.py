"""The audio sync buffer: a stream's AAC held until the styled video of the same capture time is muxed.

The video of capture time t leaves the pipeline a latency later, the audio (not styled) much sooner. Both carry
capture times on ingest's clock, so each LL-HLS part takes the audio whose capture times fall in its video's
capture span, placed at the part's output time plus the capture-time difference (docs/media.md "Audio"). Audio
stays continuous (no gaps, no overlaps) while that placement is within ``tolerance_s``; beyond it the track jumps
(a resync) or drops the overlapping frames. Every frame not muxed is counted with its reason:
``rheo_egress_audio_units_total{result}``.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field

from prometheus_client import Counter

from media.aac import SAMPLES_PER_FRAME, AacConfig
from proto import AudioUnit, EncodedAudio

log = logging.getLogger(__name__)

AUDIO_RESULTS = ("muxed", "late", "before_video", "overflow", "overlap", "bad_config", "unplayed", "lost")
UNITS = Counter("rheo_egress_audio_units_total", "publisher AAC frames at egress, by outcome", ["result"])
RESYNCS = Counter("rheo_egress_audio_resyncs_total", "audio track jumps to follow the video")


@dataclass
class AudioSyncStats:
    units: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AUDIO_RESULTS, 0))
    messages: int = 0
    resyncs: int = 0


class AudioSync:
    """One stream's audio between the bus and the packager (``LlHlsStream.audio``)."""

    def __init__(self, stream_id: str, max_units: int = 4096, tolerance_s: float = 0.05) -> None:
        self.stream_id = stream_id
        self.config: AacConfig | None = None
        self.first_frame = b""  # any one access unit: the muxer's codec template needs one
        self.stats = AudioSyncStats()
        self.max_units = max_units
        self.tolerance_s = tolerance_s
        self._units: collections.deque[AudioUnit] = collections.deque()
        self._placed_until: float | None = None  # capture times below this were muxed or passed over
        self._next_sample: int | None = None  # where the last fragment ended (samples)
        self._next_seq = 0

    def _count(self, result: str, n: int = 1) -> None:
        if n:
            self.stats.units[result] += n
            UNITS.labels(result=result).inc(n)

    def add(self, msg: EncodedAudio) -> None:
        """A batch from ingest; audio for video already muxed is dropped (late), the buffer is bounded."""
        if self.config is None or msg.config != self.config.asc:
            try:
                self.config = AacConfig.parse(msg.config)
            except ValueError as e:
                self._count("bad_config", len(msg.units))
                log.warning("stream %s: audio batch %d refused: %s", self.stream_id, msg.seq, e)
                return
        if msg.seq > self._next_seq:
            self._count("lost", msg.seq - self._next_seq)  # messages (not frames): the bus lost them
        self._next_seq = msg.seq + 1
        self.stats.messages += 1
        for unit in msg.units:
            if self._placed_until is not None and unit.capture_time < self._placed_until:
                self._count("late")
                continue
            if not self.first_frame:
                self.first_frame = unit.data
            if self._units and unit.capture_time < self._units[-1].capture_time:
                self._units = collections.deque(sorted([*self._units, unit], key=lambda u: u.capture_time))
            else:
                self._units.append(unit)
        while len(self._units) > self.max_units:
            self._units.popleft()
            self._count("overflow")

    def take(self, start_capture: float, end_capture: float, start_time: float) -> tuple[int, list[bytes]] | None:
        """The audio of a part whose video spans capture times [start_capture, end_capture) and starts at output
        time ``start_time`` (s): (decode time in samples, AAC frames), None when there is none."""
        if self.config is None:
            return None
        rate = self.config.sample_rate
        frames: list[bytes] = []
        first: float | None = None
        while self._units and self._units[0].capture_time < end_capture:
            unit = self._units.popleft()
            if unit.capture_time < start_capture:
                self._count("before_video" if self._placed_until is None else "late")
                continue
            first = unit.capture_time if first is None else first
            frames.append(unit.data)
        self._placed_until = end_capture if self._placed_until is None else max(self._placed_until, end_capture)
        if first is None:
            return None
        ideal = round((start_time + first - start_capture) * rate)
        tolerance = self.tolerance_s * rate
        if self._next_sample is not None and ideal < self._next_sample - tolerance:
            drop = min(len(frames), math.ceil((self._next_sample - ideal) / SAMPLES_PER_FRAME))
            frames, ideal = frames[drop:], ideal + drop * SAMPLES_PER_FRAME
            self._count("overlap", drop)
            if not frames:
                return None
        start = ideal
        if self._next_sample is not None:
            if abs(ideal - self._next_sample) <= tolerance:
                start = self._next_sample
            else:
                self.stats.resyncs += 1
                RESYNCS.inc()
        self._next_sample = start + len(frames) * SAMPLES_PER_FRAME
        self._count("muxed", len(frames))
        return start, frames

    def close(self) -> None:
        """The stream ended: what is still buffered will never play."""
        self._count("unplayed", len(self._units))
        self._units.clear()
