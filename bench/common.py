"""What every benchmark shares: percentiles and the commit a result was measured at."""

from __future__ import annotations

import subprocess


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in [0, 100])."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def git_commit() -> str:
    """Short hash of HEAD (``unknown`` outside a checkout), stamped on every result line."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
