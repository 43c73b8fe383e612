"""End-to-end liveness of one stream, as a pure state machine: what ingest published against what the decoder
decoded (``StreamOutput``), and when to repair (docs/recovery.md, Liveness).

Ingest is where a stream can be repaired: it owns the chunk source, and a new warm-up segment (a prepare chunk)
recreates the stream's state on every stage and in the decoder, whatever wedged it. So ingest watches the output:

- **live**: every chunk published more than ``stall_s`` ago has been followed by styled output;
- **recovering**: a chunk published ``stall_s`` ago has seen no output since: the stream is repaired (a new
  segment) and given ``stall_s`` again; the state says why;
- **failed**: ``max_repairs`` repairs in a row brought no output back. The stream is still repaired, every
  ``failed_retry_s``, because the cause may go away (a restarted decoder): output coming back makes it live again;
- **degraded**: output flows, but under ``degraded_ratio`` of the chunks published in the last ``window_s`` came
  out (drops downstream: deadlines, a slow stage).

A stream whose input stops is not stalled (nothing was published that could come out). Time is passed in, so the
rules are unit-tested without clocks (``tests/pipeline_services/test_liveness.py``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Health", "LivenessPolicy", "StreamLiveness", "stall_bound_s"]

HealthState = Literal["live", "recovering", "degraded", "failed"]


def stall_bound_s(slo_s: float, chunk_period_s: float, floor_s: float) -> float:
    """How long a published chunk may go without any styled output after it: its latency budget, four chunk
    periods of slack (batching, CFR), and at least ``floor_s`` (a replay after a lost stage takes that long)."""
    return max(floor_s, slo_s + 4 * chunk_period_s)


@dataclass(frozen=True)
class LivenessPolicy:
    stall_s: float
    max_repairs: int = 3
    failed_retry_s: float = 30.0
    window_s: float = 10.0
    degraded_ratio: float = 0.5


@dataclass(frozen=True)
class Health:
    """What the stream's state is and why; ``repair``: cut a new warm-up segment now."""

    state: HealthState
    reason: str = ""
    repair: bool = False


@dataclass
class StreamLiveness:
    policy: LivenessPolicy
    started_at: float
    state: HealthState = "live"
    reason: str = ""
    repairs: int = 0
    """Repairs since output last flowed."""
    repairs_total: int = 0
    last_output_at: float | None = None
    last_output_seq: int = -1
    _waiting_since: float | None = None  # the first chunk published and not yet followed by output
    _repaired_at: float | None = None
    _next_repair_at: float = 0.0
    _published: collections.deque[float] = field(default_factory=collections.deque)
    _decoded: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def published(self, now: float) -> None:
        """A chunk went out to the DiT."""
        if self._waiting_since is None:
            self._waiting_since = now
        self._published.append(now)

    def output(self, seq: int, decoded: int, now: float) -> None:
        """The decoder reports chunk ``seq`` decoded (``decoded``: its running count for this stream, which starts
        again when the decoder restarts)."""
        if self._decoded and decoded < self._decoded[-1][1]:
            self._decoded.clear()  # a new decoder: its count starts over
        self.last_output_at, self.last_output_seq = now, seq
        self._waiting_since = None
        self._decoded.append((now, decoded))

    def check(self, now: float) -> Health:
        """The state now; ``repair``: at most once per ``stall_s`` of published chunks (``failed_retry_s`` apart
        once failed)."""
        p = self.policy
        self._trim(now)
        waiting = self._waiting_since
        if waiting is not None and now - waiting > p.stall_s and now >= self._next_repair_at:
            return self._repair(now)
        repaired = self._repaired_at
        if self.state in ("recovering", "failed") and (
                self.last_output_at is None or (repaired is not None and self.last_output_at < repaired)):
            return Health(self.state, self.reason)  # the repair has not been answered yet
        if self.last_output_at is None:
            return Health(self.state, self.reason)  # warming up: nothing can have come out yet
        self.repairs = 0
        ratio = self._ratio(now)
        if ratio is not None and ratio < p.degraded_ratio:
            return self._set("degraded", f"only {ratio:.0%} of the chunks published in the last {p.window_s:.0f} s "
                                         "came out (dropped downstream: see the stages' and decoder's drop counts)")
        return self._set("live", "")

    def stage_lost(self, now: float) -> Health | None:
        """The first DiT stage says it has no state for this stream (``Error(code="unprepared")``: it joined late,
        its prepare chunk was lost): repair now, unless a repair is already on its way (unanswered by output, and
        less than half a stall bound old: the time its prepare chunk needs to get there)."""
        last = self._repaired_at
        if last is not None and now - last < self.policy.stall_s / 2 and (
                self.last_output_at is None or self.last_output_at < last):
            return None
        return self.repaired(now, "the first DiT stage has no state for this stream (its prepare chunk was lost): a "
                                  "new warm-up segment")

    def repaired(self, now: float, reason: str) -> Health:
        """A repair decided outside this machine (the stage lost the stream, the stream moved to another ring):
        recovering until output answers it, then live again like any repair."""
        self._waiting_since, self._repaired_at = None, now
        self.repairs_total += 1
        return self._set("recovering", reason, repair=True)

    def _repair(self, now: float) -> Health:
        p = self.policy
        quiet = now - (self.last_output_at if self.last_output_at is not None else self.started_at)
        self.repairs += 1
        self.repairs_total += 1
        self._waiting_since, self._repaired_at = None, now
        failed = self.repairs > p.max_repairs
        self._next_repair_at = now + (p.failed_retry_s if failed else 0.0)
        if failed:
            return self._set("failed", f"no styled output for {quiet:.0f} s after {self.repairs - 1} repairs (a new "
                                       "warm-up segment each): chunks are published but none comes back decoded; "
                                       "still retrying", repair=True)
        what = "no styled output yet" if self.last_output_at is None else "styled output stopped"
        return self._set("recovering", f"{what} ({quiet:.0f} s while chunks were published): repair "
                                       f"{self.repairs} of {p.max_repairs}, a new warm-up segment", repair=True)

    def _set(self, state: HealthState, reason: str, repair: bool = False) -> Health:
        self.state, self.reason = state, reason
        return Health(state, reason, repair)

    def _trim(self, now: float) -> None:
        horizon = now - self.policy.window_s
        while self._published and self._published[0] < horizon:
            self._published.popleft()
        while len(self._decoded) > 1 and self._decoded[1][0] < horizon:
            self._decoded.popleft()

    def _ratio(self, now: float) -> float | None:
        """Chunks decoded / published over the window (None until a whole window of output is there)."""
        if len(self._decoded) < 2 or now - self._decoded[0][0] < self.policy.window_s / 2:
            return None
        (t0, d0), (_, d1) = self._decoded[0], self._decoded[-1]
        published = sum(1 for t in self._published if t >= t0)
        return (d1 - d0) / published if published >= 4 else None
