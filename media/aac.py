"""AAC passthrough helpers: the AudioSpecificConfig, ADTS framing (PyAV templates) and fMP4 audio fragments.

The LL-HLS packager (``media.llhls``) writes each part's fragments itself (``media.fmp4``): the video's, then the
audio's own small ``moof+mdat`` (track 2 of the init segment) of the AAC frames captured over the part's span;
AAC needs only sample sizes and durations.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av

from media import fmp4

AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
SAMPLES_PER_FRAME = 1024  # AAC-LC access unit
AUDIO_TRACK_ID = 2  # the muxed init segment: video is track 1


@dataclass(frozen=True)
class AacConfig:
    """What a muxer needs from an AudioSpecificConfig: the bytes themselves, sample rate and channels."""

    asc: bytes
    sample_rate: int
    channels: int
    object_type: int = 2

    @classmethod
    def parse(cls, asc: bytes) -> AacConfig:
        """ISO 14496-3 AudioSpecificConfig: 5 bits object type, 4 bits rate index (15: 24-bit rate), 4 bits channels."""
        if len(asc) < 2:
            raise ValueError("AudioSpecificConfig shorter than 2 bytes")
        bits = int.from_bytes(asc[:5].ljust(5, b"\0"), "big")
        object_type, index = bits >> 35, (bits >> 31) & 0xF
        if index == 15:
            rate, channels = (bits >> 7) & 0xFFFFFF, (bits >> 3) & 0xF
        elif index < len(AAC_RATES):
            rate, channels = AAC_RATES[index], (bits >> 27) & 0xF
        else:
            raise ValueError(f"AAC sample rate index {index} is reserved")
        if not 1 <= channels <= 8 or rate <= 0 or not 1 <= object_type <= 4:
            raise ValueError(f"unsupported AAC: object type {object_type}, {channels} channels at {rate} Hz")
        return cls(bytes(asc), rate, channels, object_type)

    def adts(self, frame: bytes) -> bytes:
        """``frame`` with an ADTS header (what PyAV's ``aac`` demuxer reads)."""
        index = AAC_RATES.index(self.sample_rate) if self.sample_rate in AAC_RATES else 4
        n = len(frame) + 7
        header = (0xFFF << 44) | (1 << 40) | ((self.object_type - 1) << 38) | (index << 34) | \
            ((self.channels & 7) << 30) | (n << 13) | (0x7FF << 2)
        return header.to_bytes(7, "big") + frame


def template(config: AacConfig, frame: bytes) -> av.container.InputContainer:
    """An AAC input stream whose codec parameters a muxer copies (PyAV must not open an encoder)."""
    return av.open(io.BytesIO(config.adts(frame) * 2), format="aac")


def fragment(sequence: int, decode_time: int, frames: list[bytes], track_id: int = AUDIO_TRACK_ID) -> bytes:
    """One ``moof+mdat`` of AAC access units starting at ``decode_time`` (in samples, the track's timescale)."""
    return fmp4.fragment(sequence, track_id, decode_time, [fmp4.Sample(f, SAMPLES_PER_FRAME) for f in frames])
