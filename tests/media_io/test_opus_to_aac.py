"""WHIP audio's transcoder (ingest/opus_to_aac.py): frames shaped as aiortc's decoded Opus (48 kHz packed s16 stereo,
960 samples, pts from an arbitrary origin) in, FLV AAC payloads out, decoded back with PyAV: the tone is there at
the source time it was sent, across a lost packet and a jump; silence stays silent."""

from __future__ import annotations

import asyncio
from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from ingest.opus_to_aac import RATE, OpusToAac
from ingest.rtmp_stream import RtmpStream, StreamShape
from ingest.whip import WhipSession
from media.aac import SAMPLES_PER_FRAME, AacConfig
from media_io.audiokit import TONE_HZ, decode_audio, dominant_hz

ORIGIN = 123_456  # samples: the first frame's pts (aiortc's start at 0; any origin must do)
OPUS = 960


def opus_frames(n: int, onset_s: float | None, first: int = 0) -> list[av.AudioFrame]:
    """Frames ``first..first+n`` of a source whose 1 kHz tone starts at ``onset_s`` (None: silence)."""
    frames = []
    for k in range(first, first + n):
        t = (np.arange(OPUS) + k * OPUS) / RATE
        x = (0.5 * np.sin(2 * np.pi * TONE_HZ * t) * (onset_s is not None and t >= onset_s) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.stack([x, x], axis=1).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = RATE, ORIGIN + k * OPUS, Fraction(1, RATE)
        frames.append(frame)
    return frames


def transcode(frames: list[av.AudioFrame]) -> tuple[list[tuple[bytes, float]], list[tuple[bytes, float]], OpusToAac]:
    """(sequence headers, raw AAC payloads) with their source times, and the transcoder."""
    codec = OpusToAac()
    out = [p for f in frames for p in codec.encode(f)] + codec.flush()
    assert all(p[0] == 0xAF for p, _ in out)
    return [(p[2:], t) for p, t in out if p[1] == 0], [(p[2:], t) for p, t in out if p[1] == 1], codec


def decoded(config: bytes, units: list[tuple[bytes, float]]) -> np.ndarray:
    samples, _, rate = decode_audio(b"".join(AacConfig.parse(config).adts(d) for d, _ in units))
    assert rate == RATE
    return samples


def onset_time(samples: np.ndarray, units: list[tuple[bytes, float]]) -> float:
    """Source time of the first loud sample: its payload's time + its place in the payload's 1024 samples."""
    loud = int(np.flatnonzero(np.abs(samples) > 0.1)[0])
    return units[loud // SAMPLES_PER_FRAME][1] + (loud % SAMPLES_PER_FRAME) / RATE


def test_a_tone_comes_out_as_aac_at_its_source_time_across_a_lost_packet() -> None:
    frames = opus_frames(75, onset_s=1.0)  # 1.5 s; the tone starts at 1 s
    del frames[30:35]  # 100 ms lost before the onset: filled with silence, the onset keeps its time
    headers, units, codec = transcode(frames)
    assert len(headers) == 1 and AacConfig.parse(headers[0][0]) == AacConfig(headers[0][0], RATE, 2)
    assert codec.filled == 5 * OPUS and codec.dropped == 0
    steps = np.diff([t for _, t in units]) * RATE
    assert steps == pytest.approx(np.full(len(steps), SAMPLES_PER_FRAME))  # sample-continuous, hole included
    assert units[0][1] * RATE == pytest.approx(ORIGIN - SAMPLES_PER_FRAME)  # the encoder's priming frame
    assert len(units) * SAMPLES_PER_FRAME >= 75 * OPUS + SAMPLES_PER_FRAME
    samples = decoded(headers[0][0], units)
    tone = samples[int(1.2 * RATE):int(1.5 * RATE)]
    assert dominant_hz(tone, RATE) == pytest.approx(TONE_HZ, abs=5) and np.abs(tone).max() > 0.3
    assert onset_time(samples, units) == pytest.approx(ORIGIN / RATE + 1.0, abs=0.002)


def test_silence_stays_silent() -> None:
    """Negative control: no tone in, none out (and no onset to find)."""
    headers, units, _ = transcode(opus_frames(50, onset_s=None))
    samples = decoded(headers[0][0], units)
    assert len(samples) >= 50 * OPUS and np.abs(samples).max() < 0.01


def test_a_long_jump_starts_a_new_timeline_and_a_duplicate_is_dropped() -> None:
    frames = opus_frames(20, onset_s=0.0)
    frames += opus_frames(1, onset_s=0.0, first=19)  # a duplicate of the last frame
    frames += opus_frames(20, onset_s=0.0, first=200)  # 3.4 s later: beyond max_gap_s
    headers, units, codec = transcode(frames)
    assert codec.dropped == 1 and codec.filled == 0 and len(headers) == 2
    assert headers[1][1] == pytest.approx((ORIGIN + 200 * OPUS) / RATE)
    times = [t for _, t in units]
    jump = next(i for i in range(1, len(times)) if times[i] - times[i - 1] > 1)
    assert times[jump] * RATE == pytest.approx(ORIGIN + 200 * OPUS - SAMPLES_PER_FRAME)  # priming again
    assert (jump - 1) * SAMPLES_PER_FRAME >= 20 * OPUS  # the first timeline's tail was flushed, not lost


class _Track:
    """An aiortc audio track that yields ``frames`` and then ends."""

    def __init__(self, frames: list[av.AudioFrame]) -> None:
        self.frames = frames

    async def recv(self) -> av.AudioFrame:
        if not self.frames:
            raise MediaStreamError
        return self.frames.pop(0)


def test_the_whip_audio_pump_counts_every_frame_it_does_not_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """``WhipSession``'s audio task: a duplicate frame and one the encoder refuses are counted (``duplicate``,
    ``transcode_failed``) and the rest reaches the stream's passthrough; before the video clock is known, AAC
    units wait as ``before_video`` (as an RTMP publisher's do)."""
    frames = opus_frames(20, onset_s=None)
    frames.insert(10, opus_frames(1, onset_s=None, first=9)[0])  # a repeated packet
    encode = OpusToAac.encode

    def refuse_the_fifth(self: OpusToAac, frame: av.AudioFrame) -> list[tuple[bytes, float]]:
        if frame.pts == ORIGIN + 5 * OPUS:
            raise ValueError("not audio")
        return encode(self, frame)

    monkeypatch.setattr(OpusToAac, "encode", refuse_the_fifth)
    session = WhipSession(None, "127.0.0.1:5000", [])  # type: ignore[arg-type]  # the pump needs its stream only
    session.stream = RtmpStream("s1", "0" * 64, StreamShape(64, 64, 8.0), 4, 1.0)
    asyncio.run(session._pass_audio(_Track(frames)))  # type: ignore[arg-type]
    units = session.stream.audio.stats.units
    assert units["duplicate"] == 1 and units["transcode_failed"] == 1
    assert session.stream.stats.audio_messages == 21
    assert units["before_video"] > 0 and units["published"] == 0  # no video frame yet: not on its clock
