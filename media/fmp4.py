"""Fragmented-MP4 media fragments (``moof+mdat``) written directly: the LL-HLS parts, video and audio.

Why not the muxer: libavformat's fragmenter learns a sample's duration from the next packet, so it closes a part
only when the frame after it is muxed, one frame time after the part's last frame exists (62 ms at 16 fps, 125 ms
at 8). The packager knows every duration in advance (constant frame rate; AAC frames of 1024 samples), so it writes
each fragment the moment its last sample is encoded. PyAV's mp4 muxer still writes the init segment
(``ftyp+moov``: the sample entries with the codec configuration); ``timescale`` reads a track's clock back from it.

Boxes (ISO/IEC 14496-12): ``moof`` = ``mfhd`` (sequence number) + ``traf`` = ``tfhd`` (track, default-base-is-moof)
+ ``tfdt`` (base media decode time, version 1) + ``trun`` (data offset, per sample: duration, size, and for video
the sync flags); then one ``mdat`` with the samples. H.264 samples are length-prefixed NAL units (``avc1``), which
``avc_sample`` makes of the encoder's Annex B.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from media.h264 import nal_units

__all__ = ["KEY_FLAGS", "NON_KEY_FLAGS", "Sample", "avc_sample", "box", "fragment", "full_box", "timescale"]

KEY_FLAGS = 0x02000000  # sample_depends_on = 2: a sync sample (IDR)
NON_KEY_FLAGS = 0x01010000  # depends on others, is_non_sync_sample


@dataclass(frozen=True)
class Sample:
    data: bytes
    duration: int  # in the track's timescale
    flags: int | None = None  # sample flags; None for tracks whose every sample is a sync sample (audio)


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def fragment(sequence: int, track_id: int, decode_time: int, samples: Sequence[Sample]) -> bytes:
    """One ``moof+mdat`` of ``samples`` on ``track_id``, the first decoded at ``decode_time`` (track timescale)."""
    if not samples:
        raise ValueError("a fragment holds at least one sample")
    with_flags = samples[0].flags is not None
    if any((s.flags is not None) != with_flags for s in samples):
        raise ValueError("every sample of a fragment has flags, or none has")
    trun_flags = 0x000001 | 0x000100 | 0x000200 | (0x000400 if with_flags else 0)
    entries = b"".join(
        struct.pack(">III", s.duration, len(s.data), s.flags) if with_flags else struct.pack(">II", s.duration,
                                                                                              len(s.data))
        for s in samples
    )

    def moof(data_offset: int) -> bytes:
        trun = full_box(b"trun", 0, trun_flags, struct.pack(">Ii", len(samples), data_offset), entries)
        traf = box(b"traf", full_box(b"tfhd", 0, 0x020000, struct.pack(">I", track_id)),
                   full_box(b"tfdt", 1, 0, struct.pack(">Q", decode_time)), trun)
        return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), traf)

    size = len(moof(0))
    return moof(size + 8) + box(b"mdat", *(s.data for s in samples))


def avc_sample(annex_b: bytes) -> bytes:
    """An Annex B access unit (start codes) as an ``avc1`` sample: each NAL unit behind its 4-byte length."""
    if not annex_b.startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01")):
        raise ValueError("not an Annex B access unit (no start code at its beginning)")
    return b"".join(struct.pack(">I", len(nal)) + nal for nal in nal_units(annex_b))


def timescale(init: bytes, track_id: int) -> int:
    """The media timescale (``mdhd``) of ``track_id`` in an init segment."""
    for trak in _children(init, b"moov", b"trak"):
        tkhd = _first(trak, b"tkhd")
        version = tkhd[0]
        tid = struct.unpack(">I", tkhd[12:16] if version == 0 else tkhd[20:24])[0]
        if tid != track_id:
            continue
        mdhd = _first(_first(trak, b"mdia"), b"mdhd")
        return struct.unpack(">I", mdhd[12:16] if mdhd[0] == 0 else mdhd[20:24])[0]
    raise ValueError(f"no track {track_id} in the init segment")


def _boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """(kind, payload) of the boxes laid end to end in ``data``."""
    out, off = [], 0
    while off + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[off : off + 8])
        if size < 8:
            raise ValueError(f"malformed box {kind!r} at {off}")
        out.append((kind, data[off + 8 : off + size]))
        off += size
    return out


def _first(data: bytes, kind: bytes) -> bytes:
    for k, payload in _boxes(data):
        if k == kind:
            return payload
    raise ValueError(f"no {kind.decode()} box")


def _children(data: bytes, parent: bytes, kind: bytes) -> list[bytes]:
    return [payload for k, payload in _boxes(_first(data, parent)) if k == kind]
