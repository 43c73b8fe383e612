"""The micro-step batcher (dit_stage/batcher.py): the online fit, EDF + knee against greedy, drops before compute.

The policies are driven by a small discrete simulation of a one-stage ring (``simulate``): items arrive, each
micro-step takes the known L(n) = A + B·n, an item goes round until its steps are done. It calls the same
``select`` the first stage calls, with a ``LatencyModel`` fitted online from the simulated micro-steps.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import pytest
import torch

from dit_stage.batcher import Candidate, LatencyModel, select
from dit_stage.forward import Forward
from dit_stage.micro_step import MicroStep
from dit_stage.worker import StageWorker

from .helpers import chunk_message, latents, prompt, run_ring, workers

A, B = 0.020, 0.005  # the simulated stage: 20 ms per micro-step + 5 ms per item
MAX_ITEMS = 16


def true_duration(n: int) -> float:
    return A + B * n


def known_model(sigs: tuple[object, ...] = ("s",)) -> LatencyModel:
    model = LatencyModel()
    for sig in sigs:
        for n in (1, 4, 9):
            model.observe(sig, n, true_duration(n))
    return model


@dataclass
class Item:
    arrival: float
    deadline: float
    steps: int
    sig: object = "s"
    cls: str = ""
    done: int = 0  # traversals done
    computed: bool = False


@dataclass
class Outcome:
    on_time: dict[str, int] = field(default_factory=dict)
    missed: dict[str, int] = field(default_factory=dict)
    infeasible: int = 0
    late_after_compute: int = 0  # items that cost compute and still missed
    sizes: list[int] = field(default_factory=list)

    def count(self, item: Item, ok: bool) -> None:
        d = self.on_time if ok else self.missed
        d[item.cls] = d.get(item.cls, 0) + 1
        if not ok and item.computed:
            self.late_after_compute += 1


def simulate(policy: str, items: list[Item], model: LatencyModel | None = None) -> Outcome:
    """Run every item to its end (finished, or dropped: past its deadline as the stage drops it, or infeasible)."""
    model = model if model is not None else LatencyModel()
    out = Outcome()
    future = sorted(items, key=lambda it: it.arrival)
    queue: list[Item] = []
    t = 0.0
    while future or queue:
        while future and future[0].arrival <= t:
            queue.append(future.pop(0))
        for it in [it for it in queue if it.deadline <= t]:  # the stage's existing `deadline` drop
            queue.remove(it)
            out.count(it, False)
        if not queue:
            if future:
                t = future[0].arrival
            continue
        cands = [Candidate(it.sig, it.deadline, it.steps - it.done, (it.arrival, it.done)) for it in queue]
        sel = select(policy, cands, model, t, MAX_ITEMS)  # type: ignore[arg-type]
        for i in sel.infeasible:
            out.infeasible += 1
            out.count(queue[i], False)
        taken = [queue[i] for i in sel.take]
        queue = [it for i, it in enumerate(queue) if i not in sel.infeasible and i not in sel.take]
        if not taken:
            continue
        assert len({it.sig for it in taken}) == 1 and len(taken) <= MAX_ITEMS
        dt = true_duration(len(taken))
        t += dt
        model.observe(taken[0].sig, len(taken), dt)
        out.sizes.append(len(taken))
        for it in taken:
            it.done += 1
            it.computed = True
            if it.done == it.steps:
                out.count(it, t <= it.deadline)
            else:
                queue.append(it)
    return out


def test_fit_converges_on_synthetic_timings():
    rng = random.Random(1)
    model = LatencyModel(window=64)
    assert model.duration("s", 4) is None  # no prior guess: nothing is dropped on one
    model.observe("s", 8, 0.06)
    model.observe("s", 8, 0.06)
    assert model.coefficients("s") == pytest.approx((0.0, 0.06 / 8))  # one batch size: t ∝ n
    for _ in range(200):
        n = rng.randint(1, 16)
        model.observe("s", n, true_duration(n) * rng.uniform(0.97, 1.03))
    a, b = model.coefficients("s")  # type: ignore[misc]
    assert a == pytest.approx(A, rel=0.15) and b == pytest.approx(B, rel=0.1)
    assert model.duration("other", 1) is None  # per signature
    for _ in range(64):  # the stage got slower: the window forgets the old timings
        n = rng.randint(1, 16)
        model.observe("s", n, 2 * true_duration(n))
    assert model.duration("s", 10) == pytest.approx(2 * true_duration(10), rel=1e-6)


def test_round_trip_adds_the_rest_of_the_ring():
    model = known_model()
    model.ring_scale = 3.0  # prior: the other two stages cost what this one does
    assert model.traversal("s", 4) == pytest.approx(3 * true_duration(4))
    for _ in range(30):
        model.observe_round_trip("s", 4, true_duration(4) + 0.1)
    assert model.traversal("s", 4) == pytest.approx(true_duration(4) + 0.1, rel=1e-3)


def _feasible_set(rng: random.Random) -> list[Item]:
    """Items released at 0 whose deadlines some schedule of batches meets (a random one, with random slack)."""
    items: list[Item] = []
    t = 0.0
    for _ in range(rng.randint(1, 6)):
        n = rng.randint(1, MAX_ITEMS)
        t += true_duration(n)
        # (1 µs: the fitted model and the simulated clock round differently)
        items += [Item(0.0, t + 1e-6 + rng.choice([0.0, rng.uniform(0, 0.05)]), 1) for _ in range(n)]
    rng.shuffle(items)
    return items


def test_edf_knee_meets_every_feasible_deadline_set_and_greedy_does_not():
    rng = random.Random(7)
    greedy_missed = 0
    for case in range(150):
        items = _feasible_set(rng)
        out = simulate("slo", [Item(it.arrival, it.deadline, 1) for it in items], known_model())
        assert not out.missed and not out.infeasible, f"case {case}: {out}"
        greedy = simulate("greedy", [Item(it.arrival, it.deadline, 1) for it in items], known_model())
        greedy_missed += sum(greedy.missed.values())
    assert greedy_missed > 0  # negative control: the sets are tight enough to tell the policies apart


def _mixed_workload(seed: int) -> list[Item]:
    """Loose streams (2 s SLO) whose chunks arrive in bursts (a catching-up ingest) and tight streams (250 ms)
    at a steady rate, 2 steps each, near the stage's capacity."""
    rng = random.Random(seed)
    items: list[Item] = []
    for _ in range(6):  # loose: 10 chunks every second, all at once
        for burst in range(6):
            t0 = burst + rng.uniform(0, 0.5)
            items += [Item(t0, t0 + 2.0, 2, cls="loose") for _ in range(10)]
    for _ in range(2):  # tight: 10 chunks per second
        off = rng.uniform(0, 0.1)
        items += [Item(off + k / 10, off + k / 10 + 0.25, 2, cls="tight") for k in range(60)]
    return items


def test_edf_knee_beats_greedy_on_mixed_slos():
    slo = simulate("slo", _mixed_workload(3))
    greedy = simulate("greedy", _mixed_workload(3))
    tight_total = sum(d.get("tight", 0) for d in (slo.on_time, slo.missed))
    assert tight_total == 120
    assert slo.missed.get("tight", 0) <= 2, slo
    assert greedy.missed.get("tight", 0) >= 20, greedy  # negative control: oldest-first starves the tight ones
    assert sum(slo.missed.values()) < sum(greedy.missed.values())


def test_infeasible_items_are_dropped_before_compute():
    model = known_model()
    now = 10.0
    cands = [
        Candidate("s", now + 0.5, 1, (1.0,)),
        Candidate("s", now + true_duration(1) / 2, 1, (0.0,)),  # cannot finish even alone, now
        Candidate("s", now + 2 * true_duration(1) / 2, 3, (0.5,)),  # three trips left: cannot either
        Candidate("s", now + 0.001, 1, (0.2,), exempt=True),  # a begun prepare: runs however late
    ]
    sel = select("slo", cands, model, now, MAX_ITEMS)
    assert sorted(sel.infeasible) == [1, 2]
    assert sorted(sel.take) == [0, 3]
    # without data nothing is dropped on a guess
    assert select("slo", cands, LatencyModel(), now, MAX_ITEMS).infeasible == []
    # the simulated stage never spends compute on an item that then misses (feasible workload, model known)
    out = simulate("slo", _mixed_workload(5), known_model())
    assert out.late_after_compute == 0, out


def test_knee_shrinks_the_batch_for_an_urgent_waiting_item():
    """The largest batch whose duration lets the waiting items make it: the most urgent item's group of 16 would
    make a tight item of another signature late; 6 do not (greedy takes all 16)."""
    model = known_model(("big", "small"))
    now = 0.0
    loose = [Candidate("big", now + (true_duration(6) if i == 0 else 1.0), 1, (float(i),)) for i in range(20)]
    tight = Candidate("small", now + true_duration(6) + true_duration(1), 1, (99.0,))
    sel = select("slo", [*loose, tight], model, now, MAX_ITEMS)
    assert len(sel.take) == 6 and 0 in sel.take and 20 not in sel.take
    assert len(select("greedy", [*loose, tight], model, now, MAX_ITEMS).take) == MAX_ITEMS


def _priced_at_30_s(policy: str, zs: list[torch.Tensor], n: int) -> list[StageWorker]:
    """A two-stage ring that ran stream "a"'s first ``n`` chunks, then its first stage's model fed 30 s per item
    for the last two micro-steps (what ComputeLoop reports after each forward)."""
    ring = workers(2, batcher=policy)
    first = ring[0]
    first.add_prompt("a", 0, prompt(3))
    for c in range(n):
        first.add_chunk(chunk_message("a", c, zs[c], seed=3))
    steps = []
    take = first.take

    def record():
        step = take()
        steps.append(step)
        return step

    first.take = record
    assert [g.seq for g in run_ring(ring)] == list(range(n))
    first.take = take
    for step in [s for s in steps if s is not None][-2:]:
        first.measured(step, 30.0 * len(step.items))
    return ring


@pytest.mark.parametrize("policy", ["slo", "greedy"])
def test_worker_drops_an_infeasible_chunk_before_compute(policy):
    """Once the first stage's model says a micro-step takes 30 s, a chunk due in 50 s with 2 ring trips left cannot
    make it: dropped at selection (``deadline_infeasible``), never computed; greedy runs it anyway."""
    zs = latents(5, 6, (4, 6))
    ring = _priced_at_30_s(policy, zs, 4)
    first = ring[0]
    assert first.latency.duration((1, 4, 6), 1) == pytest.approx(30.0)
    now = time.time()
    first.add_chunk(chunk_message("a", 4, zs[4], seed=3, deadline=now + 600))
    first.add_chunk(chunk_message("a", 5, zs[5], seed=3, deadline=now + 50))
    computed: list[tuple[int, int]] = []
    compute = ring[1].compute

    def spy(step):
        computed.extend((m.seq, m.step) for m in step.items)
        return compute(step)

    ring[1].compute = spy
    got = [g.seq for g in run_ring(ring)]
    if policy == "slo":
        assert got == [4] and first.dropped["deadline_infeasible"] == 1
        assert all(seq != 5 for seq, _ in computed)
    else:
        assert got == [4, 5] and not first.dropped["deadline_infeasible"]


def test_a_slow_round_trip_does_not_move_the_rest_of_the_ring():
    """A trip during which a later stage captured a CUDA graph (seconds) leaves T(n) where the others put it."""
    model = known_model()
    for _ in range(5):
        model.observe_round_trip("s", 4, true_duration(4) + 0.1)
    model.observe_round_trip("s", 4, true_duration(4) + 3.0)
    assert model.traversal("s", 4) == pytest.approx(true_duration(4) + 0.1, rel=1e-3)


class _CapturingForward(Forward):
    """An eager forward that says it captured a graph on its first call per batch shape, as graph mode does."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self._seen: set[tuple] = set()

    def __call__(self, x, items, grid, *args, **kw):
        key = (tuple(x.shape), grid)
        if key not in self._seen:
            self._seen.add(key)
            self.warmups += 1
        return super().__call__(x, items, grid, *args, **kw)


def test_a_warm_up_micro_step_does_not_price_the_next_ones():
    """A micro-step whose forward captured a graph reports ``warmup`` and teaches the latency model nothing; the
    steps after it (replays) do. Negative control: measured as ordinary steps, the captures' 300 s price a
    chunk due in 50 s with two trips left infeasible."""
    zs = latents(5, 4, (4, 6))
    ring = workers(2)
    first = ring[0]
    first.forward = _CapturingForward(first.model)
    first.add_prompt("a", 0, prompt(3))
    for c in range(4):
        first.add_chunk(chunk_message("a", c, zs[c], seed=3))
    outputs: list[tuple[MicroStep, bool]] = []
    compute = first.compute

    def spy(step):
        out = compute(step)
        outputs.append((step, out.warmup))
        return out

    first.compute = spy
    assert [g.seq for g in run_ring(ring)] == [0, 1, 2, 3]
    assert [w for _, w in outputs][:1] == [True] and not all(w for _, w in outputs)
    sig = (1, 4, 6)  # the grid of every micro-step here
    for step, warmup in outputs:  # what ComputeLoop reports after each forward: a capture took 300 s
        first.measured(step, 300.0 if warmup else 0.01 * len(step.items), warmup)
    assert first.latency.duration(sig, 1) == pytest.approx(0.01)
    control = LatencyModel(ring_scale=first.latency.ring_scale)
    for step, warmup in outputs:
        control.observe(sig, len(step.items), 300.0 if warmup else 0.01 * len(step.items))
    now = time.time()
    assert select("slo", [Candidate(sig, now + 50, 2)], control, now, MAX_ITEMS).infeasible == [0]
    assert select("slo", [Candidate(sig, now + 50, 2)], first.latency, now, MAX_ITEMS).infeasible == []


def test_a_prepare_chunk_runs_however_late():
    """The first stage's model says a micro-step takes 30 s: a new stream's prepare chunk due in 50 s with two
    trips left still runs (without it every later chunk of its segment would be refused until a new segment); the
    same stream's next chunk, as late, is dropped as infeasible."""
    zs = latents(5, 4, (4, 6))
    ring = _priced_at_30_s("slo", zs, 2)
    first = ring[0]
    first.add_prompt("b", 0, prompt(4))
    now = time.time()
    first.add_chunk(chunk_message("b", 0, zs[2], seed=4, deadline=now + 50))
    first.add_chunk(chunk_message("b", 1, zs[3], seed=4, deadline=now + 50))
    got = [(g.stream_id, g.seq) for g in run_ring(ring)]
    assert got == [("b", 0)] and first.dropped["deadline_infeasible"] == 1
