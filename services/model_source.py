"""Where a service's models come from: weights on disk, the tiny random preset, or random weights at a real preset.

Random weights at 1.3B/14B (``model.random_weights``) let the GPU suite and ``bench/serve.py`` serve the real model
sizes without ``MODEL_DIR``: every timing is the real one, the output is noise. They are an explicit opt-in (a
real preset without weights and without it is refused at start) and logged loudly by every service that builds
them. One rule for every service: ingest (VAE encode, prompt embeddings), each DiT stage, the decoder.
"""

from __future__ import annotations

import logging
from typing import Literal

from services.config import ModelSettings
from services.runtime import ServiceStartError

__all__ = ["ModelSource", "model_source"]

log = logging.getLogger("rheo.models")

ModelSource = Literal["weights", "tiny", "random"]


def model_source(model: ModelSettings, who: str) -> ModelSource:
    """``weights`` (``model.model_dir``), ``tiny`` (no weights, the tiny preset) or ``random`` (no weights, a real
    preset, ``model.random_weights`` set: logged as a warning banner naming ``who``). A real preset with neither
    raises ``ServiceStartError``."""
    if model.model_dir is not None:
        return "weights"
    if model.preset == "tiny":
        return "tiny"
    if not model.random_weights:
        raise ServiceStartError(
            f"{who}: model.preset is {model.preset!r} but no model.model_dir is set; set model.model_dir (README, "
            "'Model weights'), or model.random_weights: true to serve RANDOM weights (benchmarks only)")
    log.warning("%s\n*  %s: RANDOM WEIGHTS at preset %s (model.random_weights): timings are real, the output is "
                "noise. Benchmarks only.\n%s", "*" * 78, who, model.preset, "*" * 78)
    return "random"
