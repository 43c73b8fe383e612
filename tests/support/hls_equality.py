"""The equality of a running stack with the single-process pipeline, the check several stack modules run: a test
pattern (with beeps) published over RTMP, the decoder's debug tap equal to ``StreamPipeline`` on the very frames
ingest tapped, the playlist through the gateway decoded back, the beeps in step with their video."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import av
import m3u8
import numpy as np
import pytest
from media_io.audiokit import TONE_HZ, decode_av, dominant_hz, onsets

from pipeline.loading import build_tiny_pipeline
from pipeline.pipeline import PipelineConfig
from pipeline.state import StreamSpec as PipelineStreamSpec
from proto.spec import RingConfig
from services.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
SIZE, FPS, STEPS, SEED = 64, 8, 2, 7


def publish(stack: LocalStack, key: str, seconds: float) -> None:
    url = f"rtmp://127.0.0.1:{stack.ports.rtmp}/live/{key}"
    out = subprocess.run([sys.executable, "-m", "ingest.testpattern", url, "--size", "96x64", "--fps", str(FPS),
                          "--seconds", str(seconds), "--tone", str(TONE_HZ)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def http_get(stack: LocalStack, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(stack.gateway_url + path, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@dataclasses.dataclass
class Reference:
    frames_in: np.ndarray
    frames: np.ndarray


def check_rtmp_to_hls_equals_pipeline(stack: LocalStack, ring: RingConfig | None = None) -> Reference:
    created = stack.api("POST", "/v1/streams", {"prompt": "a test pattern in watercolour", "width": SIZE,
                                                "height": SIZE, "fps": FPS, "steps": STEPS, "seed": SEED,
                                                "slo_latency_ms": 120000})
    sid = created["id"]
    published_from = time.time()
    publish(stack, created["stream_key"], seconds=3.0)
    published_to = time.time()
    wait_for(lambda: stack.api("GET", f"/v1/streams/{sid}")["state"] == "ended", 60, "the stream to end")
    wait_for(lambda: b"#EXT-X-ENDLIST" in http_get(stack, f"{stack.playback(sid)}/index.m3u8")[1], 90, "EXT-X-ENDLIST")

    # what went in (ingest's tap: model-size uint8 frames per chunk) and what came out (decoder's tap)
    tap_in = sorted((stack.workdir / "tap-in" / sid).glob("chunk_*.npy"))
    tap_out = sorted((stack.workdir / "tap-out" / sid).glob("*.npy"), key=lambda p: int(p.stem))
    assert len(tap_in) >= 4 and [int(p.stem) for p in tap_out] == list(range(len(tap_out)))
    frames_in = np.concatenate([np.load(p) for p in tap_in])
    frames_out = np.concatenate([np.load(p) for p in tap_out])

    pipe = build_tiny_pipeline(PipelineConfig(width=SIZE, height=SIZE, steps=STEPS, output="float",
                                              ring=ring or RingConfig()))
    ref_id = pipe.open_stream(PipelineStreamSpec(prompt="a test pattern in watercolour", seed=SEED))
    ref = pipe.push(ref_id, frames_in)
    n = min(len(ref), len(frames_out))
    assert n >= 5 + 4 * 2, (len(ref), len(frames_out))
    np.testing.assert_allclose(frames_out[:n], ref[:n], atol=1e-5, rtol=0)
    assert np.abs(frames_out[:n] - np.roll(ref[:n], 1, axis=0)).max() > 1e-3  # negative control: order matters

    # the viewer's side: the playlist through the gateway, decoded back
    status, body = http_get(stack, f"{stack.playback(sid)}/index.m3u8")
    assert status == 200
    playlist = m3u8.loads(body.decode())
    assert playlist.is_endlist and playlist.segments
    # EXT-X-PROGRAM-DATE-TIME is when the publisher's frames were captured (this host's clock), not when the
    # decoder output them (seconds later on this CPU): every segment starts with a frame captured while publishing
    pdts = [seg.program_date_time.timestamp() for seg in playlist.segments]
    assert all(published_from <= p <= published_to + 0.5 for p in pdts), (published_from, pdts, published_to)
    _, init = http_get(stack, f"{stack.playback(sid)}/init.mp4")
    decoded = 0
    for seg in playlist.segments:
        _, data = http_get(stack, f"{stack.playback(sid)}/{seg.uri}")
        with av.open(io.BytesIO(init + data)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.width, stream.codec_context.height) == (SIZE, SIZE)
            for frame in container.decode(stream):
                decoded += 1
                assert frame.width == SIZE
    assert decoded >= len(frames_out)  # CFR output: every decoded frame, plus repeats while chunks were late
    check_audio_in_step(stack, sid, playlist, published_s=3.0)
    return Reference(frames_in, ref[:n])


def check_audio_in_step(stack: LocalStack, sid: str, playlist: m3u8.M3U8, published_s: float) -> None:
    """The publisher's beeps (one at the start of every second of its video) play in the HLS output, at the
    capture times of their video: a beep's output time, mapped to capture time through its segment's PDT (the
    capture time of the segment's first frame), is a whole number of seconds after the first frame's capture.
    That mapping holds in a segment whose picture never froze; where the CFR output repeated frames while chunks
    were late (a loaded machine), the audio follows its video with a gap, or the segment has none: such segments
    ("frozen": audio shorter than the segment) are heard but not timed."""
    first_pdt = playlist.segments[0].program_date_time.timestamp()
    inits: dict[str, bytes] = {}
    heard: list[np.ndarray] = []
    captures: list[np.ndarray] = []  # per sample: its capture time, through its segment's PDT
    clean: list[np.ndarray] = []  # per sample: whether its segment never froze
    report: list[tuple] = []
    for seg in playlist.segments:
        uri = seg.init_section.uri
        if uri not in inits:
            inits[uri] = http_get(stack, f"{stack.playback(sid)}/{uri}")[1]
        data = inits[uri] + http_get(stack, f"{stack.playback(sid)}/{seg.uri}")[1]
        video_start, audio_start, samples, rate = decode_av(data)
        captured = seg.program_date_time.timestamp() - video_start + audio_start  # of the first sample
        heard.append(samples)
        captures.append(captured + np.arange(len(samples)) / rate - first_pdt)
        clean.append(np.full(len(samples), abs(len(samples) / rate - seg.duration) < 0.06))
        report.append((seg.uri, round(seg.duration, 3), round(video_start, 3), round(audio_start, 3), len(samples)))
    samples, times, timed = np.concatenate(heard), np.concatenate(captures), np.concatenate(clean)
    assert len(samples) >= 0.6 * published_s * rate, report
    assert dominant_hz(samples, rate) == pytest.approx(TONE_HZ, abs=10), report
    beeps = onsets(samples, rate)
    placed = [float(times[n]) for n in beeps if timed[n]]
    assert beeps and all(abs(p - round(p)) <= 0.1 for p in placed), (placed, report)
