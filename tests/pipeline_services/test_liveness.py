"""The liveness rules of one stream (``ingest/liveness.py``), with time passed in: when a stream is live,
recovering, failed or degraded, and when ingest repairs it (a new warm-up segment)."""

from __future__ import annotations

import itertools
import re

from ingest.liveness import LivenessPolicy, StreamLiveness, stall_bound_s

STALL = 4.0


def _stream(**kw) -> StreamLiveness:
    return StreamLiveness(LivenessPolicy(stall_s=STALL, max_repairs=2, failed_retry_s=20.0, **kw), started_at=0.0)


def _run(s: StreamLiveness, t0: float, t1: float, *, out: bool, period: float = 0.25, lag: float = 1.0,
         seq0: int = 0) -> list:
    """Publish a chunk every ``period`` from t0 to t1; with ``out``, each comes out ``lag`` later. Returns every
    health check (one per chunk)."""
    checks = []
    t, seq, decoded = t0, seq0, seq0
    pending: list[tuple[float, int]] = []
    while t < t1:
        s.published(t)
        if out:
            pending.append((t + lag, seq))
        while pending and pending[0][0] <= t:
            at, done = pending.pop(0)
            decoded += 1
            s.output(done, decoded, at)
        checks.append((t, s.check(t)))
        t += period
        seq += 1
    return checks


def test_a_flowing_stream_is_live_and_never_repaired() -> None:
    s = _stream()
    checks = _run(s, 0.0, 60.0, out=True)
    assert all(h.state == "live" and not h.repair for _, h in checks)


def test_a_stream_whose_output_stops_is_repaired_within_the_bound_then_reported_failed() -> None:
    s = _stream()
    _run(s, 0.0, 10.0, out=True)
    checks = _run(s, 10.0, 120.0, out=False, seq0=40)
    repairs = [t for t, h in checks if h.repair]
    assert repairs and repairs[0] <= 10.0 + STALL + 0.5  # the first chunk without output + the bound
    first = next(h for _, h in checks if h.repair)
    assert first.state == "recovering" and "styled output stopped" in first.reason
    # max_repairs repairs a bound apart, then failed (with the reason), retried every failed_retry_s
    assert [round(b - a) for a, b in itertools.pairwise(repairs)][:2] == [round(STALL), round(STALL)]
    failed = [(t, h) for t, h in checks if h.state == "failed"]
    assert failed and "after 2 repairs" in failed[0][1].reason
    later = [t for t, h in checks if h.repair and t > failed[0][0]]
    assert later and all(b - a >= 20.0 - 0.3 for a, b in zip([failed[0][0], *later], later, strict=False))
    # never "live" while nothing comes out
    assert not any(h.state == "live" for t, h in checks if t > 10.0 + STALL + 0.5)


def test_output_coming_back_makes_a_failed_stream_live_again() -> None:
    s = _stream()
    _run(s, 0.0, 5.0, out=True)
    _run(s, 5.0, 60.0, out=False, seq0=20)
    assert s.state == "failed"
    checks = _run(s, 60.0, 70.0, out=True, seq0=300)
    assert checks[-1][1].state == "live" and s.repairs == 0


def test_no_input_is_not_a_stall() -> None:
    s = _stream()
    _run(s, 0.0, 5.0, out=True)
    for t in range(6, 100):  # the publisher paused: nothing published, nothing expected
        assert not s.check(float(t)).repair
    assert s.state == "live"


def test_a_stream_that_never_produces_output_is_repaired_from_its_first_chunk() -> None:
    s = _stream()
    checks = _run(s, 0.0, 12.0, out=False)
    first = next(t for t, h in checks if h.repair)
    assert STALL < first <= STALL + 0.5
    assert "no styled output yet" in next(h for _, h in checks if h.repair).reason
    assert checks[0][1].state == "live"  # warming up is not a failure


def test_a_stream_losing_most_chunks_downstream_is_degraded_not_live() -> None:
    s = _stream()
    t, decoded = 0.0, 0
    states = []
    for seq in range(400):  # 4 chunks/s published, one in three comes out
        s.published(t)
        if seq % 3 == 0:
            decoded += 1
            s.output(seq, decoded, t + 0.5)
        states.append(s.check(t + 0.5))
        t += 0.25
    assert states[-1].state == "degraded"
    assert 30 <= int(re.search(r"only (\d+)%", states[-1].reason)[1]) <= 40  # ≈ 1/3
    assert not any(h.repair for h in states)


def test_a_restarted_decoder_count_is_not_a_drop() -> None:
    s = _stream()
    _run(s, 0.0, 30.0, out=True)
    s.output(200, 1, 30.1)  # a new decoder counts from 1
    checks = _run(s, 30.25, 50.0, out=True, seq0=200)
    assert checks[-1][1].state == "live"


def test_the_bound_covers_the_latency_budget_and_a_replay() -> None:
    assert stall_bound_s(1.0, 0.25, 6.0) == 6.0
    assert stall_bound_s(5.0, 0.25, 6.0) == 6.0
    assert stall_bound_s(10.0, 0.5, 6.0) == 12.0


def test_a_stage_without_state_for_the_stream_gets_one_repair_per_half_bound() -> None:
    """The first stage asks for a new segment every 2 s while it refuses the stream's chunks: one repair answers
    the requests until its prepare chunk can have arrived."""
    s = _stream()
    _run(s, 0.0, 5.0, out=True)
    first = s.stage_lost(5.0)
    assert first is not None and first.repair and first.state == "recovering" and "prepare chunk" in first.reason
    assert s.stage_lost(6.0) is None and s.stage_lost(5.0 + STALL / 2 - 0.1) is None
    assert s.stage_lost(5.0 + STALL / 2 + 0.1) is not None
    checks = _run(s, 8.0, 12.0, out=True, seq0=40)  # the new segment comes out: live again
    assert checks[-1][1].state == "live"


def test_a_repair_decided_elsewhere_is_recovering_until_its_output_then_live() -> None:
    """A live stream moved to another ring: recovering until the new segment's output answers the move, then live
    again. The state machine knows it (not only the record): ingest writes a state when the machine's changes, so a
    move the machine did not see left a live stream's record at recovering for good (tests/stack/test_rings.py)."""
    s = _stream()
    _run(s, 0.0, 5.0, out=True)
    assert s.check(5.0).state == "live"
    moved = s.repaired(5.0, "moved from ring 1 to ring 0")
    assert moved.repair and moved.state == "recovering" and s.state == "recovering"
    assert s.check(5.5).state == "recovering" and not s.check(5.5).repair
    checks = _run(s, 5.5, 9.0, out=True, seq0=40)
    assert checks[0][1].state == "recovering" and checks[-1][1].state == "live"
