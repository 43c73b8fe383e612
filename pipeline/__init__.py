"""The single-process StreamPipeline (the reference output and the offline mode) and ``rheo run``'s file path.

Names are imported lazily, so ``pipeline.offline``'s input checks run before torch and the models load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "PipelineConfig",
    "PipelineError",
    "PromptMode",
    "StreamPipeline",
    "StreamSpec",
    "StreamState",
    "segment_seed",
]

_WHERE = {
    "PipelineConfig": "pipeline.pipeline",
    "PipelineError": "pipeline.pipeline",
    "PromptMode": "pipeline.pipeline",
    "StreamPipeline": "pipeline.pipeline",
    "StreamSpec": "pipeline.state",
    "StreamState": "pipeline.state",
    "segment_seed": "pipeline.state",
}

if TYPE_CHECKING:
    from pipeline.pipeline import PipelineConfig, PipelineError, PromptMode, StreamPipeline
    from pipeline.state import StreamSpec, StreamState, segment_seed


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
