"""What every benchmark shares: percentiles, the commit a result was measured at, and stopping its stack when
its time box ends."""

from __future__ import annotations

import os
import signal
import subprocess


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in [0, 100])."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def git_commit() -> str:
    """Short hash of HEAD (``unknown`` outside a checkout), stamped on every result line; ``RHEO_COMMIT`` when set
    (a copy of the tree whose git metadata is not its own: a lent GPU machine's checkout reported a stale HEAD)."""
    if os.environ.get("RHEO_COMMIT"):
        return os.environ["RHEO_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stop_on_sigterm() -> None:
    """SIGTERM (``timeout``, the GPU suite's time box) raises ``SystemExit(143)``, so the bench's ``finally`` stops
    its ``LocalStack``: the services run in process sessions of their own, and a bench killed outright would leave
    them running (on the GPU) beside whatever runs next."""

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
