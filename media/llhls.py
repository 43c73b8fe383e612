"""Our LL-HLS packager: fMP4 parts written as their last frame is encoded, parts grouped into segments.

Each period's ``init.mp4`` (``ftyp+moov``) comes from PyAV's mp4 muxer in CMAF mode; each part is one ``moof+mdat``
that ``media.fmp4`` writes the moment the part's last access unit is pushed (``frames_per_part`` units, or fewer
before an IDR), every sample one frame long: a muxer would hold it until the next frame (media/fmp4.py). A segment
is closed when it holds ``parts_per_segment`` parts — never when the next IDR arrives, so the preload hint always
names a part that will exist. Two playlists come from the same state: the LL-HLS one (EXT-X-PART,
PRELOAD-HINT, CAN-BLOCK-RELOAD; served by ``egress.http``) and a plain rolling HLS one written to disk next to
the segment files. All methods must be called from the event loop thread that serves the playlists.

Continuity (docs/media.md "Continuity across restarts"): media sequence numbers never go back for a stream. Where
the media restarts (a new encoder session, timestamps going back or jumping, new parameter sets) the current
*period* ends, the next segment is tagged ``EXT-X-DISCONTINUITY`` with its own init segment (``init_<d>.mp4``, d
= its discontinuity sequence number), and output timestamps continue where the last period stopped. ``state()``
is what a successor needs to go on (``HlsState``, kept in JetStream KV by the egress service); ``resume`` takes
it back and lists again the window's segments still on disk.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import av

from media import aac, fmp4
from media.h264 import PartLayout, VideoConfig
from proto import HlsSegmentState, HlsState, VideoUnit

log = logging.getLogger(__name__)

PART_LIST_SEGMENTS = 3  # segments whose parts the LL playlist lists (spec: at least the last 3 target durations)
KEEP_EXTRA_SEGMENTS = 2  # segments kept past the playlist window for clients that just loaded an older playlist
JUMP_SEGMENTS = 2  # a keyframe whose pts jumps ahead by more than this many segments restarts the media
VIDEO_TRACK_ID = 1  # the init segment's video track (audio, when there is any, is aac.AUDIO_TRACK_ID)


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
    discontinuity: int = 0  # discontinuity sequence number of its period (which init segment it needs)
    parts: list[Part] = field(default_factory=list)
    complete: bool = False
    data: bytes = b""
    restored_duration: float | None = None  # listed again by a restarted egress: the whole segment, no parts

    @property
    def duration(self) -> float:
        if self.restored_duration is not None:
            return self.restored_duration
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
    restarts: int = 0  # media restarts (new periods, each a discontinuity once it has a segment)
    gaps_closed: int = 0  # units missing inside a period: the output timeline closed up behind them
    segments_restored: int = 0  # segments of a previous life listed again after a resume


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


def init_name(discontinuity: int) -> str:
    """File name of the init segment of the period with this discontinuity sequence number."""
    return f"init_{discontinuity}.mp4"


def _template_stream(config: VideoConfig, first: VideoUnit) -> av.container.InputContainer:
    """An H.264 input stream whose codec parameters the muxer copies (PyAV must not open an encoder)."""
    return av.open(io.BytesIO(config.extradata + first.data), format="h264")


class AudioSource(Protocol):
    """Where a stream's audio comes from (``egress.audio.AudioSync``): the packager asks it, per part, for the
    audio of the part's video capture span."""

    config: aac.AacConfig | None
    first_frame: bytes

    def take(self, start_capture: float, end_capture: float, start_time: float) -> tuple[int, list[bytes]] | None:
        ...


_MOVFLAGS = "cmaf+frag_keyframe+empty_moov+default_base_moof+skip_trailer+frag_discont"


class LlHlsStream:
    """Packager and playlist state for one stream id."""

    def __init__(
        self,
        stream_id: str,
        config: VideoConfig,
        layout: PartLayout,
        out_dir: Path | None = None,
        playlist_segments: int = 6,
        resume: HlsState | None = None,
    ) -> None:
        _check_layout(config, layout)
        self.stream_id, self.config, self.layout = stream_id, config, layout
        self.out_dir = out_dir
        self.playlist_segments = playlist_segments
        self.stats = PackagerStats()
        self.inits: dict[int, bytes] = {}  # discontinuity sequence number → init segment of that period
        self.segments: list[Segment] = []
        self.ended = False
        self.discontinuity = 0  # the current period's discontinuity sequence number
        self.on_segment: Callable[[LlHlsStream], None] | None = None  # called when a segment closes
        self.on_part: Callable[[list[VideoUnit]], None] | None = None  # a part is out: the units it carries
        self.audio: AudioSource | None = None  # muxed into every part from the next period with a known config
        self.on_audio: Callable[[float, aac.AacConfig, list[bytes]], None] | None = None  # (time s, config, frames)
        self._period_audio: aac.AacConfig | None = None  # the audio track of the open period's init segment
        self._first: VideoUnit | None = None  # the open period's first unit (the codec template); None: closed
        self._frame_ticks = 0  # one frame in the open period's video timescale
        self._pending: list[tuple[VideoUnit, bytes]] = []  # pushed (output pts) with its sample, not yet in a part
        self._last_in: int | None = None  # input pts of the last unit muxed in this period
        self._offset = 0  # output pts = input pts + offset (set when a period opens)
        self._next_pts = 0  # output pts after the last one written: where the next period starts
        self._first_msn = 0
        self._period_has_segment = False
        self._changed = asyncio.Event()
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self._resume(resume)
        if out_dir is not None:
            self._remove_stale_files()
            if self.segments:
                self._write_plain_playlist()

    @property
    def init(self) -> bytes | None:
        """The newest period's init segment (``init.mp4``; playlists name each period's ``init_<d>.mp4``)."""
        return self.inits[max(self.inits)] if self.inits else None

    # -- input ---------------------------------------------------------------------------------------------

    def push(self, unit: VideoUnit) -> VideoUnit | None:
        """Package one access unit; completes a part with its last frame, and segments. Returns the unit on the
        stream's output timeline (its pts continues across restarts), None when it was dropped (counted); raises
        ValueError, changing nothing, for data that is no Annex B access unit."""
        if self.ended:
            raise RuntimeError(f"stream {self.stream_id} has ended")
        sample = fmp4.avc_sample(unit.data)  # a unit that is no access unit is refused here, before any state moves
        if self._last_in is not None and unit.keyframe and (
                unit.pts <= self._last_in or unit.pts - self._last_in > JUMP_SEGMENTS * self.layout.gop_frames):
            self.restart()  # an IDR whose timestamps went back or jumped: a new encoder, a new period
        if self._last_in is not None and unit.pts <= self._last_in:
            self.stats.non_monotonic_dropped += 1
            return None
        if self._first is not None and unit.keyframe and self._audio_config() != self._period_audio:
            self.restart()  # audio appeared (or its config changed): the init segment needs the new track
        if self._first is None:
            if not unit.keyframe:
                self.stats.dropped_before_keyframe += 1
                return None
            self._open(unit)
        elif self._last_in is not None and unit.pts > self._last_in + 1:
            # units missing (lost on the way): the timeline closes up, since every sample already out is one frame
            # long; the PDTs and the audio follow the capture times
            self._offset -= unit.pts - self._last_in - 1
            self.stats.gaps_closed += 1
        self._last_in = unit.pts
        if self._offset:
            unit = unit.model_copy(update={"pts": unit.pts + self._offset})
        self._next_pts = unit.pts + 1
        self.stats.units += 1
        if unit.keyframe and self._pending:
            self._emit_part()  # a part never spans an IDR
        self._pending.append((unit, sample))
        if len(self._pending) >= self.layout.frames_per_part:
            self._emit_part()
        return unit

    def end(self) -> None:
        """Flush the last part, close the last segment and mark the playlists with EXT-X-ENDLIST."""
        if self.ended:
            return
        self._finish_period()
        self.ended = True
        self._write_plain_playlist()
        self._notify()

    def restart(self, config: VideoConfig | None = None, layout: PartLayout | None = None) -> None:
        """The media restarts at the next unit (a new encoder session, new parameter sets or size): the current
        period ends (its last part and segment are closed), the next segment opens a new one tagged
        EXT-X-DISCONTINUITY, and output timestamps continue after the last ones written."""
        self._finish_period()
        old_fps = self.layout.fps
        if config is not None or layout is not None:
            config, layout = config or self.config, layout or self.layout
            _check_layout(config, layout)
            self.config, self.layout = config, layout
            self._next_pts = math.ceil(self._next_pts * layout.fps / old_fps - 1e-9)
        if self._period_has_segment:  # a period that published nothing needs no discontinuity of its own
            self.discontinuity += 1
            self._period_has_segment = False
        self._last_in = None
        self.stats.restarts += 1
        self._notify()

    def _finish_period(self) -> None:
        """End the open period: its last (short) part and the open segment are published as they are."""
        if self._pending:
            self._emit_part()
        if self.segments and not self.segments[-1].complete and self.segments[-1].parts:
            self._close_segment(self.segments[-1])
        self._first = None

    def _audio_config(self) -> aac.AacConfig | None:
        return self.audio.config if self.audio is not None and self.audio.first_frame else None

    def _open(self, first: VideoUnit) -> None:
        """A new period from this IDR on: its init segment, and where its timestamps start."""
        self._offset = self._next_pts - first.pts
        self._period_audio = self._audio_config()
        self._first = first
        init = self._init_segment(first, self._period_audio)
        ticks = fmp4.timescale(init, VIDEO_TRACK_ID) * self.config.time_base
        if ticks.denominator != 1:
            raise ValueError(f"a frame is not a whole number of ticks of the muxer's timescale ({ticks})")
        self._frame_ticks = int(ticks)
        self.inits[self.discontinuity] = init
        self._write_file(init_name(self.discontinuity), init)
        self._write_file("init.mp4", init)

    def _init_segment(self, first: VideoUnit, audio: aac.AacConfig | None) -> bytes:
        """ftyp+moov from PyAV's mp4 muxer: the video (track 1) and, with ``audio``, the AAC track (2)."""
        sink = _BoxSink()
        out = av.open(sink, "w", format="mp4", options={"movflags": _MOVFLAGS})
        with _template_stream(self.config, first) as template:
            video = out.add_stream_from_template(template.streams.video[0])
        video.time_base = self.config.time_base
        if audio is not None:
            assert self.audio is not None
            with aac.template(audio, self.audio.first_frame) as template:
                track = out.add_stream_from_template(template.streams.audio[0])
            track.codec_context.extradata = audio.asc
        out.start_encoding()
        out.close()
        return b"".join(box for kind, box in sink.boxes if kind in (b"ftyp", b"moov"))

    def _audio_part(self, units: list[VideoUnit], next_capture: float | None) -> bytes:
        """The audio fragment that goes with a part's video (none without a capture clock or audio)."""
        config, start = self._period_audio, units[0].capture_time
        if config is None or self.audio is None or start is None or next_capture is None:
            return b""
        taken = self.audio.take(start, next_capture, float(units[0].pts * self.config.time_base))
        if taken is None:
            return b""
        decode_time, frames = taken
        if self.on_audio is not None:
            self.on_audio(decode_time / config.sample_rate, config, frames)
        return aac.fragment(self.stats.parts + 1, decode_time, frames)

    def _emit_part(self) -> None:
        """The pending units as one part, now: each sample is one frame long, so nothing waits for the next."""
        pending, self._pending = self._pending, []
        units = [u for u, _ in pending]
        samples = [fmp4.Sample(data, self._frame_ticks, fmp4.KEY_FLAGS if u.keyframe else fmp4.NON_KEY_FLAGS)
                   for u, data in pending]
        data = fmp4.fragment(self.stats.parts + 1, VIDEO_TRACK_ID, units[0].pts * self._frame_ticks, samples)
        last = units[-1].capture_time
        data += self._audio_part(units, last + 1 / self.layout.fps if last is not None else None)
        duration = len(units) / self.layout.fps
        seg = self.segments[-1] if self.segments and not self.segments[-1].complete else None
        if seg is None:
            msn = self.segments[-1].msn + 1 if self.segments else self._first_msn
            pdt = units[0].capture_time or time.time()
            seg = Segment(msn, units[0].pts, pdt, self.discontinuity)
            self.segments.append(seg)
            self._period_has_segment = True
            if not units[0].keyframe:
                self.stats.misaligned_segments += 1
                log.warning("stream %s: segment %d does not start with an IDR", self.stream_id, msn)
        seg.parts.append(Part(data, duration, units[0].keyframe))
        self.stats.parts += 1
        if self.on_part is not None:
            self.on_part(units)
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
        if self.on_segment is not None:
            self.on_segment(self)

    def _trim(self) -> None:
        complete = [s for s in self.segments if s.complete]
        excess = len(complete) - self.playlist_segments - KEEP_EXTRA_SEGMENTS
        for seg in complete[: max(0, excess)]:
            self.segments.remove(seg)
            if self.out_dir is not None:
                (self.out_dir / seg.name).unlink(missing_ok=True)
        used = {s.discontinuity for s in self.segments} | {self.discontinuity}
        for d in [d for d in self.inits if d not in used]:  # periods whose last segment is gone
            del self.inits[d]
            if self.out_dir is not None:
                (self.out_dir / init_name(d)).unlink(missing_ok=True)

    # -- continuity ----------------------------------------------------------------------------------------

    def state(self) -> HlsState:
        """What a successor needs to continue this playlist (written once per closed segment)."""
        complete = [s for s in self.segments if s.complete]
        window = complete[-(self.playlist_segments + KEEP_EXTRA_SEGMENTS):][-64:]
        return HlsState(
            stream_id=self.stream_id,
            next_msn=complete[-1].msn + 1 if complete else self._first_msn,
            discontinuity=self.discontinuity,
            next_pts=self._next_pts,
            fps=float(self.layout.fps),
            segments=[HlsSegmentState(msn=s.msn, discontinuity=s.discontinuity, duration=s.duration,
                                      program_date_time=s.program_date_time) for s in window],
        )

    def _resume(self, state: HlsState) -> None:
        """Continue a playlist published before (by a previous egress, or this stream before its end): numbering
        and timestamps go on, the media restarts (a new period), and the window's segments whose files are still
        in ``out_dir`` are listed again so a viewer mid-playlist can still fetch them."""
        self._first_msn = state.next_msn
        self._next_pts = math.ceil(state.next_pts * self.layout.fps / state.fps - 1e-9)
        self.discontinuity = state.discontinuity + (1 if state.next_msn > 0 else 0)
        self.stats.restarts += 1
        if self.out_dir is None:
            return
        restored: list[Segment] = []
        for info in reversed(state.segments):  # the newest contiguous run whose files exist
            if info.msn != (restored[0].msn if restored else state.next_msn) - 1 or info.discontinuity > \
                    (restored[0].discontinuity if restored else state.discontinuity):
                break
            seg_path, init_path = self.out_dir / f"seg_{info.msn}.m4s", self.out_dir / init_name(info.discontinuity)
            if not (seg_path.is_file() and init_path.is_file()):
                break
            if info.discontinuity not in self.inits:
                self.inits[info.discontinuity] = init_path.read_bytes()
            restored.insert(0, Segment(info.msn, 0, info.program_date_time, info.discontinuity, complete=True,
                                       data=seg_path.read_bytes(), restored_duration=info.duration))
        self.segments = restored
        self.stats.segments_restored = len(restored)

    def _remove_stale_files(self) -> None:
        """Delete files of an earlier life of this directory that no listed segment needs."""
        assert self.out_dir is not None
        keep = {s.name for s in self.segments} | {init_name(d) for d in self.inits}
        for path in self.out_dir.iterdir():
            if path.is_file() and path.name.endswith((".m4s", ".mp4", ".tmp")) and path.name not in keep:
                path.unlink(missing_ok=True)

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
            return self._first_msn, 0
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

    def _header(self, version: int, window: list[Segment]) -> list[str]:
        first_msn, first_disc = (window[0].msn, window[0].discontinuity) if window else (
            self.next_part[0], self.discontinuity)
        lines = [
            "#EXTM3U",
            f"#EXT-X-VERSION:{version}",
            f"#EXT-X-TARGETDURATION:{self.target_duration}",
            f"#EXT-X-MEDIA-SEQUENCE:{first_msn}",
        ]
        if first_disc:  # RFC 8216: discontinuities that slid out of the window (absent = 0)
            lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{first_disc}")
        lines.append("#EXT-X-INDEPENDENT-SEGMENTS")
        if not window:
            lines.append(f'#EXT-X-MAP:URI="{init_name(self.discontinuity)}"')
        return lines

    @staticmethod
    def _period_lines(seg: Segment, prev: Segment | None) -> list[str]:
        """EXT-X-DISCONTINUITY where a new period starts, and the period's init segment (EXT-X-MAP)."""
        if prev is not None and prev.discontinuity == seg.discontinuity:
            return []
        tag = [] if prev is None else ["#EXT-X-DISCONTINUITY"]
        return [*tag, f'#EXT-X-MAP:URI="{init_name(seg.discontinuity)}"']

    def ll_playlist(self) -> str:
        window = self._window()
        part_target = self.layout.part_seconds
        lines = self._header(9, window)
        lines.insert(
            3,
            f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={3 * part_target:.5f}",
        )
        lines.insert(4, f"#EXT-X-PART-INF:PART-TARGET={part_target:.5f}")
        list_parts_from = window[-1].msn - PART_LIST_SEGMENTS + 1 if window else 0
        for prev, seg in zip([None, *window], window, strict=False):
            lines += self._period_lines(seg, prev)
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
        lines = self._header(7, window)
        for prev, seg in zip([None, *window], window, strict=False):
            lines += self._period_lines(seg, prev)
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


def _check_layout(config: VideoConfig, layout: PartLayout) -> None:
    if abs(layout.fps - config.fps) > 1e-6:
        raise ValueError(f"layout fps {layout.fps} != stream fps {config.fps}")


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HlsRegistry:
    """Stream id → ``LlHlsStream``; playback paths stay ``<prefix>/<stream id>/...`` for the stream's life."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.streams: dict[str, LlHlsStream] = {}

    def open(self, stream_id: str, config: VideoConfig, layout: PartLayout, playlist_segments: int = 6,
             resume: HlsState | None = None) -> LlHlsStream:
        """A new packager for the stream; with ``resume`` it continues the playlist that state describes."""
        old = self.streams.get(stream_id)
        if old is not None and not old.ended:
            old.end()
        out_dir = None
        if self.root is not None:
            out_dir = self.root / stream_id
            if old is not None and resume is None and out_dir.exists():
                shutil.rmtree(out_dir)
        stream = LlHlsStream(stream_id, config, layout, out_dir, playlist_segments, resume)
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
