"""Helpers of the pipeline tests: the tiny pipeline at 64×64, synthetic frames, real MP4 files made with PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pipeline import PipelineConfig, StreamPipeline
from pipeline.loading import build_tiny_pipeline

SIZE = 64


def tiny_pipeline(**config: object) -> StreamPipeline:
    """A fresh tiny pipeline (same seed → same weights, so two of them are interchangeable)."""
    return build_tiny_pipeline(PipelineConfig(**({"width": SIZE, "height": SIZE} | config)))  # type: ignore[arg-type]


def moving_frames(n: int, height: int = SIZE, width: int = SIZE, seed: int = 0) -> np.ndarray:
    """uint8 [n, H, W, 3]: a textured background with a bright square sliding across (motion for the controller)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        f = base.copy()
        x = (3 * i) % (width - 12)
        f[height // 3 : height // 3 + 12, x : x + 12] = (250, 240, 30)
        out[i] = f
    return out


def write_clip(path: Path, frames: int = 24, fps: int = 12, width: int = 96, height: int = 80) -> Path:
    """An H.264 MP4 made with PyAV (not square, so the pipeline must resize and centre-crop)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i, rgb in enumerate(moving_frames(frames, height, width)):
            vf = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return path


def write_audio_only(path: Path) -> Path:
    """An AAC-only file (no video stream): refused by every input check."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=44100)
        for i in range(20):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 44100, i * 1024
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    return path


def read_clip(path: Path) -> tuple[np.ndarray, Fraction]:
    """All frames (rgb24) and the average frame rate of a video file."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        return frames, Fraction(s.average_rate)
