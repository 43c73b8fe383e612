"""File → file (``rheo run``): any video PyAV reads → StreamPipeline → H.264 MP4 at the input frame rate.

Bad input ends with one ``InputError`` line and no output file: the MP4 is written to a temp file next to the
output and renamed only when complete.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from media.video_file import DEFAULT_FPS, InputError, VideoInput

if TYPE_CHECKING:  # the model side is imported only when a run starts, so input errors come back fast
    from pipeline.pipeline import PipelineConfig, StreamPipeline
    from services.config import Settings

__all__ = ["DEFAULT_FPS", "InputError", "Mp4Writer", "RunStats", "VideoInput", "build_pipeline", "run_file",
           "run_t2v"]

OnFrames = Callable[[int], None]
"""Called with the output frames written so far, after each write; raising stops the run (no output kept)."""


@dataclass(frozen=True)
class RunStats:
    frames_in: int
    frames_out: int
    fps: float
    """Output frames per second of processing (decode + model + encode), model loading excluded."""
    ttff_s: float
    """Time from the first input frame read to the first output frame produced."""
    seconds: float
    output_fps: float


class Mp4Writer:
    """libx264 in an MP4, written to ``<output>.part`` and renamed on ``close``; ``abort`` deletes the temp file."""

    def __init__(self, output: str | Path, width: int, height: int, fps: Fraction, crf: int = 18) -> None:
        self.output = Path(output)
        if not self.output.parent.is_dir():
            raise InputError(f"output folder {self.output.parent} does not exist")
        self.temp = self.output.with_name(f".{self.output.name}.{os.getpid()}.part")
        self._container = av.open(str(self.temp), "w", format="mp4")
        rate = Fraction(fps).limit_denominator(1001)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"crf": str(crf), "preset": "veryfast"}
        self._time_base = 1 / rate
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        for rgb in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            vf.pts, vf.time_base = self.frames, self._time_base
            self._container.mux(self._stream.encode(vf))
            self.frames += 1

    def close(self) -> None:
        self._container.mux(self._stream.encode(None))
        self._container.close()
        os.replace(self.temp, self.output)

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the file is removed either way
            self._container.close()
        self.temp.unlink(missing_ok=True)


def _progress(total: int | None, enabled: bool, unit: str = "frame"):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True, leave=True)


class _Sink:
    """Pipeline output into the MP4 and the progress bar; remembers when the first frame came (TTFF)."""

    def __init__(self, writer: Mp4Writer, bar: Any, on_frames: OnFrames | None = None) -> None:
        self.writer, self.bar, self.on_frames = writer, bar, on_frames
        self.first: float | None = None

    def emit(self, frames: np.ndarray | None) -> None:
        if frames is None or not len(frames):
            return
        self.first = self.first or time.perf_counter()
        self.writer.write(frames)
        self.bar.update(len(frames))
        if self.on_frames is not None:
            self.on_frames(self.writer.frames)


def build_pipeline(settings: Settings, config: PipelineConfig, *, model_dir: str | Path | None,
                   checkpoint: str | Path | None = None, device: str = "auto", vae: str | None = None
                   ) -> StreamPipeline:
    """The offline pipeline ``rheo run`` and the jobs workers run: the tiny random model without ``model_dir``
    (seeded: the same every time), else the weights in it."""
    import torch

    from encoder.vae_loading import StreamVAEConfig
    from pipeline.loading import build_tiny_pipeline, load_pipeline
    from wan.device import resolve_device

    vae = vae or settings.encoder.vae  # both ways, as the services with encoder.vae
    vae_config = StreamVAEConfig(encoder=vae, decoder=vae, taehv_path=settings.encoder.taehv_path)
    if model_dir is None:
        torch.manual_seed(0)
        return build_tiny_pipeline(config, device=resolve_device(device), forward=settings.dit_stage.forward,
                                   vae_config=vae_config)
    return load_pipeline(model_dir, config, checkpoint=checkpoint or settings.model.checkpoint, device=device,
                         dtype=settings.model.dtype, forward=settings.dit_stage.forward, vae_config=vae_config)


def run_file(
    pipeline: StreamPipeline,
    input_path: str | Path | VideoInput,
    output_path: str | Path,
    prompt: str,
    *,
    seed: int = 0,
    progress: bool = True,
    on_frames: OnFrames | None = None,
) -> RunStats:
    """Restyle ``input_path`` (a path, or a ``VideoInput`` already opened) into ``output_path``."""
    from pipeline.state import StreamSpec
    from proto.spec import MAX_FPS

    cfg = pipeline.config
    video = input_path if isinstance(input_path, VideoInput) else VideoInput(input_path)
    sid = pipeline.open_stream(StreamSpec(prompt=prompt, seed=seed, fps=min(float(video.fps), MAX_FPS)))
    writer: Mp4Writer | None = None
    start = time.perf_counter()
    first_out: float | None = None
    frames_in = 0
    try:
        writer = Mp4Writer(output_path, cfg.width, cfg.height, video.fps)
        with _progress(video.frames_hint, progress) as bar:
            sink = _Sink(writer, bar, on_frames)
            for rgb in video.frames(cfg.width, cfg.height):
                frames_in += 1
                sink.emit(pipeline.push(sid, rgb[None]))
            if frames_in == 0:
                raise InputError(f"input {video.path} contains no video frames")
            sink.emit(pipeline.finish(sid))
            first_out = sink.first
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        video.close()
        pipeline.close_stream(sid)
    seconds = time.perf_counter() - start
    ttff = (first_out or time.perf_counter()) - start
    return RunStats(frames_in, writer.frames, writer.frames / seconds, ttff, seconds, float(video.fps))


def run_t2v(
    pipeline: StreamPipeline,
    output_path: str | Path,
    prompt: str,
    *,
    seconds: float,
    fps: float = DEFAULT_FPS,
    seed: int = 0,
    progress: bool = True,
    on_frames: OnFrames | None = None,
) -> RunStats:
    """Generate ``seconds`` of video from ``prompt`` alone (T2V)."""
    from pipeline.state import StreamSpec

    cfg = pipeline.config
    total = max(1, round(seconds * fps))
    sid = pipeline.open_stream(StreamSpec(prompt=prompt, seed=seed, t2v=True, fps=fps))
    writer: Mp4Writer | None = None
    start = time.perf_counter()
    first_out: float | None = None
    try:
        writer = Mp4Writer(output_path, cfg.width, cfg.height, Fraction(fps).limit_denominator(1001))
        with _progress(total, progress) as bar:
            sink = _Sink(writer, bar, on_frames)
            pipeline.request(sid, total)
            while pipeline.ready():
                sink.emit(pipeline.step_all().get(sid))
            sink.emit(pipeline.finish(sid))
            first_out = sink.first
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        pipeline.close_stream(sid)
    elapsed = time.perf_counter() - start
    ttff = (first_out or time.perf_counter()) - start
    return RunStats(0, writer.frames, writer.frames / elapsed, ttff, elapsed, fps)
