"""Frame shaping: any source frame → a model-size RGB array (scale to cover, centre-crop; aspect kept).

Used by ingest's pacer (``ingest.pacing``) and by the offline file path (``pipeline.offline``).
"""

from __future__ import annotations

import math

import av
import numpy as np

__all__ = ["shape_frame"]


def shape_frame(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """RGB ``[height, width, 3]`` uint8: scale to cover the target, then centre-crop (aspect kept)."""
    fw, fh = frame.width, frame.height
    if (fw, fh) == (width, height):
        return frame.to_ndarray(format="rgb24")
    scale = max(width / fw, height / fh)
    sw, sh = max(width, math.ceil(fw * scale - 1e-6)), max(height, math.ceil(fh * scale - 1e-6))
    rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="BILINEAR").to_ndarray()
    y0, x0 = (sh - height) // 2, (sw - width) // 2
    return np.ascontiguousarray(rgb[y0 : y0 + height, x0 : x0 + width])
