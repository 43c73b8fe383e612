"""FLV video tags (legacy AVC and Enhanced-RTMP ex-headers) → H.264 packets → PyAV frames."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction

import av

log = logging.getLogger(__name__)

_LEGACY_CODECS = {
    2: "Sorenson H.263",
    3: "Screen Video",
    4: "On2 VP6",
    5: "On2 VP6 with alpha",
    6: "Screen Video v2",
    7: "avc1",
    12: "HEVC (legacy FLV extension)",
    13: "AV1 (legacy FLV extension)",
}
_COMMAND_FRAME = 5
_MS = Fraction(1, 1000)


class UnsupportedVideo(Exception):
    """The publisher sends video we will not decode (codec, resolution); the reason goes back to the client."""


class TagKind(Enum):
    CONFIG = "config"
    FRAME = "frame"
    END = "end"
    IGNORED = "ignored"


@dataclass(frozen=True)
class VideoTag:
    kind: TagKind
    keyframe: bool = False
    composition_ms: int = 0
    data: bytes = b""


def _si24(b: bytes) -> int:
    v = int.from_bytes(b, "big")
    return v - (1 << 24) if v & 0x800000 else v


def parse_video_tag(payload: bytes) -> VideoTag:
    """Split an RTMP video message body; anything but H.264 raises ``UnsupportedVideo``."""
    if not payload:
        return VideoTag(TagKind.IGNORED)
    b0 = payload[0]
    if b0 & 0x80:  # Enhanced RTMP: [1 isEx | 3 frameType | 4 packetType] FourCC ...
        frame_type, packet_type = (b0 >> 4) & 0x07, b0 & 0x0F
        if len(payload) < 5:
            raise UnsupportedVideo("truncated Enhanced-RTMP video header")
        fourcc = payload[1:5].decode("latin-1")
        if frame_type == _COMMAND_FRAME:
            return VideoTag(TagKind.IGNORED)
        if fourcc != "avc1":
            raise UnsupportedVideo(f"unsupported video codec {fourcc!r} (Enhanced RTMP); only H.264/AVC is accepted")
        body = payload[5:]
        if packet_type == 0:
            return VideoTag(TagKind.CONFIG, data=body)
        if packet_type == 1:
            if len(body) < 3:
                raise UnsupportedVideo("truncated Enhanced-RTMP coded frame")
            return VideoTag(TagKind.FRAME, frame_type == 1, _si24(body[:3]), body[3:])
        if packet_type == 3:
            return VideoTag(TagKind.FRAME, frame_type == 1, 0, body)
        if packet_type == 2:
            return VideoTag(TagKind.END)
        return VideoTag(TagKind.IGNORED)
    frame_type, codec_id = b0 >> 4, b0 & 0x0F
    if frame_type == _COMMAND_FRAME:
        return VideoTag(TagKind.IGNORED)
    if codec_id != 7:
        name = _LEGACY_CODECS.get(codec_id, f"FLV codec id {codec_id}")
        raise UnsupportedVideo(f"unsupported video codec {name!r}; only H.264/AVC is accepted")
    if len(payload) < 5:
        raise UnsupportedVideo("truncated AVC video tag")
    packet_type = payload[1]
    if packet_type == 0:
        return VideoTag(TagKind.CONFIG, data=payload[5:])
    if packet_type == 1:
        return VideoTag(TagKind.FRAME, frame_type == 1, _si24(payload[2:5]), payload[5:])
    if packet_type == 2:
        return VideoTag(TagKind.END)
    return VideoTag(TagKind.IGNORED)


def metadata_codec_problem(metadata: dict) -> str | None:
    """A refusal reason when onMetaData names a video codec other than H.264, else None."""
    codec = metadata.get("videocodecid")
    if codec is None or codec in (7, 7.0, "avc1"):
        return None
    if isinstance(codec, float | int) and int(codec) in _LEGACY_CODECS:
        codec = _LEGACY_CODECS[int(codec)]
    elif isinstance(codec, float | int):
        # E-RTMP puts the FourCC as a number: 'hvc1' = 0x68766331.
        raw = int(codec).to_bytes(4, "big", signed=False) if 0 <= codec < 2**32 else b"????"
        codec = raw.decode("latin-1")
    return f"unsupported video codec {codec!r}; only H.264/AVC is accepted"


class AvcDecoder:
    """H.264 decoder fed with AVCC packets; ``max_pixels`` stops oversized pictures before allocation."""

    def __init__(self, max_width: int, max_height: int) -> None:
        self.max_width, self.max_height = max_width, max_height
        self._ctx: av.CodecContext | None = None
        self._extradata: bytes | None = None
        self.errors = 0

    def configure(self, record: bytes) -> None:
        if not record or record[0] != 1:
            raise UnsupportedVideo("malformed AVC sequence header (AVCDecoderConfigurationRecord)")
        if record == self._extradata:
            return
        ctx = av.CodecContext.create("h264", "r")
        ctx.extradata = record
        ctx.thread_count = 1
        ctx.options = {"max_pixels": str(self.max_width * self.max_height)}
        self._ctx, self._extradata = ctx, record

    def decode(self, tag: VideoTag, dts_ms: int) -> list[av.VideoFrame]:
        if self._ctx is None:
            raise UnsupportedVideo("coded video before the AVC sequence header")
        pkt = av.Packet(tag.data)
        pkt.dts = dts_ms
        pkt.pts = dts_ms + tag.composition_ms
        pkt.time_base = _MS
        pkt.is_keyframe = tag.keyframe
        try:
            frames = self._ctx.decode(pkt)
        except av.error.FFmpegError as exc:
            self.errors += 1
            if self._ctx.width * self._ctx.height > self.max_width * self.max_height:
                raise self._too_big(self._ctx.width, self._ctx.height) from exc
            log.debug("h264 decode error: %s", exc)
            return []
        return self._checked(frames)

    def flush(self) -> list[av.VideoFrame]:
        """Frames still held by the decoder (reordering delay) at the end of a session."""
        if self._ctx is None:
            return []
        try:
            return self._checked(self._ctx.decode(None))
        except av.error.FFmpegError:
            return []

    def _checked(self, frames: list[av.VideoFrame]) -> list[av.VideoFrame]:
        for frame in frames:
            if frame.width > self.max_width or frame.height > self.max_height:
                raise self._too_big(frame.width, frame.height)
            frame.time_base = _MS  # flushed frames come back without one
        return frames

    def _too_big(self, w: int, h: int) -> UnsupportedVideo:
        return UnsupportedVideo(f"video {w}x{h} exceeds the {self.max_width}x{self.max_height} cap")
