"""What a unit of model work costs, measured where it runs: the admission input for the VAE encode and decode.

A service times each call of a unit with the megapixel-frames it processed: the watchdog's ``busy(unit, mpx=…)``
around a VAE encode of a chunk, say (services/watchdog.py), or ``measure`` here. The cost per megapixel-frame is
an EWMA of those calls, seeded by the service's warm-up (so the first stream is judged by a real measurement of
this machine, not a guess). Heartbeats carry it to the controller (``Heartbeat.work``), which admits a stream only
while every bottleneck holds (services/controller/policy.py). Costs scale with pixels to first order: a VAE's work
is per pixel; per-call overhead makes small frames look dearer, so the seed is measured at a size where it does not
(``seed_size``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from proto import WorkCost

__all__ = ["WorkMeter", "seed_size"]

SMALL_SEED = (64, 64)


def seed_size(device_type: str, stream_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the warm-up call that seeds a VAE's cost: the default stream size on an accelerator,
    where a small call is nearly all launch overhead (a 64² Wan VAE encode on a GPU costs about what a 512² one
    does, so per megapixel it would price a 512² stream many times too dear, admission would refuse it, and a
    refused stream never brings the measurement that corrects it); 64² on a CPU, whose cost is per pixel (and where
    a 512² warm-up of even the tiny VAE takes seconds)."""
    return stream_size if device_type != "cpu" else SMALL_SEED


class WorkMeter:
    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._cost: dict[str, float] = {}  # unit → ms per megapixel-frame (EWMA)
        self._busy: dict[str, float] = {}  # unit → seconds busy since the last report
        self._since = time.monotonic()
        self._lock = threading.Lock()  # calls run in model threads

    @contextlib.contextmanager
    def measure(self, unit: str, mpx: float) -> Iterator[None]:
        """Time the block as one call of ``unit`` over ``mpx`` megapixel-frames (a failed call is not counted)."""
        started = time.perf_counter()
        yield
        self.record(unit, mpx, time.perf_counter() - started)

    def record(self, unit: str, mpx: float, seconds: float) -> None:
        with self._lock:
            self._busy[unit] = self._busy.get(unit, 0.0) + seconds
            if mpx <= 0:
                return
            ms = seconds * 1000.0 / mpx
            old = self._cost.get(unit)
            self._cost[unit] = ms if old is None else old + self.alpha * (ms - old)

    def report(self) -> list[WorkCost]:
        """Every unit's cost, and how busy it was since the last report (what a heartbeat carries)."""
        now = time.monotonic()
        with self._lock:
            window = max(now - self._since, 1e-6)
            out = [WorkCost(unit=u, ms_per_mpx=round(c, 4), busy=round(self._busy.get(u, 0.0) / window, 4))
                   for u, c in sorted(self._cost.items())]
            self._busy.clear()
            self._since = now
        return out
