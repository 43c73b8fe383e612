"""What blocks and stages cost, estimated from the stages' ``StageStats``.

A stage reports, per owned block, the mean time per micro-step. That time is the stage's speed (its GPU, its
clocks, a noisy neighbour) times the block's intrinsic cost; one epoch cannot tell the two apart, since every
block is measured by one stage only. The estimate is a least-squares fit in log space,
``log m[s, b] = log speed[s] + log cost[b]``, over an EWMA per (stage, block) with three rules:

- only windows that ran micro-steps (``micro_steps > 0``) and belong to the current epoch update the EWMAs, from
  each stage's second window of the epoch on (its first may mix micro-steps of the previous range);
  observations from earlier epochs stay, with a lower weight, and are what separates speed from cost once blocks
  have moved between stages;
- a weak prior pulls block costs towards each other (Wan's blocks are identical in shape), so within one epoch a
  stage that is slow on all its blocks is a slow stage, not a stage of expensive blocks;
- the geometric mean of the observed stages' speeds is 1 (the fit's free scale).

Costs are per micro-step at the load the stages ran; all stages run the same micro-steps, so they compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from proto import StageStats

__all__ = ["CostEstimate", "CostModel", "StageReport"]


@dataclass
class _Ewma:
    value: float
    epoch: int

    def update(self, x: float, epoch: int, alpha: float) -> None:
        if epoch != self.epoch:
            self.value, self.epoch = x, epoch
        else:
            self.value += alpha * (x - self.value)


@dataclass
class StageReport:
    """The latest current-epoch facts about one stage."""

    stage_id: str
    epoch: int
    block_start: int
    block_end: int
    at: float
    step_ms: float
    """Measured time per micro-step: its blocks plus its extra work (EWMA)."""
    batch_items: float
    extra_ms: float
    kv_bytes: int
    free_memory_bytes: int
    fits: tuple[tuple[float, float, int], ...] = ()
    """The stage's fitted micro-step times (a ms, b ms, items), one per grid it ran (``StageStats.latency_fits``)."""


@dataclass(frozen=True)
class CostEstimate:
    block_ms: list[float]
    speed: dict[str, float]
    first_extra_ms: float
    last_extra_ms: float


@dataclass
class CostModel:
    num_blocks: int
    alpha: float = 0.5
    stale_weight: float = 0.2
    prior_weight: float = 0.05
    _obs: dict[tuple[str, int], _Ewma] = field(default_factory=dict)
    _extra: dict[str, tuple[str, _Ewma]] = field(default_factory=dict)  # "first"/"last" → (stage, ms)
    reports: dict[str, StageReport] = field(default_factory=dict)
    ignored: int = 0
    _labelled: dict[str, int] = field(default_factory=dict)  # stage → epoch of its last window

    def observe(self, stats: StageStats, epoch: int, now: float, *, first: bool, last: bool) -> bool:
        """Take one stats window; False (ignored) when it is idle, of another epoch, inconsistent, or the first a
        stage labels with a new epoch (it may straddle the change: micro-steps of the old range, reported against
        the new one)."""
        n = stats.block_end - stats.block_start
        straddles = self._labelled.get(stats.stage_id) != stats.epoch
        self._labelled[stats.stage_id] = stats.epoch
        if (straddles or stats.epoch != epoch or stats.micro_steps <= 0 or n <= 0 or len(stats.block_ms) != n
                or stats.block_end > self.num_blocks
                or not all(math.isfinite(x) and x > 0 for x in stats.block_ms)
                or not math.isfinite(stats.extra_ms) or stats.extra_ms < 0):
            self.ignored += 1
            return False
        sid = stats.stage_id
        for b, ms in zip(range(stats.block_start, stats.block_end), stats.block_ms, strict=True):
            e = self._obs.get((sid, b))
            if e is None:
                self._obs[(sid, b)] = _Ewma(ms, epoch)
            else:
                e.update(ms, epoch, self.alpha)
        for role, is_role in (("first", first), ("last", last)):
            if not is_role:
                continue
            prev = self._extra.get(role)
            if prev is None or prev[0] != sid:
                self._extra[role] = (sid, _Ewma(stats.extra_ms, epoch))
            else:
                prev[1].update(stats.extra_ms, epoch, self.alpha)
        step_ms = sum(self._obs[(sid, b)].value for b in range(stats.block_start, stats.block_end)) + stats.extra_ms
        old = self.reports.get(sid)
        if old is not None and old.epoch == epoch and (old.block_start, old.block_end) == (stats.block_start,
                                                                                            stats.block_end):
            batch = old.batch_items + self.alpha * (stats.batch_items - old.batch_items)
        else:
            batch = stats.batch_items
        self.reports[sid] = StageReport(sid, epoch, stats.block_start, stats.block_end, now, step_ms, batch,
                                        stats.extra_ms, sum(stats.kv_bytes.values()), stats.free_memory_bytes,
                                        tuple((f.a_ms, f.b_ms, f.items) for f in stats.latency_fits))
        return True

    def fresh(self, stage_ids: list[str], epoch: int, now: float, max_age_s: float) -> bool:
        """Every stage has reported a busy window of this epoch within ``max_age_s``."""
        return all((r := self.reports.get(s)) is not None and r.epoch == epoch and now - r.at <= max_age_s
                   for s in stage_ids)

    def estimate(self, epoch: int) -> CostEstimate | None:
        """Block costs (ms at speed 1) and stage speeds; None before any observation."""
        if not self._obs:
            return None
        stages = sorted({s for s, _ in self._obs})
        si = {s: i for i, s in enumerate(stages)}
        ns, nb = len(stages), self.num_blocks
        rows: list[np.ndarray] = []
        rhs: list[float] = []
        for (s, b), e in self._obs.items():
            w = math.sqrt(1.0 if e.epoch == epoch else self.stale_weight)
            row = np.zeros(ns + nb)
            row[si[s]] = w
            row[ns + b] = w
            rows.append(row)
            rhs.append(w * math.log(e.value))
        pw = math.sqrt(self.prior_weight)
        for b in range(nb):  # cost[b] towards the mean cost
            row = np.full(ns + nb, 0.0)
            row[ns:] = -pw / nb
            row[ns + b] += pw
            rows.append(row)
            rhs.append(0.0)
        gauge = np.zeros(ns + nb)  # mean log speed = 0
        gauge[:ns] = 10.0 / ns
        rows.append(gauge)
        rhs.append(0.0)
        sol, *_ = np.linalg.lstsq(np.vstack(rows), np.array(rhs), rcond=None)
        speed = {s: float(math.exp(sol[si[s]])) for s in stages}
        block_ms = [float(math.exp(x)) for x in sol[ns:]]
        extras = {}
        for role in ("first", "last"):
            got = self._extra.get(role)
            extras[role] = got[1].value / speed.get(got[0], 1.0) if got is not None else 0.0
        return CostEstimate(block_ms, speed, extras["first"], extras["last"])
