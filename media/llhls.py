"""Our LL-HLS packager: PyAV's mp4 muxer in CMAF mode cut into parts, parts grouped into segments.

Encoded access units go into one fragmented-mp4 muxer per stream whose output is a Python sink: ``ftyp+moov``
becomes ``init.mp4`` and every ``moof+mdat`` (one per ``frag_duration``) becomes an LL-HLS part. A segment is
closed when it holds ``parts_per_segment`` parts — never when the next IDR arrives, so the preload hint always
names a part that will exist. Two playlists come from the same state: the LL-HLS one (EXT-X-PART,
PRELOAD-HINT, CAN-BLOCK-RELOAD; served by ``egress.http``) and a plain rolling HLS one written to disk next to
the segment files. All methods must be called from the event loop thread that serves the playlists.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av

from media.h264 import PartLayout, VideoConfig
from proto import VideoUnit

log = logging.getLogger(__name__)

PART_LIST_SEGMENTS = 3  # segments whose parts the LL playlist lists (spec: at least the last 3 target durations)
KEEP_EXTRA_SEGMENTS = 2  # segments kept past the playlist window for clients that just loaded an older playlist


@dataclass
class Part:
    data: bytes
    duration: float
    independent: bool


@dataclass
class Segment:
    msn: int
    start_pts: int
    program_date_time: float
    parts: list[Part] = field(default_factory=list)
    complete: bool = False
    data: bytes = b""

    @property
    def duration(self) -> float:
        return sum(p.duration for p in self.parts)

    @property
    def name(self) -> str:
        return f"seg_{self.msn}.m4s"


@dataclass
class PackagerStats:
    units: int = 0
    parts: int = 0
    segments: int = 0
    non_monotonic_dropped: int = 0
    dropped_before_keyframe: int = 0
    misaligned_segments: int = 0


class _BoxSink(io.RawIOBase):
    """Receives the muxer's bytes and hands back complete top-level MP4 boxes."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.boxes: list[tuple[bytes, bytes]] = []

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self._buf += b
        while len(self._buf) >= 8:
            size = int.from_bytes(self._buf[:4], "big")
            if size == 1 and len(self._buf) >= 16:
                size = int.from_bytes(self._buf[8:16], "big")
            if size < 8 or len(self._buf) < size:
                break
            self.boxes.append((bytes(self._buf[4:8]), bytes(self._buf[:size])))
            del self._buf[:size]
        return len(b)


def _template_stream(config: VideoConfig, first: VideoUnit) -> av.container.InputContainer:
    """An H.264 input stream whose codec parameters the muxer copies (PyAV must not open an encoder)."""
    return av.open(io.BytesIO(config.extradata + first.data), format="h264")


class LlHlsStream:
    """Packager and playlist state for one stream id."""

    def __init__(
        self,
        stream_id: str,
        config: VideoConfig,
        layout: PartLayout,
        out_dir: Path | None = None,
        playlist_segments: int = 6,
    ) -> None:
        if abs(layout.fps - config.fps) > 1e-6:
            raise ValueError(f"layout fps {layout.fps} != stream fps {config.fps}")
        self.stream_id, self.config, self.layout = stream_id, config, layout
        self.out_dir = out_dir
        self.playlist_segments = playlist_segments
        self.stats = PackagerStats()
        self.init: bytes | None = None
        self.segments: list[Segment] = []
        self.ended = False
        self._sink = _BoxSink()
        self._out: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._pending: list[VideoUnit] = []  # muxed, not yet in a part
        self._moof: bytes | None = None
        self._last_pts: int | None = None
        self._changed = asyncio.Event()
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    # -- input ---------------------------------------------------------------------------------------------

    def push(self, unit: VideoUnit) -> None:
        """Mux one access unit; completes parts and segments as the muxer emits fragments."""
        if self.ended:
            raise RuntimeError(f"stream {self.stream_id} has ended")
        if self._last_pts is not None and unit.pts <= self._last_pts:
            self.stats.non_monotonic_dropped += 1
            return
        if self._out is None:
            if not unit.keyframe:
                self.stats.dropped_before_keyframe += 1
                return
            self._open(unit)
        assert self._out is not None and self._stream is not None
        self._last_pts = unit.pts
        self.stats.units += 1
        packet = av.Packet(unit.data)
        packet.pts = packet.dts = unit.pts
        packet.time_base = self.config.time_base
        packet.is_keyframe = unit.keyframe
        packet.stream = self._stream
        self._out.mux(packet)
        self._collect(next_pts=unit.pts)
        self._pending.append(unit)

    def end(self) -> None:
        """Flush the last part, close the last segment and mark the playlists with EXT-X-ENDLIST."""
        if self.ended:
            return
        if self._out is not None:
            self._out.close()
            last = self._pending[-1].pts + 1 if self._pending else None
            self._collect(next_pts=last)
        if self.segments and not self.segments[-1].complete and self.segments[-1].parts:
            self._close_segment(self.segments[-1])
        self.ended = True
        self._write_plain_playlist()
        self._notify()

    def _open(self, first: VideoUnit) -> None:
        part_us = int((self.layout.frames_per_part - 0.5) / self.layout.fps * 1e6)
        self._out = av.open(
            self._sink,
            "w",
            format="mp4",
            options={
                "movflags": "cmaf+frag_keyframe+empty_moov+default_base_moof+skip_trailer",
                "frag_duration": str(part_us),
            },
        )
        with _template_stream(self.config, first) as template:
            self._stream = self._out.add_stream_from_template(template.streams.video[0])
        self._stream.time_base = self.config.time_base

    def _collect(self, next_pts: int | None) -> None:
        """Turn boxes the muxer has written into init/parts; ``next_pts`` is the first pts not in them."""
        boxes, self._sink.boxes = self._sink.boxes, []
        header: list[bytes] = []
        for kind, box in boxes:
            if kind in (b"ftyp", b"moov"):
                header.append(box)
                if kind == b"moov":
                    self.init = b"".join(header)
                    self._write_file("init.mp4", self.init)
            elif kind == b"moof":
                self._moof = box
            elif kind == b"mdat" and self._moof is not None:
                self._add_part(self._moof + box, next_pts)
                self._moof = None

    def _add_part(self, data: bytes, next_pts: int | None) -> None:
        units, self._pending = self._pending, []
        if not units:
            return
        end_pts = next_pts if next_pts is not None else units[-1].pts + 1
        duration = (end_pts - units[0].pts) / self.layout.fps
        seg = self.segments[-1] if self.segments and not self.segments[-1].complete else None
        if seg is None:
            msn = self.segments[-1].msn + 1 if self.segments else 0
            pdt = units[0].capture_time or time.time()
            seg = Segment(msn, units[0].pts, pdt)
            self.segments.append(seg)
            if not units[0].keyframe:
                self.stats.misaligned_segments += 1
                log.warning("stream %s: segment %d does not start with an IDR", self.stream_id, msn)
        seg.parts.append(Part(data, duration, units[0].keyframe))
        self.stats.parts += 1
        if len(seg.parts) >= self.layout.parts_per_segment:
            self._close_segment(seg)
        self._notify()

    def _close_segment(self, seg: Segment) -> None:
        seg.complete = True
        seg.data = b"".join(p.data for p in seg.parts)
        self.stats.segments += 1
        self._write_file(seg.name, seg.data)
        self._trim()
        self._write_plain_playlist()

    def _trim(self) -> None:
        complete = [s for s in self.segments if s.complete]
        excess = len(complete) - self.playlist_segments - KEEP_EXTRA_SEGMENTS
        for seg in complete[: max(0, excess)]:
            self.segments.remove(seg)
            if self.out_dir is not None:
                (self.out_dir / seg.name).unlink(missing_ok=True)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- lookup --------------------------------------------------------------------------------------------

    def segment(self, msn: int) -> Segment | None:
        for seg in self.segments:
            if seg.msn == msn:
                return seg
        return None

    def part(self, msn: int, index: int) -> Part | None:
        seg = self.segment(msn)
        if seg is None or index >= len(seg.parts):
            return None
        return seg.parts[index]

    def has(self, msn: int, part: int | None) -> bool:
        """Whether segment ``msn`` (or its part ``part``) is complete, or can no longer appear."""
        if self.ended:
            return True
        last = self.segments[-1] if self.segments else None
        if last is None:
            return False
        if msn < last.msn:
            return True
        if msn > last.msn:
            return False
        return last.complete if part is None else len(last.parts) > part

    async def wait_for(self, msn: int, part: int | None, timeout: float) -> bool:
        """Block until ``has(msn, part)``; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.has(msn, part):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return False
        return True

    @property
    def next_part(self) -> tuple[int, int]:
        """(msn, part index) of the next part to appear: the preload hint."""
        if not self.segments:
            return 0, 0
        last = self.segments[-1]
        return (last.msn + 1, 0) if last.complete else (last.msn, len(last.parts))

    # -- playlists -----------------------------------------------------------------------------------------

    @property
    def target_duration(self) -> int:
        return max(1, math.ceil(self.layout.segment_seconds - 1e-9))

    def _window(self) -> list[Segment]:
        complete = [s for s in self.segments if s.complete]
        window = complete[-self.playlist_segments :]
        open_seg = [s for s in self.segments if not s.complete and s.parts]
        return window + open_seg

    def _header(self, version: int, first_msn: int) -> list[str]:
        return [
            "#EXTM3U",
            f"#EXT-X-VERSION:{version}",
            f"#EXT-X-TARGETDURATION:{self.target_duration}",
            f"#EXT-X-MEDIA-SEQUENCE:{first_msn}",
            "#EXT-X-INDEPENDENT-SEGMENTS",
            '#EXT-X-MAP:URI="init.mp4"',
        ]

    def ll_playlist(self) -> str:
        window = self._window()
        part_target = self.layout.part_seconds
        lines = self._header(9, window[0].msn if window else 0)
        lines.insert(
            3,
            f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={3 * part_target:.5f}",
        )
        lines.insert(4, f"#EXT-X-PART-INF:PART-TARGET={part_target:.5f}")
        list_parts_from = window[-1].msn - PART_LIST_SEGMENTS + 1 if window else 0
        for seg in window:
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_iso(seg.program_date_time)}")
            if seg.msn >= list_parts_from:
                for i, p in enumerate(seg.parts):
                    ind = ",INDEPENDENT=YES" if p.independent else ""
                    lines.append(f'#EXT-X-PART:DURATION={p.duration:.5f},URI="part_{seg.msn}_{i}.m4s"{ind}')
            if seg.complete:
                lines.append(f"#EXTINF:{seg.duration:.5f},")
                lines.append(seg.name)
        if self.ended:
            lines.append("#EXT-X-ENDLIST")
        else:
            msn, idx = self.next_part
            lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part_{msn}_{idx}.m4s"')
        return "\n".join(lines) + "\n"

    def plain_playlist(self) -> str:
        window = [s for s in self._window() if s.complete]
        lines = self._header(7, window[0].msn if window else 0)
        for seg in window:
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_iso(seg.program_date_time)}")
            lines.append(f"#EXTINF:{seg.duration:.5f},")
            lines.append(seg.name)
        if self.ended:
            lines.append("#EXT-X-ENDLIST")
        return "\n".join(lines) + "\n"

    def _write_plain_playlist(self) -> None:
        self._write_file("playlist.m3u8", self.plain_playlist().encode())

    def _write_file(self, name: str, data: bytes) -> None:
        if self.out_dir is None:
            return
        tmp = self.out_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.out_dir / name)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HlsRegistry:
    """Stream id → ``LlHlsStream``; playback paths stay ``<prefix>/<stream id>/...`` for the stream's life."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.streams: dict[str, LlHlsStream] = {}

    def open(self, stream_id: str, config: VideoConfig, layout: PartLayout, playlist_segments: int = 6) -> LlHlsStream:
        old = self.streams.get(stream_id)
        if old is not None and not old.ended:
            old.end()
        out_dir = None
        if self.root is not None:
            out_dir = self.root / stream_id
            if old is not None and out_dir.exists():
                shutil.rmtree(out_dir)
        stream = LlHlsStream(stream_id, config, layout, out_dir, playlist_segments)
        self.streams[stream_id] = stream
        return stream

    def get(self, stream_id: str) -> LlHlsStream | None:
        return self.streams.get(stream_id)

    def remove(self, stream_id: str) -> None:
        """Forget an ended stream and delete its files."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None and stream.out_dir is not None:
            shutil.rmtree(stream.out_dir, ignore_errors=True)

    def __iter__(self) -> Iterator[LlHlsStream]:
        return iter(list(self.streams.values()))
