"""Rate-limited logging of drops: a flood of drops writes a few lines, never one line per drop.

One ``DropLog`` per scope (a stream in ingest, a subscription's channel on the bus). Per reason, the first drop is
logged at once with its detail; later ones are summed and logged as one line per reason at most every
``interval_s`` ("stream X: 37 chunks dropped (queue_overflow) in the last 10 s (latest: ...)"). Inside a running
event loop a pending summary is also written when its interval is up, so the count suppressed by the last drops of
a burst is not held back until the next drop. The exact counts belong in metrics; this is for the reader of logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DropLog"]


@dataclass
class _Pending:
    count: int = 0
    since: float = 0.0
    latest: str = ""


class DropLog:
    """Rate-limited drop logging for one scope (``scope`` starts every line; ``noun`` names what is dropped,
    ``verb`` what happened to it: RTMP connections are "closed")."""

    def __init__(self, scope: str, *, noun: str = "chunk", verb: str = "dropped", logger: logging.Logger | None = None,
                 interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.scope, self.noun, self.verb, self.interval_s, self.clock = scope, noun, verb, interval_s, clock
        self.log = logger or logging.getLogger("rheo.drops")
        self._logged: dict[str, float] = {}  # reason → when its last line was written
        self._pending: dict[str, _Pending] = {}
        self._timer: asyncio.TimerHandle | None = None

    def note(self, reason: str, detail: str, n: int = 1) -> bool:
        """Count ``n`` drops; True when this call wrote the detail line (the first drop of ``reason``)."""
        now = self.clock()
        last = self._logged.get(reason)
        if last is None:
            self._logged[reason] = now
            self.log.warning("%s: %s %s (%s): %s", self.scope,
                             f"a {self.noun}" if n == 1 else f"{n} {self.noun}s", self.verb, reason, detail)
            return True
        pending = self._pending.setdefault(reason, _Pending(since=last))
        pending.count += n
        pending.latest = detail
        if now - last >= self.interval_s:
            self._summary(reason, now)
        elif self._timer is None:
            self._arm(self.interval_s - (now - last))
        return False

    def flush(self, force: bool = False) -> None:
        """Log the summaries that are due (all of them with ``force``: the scope ends)."""
        now = self.clock()
        for reason in list(self._pending):
            if force or now - self._logged[reason] >= self.interval_s:
                self._summary(reason, now)

    def _arm(self, delay_s: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a unit test's clock): the owner's flush() writes it
            return
        self._timer = loop.call_later(max(delay_s, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()
        if self._pending:  # not due by this clock yet
            self._arm(self.interval_s)

    def _summary(self, reason: str, now: float) -> None:
        pending = self._pending.pop(reason)
        self._logged[reason] = now
        self.log.warning("%s: %d %ss %s (%s) in the last %.0f s (latest: %s)", self.scope,
                         pending.count, self.noun, self.verb, reason, now - pending.since, pending.latest)
