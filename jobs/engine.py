"""A job through ``pipeline.offline`` (the engine of ``rheo run``): no second implementation of the offline path.

The pipeline is built on the first job and kept while jobs ask for the same model size, steps and noise (a
different one builds a new pipeline); the model comes from ``model.model_dir`` (none: the tiny random model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proto.jobs import JobParams
from services.config import Settings

if TYPE_CHECKING:
    from pipeline.pipeline import StreamPipeline

log = logging.getLogger("rheo.jobs")


class OfflineEngine:
    """Callable as ``jobs.worker.Engine``; runs in the worker's engine thread (one job at a time)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._key: tuple[Any, ...] | None = None
        self._pipeline: StreamPipeline | None = None

    def pipeline(self, params: JobParams) -> StreamPipeline:
        from pipeline.offline import build_pipeline
        from pipeline.pipeline import PipelineConfig

        key = (params.width, params.height, params.steps, params.noise_scale)
        if self._pipeline is None or key != self._key:
            s = self.settings
            config = PipelineConfig(width=params.width, height=params.height, steps=params.steps,
                                    noise_scale=params.noise_scale, motion_aware_noise=s.stream.motion_aware_noise,
                                    ring=s.dit_stage.ring())
            log.info("jobs: building the pipeline for %dx%d, %d steps", params.width, params.height, params.steps)
            self._pipeline = build_pipeline(s, config, model_dir=s.model.model_dir, device=s.model.device)
            self._key = key
        return self._pipeline

    def chunk_frames(self) -> tuple[int, int]:
        """(first chunk's input frames, every later chunk's), from the ring's clock."""
        clock = self.settings.dit_stage.ring().clock(None)
        return clock.first_input_frames, clock.input_frames_per_chunk

    def __call__(self, params: JobParams, source: Path | None, output: Path, on_frames: Callable[[int], None]) -> int:
        from pipeline.offline import run_file, run_t2v

        pipeline = self.pipeline(params)
        if source is None:
            stats = run_t2v(pipeline, output, params.prompt, seconds=params.seconds, fps=self.settings.stream.fps,
                            seed=params.seed, progress=False, on_frames=on_frames)
        else:
            stats = run_file(pipeline, source, output, params.prompt, seed=params.seed, progress=False,
                             on_frames=on_frames)
        return stats.frames_out
