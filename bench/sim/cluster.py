"""The discrete-event cluster: streams → ingest GPUs (VAE encode) → rings (one GPU each, the DiT) → decoder GPUs.

Simulated time only (a heapq of events). The decisions are rheo's own code, called as the controller and the first
stage call them: ``dit_stage.batcher.select`` and ``LatencyModel`` (fitted online from the simulated micro-steps),
``policy.decide_admission``, ``placement.place``/``moves``, ``scaling.pool_demand`` and ``autoscale.PoolScaler``.
What is simulated: the GPUs' costs (``Calibration``), FIFO VAE servers, replicas starting after ``provision_s``.
Every chunk ends counted: ``ok``, ``late`` or dropped (``deadline_infeasible``); every refusal is counted.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench.sim.calibration import CHUNK_FRAMES, Calibration, Sig
from bench.sim.traces import Arrival
from dit_stage.batcher import BatcherPolicy, Candidate, LatencyModel, select
from proto import SLO, Assignment, StreamSpec
from services.controller.autoscale import POOLS, PoolScaler, PoolSignals, ScaleLimits
from services.controller.placement import Bin, Pool, moves, place
from services.controller.policy import (
    PathCosts,
    StreamNeed,
    decide_admission,
    ring_capacity,
    ring_item_ms,
    stream_need,
)
from services.controller.scaling import Demand, pool_demand, ring_work

__all__ = ["POLICIES", "Policy", "SimConfig", "Simulation"]


@dataclass(frozen=True)
class Policy:
    name: str
    batcher: BatcherPolicy = "slo"
    admission: bool = True
    one_per_gpu: bool = False
    max_items: int = 16


POLICIES = {p.name: p for p in (
    Policy("edf_knee"),  # rheo: the SLO batcher, admission + placement, the autoscaler
    Policy("static_batch", batcher="greedy"),  # fixed cap of 16, oldest first, no SLO (rheo before the batcher)
    Policy("no_admission", admission=False),  # every stream admitted (placement forced), autoscaler bounded
    Policy("one_per_gpu", one_per_gpu=True),  # the official code: one GPU per stream, always available
)}


@dataclass(frozen=True)
class SimConfig:
    headroom: float = 0.9  # controller.admission_headroom
    prior_streams: int = 4  # controller.admission_prior_streams
    interval_s: float = 5.0  # autoscale interval (the day is compressed: see the scenario)
    provision_s: float = 20.0  # a new replica serves this long after the decision
    limits: dict[str, ScaleLimits] = field(default_factory=lambda: {
        pool: ScaleLimits(1, 64, up_cooldown_s=10.0, down_cooldown_s=60.0) for pool in POOLS})
    noise: float = 0.03  # lognormal sigma of a micro-step's duration around the calibrated mean
    retry_s: float = 10.0  # a refused streamer retries this often …
    give_up_s: float = 60.0  # … for this long
    window_s: float = 30.0  # timeline resolution


@dataclass
class _Stream:
    sid: str
    spec: StreamSpec
    need: StreamNeed
    sig: Sig
    start: float
    end: float
    first_done: float | None = None


@dataclass
class _Chunk:
    stream: _Stream
    seq: int
    captured: float
    deadline: float
    left: int  # ring traversals still needed


class _Server:
    """A VAE GPU (ingest or decoder): FIFO, one chunk at a time."""

    def __init__(self, member: str, ready_at: float) -> None:
        self.member, self.ready_at, self.free_at, self.gone = member, ready_at, ready_at, False


class _Ring:
    def __init__(self, member: str, ready_at: float) -> None:
        self.member, self.ready_at, self.gone = member, ready_at, False
        self.model = LatencyModel()
        self.queue: list[_Chunk] = []
        self.busy = False
        self.recent: list[tuple[int, float]] = []  # (items, seconds) of the last micro-steps

    def item_ms(self) -> float | None:
        """Measured ms per item (busy time / items), as a stage's stats report it."""
        items = sum(n for n, _ in self.recent)
        return 1000.0 * sum(s for _, s in self.recent) / items if items else None

    def step_ms(self) -> float | None:
        return 1000.0 * sum(s for _, s in self.recent) / len(self.recent) if self.recent else None

    def fits_ms(self) -> list[tuple[float, float, int]]:
        """Its fitted micro-step times (a ms, b ms, items) per grid, as a stage's StageStats report them."""
        return [(1000.0 * a, 1000.0 * b, k) for _, a, b, k in self.model.fits()]

    def price(self, needs: list[StreamNeed], max_items: int) -> float | None:
        """Its ms per item for these streams, as the controller prices a ring (``ring_item_ms``, else measured)."""
        fitted = ring_item_ms([self.fits_ms()], needs, max_items)
        return self.item_ms() if fitted is None else fitted


class Simulation:
    def __init__(self, policy: Policy, cal: Calibration, arrivals: list[Arrival], horizon_s: float, seed: int,
                 cfg: SimConfig | None = None) -> None:
        self.policy, self.cal, self.horizon, self.cfg = policy, cal, horizon_s, cfg or SimConfig()
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = itertools.count()
        self.rings: dict[str, _Ring] = {}
        self.decoders: dict[str, _Server] = {}
        self.ingests: dict[str, _Server] = {}
        self.names = itertools.count()
        self.streams: dict[str, _Stream] = {}
        self.assignments: dict[str, Assignment] = {}
        self.scalers = {pool: PoolScaler(pool, self.cfg.limits[pool]) for pool in POOLS}
        self.refused_recent: dict[str, tuple[float, StreamNeed]] = {}
        self.counts = {"chunks": 0, "ok": 0, "late": 0, "deadline_infeasible": 0, "admitted": 0, "refused": 0,
                       "refusals": 0, "moves": 0, "scale_ups": 0, "scale_downs": 0}
        self.ttff: list[float] = []
        self.items = self.late_items = 0
        self.gpu_seconds = 0.0
        self.pool_seconds = {pool: 0.0 for pool in POOLS}
        self.busy_seconds = {pool: 0.0 for pool in POOLS}  # GPU time spent computing
        self.timeline: list[dict[str, float]] = []
        self._win = {"ok": 0, "done": 0}
        self._last_t = 0.0
        for i, a in enumerate(arrivals):
            self._at(a.t, self._arrive, f"s{i}", a, a.t)
        if not policy.one_per_gpu:
            for pool in POOLS:  # the cluster starts at each pool's minimum
                for _ in range(self.cfg.limits[pool].min_replicas):
                    self._add(pool, ready_at=0.0)
            self._at(0.0, self._tick)
        self._at(0.0, self._sample)

    # ------------------------------------------------------------------ the event loop
    def _at(self, t: float, fn: Callable[..., None], *args: object) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self) -> Simulation:
        while self._events and self._events[0][0] <= self.horizon:
            t, _, fn, args = heapq.heappop(self._events)
            self._bill(t)
            fn(*args)
        self._bill(self.horizon)
        return self

    def _bill(self, t: float) -> None:
        """GPU-seconds up to ``t`` (a replica counts from the decision that started it: it is paid for)."""
        if not self.policy.one_per_gpu:
            for pool in POOLS:
                self.pool_seconds[pool] += len(self._members(pool)) * (t - self.now)
        self.gpu_seconds += self.gpus() * (t - self.now)
        self.now = t

    def gpus(self) -> int:
        if self.policy.one_per_gpu:
            return len(self.streams)
        return sum(1 for r in self.rings.values() if not r.gone) + sum(
            1 for d in (*self.decoders.values(), *self.ingests.values()) if not d.gone)

    # ------------------------------------------------------------------ streams
    def _arrive(self, sid: str, a: Arrival, first: float) -> None:
        spec = StreamSpec(stream_id=sid, width=a.width, height=a.height, fps=a.fps, steps=a.steps, prompt="sim",
                          slo=SLO(target_fps=a.fps, max_latency_ms=a.slo_ms))
        st = _Stream(sid, spec, stream_need(spec), (a.height, a.width), self.now, self.now + a.duration_s)
        if not self.policy.one_per_gpu:
            why = self._admit(st)
            if why is not None:
                self.counts["refusals"] += 1
                self.refused_recent[sid] = (self.now, st.need)
                if self.now + self.cfg.retry_s - first <= self.cfg.give_up_s:
                    self._at(self.now + self.cfg.retry_s, self._arrive, sid, a, first)
                else:
                    self.counts["refused"] += 1
                return
        else:
            self.decoders[sid] = _Server(sid, self.now)  # its own GPU: encode, DiT and decode in one place
        self.counts["admitted"] += 1
        self.streams[sid] = st
        self._at(self.now + self._interval(st), self._capture, st, 0)

    def _interval(self, st: _Stream) -> float:
        return CHUNK_FRAMES / st.spec.fps

    def _admit(self, st: _Stream) -> str | None:
        """None: admitted and placed; else the refusal reason (the controller's own two calls)."""
        pool = self._pool(st.need)
        needs = {sid: s.need for sid, s in self.streams.items()}
        placed = place(st.sid, st.need, pool, self.assignments, needs, force=not self.policy.admission)
        if isinstance(placed, str):
            return placed
        if self.policy.admission:
            # The controller has one ring, so one call checks the path and the ring. With many: the path (latency,
            # the ingest pool's encode) over every admitted stream, then the DiT over the chosen ring's streams.
            ring = self.rings[placed.ring_id]
            n_ingests = max(1, sum(1 for s in self.ingests.values() if not s.gone and s.ready_at <= self.now))
            costs = PathCosts(encode_ms_per_mpx=self.cal.encode_ms_per_mpx / n_ingests,  # a pool behind one queue
                              decode_ms_per_mpx=self.cal.decode_ms_per_mpx, ring_ms=ring.step_ms())
            path = decide_admission(st.spec, needs, None, headroom=self.cfg.headroom, prior_streams=len(needs) + 1,
                                    costs=costs, decoders_placed=True)
            on_ring = {sid: needs[sid] for sid, a in self.assignments.items() if a.ring_id == ring.member}
            dit = decide_admission(st.spec, on_ring, ring.price([*on_ring.values(), st.need], self.policy.max_items),
                                   headroom=self.cfg.headroom,
                                   prior_streams=self.cfg.prior_streams)
            for d in (path, dit):
                if not d.admit:
                    return d.reason
        self.assignments[st.sid] = placed
        return None

    def _pool(self, newcomer: StreamNeed | None = None) -> Pool:
        """The live members, each ring priced at its streams and ``newcomer`` as the controller prices them."""
        live, on, _ = self._on_rings()
        decs = [d for d in self.decoders.values() if not d.gone and d.ready_at <= self.now]

        def capacity(r: _Ring, streams: list[StreamNeed]) -> float:
            return ring_capacity(r.price(streams, self.policy.max_items), self.cfg.headroom)

        return Pool(rings=[Bin(r.member, capacity(r, on[r.member] + [newcomer]), capacity(r, on[r.member]))
                           if newcomer is not None else Bin(r.member, capacity(r, on[r.member])) for r in live],
                    decoders=[Bin(d.member, self.cfg.headroom * 1000.0 / self.cal.decode_ms_per_mpx) for d in decs])

    def _on_rings(self) -> tuple[list[_Ring], dict[str, list[StreamNeed]], list[StreamNeed]]:
        """The live rings, each one's streams, and the streams on no live ring (the controller's ``_placed_rings``)."""
        live = [r for r in self.rings.values() if not r.gone and r.ready_at <= self.now]
        on: dict[str, list[StreamNeed]] = {r.member: [] for r in live}
        rest: list[StreamNeed] = []
        for sid, st in self.streams.items():
            a = self.assignments.get(sid)
            (on[a.ring_id] if a is not None and a.ring_id in on else rest).append(st.need)
        return live, on, rest

    def _capture(self, st: _Stream, seq: int) -> None:
        if self.now >= st.end:
            self.streams.pop(st.sid, None)
            self.assignments.pop(st.sid, None)
            return
        self._at(self.now + self._interval(st), self._capture, st, seq + 1)
        ch = _Chunk(st, seq, self.now, self.now + st.spec.slo.max_latency_ms / 1000.0, st.spec.steps)
        self.counts["chunks"] += 1
        mpx = st.need.decode_mpx_per_s / st.spec.fps * CHUNK_FRAMES
        if self.policy.one_per_gpu:
            gpu = self.decoders[st.sid]
            fwd = self.cal.dit_s(st.sig, st.spec.steps)  # one forward of the stream batch (B = steps)
            cost = (self.cal.encode_ms_per_mpx + self.cal.decode_ms_per_mpx) * mpx / 1000.0 + fwd
            gpu.free_at = max(self.now, gpu.free_at) + cost
            self._at(gpu.free_at + (st.spec.steps - 1) * fwd, self._done, ch)  # a chunk spends `steps` forwards
            return
        ing = min((s for s in self.ingests.values() if not s.gone and s.ready_at <= self.now),
                  key=lambda s: s.free_at)
        cost = self.cal.encode_ms_per_mpx * mpx / 1000.0
        ing.free_at = max(self.now, ing.free_at) + cost
        self.busy_seconds["ingests"] += cost
        self._at(ing.free_at, self._to_ring, ch)

    def _decode_s(self, ch: _Chunk) -> float:
        return self.cal.decode_ms_per_mpx * ch.stream.need.decode_mpx_per_s / ch.stream.spec.fps * CHUNK_FRAMES / 1e3

    def _to_ring(self, ch: _Chunk) -> None:
        a = self.assignments.get(ch.stream.sid)
        ring = self.rings.get(a.ring_id) if a is not None else None
        if ring is None or ring.gone:
            ring = next(r for r in self.rings.values() if not r.gone)
        ring.queue.append(ch)
        self._run_ring(ring)

    def _run_ring(self, ring: _Ring) -> None:
        while not ring.busy and ring.queue:
            cands = [Candidate(ch.stream.sig, ch.deadline - self._decode_s(ch), ch.left,
                               (ch.captured, ch.seq, ch.left)) for ch in ring.queue]
            sel = select(self.policy.batcher, cands, ring.model, self.now, self.policy.max_items)
            for _i in sel.infeasible:
                self.counts["deadline_infeasible"] += 1
                self.late_items += 1
                self._window(False)
            take = [ring.queue[i] for i in sel.take]
            drop = set(sel.infeasible) | set(sel.take)
            ring.queue = [ch for i, ch in enumerate(ring.queue) if i not in drop]
            if not take:
                continue
            sig = take[0].stream.sig
            dur = self.cal.dit_s(sig, len(take)) * float(self.rng.lognormal(0.0, self.cfg.noise))
            ring.busy = True
            self.busy_seconds["rings"] += dur
            self._at(self.now + dur, self._ring_done, ring, take, sig, dur)

    def _ring_done(self, ring: _Ring, take: list[_Chunk], sig: Sig, dur: float) -> None:
        ring.busy = False
        ring.model.observe(sig, len(take), dur)
        ring.recent = [*ring.recent[-63:], (len(take), dur)]
        self.items += len(take)
        for ch in take:
            ch.left -= 1
            if ch.left > 0:
                ring.queue.append(ch)
                continue
            a = self.assignments.get(ch.stream.sid)
            dec = self.decoders.get(a.decoder) if a is not None else None
            if dec is None or dec.gone:
                dec = next(d for d in self.decoders.values() if not d.gone)
            dec.free_at = max(self.now, dec.free_at) + self._decode_s(ch)
            self.busy_seconds["decoders"] += self._decode_s(ch)
            self._at(dec.free_at, self._done, ch)
        if ring.gone and not ring.queue:
            return
        self._run_ring(ring)

    def _done(self, ch: _Chunk) -> None:
        ok = self.now <= ch.deadline + 1e-9
        self.counts["ok" if ok else "late"] += 1
        self._window(ok)
        st = ch.stream
        if st.first_done is None:
            st.first_done = self.now
            self.ttff.append(self.now - st.start)

    def _window(self, ok: bool) -> None:
        self._win["done"] += 1
        self._win["ok"] += ok

    # ------------------------------------------------------------------ the autoscaler
    def _add(self, pool: str, ready_at: float) -> None:
        member = f"{pool[:-1]}-{next(self.names)}"
        if pool == "rings":
            self.rings[member] = _Ring(member, ready_at)
        else:
            (self.decoders if pool == "decoders" else self.ingests)[member] = _Server(member, ready_at)

    def _members(self, pool: str) -> list:
        return [m for m in {"rings": self.rings, "decoders": self.decoders, "ingests": self.ingests}[pool].values()
                if not m.gone]

    def _remove(self, pool: str) -> None:
        """Scale in by one: the member serving the fewest streams goes; placement moves its streams."""
        members = self._members(pool)
        kind = {"rings": "ring_id", "decoders": "decoder"}.get(pool)
        victim = min(members, key=lambda m: (sum(1 for a in self.assignments.values()
                                                 if kind and getattr(a, kind) == m.member), m.member))
        victim.gone = True
        if kind is not None:
            needs = {sid: s.need for sid, s in self.streams.items()}
            for mv in moves(self.assignments, needs, self._pool()):
                self.assignments[mv.stream_id] = mv.new
                self.counts["moves"] += 1

    def _tick(self) -> None:
        self._at(self.now + self.cfg.interval_s, self._tick)
        w = self.cfg.interval_s
        self.refused_recent = {k: v for k, v in self.refused_recent.items() if self.now - v[0] <= w}
        recent = [x for r in self.rings.values() if not r.gone for x in r.recent]
        items = sum(n for n, _ in recent)  # the pool's measured ms per item (one ring: the controller's item_ms)
        item_ms = 1000.0 * sum(s for _, s in recent) / items if items else None
        fits = [r.fits_ms() for r in self.rings.values() if not r.gone and r.fits_ms()]  # … or its fitted price
        fitted = ring_item_ms(fits, [s.need for s in self.streams.values()], self.policy.max_items)
        item_ms = item_ms if fitted is None else fitted
        live, on, rest = self._on_rings()
        placed = ring_work([*((on[r.member], r.price(on[r.member], self.policy.max_items)) for r in live),
                            (rest, item_ms)])
        demand = Demand(item_ms, PathCosts(self.cal.encode_ms_per_mpx, self.cal.decode_ms_per_mpx),
                        self.cfg.prior_streams, placed)
        per_pool = pool_demand(demand, [s.need for s in self.streams.values()],
                               [n for _, n in self.refused_recent.values()])
        done = self.items + self.late_items
        miss = self.late_items / done if done else None
        self.items = self.late_items = 0
        for pool, scaler in self.scalers.items():
            current = len(self._members(pool))
            d = scaler.decide(PoolSignals(current, *per_pool[pool], miss if pool == "rings" else None), self.now)
            for _ in range(max(0, d.change)):
                self._add(pool, self.now + self.cfg.provision_s)
            for _ in range(max(0, -d.change)):
                self._remove(pool)
            if d.change:
                self.counts["scale_ups" if d.change > 0 else "scale_downs"] += 1
                scaler.note_applied(d, self.now)

    def _sample(self) -> None:
        self._at(self.now + self.cfg.window_s, self._sample)
        done = self._win["done"]
        self.timeline.append({"t": round(self.now, 1), "gpus": self.gpus(), "streams": len(self.streams),
                              "attainment": round(self._win["ok"] / done, 4) if done else math.nan})
        self._win = {"ok": 0, "done": 0}
