"""A video file as the offline engine reads it: checked at open (missing, empty, not a video, audio-only,
unsupported codec → one ``InputError`` line), then decoded frame by frame at the model size.

A library (not ``pipeline``): the gateway checks an upload with the very check ``rheo run`` and the jobs workers
make, before anything is queued or any model is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from media.frames import shape_frame

__all__ = ["DEFAULT_FPS", "InputError", "VideoInput"]

DEFAULT_FPS = 16.0
# Formats FFmpeg "reads" that no one means as video (it renders text files as ANSI art).
_NOT_VIDEO_FORMATS = {"tty": "a text file"}


class InputError(ValueError):
    """An input that cannot be turned into frames (missing, empty, corrupt, audio-only, unsupported)."""


class VideoInput:
    """The first video stream of a file PyAV can read, decoded frame by frame, shaped to the model size."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"input {self.path} does not exist")
        if not self.path.is_file():
            raise InputError(f"input {self.path} is not a file")
        if self.path.stat().st_size == 0:
            raise InputError(f"input {self.path} is empty (0 bytes)")
        try:
            self._container = av.open(str(self.path))
        except av.error.FFmpegError as err:
            why = _why(err)
            msg = f"cannot read {self.path}: not a video PyAV can read (corrupt or unsupported: {why})"
            raise InputError(msg) from None
        kind = _NOT_VIDEO_FORMATS.get(self._container.format.name)
        if kind is not None:
            self._container.close()
            raise InputError(f"input {self.path} is {kind}, not a video (unsupported input)")
        streams = self._container.streams
        if not streams.video:
            kinds = sorted({s.type for s in streams}) or ["nothing"]
            self._container.close()
            what = "audio-only" if kinds == ["audio"] else "no video"
            raise InputError(f"input {self.path} has no video stream ({what}; it holds: {', '.join(kinds)})")
        self._stream = streams.video[0]
        if self._stream.codec_context is None or not self._stream.codec_context.name:
            self._container.close()
            raise InputError(f"input {self.path}: its video codec is not supported by this FFmpeg build")
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        self.fps = Fraction(rate) if rate else Fraction(DEFAULT_FPS)
        if not 0 < self.fps <= 240:
            self.fps = Fraction(DEFAULT_FPS)
        self.frames_hint = int(self._stream.frames or 0) or None

    def frames(self, width: int, height: int) -> Iterator[np.ndarray]:
        try:
            for frame in self._container.decode(self._stream):
                yield shape_frame(frame, width, height)
        except av.error.FFmpegError as err:
            raise InputError(f"cannot decode {self.path}: corrupt video data ({_why(err)})") from None
        finally:
            self.close()

    def close(self) -> None:
        self._container.close()


def _why(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err).splitlines()[0]
