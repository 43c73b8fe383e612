"""Audio passthrough: the publisher's AAC, muxed into the LL-HLS parts in step with the (delayed) video, decoded
back with PyAV; the sync buffer's drop rules; ASC parsing; the FLV side of ingest's passthrough."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from egress.audio import AudioSync
from ingest.audio import AudioPassthrough
from media.aac import AacConfig
from media.h264 import H264Encoder, PartLayout
from media.llhls import LlHlsStream
from media_io.audiokit import RATE, TONE_HZ, aac_tone, decode_audio, dominant_hz, mux_hls, tone_offset_s
from media_io.mediakit import barcode_frame
from proto import AudioUnit, EncodedAudio

T0 = 1_700_000_000.0  # capture clock of the test (wall-clock seconds)
FPS, MARK = 16, 40  # the video frame captured when the tone starts (2.5 s)


def _batches(asc: bytes, frames: list[tuple[float, bytes]], per: int = 7) -> list[EncodedAudio]:
    units = [AudioUnit(capture_time=T0 + t, data=d) for t, d in frames]
    return [EncodedAudio(stream_id="s", seq=i, config=asc, sample_rate=RATE, channels=2, units=units[j: j + per])
            for i, j in enumerate(range(0, len(units), per))]


def test_audio_specific_config_parses_rate_and_channels() -> None:
    assert AacConfig.parse(bytes.fromhex("1210")) == AacConfig(bytes.fromhex("1210"), 44100, 2, 2)
    assert AacConfig.parse(bytes.fromhex("1188")).sample_rate == 48000
    assert AacConfig.parse(bytes.fromhex("1190")).channels == 2
    for bad in (b"\x12", bytes.fromhex("17f0"), bytes.fromhex("1200")):  # short, reserved rate index, 0 channels
        with pytest.raises(ValueError):
            AacConfig.parse(bad)


def test_audio_is_muxed_into_the_parts_in_step_with_the_video() -> None:
    """Audio arrives long before its video (the pipeline's latency); each part takes the audio of its video's
    capture span: the decoded HLS has a 1 kHz track whose onset matches the marked frame."""
    asc, frames = aac_tone(6.0, onset_s=MARK / FPS)
    data, sync = mux_hls([(barcode_frame(i, 160, 120), T0 + i / FPS) for i in range(FPS * 5)], _batches(asc, frames),
                         FPS)
    samples, _, rate = decode_audio(data)
    assert rate == RATE and dominant_hz(samples[int(3 * rate):], rate) == pytest.approx(TONE_HZ, abs=5)
    offset = tone_offset_s(data, MARK)
    assert abs(offset) <= 0.05, f"audio is {offset * 1000:.0f} ms off the video"
    muxed = sync.stats.units["muxed"]
    assert muxed >= 5 * RATE / 1024 - 3 and sync.stats.resyncs == 0
    assert sum(sync.stats.units.values()) - muxed == sync.stats.units["before_video"] == 0


def test_late_early_and_overflowing_audio_is_counted_never_muxed() -> None:
    asc, frames = aac_tone(1.0)
    sync = AudioSync("s", max_units=20)
    sync.add(_batches(asc, frames, per=100)[0])  # 43 frames into a buffer of 20
    assert sync.stats.units["overflow"] == len(frames) - 20
    taken = sync.take(T0 + 0.6, T0 + 0.8, 10.0)  # the video starts at 0.6 s: earlier audio never plays
    assert taken is not None and sync.stats.units["before_video"] == 20 - len(taken[1]) - sum(
        1 for t, _ in frames[-20:] if t >= 0.8)
    assert taken[0] == round((10.0 + frames[-20 + sync.stats.units["before_video"]][0] - 0.6) * RATE)
    sync.add(EncodedAudio(stream_id="s", seq=5, config=asc, sample_rate=RATE, channels=2,
                          units=[AudioUnit(capture_time=T0 + 0.7, data=frames[0][1])]))
    assert sync.stats.units["late"] == 1 and sync.stats.units["lost"] == 4  # for a closed part; seq 1-4 lost
    sync.close()
    assert sync.stats.units["unplayed"] == sum(1 for t, _ in frames[-20:] if t >= 0.8)


def test_a_period_without_audio_gains_the_track_at_the_next_keyframe() -> None:
    asc, frames = aac_tone(4.0)
    layout = PartLayout.for_rate(FPS, 1.0, 0.2)
    enc = H264Encoder(160, 120, FPS, layout.gop_frames, "ultrafast", 300)
    hls = LlHlsStream("s", enc.config, layout, None, 10)
    hls.audio = sync = AudioSync("s")
    for i in range(FPS * 3):
        if i == 10:
            for msg in _batches(asc, frames):
                sync.add(msg)
        for unit in enc.encode(barcode_frame(i, 160, 120), i, T0 + i / FPS):
            hls.push(unit)
    hls.end()
    assert hls.discontinuity == 1 and hls.stats.dropped_before_keyframe == 0
    samples, start, _ = decode_audio(hls.inits[1] + b"".join(s.data for s in hls.segments if s.discontinuity == 1))
    assert start == pytest.approx(layout.gop_frames / FPS, abs=0.03) and np.abs(samples).max() > 0.3


async def test_ingest_stamps_flv_aac_and_batches_it() -> None:
    asc, frames = aac_tone(1.0)
    sent: list[EncodedAudio] = []

    async def sink(msg: EncodedAudio) -> None:
        sent.append(msg)

    audio = AudioPassthrough("s", batch_s=0.15)
    audio.feed(b"\xaf\x01" + frames[0][1], T0)  # before the sequence header
    audio.feed(b"\xaf\x00" + asc, None)
    audio.feed(b"\xaf\x01" + frames[0][1], None)  # before the first video frame anchored the clock
    audio.feed(b"\x2f\x01" + frames[0][1], T0)  # MP3
    audio.feed(b"\xaf\x01" + bytes(9000), T0)  # no AAC frame is that large
    for n, (t, data) in enumerate(frames):
        if n == 20:  # the stream went live: what was batched meanwhile goes first, nothing is lost
            audio.sink = sink
        audio.feed(b"\xaf\x01" + data, T0 + t)
    await audio.close()
    assert [m.seq for m in sent] == list(range(len(sent))) and 5 <= len(sent) <= 8  # ≈150 ms batches
    assert [u.data for m in sent for u in m.units] == [d for _, d in frames]
    assert sent[0].units[0].capture_time == T0 and sent[0].sample_rate == RATE and sent[0].channels == 2
    assert audio.stats.units == {"published": len(frames), "before_video": 1, "not_aac": 1, "no_config": 1,
                                 "oversized": 1, "queue_full": 0, "publish_failed": 0, "not_live": 0,
                                 "transcode_failed": 0, "duplicate": 0}
    await asyncio.sleep(0)
