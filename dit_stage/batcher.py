"""The first stage's micro-step selection: which queued items run next, and how many (docs/scheduling.md).

Pure (no I/O, no torch): the worker hands it the heads of its queues as ``Candidate``s and a ``LatencyModel`` fitted
from its own measured micro-steps; ``select`` returns the items to run and those that cannot make their deadline
even if run now (the caller drops them before they cost compute). Two policies:

* ``greedy`` — the oldest item by capture time fixes the grid signature; the oldest items of it, up to the cap.
* ``slo`` — earliest *effective* deadline first (the chunk's deadline minus the modelled time of the ring
  traversals it still needs after this one), one signature per forward (the group whose most urgent item is most
  urgent), and the batch size at the knee: the largest n whose modelled duration still lets every chosen item and
  every item left waiting meet its deadline (checked exactly per signature by a small dynamic programme over the
  waiting items in EDF order). Before the model has data for a signature it behaves like greedy's batch size and
  drops nothing on a guess.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["BatcherPolicy", "Candidate", "LatencyModel", "Selection", "select"]

BatcherPolicy = Literal["slo", "greedy"]

MIN_SAMPLES = 2
"""Micro-steps of a signature measured before its fit is used (fewer: the model says nothing)."""


@dataclass(frozen=True)
class Candidate:
    """One queued item at the head of its queue, as the batcher sees it."""

    signature: Hashable  # items of one signature share one forward (one grid)
    deadline: float  # the chunk's deadline (the clock of ``now``)
    traversals: int = 1  # ring traversals the item still needs, this one included
    age: tuple[float, ...] = ()  # greedy's order: older first (capture time, seq, −step)
    exempt: bool = False  # runs however late (a prepare chunk, a replay, a clean pass): never infeasible


@dataclass
class Selection:
    """Indices into the candidates: the micro-step's items, and the items to drop as ``deadline_infeasible``."""

    take: list[int] = field(default_factory=list)
    infeasible: list[int] = field(default_factory=list)


class LatencyModel:
    """L(n, signature): a first-stage micro-step's duration, least squares of a + b·n over the last ``window``
    measured micro-steps of that signature; plus the rest of a ring traversal (the other stages and the links),
    the median of the last ``hop_window`` measured round trips minus L, with the prior ``(ring_scale − 1)·L``
    (stages of similar cost). A median, not a mean: a trip during which a later stage captured a CUDA graph takes
    seconds, and a mean would price the next trips infeasible, whose drops then bring no trips to correct it."""

    def __init__(self, window: int = 64, ring_scale: float = 1.0, hop_window: int = 9) -> None:
        self.window = window
        self.ring_scale = ring_scale  # the ring's blocks / this stage's blocks (the worker keeps it current)
        self.hop_window = hop_window
        self._points: dict[Hashable, collections.deque[tuple[int, float]]] = {}
        self._fits: dict[Hashable, tuple[float, float] | None] = {}
        self._hops: dict[Hashable, collections.deque[float]] = {}

    def observe(self, sig: Hashable, n: int, seconds: float) -> None:
        """A micro-step of ``n`` items of ``sig`` took ``seconds`` at this stage."""
        pts = self._points.setdefault(sig, collections.deque(maxlen=self.window))
        pts.append((n, seconds))
        self._fits[sig] = _fit(pts)

    def observe_round_trip(self, sig: Hashable, n: int, seconds: float) -> None:
        """An item taken in a micro-step of ``n`` items came back ``seconds`` after it was taken."""
        d = self.duration(sig, n)
        if d is None:
            return
        self._hops.setdefault(sig, collections.deque(maxlen=self.hop_window)).append(max(0.0, seconds - d))

    def coefficients(self, sig: Hashable) -> tuple[float, float] | None:
        """(a, b) of the fit, or None before ``MIN_SAMPLES`` measurements."""
        return self._fits.get(sig)

    def fits(self, limit: int = 8) -> list[tuple[Hashable, float, float, int]]:
        """(signature, a, b, items in its window) of every fitted signature, the most measured first (at most
        ``limit``): what a stage reports in its ``StageStats`` for the controller to price its ring with (the items
        say the mix of grids; docs/scheduling.md)."""
        fitted = [(sig, fit) for sig, fit in self._fits.items() if fit is not None]
        fitted.sort(key=lambda x: -len(self._points[x[0]]))
        return [(sig, a, b, sum(n for n, _ in self._points[sig])) for sig, (a, b) in fitted[:limit]]

    def duration(self, sig: Hashable, n: int) -> float | None:
        fit = self._fits.get(sig)
        return None if fit is None else fit[0] + fit[1] * n

    def traversal(self, sig: Hashable, n: int) -> float | None:
        """One item's trip round the ring in a micro-step of ``n``: this stage's L(n) and the rest of the ring."""
        d = self.duration(sig, n)
        if d is None:
            return None
        hops = self._hops.get(sig)
        return d + (statistics.median(hops) if hops else max(0.0, self.ring_scale - 1.0) * d)


def _fit(pts: Sequence[tuple[int, float]]) -> tuple[float, float] | None:
    """a, b ≥ 0 of t ≈ a + b·n. One batch size only: t ∝ n (a = 0), which never under-estimates a larger batch
    and never over-estimates a smaller one (so nothing is dropped on a guess)."""
    if len(pts) < MIN_SAMPLES:
        return None
    k = len(pts)
    mn = sum(n for n, _ in pts) / k
    mt = sum(t for _, t in pts) / k
    var = sum((n - mn) ** 2 for n, _ in pts)
    if var == 0:
        return 0.0, mt / mn
    b = sum((n - mn) * (t - mt) for n, t in pts) / var
    a = mt - b * mn
    if b < 0:
        return mt, 0.0
    if a < 0:
        return 0.0, sum(n * t for n, t in pts) / sum(n * n for n, _ in pts)
    return a, b


def select(policy: BatcherPolicy, cands: Sequence[Candidate], model: LatencyModel, now: float,
           max_items: int) -> Selection:
    """The next micro-step's items (indices into ``cands``, all of one signature) and the infeasible ones."""
    if not cands:
        return Selection()
    if policy == "greedy":
        return _greedy(cands, max_items)
    if policy != "slo":
        raise ValueError(f"unknown batcher policy {policy!r}")
    return _slo(cands, model, now, max_items)


def _greedy(cands: Sequence[Candidate], max_items: int) -> Selection:
    order = sorted(range(len(cands)), key=lambda i: cands[i].age)
    sig = cands[order[0]].signature
    return Selection([i for i in order if cands[i].signature == sig][:max_items])


def _slo(cands: Sequence[Candidate], model: LatencyModel, now: float, max_items: int) -> Selection:
    due: dict[int, float] = {}  # when this item's micro-step must be over, at the latest
    infeasible: list[int] = []
    for i, c in enumerate(cands):
        one = model.traversal(c.signature, 1)
        if one is None:  # no data yet: order by deadline, drop nothing
            due[i] = c.deadline
            continue
        due[i] = c.deadline - (c.traversals - 1) * one - (one - _dur(model, c.signature, 1))
        if not c.exempt and now + _dur(model, c.signature, 1) > due[i]:
            infeasible.append(i)  # even alone, now, and alone on every later trip, it would be late
    live = sorted((i for i in due if i not in infeasible), key=lambda i: (due[i], cands[i].age))
    if not live:
        return Selection([], infeasible)
    sig = cands[live[0]].signature
    group = [i for i in live if cands[i].signature == sig][:max_items]
    if model.duration(sig, 1) is None:
        return Selection(group, infeasible)
    for n in range(len(group), 0, -1):
        if _feasible(group[:n], [i for i in live if i not in group[:n]], cands, due, model, now, max_items):
            return Selection(group[:n], infeasible)
    # some deadline is lost whatever runs: serve the most urgent with the largest batch they all still meet
    n = max((n for n in range(1, len(group) + 1) if now + _dur(model, sig, n) <= min(due[i] for i in group[:n])),
            default=1)
    return Selection(group[:n], infeasible)


def _dur(model: LatencyModel, sig: Hashable, n: int) -> float:
    d = model.duration(sig, n)
    return 0.0 if d is None else d


def _feasible(chosen: list[int], waiting: list[int], cands: Sequence[Candidate], due: dict[int, float],
              model: LatencyModel, now: float, max_items: int) -> bool:
    """Whether, after a micro-step of ``chosen``, every item still makes its deadline: the chosen ones at its end,
    the waiting ones (per signature, EDF order, exempt ones ignored) in some sequence of later micro-steps."""
    t0 = now + _dur(model, cands[chosen[0]].signature, len(chosen))
    if any(t0 > due[i] for i in chosen if not cands[i].exempt):
        return False
    by_sig: dict[Hashable, list[float]] = {}
    for i in waiting:
        if not cands[i].exempt:
            by_sig.setdefault(cands[i].signature, []).append(due[i])
    return all(_schedulable(sorted(d), sig, model, t0, max_items) for sig, d in by_sig.items())


def _schedulable(dues: list[float], sig: Hashable, model: LatencyModel, t0: float, max_items: int) -> bool:
    """Whether items with these due times (ascending) can all run from ``t0`` on, in consecutive micro-steps of at
    most ``max_items`` (with the same release time, batches of consecutive EDF items are optimal)."""
    if model.duration(sig, 1) is None:
        return True
    best = [math.inf] * (len(dues) + 1)  # best[j]: earliest end of a schedule of the first j items
    best[0] = t0
    for j in range(1, len(dues) + 1):
        for i in range(max(0, j - max_items), j):
            end = best[i] + _dur(model, sig, j - i)
            if end <= dues[i] and end < best[j]:  # dues[i]: the batch's most urgent item
                best[j] = end
    return best[-1] < math.inf
