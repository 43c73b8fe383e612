"""Synthetic AAC for the audio tests: a 1 kHz tone (optionally silent before an onset, the sync marker) encoded
with PyAV, an LL-HLS rendition of barcoded frames with audio in step (egress's parts), and the checks on decoded
audio (dominant frequency, onset time, offset from a marked frame)."""

from __future__ import annotations

import math
from fractions import Fraction

import av
import numpy as np

from media_io.mediakit import read_barcode
from proto import EncodedAudio

RATE = 44100
TONE_HZ = 1000.0


def aac_tone(seconds: float, onset_s: float = 0.0, rate: int = RATE) -> tuple[bytes, list[tuple[float, bytes]]]:
    """(AudioSpecificConfig, [(time of the frame's first sample, raw AAC frame)]): the tone starts at ``onset_s``."""
    enc = av.CodecContext.create("aac", "w")
    enc.sample_rate, enc.layout, enc.format, enc.bit_rate = rate, "stereo", "fltp", 96000
    enc.time_base = Fraction(1, rate)
    enc.open()
    packets: list[av.Packet] = []
    for i in range(int(seconds * rate) // 1024):
        t = (np.arange(1024) + i * 1024) / rate
        x = (0.5 * np.sin(2 * np.pi * TONE_HZ * t) * (t >= onset_s)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.stack([x, x]), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, i * 1024
        packets += enc.encode(frame)
    packets += enc.encode(None)
    return bytes(enc.extradata), [(float(p.pts) / rate, bytes(p)) for p in packets if p.pts is not None and p.pts >= 0]


def decode_audio(data: bytes) -> tuple[np.ndarray, float, int]:
    """(mono samples, time of the first sample, sample rate) of the first audio stream of a media file."""
    import io

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = list(container.decode(stream))
    if not frames:  # a segment can hold no audio (a frozen picture: its capture span is empty)
        return np.zeros(0, np.float32), math.nan, stream.sample_rate
    samples = np.concatenate([f.to_ndarray().reshape(f.to_ndarray().shape[0], -1).mean(axis=0) for f in frames])
    return samples, float(frames[0].time), frames[0].sample_rate


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def onset_s(samples: np.ndarray, start: float, rate: int, threshold: float = 0.1) -> float:
    """Time of the first sample louder than ``threshold`` (the tone's onset)."""
    loud = np.flatnonzero(np.abs(samples) > threshold)
    assert loud.size, "no tone in the audio"
    return start + loud[0] / rate


def onsets(samples: np.ndarray, rate: int, threshold: float = 0.1, quiet_s: float = 0.5) -> list[int]:
    """Sample indices where a beep starts: loud after at least ``quiet_s`` of quiet (a beep cut by the start of
    ``samples`` is not one)."""
    loud = np.flatnonzero(np.abs(samples) > threshold)
    return [int(b) for a, b in zip([-1, *loud[:-1]], loud, strict=False) if b - a > quiet_s * rate]


def decode_av(data: bytes) -> tuple[float, float, np.ndarray, int]:
    """(first video frame's time, first audio sample's time, mono audio, rate) of a muxed file (init + segment)."""
    import io

    with av.open(io.BytesIO(data)) as container:
        video_start = float(next(container.decode(video=0)).time)
    samples, audio_start, rate = decode_audio(data)
    return video_start, audio_start, samples, rate


def mux_hls(frames: list[tuple[np.ndarray, float]], batches: list[EncodedAudio], fps: int):
    """(init + segments, the ``AudioSync``) of an LL-HLS rendition of ``frames`` (RGB, capture time) with the
    audio of ``batches`` placed by egress's sync rule (docs/media.md "Audio")."""
    from egress.audio import AudioSync
    from media.h264 import H264Encoder, PartLayout
    from media.llhls import LlHlsStream

    sync = AudioSync(batches[0].stream_id)
    for msg in batches:
        sync.add(msg)
    layout = PartLayout.for_rate(fps, 1.0, 0.2)
    height, width = frames[0][0].shape[:2]
    enc = H264Encoder(width, height, fps, layout.gop_frames, "ultrafast", 300)
    hls = LlHlsStream(batches[0].stream_id, enc.config, layout, None, 10)
    hls.audio = sync
    for i, (rgb, capture_time) in enumerate(frames):
        for unit in enc.encode(rgb, i, capture_time):
            hls.push(unit)
    hls.end()
    return hls.inits[0] + b"".join(s.data for s in hls.segments), sync


def tone_offset_s(data: bytes, mark: int) -> float:
    """Onset of the tone in a muxed file minus the output time of the first frame showing barcode ``mark``."""
    import io

    samples, start, rate = decode_audio(data)
    with av.open(io.BytesIO(data)) as c:
        marked = next(float(f.time) for f in c.decode(video=0) if read_barcode(f.to_ndarray(format="rgb24")) == mark)
    return onset_s(samples, start, rate) - marked
