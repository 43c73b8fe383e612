"""Pipeline tests: the tiny random preset on CPU (64×64), real PyAV files; keep them to the 2 cores CI has."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support.pipekit import write_clip

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 2-second clip: 24 frames at 12 fps, 96×80."""
    return write_clip(tmp_path_factory.mktemp("clips") / "in.mp4")
