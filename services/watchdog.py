"""What ``/healthz`` checks beyond "the HTTP server answers": the event loop turns on time and no unit of work
(a DiT micro-step, a VAE encode or decode) has been busy far longer than it may be.

A wedged service (a forward stuck in a driver call, a loop starved by a blocking call) still answers TCP, so a
liveness probe that only reaches the HTTP server never restarts it. Workers mark their work with ``busy()`` (or
``watch()`` around a function run in an executor); idle is never stuck. A periodic task measures how late the loop
wakes (``run_lag_probe``). Both limits come from ``lifecycle.*``; Kubernetes restarts the pod after the probe's
``failureThreshold`` failures (docs/supervision.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

from services.workmeter import WorkMeter

P = ParamSpec("P")
T = TypeVar("T")


class Watchdog:
    """Busy units of work and the event loop's lag; ``problems()`` names whatever is stuck (empty: healthy)."""

    def __init__(self, work_limit_s: float, lag_limit_s: float, lag_interval_s: float = 0.5,
                 lag_window_s: float = 5.0, meter: WorkMeter | None = None) -> None:
        self.meter = meter
        """Where a finished call's time goes when it says how much work it did (``mpx``): admission's costs."""
        self.work_limit_s = work_limit_s
        self.lag_limit_s = lag_limit_s
        self.lag_interval_s = lag_interval_s
        self.lag_window_s = lag_window_s  # a probe sees the worst lag of this window, not only the last wake-up
        self._lags: deque[tuple[float, float]] = deque()  # (when, how late) of the lag probe's recent wake-ups
        self._last_tick: float | None = None  # when the lag probe last woke (None: not running)
        self._busy: dict[int, tuple[str, float, float]] = {}  # token → (unit, since, limit)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # units run in executor threads

    @contextlib.contextmanager
    def busy(self, unit: str, limit_s: float | None = None, mpx: float = 0.0) -> Iterator[None]:
        """Mark ``unit`` (a code constant: it names the problem and labels a metric) busy for the block; stuck once
        it has been busy longer than ``limit_s`` (default ``work_limit_s``). Thread-safe, re-entrant per call.
        ``mpx``: the model-size megapixel-frames the call processes; its time then also goes to ``meter``."""
        token = next(self._ids)
        started = time.monotonic()
        with self._lock:
            self._busy[token] = (unit, started, self.work_limit_s if limit_s is None else limit_s)
        try:
            yield
            if self.meter is not None and mpx > 0:
                self.meter.record(unit, mpx, time.monotonic() - started)
        finally:
            with self._lock:
                del self._busy[token]

    def watch(self, unit: str, fn: Callable[P, T], limit_s: float | None = None, mpx: float = 0.0) -> Callable[P, T]:
        """``fn`` wrapped in ``busy(unit)``: for ``run_in_executor``/``to_thread``, so the time a call waits in the
        executor's queue behind others does not count as busy."""

        def run(*args: P.args, **kwargs: P.kwargs) -> T:
            with self.busy(unit, limit_s, mpx):
                return fn(*args, **kwargs)

        return run

    def busy_ages(self) -> dict[str, float]:
        """The oldest in-flight call of each busy unit: seconds busy so far."""
        now = time.monotonic()
        ages: dict[str, float] = {}
        with self._lock:
            for unit, since, _ in self._busy.values():
                ages[unit] = max(ages.get(unit, 0.0), now - since)
        return ages

    def loop_lag(self) -> float:
        """The loop's lag: the worst wake-up of the last ``lag_window_s``, or how overdue the probe is now (a loop
        blocked right now has not let the probe measure it yet)."""
        if self._last_tick is None:
            return 0.0
        now = time.monotonic()
        recent = [lag for at, lag in list(self._lags) if now - at <= self.lag_window_s]
        return max([now - self._last_tick - self.lag_interval_s, *recent])

    def problems(self) -> list[str]:
        """What is stuck, one phrase each; empty when healthy."""
        now = time.monotonic()
        found: list[str] = []
        with self._lock:
            entries = list(self._busy.values())
        for unit, since, limit in sorted(entries, key=lambda e: e[1]):
            if now - since > limit:
                found.append(f"{unit} busy for {now - since:.1f}s (limit {limit:g}s)")
        lag = self.loop_lag()
        if lag > self.lag_limit_s:
            found.append(f"event loop lagging {lag:.1f}s (limit {self.lag_limit_s:g}s)")
        return found

    async def run_lag_probe(self) -> None:
        """Sleep ``lag_interval_s`` again and again; how much later than asked the loop woke is its lag."""
        self._last_tick = time.monotonic()
        try:
            while True:
                await asyncio.sleep(self.lag_interval_s)
                now = time.monotonic()
                self._lags.append((now, max(0.0, now - self._last_tick - self.lag_interval_s)))
                while self._lags and now - self._lags[0][0] > self.lag_window_s:
                    self._lags.popleft()
                self._last_tick = now
        finally:
            self._last_tick = None
