"""The cost model, the rebalance policy's hysteresis, admission arithmetic and the leader-election rule."""

from __future__ import annotations

import datetime as dt

import pytest

from proto import SLO, StageStats, StreamSpec
from services.controller.costmodel import CostModel
from services.controller.leader import KubernetesLease, Observation, decide
from services.controller.partition import PartitionProblem, Stage, best_split
from services.controller.policy import (
    PathCosts,
    RebalancePolicy,
    StreamNeed,
    decide_admission,
    stream_items_per_s,
    stream_need,
)


def _stats(sid: str, epoch: int, rng: tuple[int, int], ms: list[float], *, steps: int = 5, items: float = 2.0,
           extra: float = 0.0) -> StageStats:
    return StageStats(stage_id=sid, epoch=epoch, block_start=rng[0], block_end=rng[1], window_s=1.0,
                      micro_steps=steps, block_ms=ms, extra_ms=extra, batch_items=items)


def _observe(model: CostModel, stats: StageStats, epoch: int, now: float, **kw: bool) -> bool:
    """A stage's first window of an epoch is always ignored (it may straddle the change): report twice."""
    model.observe(stats, epoch, now, **kw)
    return model.observe(stats, epoch, now, **kw)


def test_cost_model_separates_a_slow_stage_from_costly_blocks() -> None:
    model = CostModel(6)
    intrinsic = [1.0, 1.0, 3.0, 1.0, 1.0, 1.0]
    speed = {"a": 1.0, "b": 2.0}
    # epoch 1: a owns 0-2, b owns 3-5 (b is twice as slow)
    for sid, rng in (("a", (0, 3)), ("b", (3, 6))):
        assert _observe(model, _stats(sid, 1, rng, [intrinsic[i] * speed[sid] for i in range(*rng)]), 1, 0.0,
                             first=sid == "a", last=sid == "b")
    est = model.estimate(1)
    assert est is not None
    assert est.speed["b"] / est.speed["a"] > 1.2  # one epoch: the geometric means decide (the equal-blocks prior)
    # epoch 2: block 2 moved to b: now the data says which part is speed and which is cost
    for sid, rng in (("a", (0, 2)), ("b", (2, 6))):
        _observe(model, _stats(sid, 2, rng, [intrinsic[i] * speed[sid] for i in range(*rng)]), 2, 1.0,
                      first=sid == "a", last=sid == "b")
    est = model.estimate(2)
    assert est.speed["b"] / est.speed["a"] == pytest.approx(2.0, rel=0.05)
    ratio = [c / est.block_ms[0] for c in est.block_ms]
    assert ratio == pytest.approx(intrinsic, rel=0.1)


def test_cost_model_ignores_idle_stale_and_inconsistent_windows() -> None:
    model = CostModel(4)
    assert not model.observe(_stats("a", 1, (0, 2), [9.0, 9.0]), 1, 0.0, first=True, last=False)  # straddles
    assert not model.observe(_stats("a", 1, (0, 2), [1.0, 1.0], steps=0), 1, 0.0, first=True, last=False)
    assert not model.observe(_stats("a", 0, (0, 2), [1.0, 1.0]), 1, 0.0, first=True, last=False)
    assert not model.observe(_stats("a", 1, (0, 2), [1.0]), 1, 0.0, first=True, last=False)
    assert not model.observe(_stats("a", 1, (0, 2), [1.0, float("nan")]), 1, 0.0, first=True, last=False)
    assert not model.observe(_stats("a", 1, (3, 5), [1.0, 1.0]), 1, 0.0, first=True, last=False)
    assert not model.observe(_stats("a", 0, (0, 2), [1.0, 1.0]), 0, 0.0, first=True, last=False)  # relabelled
    model.observe(_stats("a", 1, (0, 2), [1.0, 1.0], steps=0), 1, 0.0, first=True, last=False)
    assert model.ignored == 8 and model.estimate(1) is None
    assert model.observe(_stats("a", 1, (0, 2), [1.0, 1.0], extra=4.0), 1, 0.0, first=True, last=False)
    assert not model.fresh(["a", "b"], 1, 0.5, 2.0) and model.fresh(["a"], 1, 0.5, 2.0)
    assert not model.fresh(["a"], 1, 5.0, 2.0)
    assert model.estimate(1).first_extra_ms == pytest.approx(4.0)


def test_estimates_drive_the_partitioner_to_the_optimum() -> None:
    model = CostModel(12)
    for i, (sid, slow) in enumerate((("dit-0", 1.0), ("dit-1", 2.0), ("dit-2", 1.0))):
        _observe(model, _stats(sid, 1, (4 * i, 4 * i + 4), [10.0 * slow] * 4), 1, 0.0, first=i == 0, last=i == 2)
    est = model.estimate(1)
    problem = PartitionProblem(est.block_ms, [Stage(s, est.speed[s]) for s in ("dit-0", "dit-1", "dit-2")])
    assert best_split(problem).ranges == ((0, 5), (5, 7), (7, 12))


def test_rebalance_needs_a_sustained_gain_and_respects_the_cool_down() -> None:
    p = RebalancePolicy(gain_threshold=0.1, sustain_s=3.0, cooldown_s=10.0)
    assert p.decide(None, None, 0.0).verdict == "hold"
    assert p.decide(100.0, 95.0, 0.0).verdict == "hold"  # 5 % < 10 %
    assert p.decide(100.0, 70.0, 1.0).verdict == "pending"
    assert p.decide(100.0, 70.0, 3.0).verdict == "pending"
    assert p.decide(100.0, 95.0, 3.5).verdict == "hold"  # the gain dipped: the window starts again
    assert p.decide(100.0, 70.0, 4.0).verdict == "pending"
    v = p.decide(100.0, 70.0, 7.0)
    assert v.verdict == "act" and v.gain == pytest.approx(0.3)
    p.note_change(7.0)
    assert p.decide(100.0, 70.0, 8.0).verdict == "pending"
    assert p.decide(100.0, 70.0, 12.0).verdict == "cooldown"
    assert p.decide(100.0, 70.0, 17.5).verdict == "act"


def _spec(sid: str, fps: float = 16.0, steps: int = 2) -> StreamSpec:
    return StreamSpec(stream_id=sid, width=512, height=512, fps=fps, steps=steps, prompt="p",
                      slo=SLO(target_fps=fps))


def test_admission_holds_every_admitted_stream() -> None:
    assert stream_items_per_s(_spec("a")) == 8.0  # 16 fps / 4 frames per chunk · 2 steps
    # slowest stage 45 ms per item: 22.2 items/s, 90 % of it = 20: two 8-item/s streams fit, a third does not
    admitted: dict[str, StreamNeed] = {}
    for sid in ("a", "b"):
        d = decide_admission(_spec(sid), admitted, 45.0, headroom=0.9, prior_streams=0, bottleneck="dit-1")
        assert d.admit, d.reason
        admitted[sid] = stream_need(_spec(sid))
    d = decide_admission(_spec("c"), admitted, 45.0, headroom=0.9, prior_streams=0, bottleneck="dit-1")
    assert not d.admit and "no capacity" in d.reason and "dit-1" in d.reason
    assert decide_admission(_spec("a"), admitted, 45.0, headroom=0.9, prior_streams=0).admit  # a re-publish
    # no telemetry: the prior
    one = {"a": StreamNeed(8.0)}
    assert decide_admission(_spec("c"), one, None, headroom=0.9, prior_streams=2).admit
    d = decide_admission(_spec("c"), {**one, "b": StreamNeed(8.0)}, None, headroom=0.9, prior_streams=2)
    assert not d.admit and "admission_prior_streams" in d.reason


def test_admission_counts_the_vae_encode_and_decode() -> None:
    """512² at 16 fps is 4.19 megapixel-frames/s: at 100 ms each a VAE is 42 % busy per stream, so two streams fit
    under 90 % and a third does not; the reason names the bottleneck. Without measurements nothing is checked."""
    cheap_dit = 1.0  # the DiT is not the bottleneck here
    admitted = {sid: stream_need(_spec(sid)) for sid in ("a", "b")}
    costs = PathCosts(encode_ms_per_mpx=100.0, decode_ms_per_mpx=50.0)
    assert decide_admission(_spec("b"), {"a": admitted["a"]}, cheap_dit, headroom=0.9, prior_streams=0,
                            costs=costs).admit
    d = decide_admission(_spec("c"), admitted, cheap_dit, headroom=0.9, prior_streams=0, costs=costs)
    assert not d.admit and "VAE encode (ingest)" in d.reason and "126% busy" in d.reason
    d = decide_admission(_spec("c"), admitted, cheap_dit, headroom=0.9, prior_streams=0,
                         costs=PathCosts(decode_ms_per_mpx=100.0))
    assert not d.admit and "VAE decode (decoder)" in d.reason
    # text-to-video streams encode nothing
    t2v = _spec("c").model_copy(update={"t2v": True})
    assert decide_admission(t2v, admitted, cheap_dit, headroom=0.9, prior_streams=0,
                            costs=PathCosts(encode_ms_per_mpx=100.0)).admit
    assert decide_admission(_spec("c"), admitted, cheap_dit, headroom=0.9, prior_streams=0).admit  # unmeasured


def test_admission_refuses_a_stream_whose_chunks_cannot_meet_its_latency_slo() -> None:
    """The CPU stack with the API defaults: a 512² chunk takes seconds to encode, so against a 1 s SLO every chunk
    would be dropped for its deadline and the stream would show nothing. Refused, with the breakdown."""
    spec = _spec("a").model_copy(update={"slo": SLO(target_fps=16.0, max_latency_ms=1000)})
    costs = PathCosts(encode_ms_per_mpx=2300.0, decode_ms_per_mpx=1500.0, ring_ms=40.0)
    d = decide_admission(spec, {}, 1.0, headroom=0.9, prior_streams=4, costs=costs)
    assert not d.admit and "latency SLO" in d.reason and "encode 2412" in d.reason and "DiT 80" in d.reason
    relaxed = spec.model_copy(update={"slo": SLO(target_fps=16.0, max_latency_ms=20000)})
    assert "latency" not in decide_admission(relaxed, {}, 1.0, headroom=0.9, prior_streams=4, costs=costs).reason
    assert PathCosts().chunk_latency_ms(spec) is None


def test_leader_rule() -> None:
    assert decide(None, None, "me", None, 0.0, 5.0) == ("acquire", None)
    assert decide("me", "7", "me", None, 0.0, 5.0)[0] == "renew"
    action, seen = decide("other", "7", "me", None, 1.0, 5.0)
    assert action == "wait" and seen == Observation("7", 1.0)
    assert decide("other", "7", "me", seen, 5.9, 5.0)[0] == "wait"
    assert decide("other", "7", "me", seen, 6.0, 5.0)[0] == "takeover"
    action, seen2 = decide("other", "8", "me", seen, 6.0, 5.0)  # renewed meanwhile: the clock starts again
    assert action == "wait" and seen2 == Observation("8", 6.0)


def test_kubernetes_lease_bodies() -> None:
    """The Lease objects a candidate writes (no cluster here: the client's models only)."""
    from kubernetes import client

    lease = KubernetesLease("rheo-controller", "ctl-a", 5.0, namespace="rheo")
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    first = lease.lease_body(now=t0)
    assert first.metadata.name == "rheo-controller" and first.metadata.namespace == "rheo"
    assert first.spec.holder_identity == "ctl-a" and first.spec.lease_duration_seconds == 5
    assert first.spec.acquire_time == t0 and first.spec.lease_transitions == 0
    first.metadata.resource_version = "41"
    t1 = t0 + dt.timedelta(seconds=2)
    renewed = lease.lease_body(first, now=t1)
    assert renewed.spec.acquire_time == t0 and renewed.spec.renew_time == t1 and renewed.spec.lease_transitions == 0
    assert renewed.metadata.resource_version == "41"  # replace is compare-and-set on it
    other = KubernetesLease("rheo-controller", "ctl-b", 5.0, namespace="rheo")
    taken = other.lease_body(renewed, now=t1)
    assert taken.spec.holder_identity == "ctl-b" and taken.spec.acquire_time == t1
    assert taken.spec.lease_transitions == 1
    assert isinstance(taken, client.V1Lease)


def test_the_controller_builds_memory_limits_from_stage_stats() -> None:
    """Free memory + what a stage holds now bounds its blocks; weights and KV per block come from the config and
    the stats (a CPU stage reports 0 free bytes: unknown, unlimited)."""
    from proto import BlockMap
    from services.config import Settings
    from services.controller.partition import block_weight_bytes, even_split
    from services.controller.service import ControllerService
    from wan.config import WanDiTConfig

    svc = ControllerService(Settings(controller={"stages": 2, "num_blocks": 30}, model={"preset": "1.3b"}))
    svc.block_map = BlockMap(epoch=3, num_blocks=30, stages=even_split(30, ["dit-0", "dit-1"]))
    weights = block_weight_bytes(WanDiTConfig.t2v_1_3b(), 2)
    assert 80e6 < weights < 100e6  # 1.3B: ~46 M parameters per block in bf16
    free_b = 2**28
    for sid, (a, b), free in (("dit-0", (0, 15), 0), ("dit-1", (15, 30), free_b)):
        st = StageStats(stage_id=sid, epoch=3, block_start=a, block_end=b, window_s=1.0, micro_steps=4,
                        block_ms=[10.0 * (2.0 if sid == "dit-0" else 1.0)] * 15, kv_bytes={"s": 15 * 2**20},
                        free_memory_bytes=free)
        _observe(svc.cost, st, 3, 0.0, first=sid == "dit-0", last=sid == "dit-1")
    problem = svc._problem(["dit-0", "dit-1"])
    per_block = weights + 2**20
    assert problem.bytes_per_block == pytest.approx(per_block)
    assert problem.stages[0].memory_bytes == float("inf")
    assert problem.stages[1].memory_bytes == pytest.approx((free_b + 15 * per_block) * 0.9)
    split = best_split(problem)
    # dit-0 is twice as slow and would hand blocks to dit-1, but dit-1 can hold no more than its memory allows
    unconstrained = best_split(PartitionProblem(problem.block_ms, [Stage(s.stage_id, s.speed) for s in problem.stages]))
    assert unconstrained.ranges[1][1] - unconstrained.ranges[1][0] == 20
    held = split.ranges[1][1] - split.ranges[1][0]
    assert held == int(problem.stages[1].memory_bytes // per_block) < 20
